"""The same image gets a bit-identical answer alone, inside a full TorchServe batch, and
from a second server instance (the coordinated target makes answers a pure function of
the query; the handler runs victim and defense in probed batch sizes only, so batching
cannot change a bit)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from ts_client import png, predict_raw

from grad2.serve import TorchServeServer

pytestmark = pytest.mark.integration

PROBE = png(1234)
BATCH_SIZE = 8  # batchSize of fashion 1.0


def batch_sizes(server) -> list[int]:
    """Sizes of the batches fashion 1.0 has defended so far (the handler's metric lines,
    which the frontend logs in ts_log.log)."""
    log = (server.log_dir / "ts_log.log").read_text(errors="replace")
    return [int(float(n)) for n in re.findall(
        r"DefendedAnswers\.\w+:([0-9.]+)\|#ModelName:fashion,ModelVersion:1\.0", log)]


def full_batch_answer(server, token) -> tuple[str, list[int]]:
    """Send the probe with 7 other images at once; returns its answer text and the batch
    sizes seen meanwhile."""
    images = [png(seed) for seed in range(BATCH_SIZE - 1)]
    images.insert(3, PROBE)
    start = threading.Barrier(len(images))
    before = len(batch_sizes(server))

    def send(image: bytes):
        start.wait()
        return predict_raw(server.inference_url, "/predictions/fashion/1.0", token, image)

    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(send, images))
    assert all(r.status_code == 200 for r in responses)
    return responses[3].text, batch_sizes(server)[before:]


def test_same_answer_alone_in_a_batch_and_on_another_server(
    server, inference_token, model_store, tmp_path
) -> None:
    alone = predict_raw(server.inference_url, "/predictions/fashion/1.0", inference_token, PROBE)
    assert alone.status_code == 200
    for _ in range(5):  # retry until TorchServe really batched the probe with others
        crowded, sizes = full_batch_answer(server, inference_token)
        assert crowded == alone.text
        if sizes and max(sizes) > 1:
            break
    else:
        pytest.fail(f"TorchServe never formed a batch > 1: {sizes}")

    # The second instance is started and stopped through the CLI, as an operator would.
    workdir = tmp_path / "ts2"
    started = grad2_cli("serve", "--model-store", str(model_store), "--models",
                        "fashion=fashion-1.0.mar", "--workdir", str(workdir), "--free-ports")
    second = TorchServeServer.load(workdir)
    pids = [process.pid for process in second.processes()]
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        assert "TorchServe is READY" in started.stdout and str(second.key_file) in started.stdout
        assert second.ready("fashion")
        again = predict_raw(second.inference_url, "/predictions/fashion",
                            second.tokens().inference, PROBE)
        assert again.status_code == 200
        assert again.text == alone.text
    finally:
        stopped = grad2_cli("serve", "--stop", "--workdir", str(workdir))
    assert stopped.returncode == 0 and "stopped TorchServe" in stopped.stdout
    assert pids and not [pid for pid in pids if psutil.pid_exists(pid)
                         and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not (workdir / "server.json").exists()


def grad2_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grad2.cli", *args], capture_output=True,
                          text=True, check=False, timeout=300)
