"""The TorchServe handler class and its pure helpers (grad2.serving_io), without a server:
a fake ``Context`` plays TorchServe's part."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from grad2.config import ConfigError, InputConfig
from grad2.models import build_model, save_checkpoint
from grad2.serve import codec, loader

HANDLER_FILE = Path(__file__).resolve().parents[1] / "handler" / "grad2_handler.py"
SPEC = InputConfig.from_dict({"channels": 1, "height": 28, "width": 28, "mean": [0.5],
                              "std": [0.25], "max_side": 512})
EPSILON = 0.6


def load_handler_class() -> type:
    spec = importlib.util.spec_from_file_location("grad2_handler", HANDLER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [
        value for value in vars(module).values()
        if isinstance(value, type) and value.__module__ == module.__name__
    ]
    assert len(classes) == 1, "TorchServe needs exactly one class in the handler file"
    return classes[0]


class FakeMetrics:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, float, str, list[tuple[str, str]]]] = []

    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self.emitted.append((name, value, unit, [(d.name, d.value) for d in dimensions or []]))

    def values(self, name: str) -> list[float]:
        return [value for metric, value, _, _ in self.emitted if metric == name]


class FakeContext:
    """The parts of ``ts.context.Context`` the handler uses."""

    def __init__(self, model_dir: Path, model_yaml_config: dict[str, Any]) -> None:
        self.model_name = "fashion"
        self.manifest = {"model": {"modelName": "fashion", "modelVersion": "2.0",
                                   "serializedFile": "victim.pt",
                                   "handler": "grad2_handler.py"}}
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None,
                                  "batch_size": 8}
        self.model_yaml_config = model_yaml_config
        self.metrics = FakeMetrics()
        self.request_headers: list[dict[str, Any]] = []
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self.request_headers[idx] if idx < len(self.request_headers) else {}

    def get_request_header(self, idx: int, key: str) -> Any:
        return self.get_all_request_header(idx).get(key)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

    def status(self, idx: int) -> int:
        return self.statuses.get(idx, (200, ""))[0]


def model_config(**defense: Any) -> dict[str, Any]:
    return {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5,
        "defense": {"method": "grad2", "epsilon": EPSILON, "target": "all_ones", **defense},
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.5], "std": [0.25],
                  "max_side": 512},
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model_dir")
    torch.manual_seed(0)
    save_checkpoint(build_model("small_cnn"), folder / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model("small_cnn"), folder / "surrogate.pt")
    return folder


@pytest.fixture(scope="module")
def handler_class() -> type:
    return load_handler_class()


@pytest.fixture()
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_handler(handler_class: type, model_dir: Path, config: dict[str, Any]) -> tuple[Any, Any]:
    context = FakeContext(model_dir, config)
    handler = handler_class()
    handler.initialize(context)
    return handler, context


def png_bytes(seed: int = 0, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` pixels whose data is a few compressed zeros (a
    decompression bomb's header: decoding it fully would need ``width * height`` bytes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


def clean_answer(handler: Any, image: bytes) -> torch.Tensor:
    """The undefended probabilities the victim gives ``image`` (test-side reference)."""
    pixels = codec.decode_image(image, handler.served.input_config)[None]
    x = codec.normalise(pixels, handler.served.input_config)
    return loader.clean_probabilities(handler.model, x)[0]


def as_vector(answer: dict[str, float], names: list[str]) -> torch.Tensor:
    return torch.tensor([answer[name] for name in names], dtype=torch.float64)


# --------------------------------------------------------------------------- initialize


def test_handler_file_defines_one_class(handler_class: type) -> None:
    assert handler_class.__name__ == "Grad2Handler"


def test_initialize_loads_victim_defense_and_threads(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    torch.set_num_threads(2)
    config = model_config()
    config["input"]["threads"] = 1
    handler, _ = make_handler(handler_class, model_dir, config)
    assert handler.initialized
    assert torch.get_num_threads() == 1
    assert handler.served.class_names == [str(i) for i in range(10)]
    assert type(handler.served.defense).__name__ == "GRAD2"


@pytest.mark.parametrize(
    ("defense", "key"),
    [
        ({"epsilon": 2.5}, "defense.epsilon"),
        ({"method": "grad3"}, "defense.method"),
        ({"surprise": 1}, "defense.surprise"),
        ({"surrogate": "missing.pt"}, "defense.surrogate"),
        ({"target": "file", "target_file": "wm.pt"}, "defense.target_file"),
        ({"target": "watermark", "target_file": "wm.pt"}, "defense.target"),
    ],
)
def test_initialize_refuses_bad_defense_naming_the_key(
    handler_class: type, model_dir: Path, defense: dict[str, Any], key: str, keep_threads: None
) -> None:
    with pytest.raises(ConfigError) as raised:
        make_handler(handler_class, model_dir, model_config(**defense))
    assert raised.value.key == key
    assert key in str(raised.value)


def test_initialize_refuses_missing_defense_and_bad_input(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    config = model_config()
    del config["defense"]
    with pytest.raises(ConfigError, match="defense"):
        make_handler(handler_class, model_dir, config)
    config = model_config()
    config["input"]["channels"] = 3
    config["input"]["mean"] = [0.5] * 3
    config["input"]["std"] = [0.25] * 3
    with pytest.raises(ConfigError, match=r"input\.channels"):
        make_handler(handler_class, model_dir, config)
    config = model_config()
    config["handler"] = {"batch_invariant": "yes"}
    with pytest.raises(ConfigError, match=r"handler\.batch_invariant"):
        make_handler(handler_class, model_dir, config)


def test_memory_format_sets_the_layout_and_keeps_the_answers(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    """The default ``handler.memory_format: channels_last`` lays the victim's and the
    surrogate's convolution weights out channels-last; ``contiguous`` keeps NCHW. The
    answers agree up to float rounding, and are each bit-identical alone and in a batch."""
    answers = {}
    images = [bytearray(png_bytes(seed)) for seed in range(5)]
    for memory_format in ("channels_last", "contiguous"):
        config = model_config()
        if memory_format == "contiguous":
            config["handler"] = {"memory_format": "contiguous"}
        handler, context = make_handler(handler_class, model_dir, config)
        weights = [handler.served.victim[0].weight, handler.served.surrogate[4].weight]
        layout = {"channels_last": torch.channels_last,
                  "contiguous": torch.contiguous_format}[memory_format]
        assert all(w.is_contiguous(memory_format=layout) for w in weights)
        assert handler.served.victim[4].weight.is_contiguous() == (memory_format == "contiguous")
        batch = handler.handle([{"body": image} for image in images], context)
        alone = [handler.handle([{"body": image}], context)[0] for image in images]
        assert json.dumps(batch) == json.dumps(alone)
        answers[memory_format] = torch.stack(
            [as_vector(answer, handler.served.class_names) for answer in batch])
    assert torch.allclose(answers["channels_last"], answers["contiguous"], atol=1e-5)


def test_index_to_name_gives_class_names(
    handler_class: type, model_dir: Path, tmp_path: Path, keep_threads: None
) -> None:
    for name in ("victim.pt", "victim.json", "surrogate.pt", "surrogate.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
             "bag", "boot"]
    (tmp_path / "index_to_name.json").write_text(json.dumps(dict(enumerate(names))))
    handler, _ = make_handler(handler_class, tmp_path, model_config())
    [answer] = handler.handle([{"body": bytearray(png_bytes())}], handler.context)
    assert list(answer) == names
    (tmp_path / "index_to_name.json").write_text(json.dumps({"0": "a", "12": "b"}))
    with pytest.raises(ConfigError, match=r"index_to_name\.json"):
        make_handler(handler_class, tmp_path, model_config())


# --------------------------------------------------------------------------- answers


def test_batch_of_mixed_requests_each_gets_its_own_answer(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config())
    image = png_bytes(3)
    b64 = base64.b64encode(image).decode()
    tensor = (codec.decode_image(image, SPEC)[0]).tolist()
    data = [
        {"body": bytearray(image)},                                   # raw body
        {"body": bytearray(b"not an image at all")},                  # garbage → 400
        {"data": bytearray(image)},                                   # multipart / gRPC
        {"body": {"image": b64}},                                     # JSON base64
        {"body": {"tensor": tensor}},                                 # JSON tensor
        {"body": {"instances": [{"data": b64}, {"data": b64}]}},      # KServe v1
        {"body": {"id": "r7", "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                          "data": [b64]}]}},         # KServe v2
        {"body": b""},                                                # empty → 400
    ]
    context.request_headers = [{} for _ in data]
    responses = handler.handle(data, context)
    assert len(responses) == len(data)
    assert context.status(1) == 400 and context.status(7) == 400
    assert set(responses[1]) == {"code", "type", "message"}
    names = handler.served.class_names
    reference = clean_answer(handler, image)
    answers = [responses[0], responses[2], responses[3], responses[4],
               *responses[5]["predictions"], json.loads(responses[6]["outputs"][0]["data"][0])]
    assert responses[6]["id"] == "r7" and responses[6]["model_name"] == "fashion"
    first = as_vector(answers[0], names)
    for answer in answers:
        vector = as_vector(answer, names)
        assert torch.equal(vector, first)  # same image, same bits, whatever the route
        assert abs(float(vector.sum()) - 1) < 1e-5 and float(vector.min()) >= 0
    l1 = float((first - reference.double()).abs().sum())
    assert 0 < l1 <= EPSILON + 1e-5
    for index in (0, 2, 3, 4, 5, 6):
        assert context.status(index) == 200


def test_freed_memory_goes_back_at_most_once_per_interval(
    handler_class: type, model_dir: Path, keep_threads: None,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from grad2.serve import pipeline

    handler, context = make_handler(handler_class, model_dir, model_config())
    calls: list[float] = []
    monkeypatch.setattr(loader, "release_free_memory", lambda: calls.append(1) or True)
    clock = [1000.0]
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: clock[0])
    handler.pipeline._released = clock[0] - pipeline.RELEASE_INTERVAL_S  # due now
    image = png_bytes(4)
    answers = []
    for step in (0.0, 0.3, 0.5, 0.3):  # batches at 0, 0.3, 0.8 and 1.1 s
        clock[0] += step
        context.request_headers = [{}]
        answers.append(handler.handle([{"body": bytearray(image)}], context)[0])
    assert len(calls) == 2  # at 0 s and 1.1 s, not in between
    assert all(answer == answers[0] for answer in answers)  # answers do not depend on it


def test_answer_is_bit_identical_alone_and_in_a_batch(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config())
    image = png_bytes(11)
    alone = handler.handle([{"body": bytearray(image)}], context)[0]
    batch = [{"body": bytearray(png_bytes(seed))} for seed in range(7)]
    batch.insert(4, {"body": bytearray(image)})
    context.request_headers = []
    crowded = handler.handle(batch, context)[4]
    assert json.dumps(alone) == json.dumps(crowded)


def test_wide_networks_answer_alike_alone_and_in_any_batch(
    handler_class: type, tmp_path: Path, keep_threads: None, caplog: pytest.LogCaptureFixture
) -> None:
    """``wide_cnn``'s convolutions take other kernels from 4 rows on (other last bits), and
    preserve_top1's answers follow the scores' values: the handler's batch plan (probed at
    ``initialize`` up to ``batchSize``) keeps every answer the same whatever the batch."""
    torch.manual_seed(0)
    save_checkpoint(build_model("wide_cnn"), tmp_path / "victim.pt")
    save_checkpoint(build_model("wide_cnn"), tmp_path / "surrogate.pt")
    with caplog.at_level(logging.INFO):
        handler, context = make_handler(handler_class, tmp_path,
                                        model_config(preserve_top1=True))
    assert "batch-independent rows" in caplog.text
    assert handler.served.defense.batch_sizes and max(handler.served.defense.batch_sizes) <= 8
    images = [bytearray(png_bytes(seed)) for seed in range(8)]
    alone = [json.dumps(handler.handle([{"body": image}], context)[0]) for image in images]
    for order in (range(8), reversed(range(8)), [3, 1, 4, 0, 5]):
        order = list(order)
        answers = handler.handle([{"body": images[i]} for i in order], context)
        assert [json.dumps(answer) for answer in answers] == [alone[i] for i in order]


def test_topk_output_and_metrics(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir,
                                    model_config(output="topk", topk=3))
    responses = handler.handle([{"body": bytearray(png_bytes(s))} for s in range(4)], context)
    for answer in responses:
        values = list(answer.values())
        assert len(values) == 3 and values == sorted(values, reverse=True)
    metrics = context.metrics
    assert len(metrics.values("DefenseTime")) == 1
    assert 0 < metrics.values("DefenseL1")[0] <= EPSILON + 1e-6
    assert metrics.values("DefendedAnswers") == [4]
    assert len(metrics.values("DefenseLabelFlips")) == 1
    dims = dict(next(d for n, _, _, d in metrics.emitted if n == "DefenseTime"))
    assert dims == {"ModelName": "fashion", "ModelVersion": "2.0", "Level": "Model"}


def test_epsilon_zero_returns_the_clean_answer(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config(epsilon=0.0))
    image = png_bytes(5)
    [answer] = handler.handle([{"body": bytearray(image)}], context)
    vector = as_vector(answer, handler.served.class_names)
    assert torch.equal(vector, clean_answer(handler, image).double())


def test_rounding_answers_rows_that_sum_to_one_within_its_rounding(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    config = model_config()
    config["defense"] = {"method": "rounding", "decimals": 2, "surrogate": None}
    handler, context = make_handler(handler_class, model_dir, config)
    images = [png_bytes(seed) for seed in range(4)]
    answers = handler.handle([{"body": bytearray(image)} for image in images], context)
    assert [context.status(index) for index in range(4)] == [200] * 4
    for image, answer in zip(images, answers, strict=True):
        vector = as_vector(answer, handler.served.class_names)
        expected = torch.round(clean_answer(handler, image), decimals=2).double()
        assert torch.equal(vector, expected)


# --------------------------------------------------------------------------- fail closed


class ExplodingDefense:
    def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"boom {probs.tolist()}")


class OffSimplexDefense:
    def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs * 2


@pytest.mark.parametrize("broken", [ExplodingDefense(), OffSimplexDefense()])
def test_defense_failure_rejects_without_probabilities(
    handler_class: type, model_dir: Path, broken: Any, caplog: pytest.LogCaptureFixture,
    keep_threads: None,
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config())
    handler.served.defense = broken
    image = png_bytes(2)
    clean = clean_answer(handler, image)
    with caplog.at_level(logging.DEBUG):
        responses = handler.handle(
            [{"body": bytearray(image)}, {"body": bytearray(b"junk")}], context
        )
    assert context.status(0) == 503 and context.status(1) == 400
    assert set(responses[0]) == {"code", "type", "message"}
    assert context.metrics.values("DefenseFailures") == [1]
    leaked = json.dumps(responses) + caplog.text + json.dumps(context.metrics.emitted)
    leaked += json.dumps(context.statuses)
    for value in clean.tolist():
        assert repr(value)[:8] not in leaked
    assert "boom [[" not in caplog.text  # the message (it quotes values) is never logged


def test_defense_failure_with_top1_fallback_gives_the_label_only(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config(on_failure="top1"))
    handler.served.defense = ExplodingDefense()
    image = png_bytes(4)
    [answer] = handler.handle([{"body": bytearray(image)}], context)
    assert answer == {"label": str(int(clean_answer(handler, image).argmax()))}
    assert context.status(0) == 200
    assert context.metrics.values("DefenseFailures") == [1]


def test_victim_failure_gives_503(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config())

    def broken_victim(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("victim broke")

    handler.model = broken_victim
    responses = handler.handle([{"body": bytearray(png_bytes())}], context)
    assert context.status(0) == 503 and responses[0]["code"] == 503


# --------------------------------------------------------------------------- other routes


def test_explain_and_describe_never_run_the_model(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config())
    calls = []
    victim = handler.model
    handler.model = lambda x: calls.append(1) or victim(x)
    image = bytearray(png_bytes())
    context.request_headers = [{"explain": "True"}, {"describe": "True"}, {"Explain": "true"}]
    responses = handler.handle([{"body": image}, {}, {"body": image}], context)
    assert calls == []
    assert context.status(0) == 403 and context.status(2) == 403
    description = responses[1]
    assert description["input"] == {"channels": 1, "height": 28, "width": 28,
                                    "formats": list(codec.IMAGE_FORMATS)}
    assert set(description) == {"model", "version", "description", "input", "classes"}
    assert "epsilon" not in json.dumps(description) and "grad2" not in json.dumps(description)
    assert handler.explain_handle(None, None)["code"] == 403
    assert handler.get_insights(None, None)["code"] == 403


# --------------------------------------------------------------------------- decoding


def test_decode_image_resizes_and_converts() -> None:
    rgb = png_bytes(0, size=(40, 50), mode="RGB")
    pixels = codec.decode_image(rgb, SPEC)
    assert pixels.shape == (1, 28, 28) and pixels.dtype == torch.float32
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    spec3 = InputConfig.from_dict({"channels": 3, "height": 8, "width": 6})
    assert codec.decode_image(png_bytes(1), spec3).shape == (3, 8, 6)
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buffer, format="JPEG")
    assert codec.decode_image(buffer.getvalue(), SPEC).shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("payload", "content_type", "status"),
    [
        (b"garbage bytes", None, 400),
        (b"", None, 400),
        (png_bytes()[:60], None, 400),                      # truncated PNG
        (png_header_only(100_000, 100_000), None, 413),     # huge dimensions, no pixels
        (png_header_only(513, 10), None, 413),              # just over max_side
        (png_bytes(), "text/plain", 415),                   # wrong content type
        (png_bytes(), "application/x-www-form-urlencoded", 415),
        (png_bytes(), "application/json", 400),             # says JSON, is not
        (b'{"tensor": [[NaN]]}', "application/json", 400),  # JSON with NaN
        (b'{"image": 12}', None, 400),
        (b'{"image": "***"}', None, 400),                   # bad base64
        (b'{"tensor": [[0.5, 0.5]]}', None, 400),           # wrong shape
        (b'{"instances": []}', None, 400),
        (b'{"inputs": [{"datatype": "INT8", "data": [1]}]}', None, 400),
        (b"[1, 2, 3]", None, 400),
    ],
)
def test_bad_payloads_get_their_status(payload: bytes, content_type: str | None,
                                       status: int) -> None:
    with pytest.raises(codec.RequestError) as raised:
        codec.decode_request(bytearray(payload), content_type, SPEC)
    assert raised.value.status == status
    assert raised.value.message


def test_wrong_channel_count_tensor_is_refused() -> None:
    three = np.zeros((3, 28, 28)).tolist()
    with pytest.raises(codec.RequestError, match=r"\[1, 28, 28\]"):
        codec.decode_json({"tensor": three}, SPEC)
    with pytest.raises(codec.RequestError, match="0, 1"):
        codec.decode_json({"tensor": (np.ones((28, 28)) * 2).tolist()}, SPEC)


def test_too_many_instances_are_refused() -> None:
    b64 = base64.b64encode(png_bytes()).decode()
    body = {"instances": [b64] * (codec.MAX_IMAGES_PER_REQUEST + 1)}
    with pytest.raises(codec.RequestError) as raised:
        codec.decode_json(body, SPEC)
    assert raised.value.status == 413


def test_kserve_v2_float_tensor_and_base64_variants() -> None:
    values = np.random.default_rng(0).random((2, 1, 28, 28))
    body = {"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32",
                        "data": values.ravel().tolist()}]}
    decoded = codec.decode_json(body, SPEC)
    assert decoded.protocol == codec.KSERVE_V2 and decoded.pixels.shape == (2, 1, 28, 28)
    assert torch.allclose(decoded.pixels, torch.from_numpy(values).float())
    image = png_bytes(9)
    plain = base64.b64encode(image).decode()
    urlsafe = base64.urlsafe_b64encode(image).decode().rstrip("=")
    for text in (plain, urlsafe, "data:image/png;base64," + plain):
        decoded = codec.decode_request(text, "text/plain", SPEC)
        assert torch.equal(decoded.pixels[0], codec.decode_image(image, SPEC))


def test_select_payload_prefers_body_then_data() -> None:
    assert codec.select_payload({"model_name": b"m", "body": b"x"}) == ("body", b"x")
    assert codec.select_payload({"data": b"y"}) == ("data", b"y")
    with pytest.raises(codec.RequestError):
        codec.select_payload({})
    with pytest.raises(codec.RequestError):
        codec.select_payload({"a": 1, "b": 2})


def test_answers_and_wrapping() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    names = ["a", "b", "c"]
    full = codec.answer_probabilities(probs, names, "probabilities", 5)
    assert full[0] == {"a": pytest.approx(0.1), "b": pytest.approx(0.6), "c": pytest.approx(0.3)}
    top = codec.answer_probabilities(probs, names, "topk", 2)
    assert list(top[0]) == ["b", "c"] and list(top[1]) == ["a", "b"]
    assert codec.answer_labels(torch.tensor([2]), names) == [{"label": "c"}]
    with pytest.raises(ValueError):
        codec.check_defended(probs * 2, probs)
    with pytest.raises(ValueError):
        codec.check_defended(probs[:1], probs)
    codec.check_defended(probs, probs)


def test_fuzzed_bytes_never_escape_as_other_errors() -> None:
    rng = np.random.default_rng(0)
    seeds = [png_bytes(0), png_bytes(1, mode="RGB"), b'{"image": "aGVsbG8="}']
    for _ in range(300):
        sample = bytearray(seeds[int(rng.integers(len(seeds)))])
        for _ in range(int(rng.integers(1, 6))):
            sample[int(rng.integers(len(sample)))] = int(rng.integers(256))
        cut = int(rng.integers(1, len(sample) + 1))
        try:
            decoded = codec.decode_request(sample[:cut], None, SPEC)
        except codec.RequestError as error:
            assert 400 <= error.status < 500
        else:
            assert decoded.pixels.shape[1:] == (1, 28, 28)
            assert torch.isfinite(decoded.pixels).all()


def test_unexpected_handler_error_still_answers_every_request(
    handler_class: type, model_dir: Path, keep_threads: None
) -> None:
    handler, context = make_handler(handler_class, model_dir, model_config())

    def broken_answers(*args: Any, **kwargs: Any) -> None:
        raise KeyError("values 0.123")

    handler.postprocess = broken_answers
    responses = handler.handle([{"body": bytearray(png_bytes())}, {"body": b"x"}], context)
    assert len(responses) == 2
    assert context.status(0) == 503 and context.status(1) == 400
