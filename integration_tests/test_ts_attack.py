"""The live thief (``grad2 attack``) and its HTTP client against a real TorchServe.

The session server's models use short class names, and ``grad2 attack`` scores its clone
on Fashion-MNIST, so it refuses them; this module starts its own small server whose
archive carries Fashion-MNIST's real class names (random-init ``small_cnn`` victim and
surrogate, GRAD² at epsilon 0.5).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import stop_and_check_gone, write_checkpoints, write_model_config
from ts_client import png, predict_raw

from grad2.cli import main
from grad2.lab.attack import APIClient, QueryError, encode_png
from grad2.lab.data import FASHION_CLASSES
from grad2.models import load_checkpoint
from grad2.serve import Ports, TorchServeServer, build_archive, start_server

pytestmark = pytest.mark.integration

MODEL = "fashion_named"
BUDGET = 200
GRAD2 = Path(sys.executable).with_name("grad2")


@pytest.fixture(scope="module")
def named_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeServer]:
    folder = tmp_path_factory.mktemp("named")
    names = write_checkpoints(folder, 0, 1, FASHION_CLASSES)
    store = folder / "store"
    build_archive(MODEL, "1.0", folder / "victim.pt",
                  write_model_config(folder / "config.yaml", 0.5, batch_size=8),
                  store, surrogate=folder / "surrogate.pt", index_to_name=names)
    server = start_server(store, [f"{MODEL}={MODEL}.mar"], workdir=folder / "ts",
                          ports=Ports.free(), timeout=300)
    try:
        yield server
    finally:
        stop_and_check_gone(server)


def served_requests(server: TorchServeServer, model: str) -> int:
    """Inference requests the frontend has counted for ``model`` (Prometheus metric)."""
    text = requests.get(server.metrics_url, timeout=30).text
    pattern = rf'^ts_inference_requests_total\{{[^}}]*model_name="{model}"[^}}]*\}} (\S+)$'
    return int(sum(float(value) for value in re.findall(pattern, text, re.MULTILINE)))


def wait_for_count(server: TorchServeServer, model: str, expected: int) -> int:
    deadline = time.monotonic() + 15
    while (count := served_requests(server, model)) != expected and time.monotonic() < deadline:
        time.sleep(0.3)
    return count


def grad2_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GRAD2), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_cli_attack_spends_its_budget_and_reports_honestly(named_server, tmp_path) -> None:
    url = f"{named_server.inference_url}/predictions/{MODEL}"
    before = served_requests(named_server, MODEL)
    started = time.perf_counter()
    result = grad2_cli(
        "attack", "--url", url, "--token-file", str(named_server.key_file), "--pool", "animal",
        "--budget", str(BUDGET), "--epochs", "1", "--concurrency", "4", "--threads", "1",
        "--no-progress", "--out", str(tmp_path / "report"),
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    print(json.dumps(report), f"CLI took {elapsed:.1f} s")
    assert report["url"] == url and report["pool"] == "animal"
    assert report["budget"] == report["sent"] == report["answered"] == BUDGET
    assert report["failed"] == 0 and report["errors"] == {}
    assert report["requests"] == BUDGET + report["retries"]
    assert report["epochs"] == 1
    assert (tmp_path / "report" / "clone.pt").is_file()
    assert json.loads((tmp_path / "report" / "attack.json").read_text()) == report
    assert isinstance(report["clone_accuracy"], float) and 0 <= report["clone_accuracy"] <= 1
    assert 0 <= report["mean_answer_entropy"] <= np.log(10) + 1e-6
    assert 0 < report["wall_time_s"] < elapsed
    # the server saw exactly the requests the thief says it made
    assert wait_for_count(named_server, MODEL, before + report["requests"]) == \
        before + report["requests"]
    clone, metadata = load_checkpoint(tmp_path / "report" / "clone.pt")
    assert metadata["role"] == "clone" and metadata["url"] == url
    with torch.inference_mode():
        assert clone(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cli_attack_with_a_wrong_token_stops_after_one_query(named_server, tmp_path,
                                                             capsys) -> None:
    """Error paths run ``grad2.cli.main`` in-process (a subprocess costs ~8 s of imports
    on 2 cores); the exit code and messages are the command's."""
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "not-the-key"}}))
    before = served_requests(named_server, MODEL)
    code = main(["attack", "--url", f"{named_server.inference_url}/predictions/{MODEL}",
                 "--token-file", str(key_file), "--budget", "50", "--epochs", "1",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    # TorchServe 0.12 answers a bad token with 400; the client does not retry a 4xx
    assert "first query" in err and "(HTTP 400)" in err and "sent no more" in err, err
    # the frontend refuses the token before the model counts the request
    assert served_requests(named_server, MODEL) == before


def test_cli_attack_refuses_a_model_with_other_classes(server, inference_token,
                                                       capsys) -> None:
    """The session server's ``fashion`` model has short class names: a clone trained on
    it could not be scored on Fashion-MNIST, so the thief stops after one query."""
    before = served_requests(server, "fashion")
    code = main(["attack", "--url", f"{server.inference_url}/predictions/fashion/1.0",
                 "--token-file", str(server.key_file), "--budget", "50", "--epochs", "1",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    assert "expected" in err and "sent no more" in err, err
    assert wait_for_count(server, "fashion", before + 1) == before + 1


def test_client_answers_in_the_server_class_order(named_server) -> None:
    token = named_server.tokens().inference
    url = f"{named_server.inference_url}/predictions/{MODEL}"
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    answers, answered, names, stats = APIClient(url, token, concurrency=3).query(
        images, progress=False, expected_classes=FASHION_CLASSES)
    assert names == list(FASHION_CLASSES) and answered.tolist() == list(range(6))
    assert (stats.sent, stats.answered, stats.failed, stats.requests) == (6, 6, 0, 6)
    assert torch.allclose(answers.sum(dim=1), torch.ones(6), atol=1e-5)
    for image, row in zip(images, answers):
        direct = predict_raw(named_server.inference_url, f"/predictions/{MODEL}", token,
                             encode_png(image))
        assert direct.status_code == 200
        assert list(direct.json()) == list(FASHION_CLASSES)
        # one query's answer does not depend on its batch-mates (all_ones target)
        assert np.allclose(list(direct.json().values()), row.numpy(), atol=1e-6)


def test_client_bad_input_is_refused_once_not_retried(named_server) -> None:
    token = named_server.tokens().inference
    url = f"{named_server.inference_url}/predictions/{MODEL}"
    before = served_requests(named_server, MODEL)
    client = APIClient(url, token, retries=3, backoff=0.01)
    body = b"this is not an image"
    outcome = client._post(body)
    assert outcome.answer is None and outcome.attempts == 1
    assert outcome.error is not None and outcome.error.startswith("HTTP 4"), outcome.error
    assert wait_for_count(named_server, MODEL, before + 1) == before + 1
    # a real image through the same client still works
    assert client._post(png(0)).answer is not None


def test_client_against_a_closed_port_gives_up_quickly(named_server) -> None:
    port = Ports.free().inference
    client = APIClient(f"http://127.0.0.1:{port}/predictions/{MODEL}", "t", timeout=2,
                       retries=2, backoff=0.05)
    started = time.perf_counter()
    with pytest.raises(QueryError, match="ConnectionError") as raised:
        client.query(np.zeros((4, 28, 28), np.uint8), progress=False)
    assert time.perf_counter() - started < 5
    assert raised.value.stats.requests == 3 and raised.value.stats.sent == 1
