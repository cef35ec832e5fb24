"""grad2.lab.attack without a model server: PNG encoding, token files, and APIClient against a
tiny local HTTP stub (retries, timeouts, refusals, class order, honest counting)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grad2.lab import attack
from grad2.lab.attack import APIClient, QueryError, encode_png, live_attack, read_token
from grad2.lab.data import FASHION_CLASSES, Dataset

#: Deliberately not alphabetical: the client must keep the server's order.
CLASSES = ["zebra", "ant", "moth", "bee"]
ANSWER = {"zebra": 0.1, "ant": 0.2, "moth": 0.3, "bee": 0.4}

#: A route answers (status, body bytes, seconds to wait first) for the n-th request
#: (counted from 0) to its path and the request body.
Route = Callable[[int, bytes], tuple[int, bytes, float]]


def _json(status: int, payload: object, delay: float = 0.0) -> tuple[int, bytes, float]:
    return status, json.dumps(payload).encode(), delay


def _first_pixel(body: bytes) -> int:
    return int(np.asarray(Image.open(io.BytesIO(body)))[0, 0])


ROUTES: dict[str, Route] = {
    "/ok": lambda n, body: _json(200, ANSWER),
    # The answer depends on the image: probability of "zebra" is its first pixel / 255.
    "/echo": lambda n, body: _json(200, {"zebra": _first_pixel(body) / 255, "ant": 0.0,
                                         "moth": 0.0, "bee": 1 - _first_pixel(body) / 255}),
    "/flaky": lambda n, body: _json(500, {"code": 500}) if n < 2 else _json(200, ANSWER),
    "/busy": lambda n, body: _json(429, {"code": 429}) if n < 1 else _json(200, ANSWER),
    "/broken": lambda n, body: _json(500, {"code": 500}),
    "/refused": lambda n, body: _json(400, {"code": 400, "message": "bad image"}),
    "/unauthorized": lambda n, body: _json(401, {"code": 401}),
    # Images whose first pixel is odd are refused; the others answered.
    "/picky": lambda n, body: (_json(400, {"code": 400}) if _first_pixel(body) % 2
                               else _json(200, ANSWER)),
    "/slow": lambda n, body: _json(200, ANSWER, delay=2.0),
    "/topk": lambda n, body: _json(200, dict(reversed(ANSWER.items())) if n % 2 else ANSWER),
    "/label": lambda n, body: _json(200, {"label": "zebra"}),
    "/garbage": lambda n, body: (200, b"{not json", 0.0) if n < 1 else _json(200, ANSWER),
    "/list": lambda n, body: _json(200, [0.25, 0.25, 0.25, 0.25]),
    "/nan": lambda n, body: (200, b'{"zebra": NaN, "ant": 1.0}', 0.0),
    "/fashion": lambda n, body: _json(200, dict.fromkeys(FASHION_CLASSES, 0.1)),
}


@dataclass
class StubState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for seen, _, _ in self.requests if seen == path)


class _StubHandler(BaseHTTPRequestHandler):
    server: _StubServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        state = self.server.state
        with state.lock:
            n = sum(1 for seen, _, _ in state.requests if seen == self.path)
            state.requests.append((self.path, dict(self.headers), body))
        route = ROUTES.get(self.path)
        status, payload, delay = route(n, body) if route else _json(404, {"code": 404})
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, format: str, *args: object) -> None:
        pass


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True
    state: StubState


@pytest.fixture()
def stub() -> Iterator[tuple[str, StubState]]:
    server = _StubServer(("127.0.0.1", 0), _StubHandler)
    server.state = StubState()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- encode_png


def test_encode_png_round_trip() -> None:
    gray = images(1)[0]
    decoded = Image.open(io.BytesIO(encode_png(gray)))
    assert decoded.format == "PNG" and decoded.mode == "L"
    assert np.array_equal(np.asarray(decoded), gray)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(rgb)))
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), rgb)


@pytest.mark.parametrize(
    "bad", [np.zeros((28, 28), np.float32), np.zeros((2, 28, 28), np.uint8),
            np.zeros((28, 28, 2), np.uint8)],
)
def test_encode_png_refuses_what_it_cannot_send_exactly(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected"):
        encode_png(bad)


# --------------------------------------------------------------------------- read_token


def test_read_token(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": "abc",
                                                                          "expiration time": 1}}))
    assert read_token(path) == "abc"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"management": {"key": "m"}}', "no inference key"),
        ('{"inference": "abc"}', "no inference key"),
        ('{"inference": {"key": ""}}', "no inference key"),
        ('{"inference": {"key": 5}}', "no inference key"),
        ("[1, 2]", "no inference key"),
        ("not json", "not JSON"),
    ],
)
def test_read_token_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "key_file.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_token(path)


def test_read_token_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_token(tmp_path / "absent.json")


# --------------------------------------------------------------------------- APIClient


def test_client_validates_its_settings() -> None:
    for kwargs in ({"concurrency": 0}, {"retries": -1}, {"timeout": 0}, {"backoff": -1}):
        with pytest.raises(ValueError):
            APIClient("http://127.0.0.1:1/x", None, **kwargs)


def test_answers_keep_the_server_class_order_and_the_request_shape(stub) -> None:
    url, state = stub
    sent = images(5)
    answers, answered, names, stats = APIClient(f"{url}/echo", "secret", concurrency=3).query(
        sent, progress=False)
    assert names == CLASSES
    assert answers.dtype == torch.float32 and answers.shape == (5, len(CLASSES))
    assert answered.tolist() == [0, 1, 2, 3, 4]
    # row i belongs to image i, whatever order the concurrent answers arrived in
    assert np.allclose(answers[:, 0].numpy(), sent[:, 0, 0] / 255, atol=1e-6)
    assert (stats.sent, stats.answered, stats.failed, stats.retries, stats.requests) == \
        (5, 5, 0, 0, 5)
    assert stats.errors == {} and stats.wall_time_s > 0
    assert len(state.requests) == 5
    for _, headers, body in state.requests:
        assert headers["Authorization"] == "Bearer secret"
        assert headers["Content-Type"] == "application/octet-stream"
        assert Image.open(io.BytesIO(body)).format == "PNG"
    bodies = sorted(body for _, _, body in state.requests)
    assert bodies == sorted(encode_png(image) for image in sent)


def test_no_token_sends_no_authorization(stub) -> None:
    url, state = stub
    APIClient(f"{url}/ok", None).query(images(1), progress=False)
    assert "Authorization" not in state.requests[0][1]


@pytest.mark.parametrize(("path", "retried"), [("/flaky", 2), ("/busy", 1), ("/garbage", 1)])
def test_server_errors_are_retried_and_counted(stub, path: str, retried: int) -> None:
    url, state = stub
    client = APIClient(f"{url}{path}", None, retries=3, backoff=0.01)
    answers, answered, _, stats = client.query(images(1), progress=False)
    assert answered.tolist() == [0] and answers.shape == (1, 4)
    assert stats.retries == retried and stats.requests == retried + 1 == state.count(path)
    assert stats.failed == 0 and stats.errors == {}


def test_persistent_5xx_fails_after_the_retries(stub) -> None:
    url, state = stub
    client = APIClient(f"{url}/broken", None, retries=2, backoff=0.01)
    with pytest.raises(QueryError, match=r"first query .* failed \(HTTP 500\); sent no more") \
            as raised:
        client.query(images(4), progress=False)
    assert state.count("/broken") == 3  # one image, three attempts, the others never sent
    stats = raised.value.stats
    assert (stats.sent, stats.answered, stats.failed, stats.retries, stats.requests) == \
        (1, 0, 1, 2, 3)
    assert stats.errors == {"HTTP 500": 1}


@pytest.mark.parametrize(("path", "error"), [("/refused", "HTTP 400"),
                                             ("/unauthorized", "HTTP 401")])
def test_4xx_is_not_retried(stub, path: str, error: str) -> None:
    url, state = stub
    client = APIClient(f"{url}{path}", None, retries=3, backoff=0.01)
    with pytest.raises(QueryError, match=error) as raised:
        client.query(images(3), progress=False)
    assert state.count(path) == 1
    assert raised.value.stats.retries == 0 and raised.value.stats.errors == {error: 1}


def test_some_refused_images_are_reported_not_hidden(stub) -> None:
    url, state = stub
    sent = images(20, seed=3)
    sent[0, 0, 0] = 0  # the first (probe) image is answered
    odd = [i for i in range(20) if sent[i, 0, 0] % 2]
    assert odd, "the seed should give some odd first pixels"
    client = APIClient(f"{url}/picky", None, retries=3, backoff=0.01)
    answers, answered, _, stats = client.query(sent, progress=False)
    assert answered.tolist() == [i for i in range(20) if i not in odd]
    assert answers.shape == (20 - len(odd), 4)
    assert (stats.sent, stats.answered, stats.failed) == (20, 20 - len(odd), len(odd))
    assert stats.retries == 0 and stats.requests == 20 == state.count("/picky")
    assert stats.errors == {"HTTP 400": len(odd)}


def test_closed_port_fails_after_retries_without_hanging() -> None:
    client = APIClient(f"http://127.0.0.1:{closed_port()}/predictions/x", None, timeout=2,
                       retries=2, backoff=0.05)
    started = time.perf_counter()
    with pytest.raises(QueryError, match="ConnectionError") as raised:
        client.query(images(3), progress=False)
    assert time.perf_counter() - started < 5
    assert raised.value.stats.requests == 3 and raised.value.stats.sent == 1


def test_a_silent_server_times_out_per_request(stub) -> None:
    url, state = stub
    client = APIClient(f"{url}/slow", None, timeout=0.3, retries=1, backoff=0.01)
    started = time.perf_counter()
    with pytest.raises(QueryError, match="ReadTimeout") as raised:
        client.query(images(2), progress=False)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.8, elapsed  # two attempts of 0.3 s, not the stub's 2 s each
    assert raised.value.stats.requests == 2 == state.count("/slow")


def test_expected_classes_are_checked_on_the_first_answer(stub) -> None:
    url, state = stub
    client = APIClient(f"{url}/ok", None)
    with pytest.raises(QueryError, match="expected") as raised:
        client.query(images(10), progress=False, expected_classes=list(reversed(CLASSES)))
    assert state.count("/ok") == 1 and raised.value.stats.sent == 1
    _, _, names, stats = client.query(images(3), progress=False, expected_classes=CLASSES)
    assert names == CLASSES and stats.sent == 3


def test_answers_in_changing_class_order_are_refused(stub) -> None:
    url, _ = stub
    with pytest.raises(QueryError, match="one order"):
        APIClient(f"{url}/topk", None, concurrency=1).query(images(4), progress=False)


@pytest.mark.parametrize(("path", "error"), [
    ("/label", "HTTP 200, label-only answer"),
    ("/list", "HTTP 200, not a {class: probability} object"),
    ("/nan", "HTTP 200, not a {class: probability} object"),
])
def test_answers_without_probabilities_are_failures(stub, path: str, error: str) -> None:
    url, state = stub
    with pytest.raises(QueryError) as raised:
        APIClient(f"{url}{path}", None, retries=3).query(images(2), progress=False)
    assert raised.value.stats.errors == {error: 1}
    assert state.count(path) == 1  # the same image would get the same answer


def test_no_images_is_an_error(stub) -> None:
    url, state = stub
    with pytest.raises(QueryError, match="no images"):
        APIClient(f"{url}/ok", None).query(np.zeros((0, 28, 28), np.uint8), progress=False)
    assert not state.requests


# --------------------------------------------------------------------------- live_attack


@pytest.fixture()
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for the thief pool and the Fashion-MNIST test split (no data files)."""
    rng = np.random.default_rng(0)

    def pool(name: str, size: int | None = None, seed: int = 0) -> Dataset:
        return Dataset(rng.integers(0, 256, (size, 28, 28), dtype=np.uint8), None,
                       ["a"] * 10, name)

    test = Dataset(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                   rng.integers(0, 10, 50).astype(np.int64), list(FASHION_CLASSES), "test")
    monkeypatch.setattr(attack, "thief_pool", pool)
    monkeypatch.setattr(attack, "load_fashion_mnist", lambda split: test)


def test_live_attack_reports_what_it_spent(stub, tiny_data, tmp_path: Path) -> None:
    url, state = stub
    report = live_attack(f"{url}/fashion", "t", budget=24, epochs=1, progress=False,
                         clone_out=tmp_path / "clone.pt")
    assert state.count("/fashion") == 24
    assert report["budget"] == report["sent"] == report["answered"] == report["requests"] == 24
    assert report["failed"] == report["retries"] == 0 and report["errors"] == {}
    assert 0 <= report["clone_accuracy"] <= 1
    assert report["mean_answer_entropy"] == pytest.approx(np.log(10), abs=1e-4)
    assert (tmp_path / "clone.pt").is_file()
    json.dumps(report)  # the CLI prints it


def test_live_attack_stops_after_one_query_on_foreign_classes(stub, tiny_data,
                                                              monkeypatch) -> None:
    url, state = stub
    trained = Counter()
    monkeypatch.setattr(attack, "train_clone", lambda *a, **k: trained.update(["x"]))
    with pytest.raises(QueryError, match="expected"):
        live_attack(f"{url}/ok", None, budget=30, epochs=1, progress=False)
    assert state.count("/ok") == 1 and not trained
