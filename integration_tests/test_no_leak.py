"""The undefended probabilities appear in no response, error body, log line or metric of
the defended models, whatever the route.

Queries go through every route TorchServe 0.12 offers (HTTP predictions with and without
version, multipart, JSON base64 and tensor, KServe v1/v2, gRPC Predictions and
StreamPredictions, explanations, the describe header, management and gRPC describe,
version listing, error paths); the exact clean vectors come from the epsilon-0 twin
``fashion_clean`` (same victim). GRAD² leaves the classes it does not touch at their clean
value, so those values are public in the defended answers themselves; the secrets are the
clean values of every class the defense changed, which no defended answer reveals. Every
response body, every file under the server's log dir and the Prometheus ``/metrics`` text
are scanned for any decimal number printed with >= 6 significant digits that equals a
secret to its last printed digit (repr of the float64, float32 forms, rounded or cut).
The twin's own responses and its log lines (worker ``W-…-fashion_clean_…``, metric
dimensions ``fashion_clean``) are the only text left out; scanning the twin's answers must
find the secrets, which shows the scan works.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest
import requests
from conftest import EPSILON_V1, EPSILON_V2
from ts_client import CLASS_NAMES, TIMEOUT, b64, png, post, predict_raw, vector

from grad2.config import InputConfig
from grad2.serve import codec

pytestmark = pytest.mark.integration

IMAGES = [png(4000 + seed) for seed in range(10)]
SPEC = InputConfig.from_dict({"channels": 1, "height": 28, "width": 28})
TWIN = "fashion_clean"
#: Fewer significant digits than this say too little about a value to count as a leak.
MIN_DIGITS = 6
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def printed_numbers(text: str) -> Iterator[tuple[str, float, float]]:
    """``(token, value, unit of its last digit)`` for every decimal number in ``text``
    printed with at least :data:`MIN_DIGITS` significant digits."""
    for match in NUMBER.finditer(text):
        token = match.group()
        mantissa, _, exponent = token.lower().partition("e")
        if len(mantissa.lstrip("+-").replace(".", "").lstrip("0")) < MIN_DIGITS:
            continue
        scale = int(exponent or 0) - len(mantissa.partition(".")[2])
        # Hex identifiers in log lines (request ids) hold digit runs such as "123456e7890".
        # A last digit worth more than 1 cannot pin a probability, and 10 ** 7890 overflows.
        if not -340 < scale <= 0:
            continue
        yield token, float(token), 10.0**scale


def leaks(text: str, secrets: np.ndarray) -> list[str]:
    """Numbers in ``text`` that equal a secret (sorted float64) to their last digit,
    rounded or cut."""
    found = []
    for token, value, unit in printed_numbers(text):
        at = np.searchsorted(secrets, value - unit)
        if at < len(secrets) and secrets[at] <= value + unit:
            found.append(f"{token} (secret {secrets[at]!r})")
    return found


def test_printed_numbers_skips_digit_runs_of_identifiers() -> None:
    text = 'id 9f1234567e89012a3 p=0.1234567 n=1234567 "x": 1.234567e-05'
    assert [token for token, _, _ in printed_numbers(text)] == [
        "0.1234567", "1234567", "1.234567e-05"]
    assert [found.split()[0] for found in leaks(text, np.array([0.12345671]))] == ["0.1234567"]
    assert leaks("123456e-999999 1e999999", np.array([0.0])) == []


def twin_line(line: str) -> bool:
    return TWIN in line


def compile_protos(folder: Path, names: list[str]) -> None:
    """Python gRPC modules for TorchServe's own ``.proto`` files (inside its jar)."""
    import grpc_tools
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(jar) as bundle:
        for name in names:
            (folder / name).write_bytes(bundle.read(name))
    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}", f"-I{include}",
                    f"--python_out={folder}", f"--grpc_python_out={folder}", *names],
                   cwd=folder, check=True, capture_output=True)


@pytest.fixture(scope="module")
def grpc_management(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    folder = tmp_path_factory.mktemp("grpc_management")
    compile_protos(folder, ["management.proto"])
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return importlib.import_module("management_pb2"), importlib.import_module(
        "management_pb2_grpc")


def grpc_calls(stubs: tuple[ModuleType, ModuleType], target: str, token: str, model: str,
               image: bytes, version: str = "", stream: bool = False) -> list[bytes]:
    """The prediction bytes of one ``Predictions`` call, or of every message of one
    ``StreamPredictions`` call."""
    pb2, pb2_grpc = stubs
    request = pb2.PredictionsRequest(model_name=model, model_version=version,
                                     input={"data": image})
    metadata = [("authorization", f"Bearer {token}")]
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        if stream:
            return [reply.prediction for reply in
                    stub.StreamPredictions(request, metadata=metadata, timeout=TIMEOUT)]
        return [stub.Predictions(request, metadata=metadata, timeout=TIMEOUT).prediction]


def worker_pid(server, token: str, model: str, version: str) -> int:
    response = requests.get(f"{server.management_url}/models/{model}/{version}",
                            headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)
    response.raise_for_status()
    [worker] = response.json()[0]["workers"]
    assert worker["status"] == "READY"
    return int(worker["pid"])


def defended_vectors(route: str, text: str) -> list[np.ndarray]:
    """The probability vectors inside a 200 response of any protocol."""
    body = json.loads(text)
    if "predictions" in body:
        return [vector(answer) for answer in body["predictions"]]
    if "outputs" in body:
        return [vector(json.loads(item)) for item in body["outputs"][0]["data"]]
    return [vector(body)]


def test_no_route_leaks_the_undefended_probabilities(
    server, inference_token, management_token, grpc_stubs, grpc_management
) -> None:
    base, token = server.inference_url, inference_token
    twin = [predict_raw(base, f"/predictions/{TWIN}", token, image) for image in IMAGES]
    assert all(response.status_code == 200 for response in twin)
    clean = [vector(response.json()) for response in twin]
    encoded = [b64(image) for image in IMAGES]
    pixels = [codec.decode_image(image, SPEC) for image in IMAGES]
    octet = {"Content-Type": "application/octet-stream"}

    answered: list[tuple[str, int, str, list[int]]] = []  # route, status, text, images

    def keep(route: str, response: requests.Response, images: list[int]) -> None:
        answered.append((route, response.status_code, response.text, images))

    for i, image in enumerate(IMAGES):
        for path in ("/predictions/fashion", "/predictions/fashion/1.0",
                     "/predictions/fashion/2.0"):
            keep(path, predict_raw(base, path, token, image), [i])
        keep("multipart", post(f"{base}/predictions/fashion", token,
                               files={"data": ("x.png", image, "image/png")}), [i])
        keep("json base64 2.0", post(f"{base}/predictions/fashion/2.0", token,
                                     json_body={"image": encoded[i]}), [i])
        keep("json tensor", post(f"{base}/predictions/fashion", token,
                                 json_body={"tensor": pixels[i].tolist()}), [i])
        for name, (version, stream) in {"gRPC": ("", False), "gRPC 2.0": ("2.0", False),
                                        "gRPC stream": ("", True)}.items():
            for reply in grpc_calls(grpc_stubs, server.grpc_inference_target, token,
                                    "fashion", image, version, stream):
                answered.append((name, 200, reply.decode(), [i]))
    # TorchServe sets its own ``explain: False`` on /predictions: a defended answer.
    keep("explain header", post(f"{base}/predictions/fashion", token, data=IMAGES[0],
                                headers={**octet, "explain": "True"}), [0])
    every = list(range(len(IMAGES)))
    keep("KServe v1", post(f"{base}/v1/models/fashion:predict", token,
                           json_body={"instances": [{"data": e} for e in encoded]}), every)
    keep("KServe v2 BYTES", post(f"{base}/v2/models/fashion/infer", token, json_body={
        "inputs": [{"name": "x", "shape": [len(IMAGES)], "datatype": "BYTES",
                    "data": encoded}]}), every)
    stacked = np.stack([p.numpy() for p in pixels])
    keep("KServe v2 FP32", post(f"{base}/v2/models/fashion/infer", token, json_body={
        "inputs": [{"name": "x", "shape": list(stacked.shape), "datatype": "FP32",
                    "data": stacked.ravel().tolist()}]}), every)

    # Routes that must not answer with probabilities at all.
    refused: list[tuple[str, str]] = []
    for path in ("/explanations/fashion", "/explanations/fashion/2.0"):
        refused.append((path, predict_raw(base, path, token, IMAGES[0]).text))
    refused.append(("v1 explain", post(f"{base}/v1/models/fashion:explain", token,
                                       json_body={"instances": [{"data": encoded[0]}]}).text))
    refused.append(("v2 explain", post(f"{base}/v2/models/fashion/explain", token, json_body={
        "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": encoded[:1]}]}).text))
    refused.append(("describe header", post(f"{base}/predictions/fashion", token,
                                            data=IMAGES[0],
                                            headers={**octet, "describe": "True"}).text))
    for path, body in (("/predictions/fashion", b"garbage"), ("/predictions/fashion/2.0",
                                                              IMAGES[0][:80])):
        refused.append((f"bad input {path}", post(f"{base}{path}", token, data=body,
                                                  headers=octet).text))
    refused.append(("bad KServe v1", post(f"{base}/v1/models/fashion:predict", token, json_body={
        "instances": [{"data": encoded[0]}, {"data": "%%%"}]}).text))
    refused.append(("bad gRPC", grpc_calls(grpc_stubs, server.grpc_inference_target, token,
                                           "fashion", b"junk")[0].decode()))
    management = {"Authorization": f"Bearer {management_token}"}
    for path in ("/models", "/models/fashion/all", "/models/fashion?customized=true",
                 "/models/fashion/2.0?customized=true"):
        refused.append((f"management {path}", requests.get(
            f"{server.management_url}{path}", headers=management, timeout=TIMEOUT).text))
    for path in ("/v1/models/fashion", "/v2/models/fashion", "/v2/models/fashion/ready",
                 "/ping", "/metrics"):
        refused.append((f"GET {path}", requests.get(f"{base}{path}", timeout=TIMEOUT, headers={
            "Authorization": f"Bearer {token}"}).text))
    pb2, pb2_grpc = grpc_management
    with grpc.insecure_channel(f"{server.host}:{server.ports.grpc_management}") as channel:
        reply = pb2_grpc.ManagementAPIsServiceStub(channel).DescribeModel(
            pb2.DescribeModelRequest(model_name="fashion", customized=True),
            metadata=[("authorization", f"Bearer {management_token}")], timeout=TIMEOUT)
        refused.append(("gRPC describe", reply.msg))

    # Every answer is defended; the values it reveals are public from then on.
    revealed: set[float] = set()
    for route, status, text, images in answered:
        assert status == 200, (route, status, text[:200])
        vectors = defended_vectors(route, text)
        assert len(vectors) == len(images), route
        budget = EPSILON_V2 if "2.0" in route else EPSILON_V1
        for answer, i in zip(vectors, images):
            l1 = float(np.abs(answer - clean[i]).sum())
            assert 1e-6 < l1 <= budget + 1e-5, (route, i, l1)
            revealed.update(answer.tolist())
    for route, text in refused:
        for name in CLASS_NAMES:
            assert not re.search(rf'"{name}": *[01]', text), (route, text[:300])
    secrets = np.array(sorted({v for c in clean for v in c.tolist()} - revealed))
    assert len(secrets) >= 2 * len(IMAGES)

    # The scan finds the secrets where they are: in the twin's answers.
    for response in twin:
        assert leaks(response.text, secrets)
        assert leaks(json.dumps([np.float32(v).item() for v in response.json().values()]),
                     secrets)
        assert leaks(" ".join(f"{v:.6g}" for v in response.json().values()), secrets)

    for route, _, text, _ in answered:
        assert not leaks(text, secrets), route
    for route, text in refused:
        assert not leaks(text, secrets), route

    time.sleep(1.5)  # the frontend writes log and metric lines asynchronously
    logs = [path for path in server.log_dir.rglob("*") if path.is_file()]
    assert {"ts_log.log", "model_log.log", "access_log.log"} <= {path.name for path in logs}
    scanned = 0
    for path in logs:
        for number, line in enumerate(path.read_text(errors="replace").splitlines()):
            if not twin_line(line):
                scanned += 1
                assert not leaks(line, secrets), f"{path.name}:{number + 1}: {line[:300]}"
    assert scanned > 100
    metrics = requests.get(server.metrics_url, timeout=TIMEOUT).text
    assert "DefendedAnswers" in metrics
    for line in metrics.splitlines():
        if not twin_line(line):
            assert not leaks(line, secrets), line


def test_grpc_stream_predictions_answer_once_and_the_worker_survives(
    server, inference_token, management_token, grpc_stubs
) -> None:
    """TorchServe 0.12 killed the worker on every gRPC StreamPredictions call to a
    handler that does not stream (a NullPointerException in its frontend), so one call
    from any inference token took the model down; the handler now ends the stream."""
    pid = worker_pid(server, management_token, "fashion", "1.0")
    image = png(77)
    clean = vector(predict_raw(server.inference_url, f"/predictions/{TWIN}", inference_token,
                               image).json())
    for body in (image, b"junk", image):
        replies = grpc_calls(grpc_stubs, server.grpc_inference_target, inference_token,
                             "fashion", body, stream=True)
        assert len(replies) == 1
        answer = json.loads(replies[0])
        if body == image:
            assert 1e-6 < float(np.abs(vector(answer) - clean).sum()) <= EPSILON_V1 + 1e-5
        else:
            assert answer["code"] == 400
    assert worker_pid(server, management_token, "fashion", "1.0") == pid
    plain = grpc_calls(grpc_stubs, server.grpc_inference_target, inference_token, "fashion",
                       image)
    assert json.loads(plain[0]) == json.loads(replies[0])
