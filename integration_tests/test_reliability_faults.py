"""Faults on a second, real TorchServe (this module's own, so a killed worker disturbs no
other test): a defense that fails at run time fails closed as configured, a second
instance answers bit for bit like the first, and a worker killed with SIGKILL under load
comes back by itself while no answer is undefended and no client hangs.

The failing defense is honest product code with a pathological surrogate: a ``small_cnn``
checkpoint whose first-layer channel 0 fires only where a 3x3 patch is nearly white (its
batch-norm scales by 1e30 past a threshold) and whose second conv multiplies that channel
by 1e15, so the surrogate overflows to inf/NaN on images with a white patch and is an
ordinary network elsewhere. ``grad2 archive`` accepts it (its test batch is mid-gray), the
worker loads it, and on a white-patch query the redirection scores are not finite, so
``redirect`` raises at run time; ``on_failure`` decides the answer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
from conftest import EPSILON_V1, stop_and_check_gone, write_model_config
from PIL import Image
from test_no_leak import leaks, worker_pid
from ts_client import CLASS_NAMES, b64, png, post, predict_raw, vector

from grad2.models import load_checkpoint, save_checkpoint
from grad2.serve import Ports, build_archive, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TWIN = "/predictions/fashion_clean"
#: Normalised 3x3 patch mean above which the trap surrogate overflows (pixel mean ~0.96).
TRAP_THRESHOLD = 1.9
#: Client read timeout in the SIGKILL test; documented in docs/security.md.
CLIENT_TIMEOUT = 10.0
#: Seconds TorchServe may take to bring a killed worker back to READY.
RECOVERY_LIMIT = 90.0


def dim_png(seed: int) -> bytes:
    """Random pixels in 0..180: never near the trap's white threshold."""
    pixels = np.random.default_rng(seed).integers(0, 181, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def bright_png(seed: int) -> bytes:
    """A dim image with one white 8x8 square: the trap surrogate overflows on it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 101, (28, 28), dtype=np.uint8)
    row, col = rng.integers(0, 20, 2)
    pixels[row:row + 8, col:col + 8] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


DIM = [dim_png(seed) for seed in range(4)]
BRIGHT = [bright_png(seed) for seed in range(3)]


def trap_surrogate(source: Path, destination: Path) -> Path:
    """The session surrogate with the overflow trap described in the module doc."""
    model, _ = load_checkpoint(source)
    with torch.no_grad():
        model[0].weight[0] = 1 / 9
        model[1].running_mean[0], model[1].running_var[0] = 0.0, 1.0
        model[1].weight[0], model[1].bias[0] = 1e30, -1e30 * TRAP_THRESHOLD
        model[4].weight[:, 0] = 1e15
    save_checkpoint(model, destination)
    return destination


@pytest.fixture(scope="module")
def faults_server(model_store: Path, checkpoints: dict[str, Path],
                  tmp_path_factory: pytest.TempPathFactory):
    """``fashion`` 1.0 (the session's archive), ``trap`` (on_failure reject) and
    ``trap_top1`` (on_failure top1) on their own TorchServe."""
    folder = tmp_path_factory.mktemp("faults")
    store = folder / "store"
    store.mkdir()
    shutil.copyfile(model_store / "fashion-1.0.mar", store / "fashion-1.0.mar")
    surrogate = trap_surrogate(checkpoints["surrogate"], folder / "trap_surrogate.pt")
    for name, on_failure in (("trap", "reject"), ("trap_top1", "top1")):
        config = write_model_config(folder / f"{name}.yaml", EPSILON_V1, batch_size=8,
                                    max_batch_delay=50, on_failure=on_failure)
        build_archive(name, "1.0", checkpoints["victim"], config, store, surrogate=surrogate,
                      index_to_name=checkpoints["index_to_name"])
    started = start_server(store, ["fashion=fashion-1.0.mar", "trap=trap.mar",
                                   "trap_top1=trap_top1.mar"],
                           workdir=folder / "ts", ports=Ports.free(), timeout=300)
    try:
        yield started
    finally:
        stop_and_check_gone(started)


@pytest.fixture(scope="module")
def faults_tokens(faults_server):
    return faults_server.tokens()


def clean_of(server, token: str, image: bytes) -> np.ndarray:
    """The epsilon-0 twin's answer (the session server's, same victim)."""
    response = predict_raw(server.inference_url, TWIN, token, image)
    assert response.status_code == 200
    return vector(response.json())


def assert_defended(text: str, clean: np.ndarray) -> None:
    answer = vector(json.loads(text))
    assert answer.min() >= 0 and abs(answer.sum() - 1) < 1e-5
    assert 1e-6 < float(np.abs(answer - clean).sum()) <= EPSILON_V1 + 1e-5


def metric_value(server, name: str, model: str, timeout: float = 20.0) -> float:
    """A counter of the handler on the Prometheus endpoint (read asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in requests.get(server.metrics_url, timeout=30).text.splitlines():
            if line.startswith(f'{name}{{ModelName="{model}"'):
                return float(line.rsplit(" ", 1)[1])
        if time.monotonic() > deadline:
            return 0.0
        time.sleep(0.5)


def scan_server(server, secrets: np.ndarray) -> None:
    """No log line and no metric of ``server`` holds a secret value."""
    time.sleep(1.5)
    for path in server.log_dir.rglob("*"):
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                assert not leaks(line, secrets), f"{path.name}: {line[:300]}"
    assert not leaks(requests.get(server.metrics_url, timeout=30).text, secrets)


# --------------------------------------------------------------------------- fail closed


def test_images_are_on_the_right_side_of_the_trap(checkpoints, tmp_path: Path) -> None:
    """In-process, on the same weights: the trap surrogate defends the dim images and
    the blank test batch of ``grad2 archive``, and fails on every white-patch image."""
    from grad2.config import InputConfig
    from grad2.defenses import GRAD2
    from grad2.serve import codec, loader

    surrogate, _ = load_checkpoint(trap_surrogate(checkpoints["surrogate"],
                                                  tmp_path / "trap.pt"))
    victim, _ = load_checkpoint(checkpoints["victim"])
    defense = GRAD2(surrogate, EPSILON_V1)
    spec = InputConfig.from_dict({"channels": 1, "height": 28, "width": 28,
                                  "mean": [0.286], "std": [0.353]})

    def defend(pixels: torch.Tensor) -> None:
        x = codec.normalise(pixels, spec)
        probs = loader.clean_probabilities(victim, x)
        codec.check_defended(defense(x, probs), probs)

    defend(torch.full((2, 1, 28, 28), 0.5))
    defend(torch.stack([codec.decode_image(image, spec) for image in DIM]))
    for image in BRIGHT:
        with pytest.raises(ValueError, match="finite"):
            defend(codec.decode_image(image, spec)[None])


def test_failing_defense_rejects_without_probabilities(
    faults_server, faults_tokens, server, inference_token
) -> None:
    token = faults_tokens.inference
    pid = worker_pid(faults_server, faults_tokens.management, "trap", "1.0")
    secrets = []
    for image in BRIGHT:
        response = predict_raw(faults_server.inference_url, "/predictions/trap", token, image)
        assert response.status_code == 503, response.text[:300]
        body = response.json()
        assert set(body) == {"code", "type", "message"} and body["code"] == 503
        assert "fail closed" in body["message"]
        clean = clean_of(server, inference_token, image)
        secrets += clean.tolist()
        assert not leaks(response.text, np.sort(clean))
    kserve = post(f"{faults_server.inference_url}/v1/models/trap:predict", token,
                  json_body={"instances": [{"data": b64(BRIGHT[0])}]})
    assert kserve.status_code == 503 and "predictions" not in kserve.text
    for image in DIM:
        response = predict_raw(faults_server.inference_url, "/predictions/trap", token, image)
        assert response.status_code == 200
        assert_defended(response.text, clean_of(server, inference_token, image))
    assert worker_pid(faults_server, faults_tokens.management, "trap", "1.0") == pid
    assert metric_value(faults_server, "DefenseFailures", "trap") >= len(BRIGHT) + 1
    scan_server(faults_server, np.array(sorted(secrets)))


def test_failing_defense_with_top1_fallback_gives_the_label_only(
    faults_server, faults_tokens, server, inference_token
) -> None:
    token = faults_tokens.inference
    for image in BRIGHT:
        response = predict_raw(faults_server.inference_url, "/predictions/trap_top1", token,
                               image)
        clean = clean_of(server, inference_token, image)
        assert response.status_code == 200
        assert response.json() == {"label": CLASS_NAMES[int(np.argmax(clean))]}
    for image in DIM:
        response = predict_raw(faults_server.inference_url, "/predictions/trap_top1", token,
                               image)
        assert_defended(response.text, clean_of(server, inference_token, image))


def test_failing_query_in_a_batch_never_releases_clean_answers(
    faults_server, faults_tokens, server, inference_token
) -> None:
    """The defense runs once per batch, so a batch holding a failing query fails closed
    as a whole: its batch-mates get 503 too (documented), never an undefended answer."""
    token = faults_tokens.inference
    images = [BRIGHT[0], *DIM, *DIM[:3]]
    clean = [clean_of(server, inference_token, image) for image in images]
    outcomes: list[tuple[int, int, str]] = []
    for _ in range(3):
        start = threading.Barrier(len(images))

        def send(index: int, barrier: threading.Barrier = start) -> tuple[int, int, str]:
            barrier.wait()
            response = predict_raw(faults_server.inference_url, "/predictions/trap", token,
                                   images[index])
            return index, response.status_code, response.text

        threads = []
        for index in range(len(images)):
            thread = threading.Thread(target=lambda i=index: outcomes.append(send(i)))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    assert len(outcomes) == 3 * len(images)
    for index, status, text in outcomes:
        if index == 0:
            assert status == 503
        elif status == 200:
            assert_defended(text, clean[index])
        else:
            assert status == 503 and "fail closed" in text
    mates = [status for index, status, _ in outcomes if index]
    print(f"\nbatch-mates of a failing query: {mates.count(503)} of {len(mates)} got 503")


# --------------------------------------------------------------------------- replicas


def test_second_instance_answers_bit_for_bit_like_the_first(
    faults_server, faults_tokens, server, inference_token
) -> None:
    images = [png(5000 + seed) for seed in range(16)]
    path = "/predictions/fashion/1.0"
    for image in images:
        first = predict_raw(server.inference_url, path, inference_token, image)
        second = predict_raw(faults_server.inference_url, path, faults_tokens.inference, image)
        assert first.status_code == second.status_code == 200
        assert first.content == second.content
    body = {"instances": [{"data": b64(image)} for image in images]}
    first = post(f"{server.inference_url}/v1/models/fashion:predict", inference_token,
                 json_body=body)  # the default version is 1.0 on both servers
    second = post(f"{faults_server.inference_url}/v1/models/fashion:predict",
                  faults_tokens.inference, json_body=body)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content


# --------------------------------------------------------------------------- SIGKILL


def test_worker_killed_under_load_recovers_and_never_answers_undefended(
    faults_server, faults_tokens, server, inference_token
) -> None:
    token, management = faults_tokens.inference, faults_tokens.management
    url = f"{faults_server.inference_url}/predictions/fashion"
    images = [png(6000 + seed) for seed in range(12)]
    expected = [predict_raw(faults_server.inference_url, "/predictions/fashion", token,
                            image).text for image in images]
    clean = [clean_of(server, inference_token, image) for image in images]
    old_pid = worker_pid(faults_server, management, "fashion", "1.0")

    outcomes: list[tuple[int, int, str, float, float]] = []  # image, status, text, t0, t1
    stop = threading.Event()

    def client(first: int) -> None:
        session = requests.Session()
        number = first
        while not stop.is_set():
            index = number % len(images)
            began = time.monotonic()
            try:
                response = session.post(url, data=images[index], timeout=CLIENT_TIMEOUT,
                                        headers={"Authorization": f"Bearer {token}",
                                                 "Content-Type": "application/octet-stream"})
                status, text = response.status_code, response.text
            except requests.RequestException as error:
                status, text = 0, type(error).__name__
                session = requests.Session()
            outcomes.append((index, status, text, began, time.monotonic()))
            number += 7

    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(12)]
    for thread in clients:
        thread.start()
    time.sleep(2.0)
    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    ready = None
    while time.monotonic() - killed < RECOVERY_LIMIT:
        try:
            new_pid = worker_pid(faults_server, management, "fashion", "1.0")
        except (AssertionError, requests.RequestException, KeyError, ValueError):
            new_pid = None
        if new_pid is not None and new_pid != old_pid:
            ready = time.monotonic()
            break
        time.sleep(0.2)
    time.sleep(3.0)
    stop.set()
    for thread in clients:
        thread.join(CLIENT_TIMEOUT + 10)
    assert ready is not None, f"no READY worker {RECOVERY_LIMIT:.0f} s after SIGKILL"
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == \
        psutil.STATUS_ZOMBIE

    statuses: dict[int, int] = {}
    for index, status, text, began, ended in outcomes:
        statuses[status] = statuses.get(status, 0) + 1
        assert ended - began <= CLIENT_TIMEOUT + 5, "a client waited past its timeout"
        if status == 200:
            assert text == expected[index], "an answer changed across the restart"
            assert_defended(text, clean[index])
        else:
            assert status in (0, 500, 503, 507), (status, text[:200])
            assert not any(f'"{name}"' in text for name in CLASS_NAMES), text[:200]
    after = [status for _, status, _, began, _ in outcomes if began > ready + 1.0]
    assert after and all(status == 200 for status in after), after
    assert any(began < killed for _, _, _, began, _ in outcomes)
    print(f"\nSIGKILL: READY again {ready - killed:.1f} s after the kill; "
          f"{len(outcomes)} requests, statuses {statuses}")
