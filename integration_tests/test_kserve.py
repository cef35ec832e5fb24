"""The KServe predictor on real KServe model server processes gives the TorchServe
handler's answers bit for bit.

Every shipped example ``model-config.yaml`` (seeded files from ``tests/shipped_answers.py``)
is served by one ``python -m grad2.serve.kserve`` (free port, own ``TMPDIR``); its V1 and V2
answers must equal the TorchServe handler's for the same bodies (the handler class driven
by a fake context in a process of its own with ``MKL_CBWR=AUTO,STRICT``, as servers run).
``grad2`` and ``grad2_gated`` are served from their ``.mar`` by a real TorchServe as well,
and must answer alike there. Then, on the ``grad2`` server: a scan of every route
for the clean probabilities, statuses of refused requests, and 32 concurrent requests.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import stop_and_check_gone
from test_no_leak import leaks
from ts_client import TIMEOUT, b64, png

from grad2.config import InputConfig
from grad2.serve import Ports, build_archive, codec, start_server
from grad2.serve.kserve_server import KServeServer, start_kserve, stop_kserve

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from shipped_answers import served_config, shipped_configs, stage  # noqa: E402

pytestmark = pytest.mark.integration

ON_TORCHSERVE = ("grad2", "grad2_gated")
#: Configs whose answers draw fresh noise per call (seeded once at load): equal across
#: runtimes for the same sequence of calls, not a function of the query alone.
HISTORY_DEPENDENT = ("random",)


def dim_png(seed: int) -> bytes:
    """A nearly black PNG (out of distribution: the gated configs gate it)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 256, (28, 28)) * 0.05).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [png(7000 + seed) for seed in range(3)] + [dim_png(7100 + seed) for seed in range(3)]
V1_BODY = {"instances": [{"data": b64(image)} for image in IMAGES]}
V2_BODY = {"id": "q1", "inputs": [{"name": "image", "shape": [len(IMAGES)],
                                   "datatype": "BYTES", "data": [b64(i) for i in IMAGES]}]}


def v2_answers(body: dict[str, Any]) -> list[dict[str, Any]]:
    [output] = body["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [len(output["data"])]
    return [json.loads(item) for item in output["data"]]


def same(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> bool:
    """Equal answers: the same classes in the same order, every value equal bit for bit."""
    return [list(a.items()) for a in first] == [list(b.items()) for b in second]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def configs() -> dict[str, dict[str, Any]]:
    return {name: served_config(config) for name, config in shipped_configs().items()}


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, configs) -> dict[str, Path]:
    """Each config's files, unpacked as in an archive (model-config.yaml included)."""
    root = tmp_path_factory.mktemp("staged")
    folders = {}
    for name, config in configs.items():
        folder = root / name
        folder.mkdir()
        stage(folder, config["defense"])
        (folder / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, staged) -> Path:
    """``.mar`` archives of the configs served by TorchServe too."""
    store = tmp_path_factory.mktemp("kserve_store")
    for name in ON_TORCHSERVE:
        folder = staged[name]
        config = yaml.safe_load((folder / "model-config.yaml").read_text())
        files = {key: folder / file for key, file in config["defense"].items()
                 if key in ("target_file", "mapping_key", "gate_file")}
        build_archive(name=name, version="1.0", victim=folder / "victim.pt",
                      config=folder / "model-config.yaml", export_path=store,
                      surrogate=folder / "surrogate.pt", files=files)
    return store


REFERENCE = r"""
import json, sys
import torch, yaml
sys.path.insert(0, sys.argv[1])
from test_handler import FakeContext, load_handler_class
from grad2.serve import codec
folders, bodies = json.loads(open(sys.argv[2]).read()), json.loads(open(sys.argv[3]).read())
answers = {}
for name, folder in folders.items():
    config = yaml.safe_load(open(folder + "/model-config.yaml"))
    context = FakeContext(folder, config)
    context.model_name = name
    context.manifest["model"]["modelName"] = name
    context.system_properties["batch_size"] = config["batchSize"]
    handler = load_handler_class()()
    handler.initialize(context)
    replies = handler.handle([{"body": body} for body in bodies], context)
    pixels = codec.decode_request(bodies[0], "application/json", handler.served.input_config)
    clean = handler.inference(codec.normalise(pixels.pixels, handler.served.input_config))
    answers[name] = {"replies": [[context.status(i), reply] for i, reply in enumerate(replies)],
                     "clean": clean.double().tolist()}
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, staged, store
           ) -> Iterator[tuple[KServeServer, dict[str, Any]]]:
    """One KServe model server with every config (the ``.mar`` where there is one, else
    the unpacked files), READY, and the handler's replies to the V1 and V2 bodies (status
    and body, per config), computed meanwhile; the server is stopped and checked gone."""
    root = tmp_path_factory.mktemp("kserve")
    models = {name: store / f"{name}.mar" if name in ON_TORCHSERVE else folder
              for name, folder in staged.items()}
    (root / "folders.json").write_text(json.dumps({k: str(v) for k, v in staged.items()}))
    (root / "bodies.json").write_text(json.dumps([V1_BODY, V2_BODY]))
    server = start_kserve(models, workdir=root / "server", wait=False)
    try:
        reference = subprocess.run(
            [sys.executable, "-c", REFERENCE, str(TESTS), str(root / "folders.json"),
             str(root / "bodies.json")], capture_output=True, text=True, timeout=600,
            env={**os.environ, "MKL_CBWR": "AUTO,STRICT"}, check=False)
        assert reference.returncode == 0, reference.stderr[-3000:]
        replies = json.loads(reference.stdout.strip().splitlines()[-1])
        server.wait_ready(timeout=300)
        answers = {name: {"v1": tuple(entry["replies"][0]), "v2": tuple(entry["replies"][1]),
                          "clean": np.array(entry["clean"])}
                   for name, entry in replies.items()}
        for entry in answers.values():
            if entry["v1"][0] == 200:
                entry["answers"] = entry["v1"][1]["predictions"]
        yield server, answers
    finally:
        stop_and_check_gone(server, stop_kserve)


@pytest.fixture(scope="module")
def kserver(served) -> KServeServer:
    return served[0]


@pytest.fixture(scope="module")
def handler_answers(served) -> dict[str, dict[str, Any]]:
    return served[1]


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory, store) -> Iterator[Any]:
    started = start_server(store, [f"{name}={name}.mar" for name in ON_TORCHSERVE],
                           workdir=tmp_path_factory.mktemp("ts_kserve"), ports=Ports.free(),
                           timeout=300)
    try:
        yield started
    finally:
        stop_and_check_gone(started)


def post(server: Any, path: str, **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.inference_url}{path}", timeout=TIMEOUT, **kwargs)


# --------------------------------------------------------------------------- answers


def test_every_shipped_config_answers_as_the_handler(kserver, handler_answers) -> None:
    assert set(kserver.models) == set(handler_answers) and len(handler_answers) >= 12
    answered, server = 0, kserver
    for name in kserver.models:
        status, body = handler_answers[name]["v1"]
        v1 = post(server, f"/v1/models/{name}:predict", json=V1_BODY)
        assert v1.status_code == status, (name, v1.text[:300])
        if status != 200:  # a refusal: the same status and error body
            assert v1.json() == body, name
            assert post(server, f"/v2/models/{name}/infer", json=V2_BODY).json() == body
            continue
        answered += 1
        assert same(v1.json()["predictions"], body["predictions"]), name
        v2 = post(server, f"/v2/models/{name}/infer", json=V2_BODY)
        assert v2.status_code == 200, (name, v2.text[:300])
        assert v2.json()["id"] == "q1" and v2.json()["model_name"] == name
        assert same(v2_answers(v2.json()), v2_answers(handler_answers[name]["v2"][1])), name
        if name not in HISTORY_DEPENDENT:
            assert same(v2_answers(v2.json()), body["predictions"]), name
    assert answered == len(handler_answers)  # every shipped example answers


def test_torchserve_and_kserve_answer_alike(kserver, torchserve) -> None:
    token = torchserve.tokens().inference
    auth = {"Authorization": f"Bearer {token}"}
    for name in ON_TORCHSERVE:
        kserve_server = kserver
        for path, body, read in (
            (f"/v1/models/{name}:predict", V1_BODY, lambda r: r.json()["predictions"]),
            (f"/v2/models/{name}/infer", V2_BODY, lambda r: v2_answers(r.json())),
        ):
            on_ts = post(torchserve, path, json=body, headers=auth)
            on_kserve = post(kserve_server, path, json=body)
            assert on_ts.status_code == on_kserve.status_code == 200, (name, path)
            assert same(read(on_ts), read(on_kserve)), (name, path)
        for image in IMAGES:  # raw image bodies, one per request
            on_ts = post(torchserve, f"/predictions/{name}", data=image,
                         headers={**auth, "Content-Type": "application/octet-stream"})
            on_kserve = post(kserve_server, f"/v1/models/{name}:predict", data=image,
                             headers={"Content-Type": "image/png"})
            assert same([on_ts.json()], [on_kserve.json()]), name


def test_v2_float_tensor_answers_as_the_image(kserver, handler_answers) -> None:
    spec = InputConfig.from_dict({"channels": 1, "height": 28, "width": 28})
    pixels = torch.stack([codec.decode_image(image, spec) for image in IMAGES])
    body = {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32",
                        "data": pixels.flatten().tolist()}]}
    response = post(kserver, "/v2/models/grad2/infer", json=body)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["id"]  # KServe's v2 answer needs one: a new one is made
    assert same(v2_answers(response.json()), handler_answers["grad2"]["answers"])


def test_concurrent_requests_each_get_their_own_answer(kserver, handler_answers) -> None:
    server = kserver
    expected = handler_answers["grad2"]["answers"]
    order = [i % len(IMAGES) for i in range(32)]

    def ask(index: int) -> tuple[int, Any]:
        response = post(server, "/v1/models/grad2:predict", data=IMAGES[index],
                        headers={"Content-Type": "image/png"})
        return response.status_code, response.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, order))
    assert [status for status, _ in results] == [200] * len(order)
    for index, (_, answer) in zip(order, results):
        assert same([answer], [expected[index]])


# --------------------------------------------------------------------------- fail closed


def secrets_of(clean: np.ndarray, answers: list[dict[str, float]]) -> np.ndarray:
    """Sorted clean values of the classes the defense changed (the others are public)."""
    defended = np.array([list(answer.values()) for answer in answers])
    changed = np.abs(clean - defended) > 0
    assert changed.any()
    return np.sort(clean[changed])


def test_no_route_returns_the_clean_probabilities(kserver, handler_answers) -> None:
    server, name = kserver, "grad2"
    secrets = secrets_of(handler_answers[name]["clean"], handler_answers[name]["answers"])
    image = IMAGES[0]
    texts: dict[str, str] = {}
    statuses: dict[str, int] = {}

    def record(label: str, response: requests.Response) -> None:
        texts[label], statuses[label] = response.text, response.status_code

    base = server.inference_url
    for path in ("/", "/v1/models", f"/v1/models/{name}", "/v2", "/v2/health/live",
                 "/v2/health/ready", "/v2/models", f"/v2/models/{name}",
                 f"/v2/models/{name}/ready", f"/v2/models/{name}/versions/1.0",
                 "/docs", "/openapi.json", "/redoc", f"/predictions/{name}"):
        record(f"GET {path}", requests.get(f"{base}{path}", timeout=TIMEOUT))
    posts = {
        ":predict json": (f"/v1/models/{name}:predict", {"json": {"image": b64(image)}}),
        ":predict tensor": (f"/v1/models/{name}:predict",
                            {"json": {"tensor": [[0.5] * 28] * 28}}),
        ":predict v1": (f"/v1/models/{name}:predict", {"json": V1_BODY}),
        ":explain": (f"/v1/models/{name}:explain", {"json": V1_BODY}),
        ":explain raw": (f"/v1/models/{name}:explain",
                         {"data": image, "headers": {"Content-Type": "image/png"}}),
        "v2 infer": (f"/v2/models/{name}/infer", {"json": V2_BODY}),
        "v2 versioned": (f"/v2/models/{name}/versions/1.0/infer", {"json": V2_BODY}),
        "v2 explain": (f"/v2/models/{name}/explain", {"json": V2_BODY}),
        "/explanations": (f"/explanations/{name}", {"data": image}),
        "/predictions": (f"/predictions/{name}", {"data": image}),
        "bad image": (f"/v1/models/{name}:predict",
                      {"data": b"junk", "headers": {"Content-Type": "image/png"}}),
        "text body": (f"/v1/models/{name}:predict",
                      {"data": b"junk", "headers": {"Content-Type": "text/plain"}}),
        "bad json": (f"/v1/models/{name}:predict",
                     {"data": b"{nope", "headers": {"Content-Type": "application/json"}}),
        "nan tensor": (f"/v1/models/{name}:predict", {
            "data": b'{"tensor": [[NaN]]}', "headers": {"Content-Type": "application/json"}}),
        "bad base64": (f"/v1/models/{name}:predict", {"json": {"instances": ["!!"]}}),
        "too many": (f"/v1/models/{name}:predict",
                     {"json": {"instances": [b64(image)] * 65}}),
        "too large": (f"/v1/models/{name}:predict",
                      {"data": b"\0" * 7_000_000, "headers": {"Content-Type": "image/png"}}),
        "v2 bad datatype": (f"/v2/models/{name}/infer", {"json": {"inputs": [
            {"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]}}),
        "v2 empty": (f"/v2/models/{name}/infer", {"json": {"inputs": []}}),
        "other model": ("/v1/models/nobody:predict", {"json": V1_BODY}),
    }
    for label, (path, kwargs) in posts.items():
        record(label, requests.post(f"{base}{path}", timeout=TIMEOUT, **kwargs))
    record("metrics", requests.get(server.metrics_url, timeout=TIMEOUT))
    texts["log"] = server.log_file.read_text(errors="replace")

    found = {label: leaks(text, secrets) for label, text in texts.items()}
    assert not {label: hits for label, hits in found.items() if hits}
    clean_text = json.dumps(secrets.tolist())
    assert leaks(clean_text, secrets), "the scan must find the secrets where they are"
    # Each refused request got its own status; explanations are closed.
    assert statuses[":explain"] == statuses[":explain raw"] == 403
    assert statuses["bad image"] == statuses["bad base64"] == statuses["bad json"] == 400
    assert statuses["nan tensor"] == 400 and statuses["v2 bad datatype"] == 400
    assert statuses["text body"] == 415
    assert statuses["too many"] == statuses["too large"] == 413
    assert statuses["v2 empty"] in (400, 422) and statuses["v2 versioned"] == 501
    assert statuses["other model"] == 404 and statuses["GET /docs"] == 404
    assert json.loads(texts[":explain"]) == codec.error_body(403, json.loads(
        texts[":explain"])["message"])
    for label in ("v2 explain", "/explanations", "/predictions", "GET /predictions/grad2"):
        assert statuses[label] in (404, 405), label
    for metric in ("DefenseTime", "DefenseL1", "DefendedAnswers_total",
                   "DefenseLabelFlips_total", "RejectedRequests_total", "HandlerTime"):
        assert f"{metric}{{" in texts["metrics"], metric
    assert 'ModelName="grad2"' in texts["metrics"]


def test_refused_archive_never_becomes_ready(tmp_path: Path, staged) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for file in staged["grad2"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    config["defense"]["epsilon"] = 3.0
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match=r"defense\.epsilon"):
        start_kserve(folder, "bad", workdir=tmp_path / "server", timeout=120)
    assert not (tmp_path / "server" / "kserve.json").exists()  # stopped and forgotten


def test_base64_request_id_and_binary_body_helpers() -> None:
    from kserve.protocol.infer_type import InferInput, InferRequest

    from grad2.serve.kserve import v2_body

    request = InferRequest("m", [InferInput("image", [1], "BYTES", [b"\x89PNG"])])
    body = v2_body(request, {"x-request-id": "abc"})
    assert body["id"] == "abc"
    assert base64.b64decode(body["inputs"][0]["data"][0]) == b"\x89PNG"
