"""Property tests of the request decoding path with arbitrary bytes and JSON (hypothesis),
and a replay of the atheris corpus (``fuzz/corpus``).

The property (``fuzz/fuzz_decoding.py``'s :func:`check_row`): decoding either refuses the
request with :class:`codec.RequestError` carrying a 4xx status, or gives
``[N, 1, 28, 28]`` pixels in ``[0, 1]``, within a bounded time. Through the handler (a fake
TorchServe context): every request of a batch gets a 4xx error body or a defended answer
(on the simplex, within epsilon of the victim's clean answer, and not that answer), never
a 5xx, and never the handler's guard for decoder bugs.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_hostile_images import (
    EPSILON,
    FakeContext,
    answer_vector,
    build_handler,
    clean_probabilities,
    encode,
    noise,
    write_models,
)

from grad2.serve import codec

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"


def load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_decoding", ROOT / "fuzz" /
                                                  "fuzz_decoding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load_harness()
SEEDS = harness.seed_inputs()
#: Small valid images of every format (seed inputs without their two control bytes).
IMAGES = [data[2:] for name, data in SEEDS.items() if name.startswith("raw_")]
B64_IMAGES = [base64.b64encode(image).decode() for image in IMAGES]
#: Keys the decoders look for, so generated JSON reaches every branch.
KEYS = ["image", "data", "b64", "tensor", "instances", "inputs", "datatype", "shape", "name",
        "id", "body"]
FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

numbers = (st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from([0, 1, 0.5, -0.0])
           | st.integers(0, 1).map(float))
scalars = (st.none() | st.booleans() | numbers | st.text(max_size=12)
           | st.sampled_from(B64_IMAGES) | st.sampled_from(["BYTES", "FP32", "FP64", "INT8"]))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)
content_types = st.sampled_from(harness.CONTENT_TYPES)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real image with a few bytes replaced, a slice repeated, and maybe truncated."""
    data = bytearray(draw(st.sampled_from(IMAGES)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data) - 1))
        data[start:start] = data[start:start + draw(st.integers(1, 64))] * draw(
            st.integers(1, 20))
    return bytes(data[:draw(st.integers(0, len(data)))])


@st.composite
def kserve_v2_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """KServe v2 bodies near the valid ones: odd shapes, datatypes and data."""
    count = draw(st.integers(0, 3))
    shape = draw(st.one_of(
        st.just([count, 1, 28, 28]), st.just([count]),
        st.lists(st.integers(-3, 2**40), max_size=5), json_values))
    datatype = draw(st.sampled_from(["BYTES", "FP32", "FP64", "fp32", "INT8", ""]) | st.text())
    data = draw(st.one_of(
        st.just(np.full(count * 784, 0.5).tolist()),
        st.lists(st.sampled_from(B64_IMAGES) | st.text(max_size=8), max_size=4),
        st.lists(st.lists(st.sampled_from(B64_IMAGES), max_size=3), max_size=3),
        st.lists(numbers, max_size=10), json_values))
    tensor = {"name": "x", "shape": shape, "datatype": datatype, "data": data}
    extra = draw(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=2))
    return {"id": draw(json_values), "inputs": [{**extra, **tensor}]}


@given(data=st.binary(max_size=4096))
@FUZZ
def test_arbitrary_bytes_in_every_request_form(data: bytes) -> None:
    harness.check_input(data)


@given(image=mutated_images(), content_type=content_types,
       form=st.sampled_from(["raw", "image_b64", "kserve_v1", "kserve_v2", "multipart"]))
@FUZZ
def test_mutated_images(image: bytes, content_type: str | None, form: str) -> None:
    prefix = bytes([harness.KINDS.index(form), harness.CONTENT_TYPES.index(content_type)])
    harness.check_input(prefix + image)


@given(body=json_values, content_type=content_types, as_text=st.booleans())
@FUZZ
def test_arbitrary_json_bodies(body: Any, content_type: str | None, as_text: bool) -> None:
    """Decoded JSON as TorchServe passes it, or its text as a raw body."""
    if as_text:
        try:
            text = json.dumps(body, allow_nan=True).encode()
        except (ValueError, RecursionError):
            return
        harness.check_row({"body": bytearray(text)}, content_type, "json text")
    else:
        harness.check_row({"body": body}, content_type, "json")


@given(body=json_values, wrapper=st.sampled_from(["instances", "image", "tensor", "data"]))
@FUZZ
def test_arbitrary_json_inside_each_request_form(body: Any, wrapper: str) -> None:
    wrapped = {"instances": [body]} if wrapper == "instances" else {wrapper: body}
    harness.check_row({"body": wrapped}, "application/json", wrapper)


@given(body=kserve_v2_bodies())
@example(body={"inputs": [{"name": "x", "shape": [0, 1, 28, 28], "datatype": "BYTES",
                           "data": [[]]}]})  # torch.stack([]) raised RuntimeError
@FUZZ
def test_kserve_v2_bodies(body: dict[str, Any]) -> None:
    harness.check_row({"body": body}, "application/json", "kserve_v2")


@given(row=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                           st.binary(max_size=64) | json_values, max_size=4)
       | json_values)
@FUZZ
def test_arbitrary_rows(row: Any) -> None:
    """What TorchServe hands the handler per request: any mapping, or worse."""
    harness.check_row(row, None)


def test_large_tensors_and_deep_nesting_are_refused_quickly() -> None:
    deep: Any = 0.5
    for _ in range(5000):
        deep = [deep]
    for body in ({"tensor": deep}, {"instances": [deep]},
                 {"inputs": [{"datatype": "FP32", "shape": [1, 1, 28, 28], "data": deep}]},
                 {"inputs": [{"datatype": "BYTES", "shape": [1], "data": deep}]},
                 {"tensor": np.full((1000, 1000), 0.5).tolist()},
                 {"inputs": [{"datatype": "FP32", "shape": [2**40, 1, 28, 28],
                              "data": [0.5] * 784}]}):
        assert harness.check_row({"body": body}, "application/json") != "ok"


def test_corpus_replays() -> None:
    """Every input atheris kept (and every crash it found) decodes or is refused."""
    files = sorted(path for path in CORPUS.iterdir() if path.is_file())
    assert len(files) >= len(SEEDS)
    started = time.perf_counter()
    outcomes = {path.name: harness.check_input(path.read_bytes()) for path in files}
    assert "ok" in outcomes.values() and "400" in outcomes.values()
    crashes = {name: outcome for name, outcome in outcomes.items() if name.startswith("crash-")}
    assert crashes and "ok" not in crashes.values(), crashes
    assert time.perf_counter() - started < 60


def test_seeds_are_in_the_corpus() -> None:
    for name, data in SEEDS.items():
        path = CORPUS / f"seed_{name}"
        assert path.is_file() and path.read_bytes() == data, name


# --------------------------------------------------------------------------- handler


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pixel_limit = Image.MAX_IMAGE_PIXELS
    yield build_handler(write_models(tmp_path_factory.mktemp("models")))
    Image.MAX_IMAGE_PIXELS = pixel_limit


GOOD = [encode(noise(seed=seed), "PNG") for seed in range(4)]
rows = st.one_of(
    st.sampled_from(GOOD).map(lambda image: {"body": bytearray(image)}),
    st.sampled_from(GOOD).map(lambda image: {"data": bytearray(image)}),
    st.sampled_from(GOOD).map(lambda image: {"body": {"instances": [
        {"data": base64.b64encode(image).decode()}, base64.b64encode(image).decode()]}}),
    mutated_images().map(lambda image: {"body": bytearray(image)}),
    st.binary(max_size=256).map(lambda data: {"body": bytearray(data)}),
    json_values.map(lambda body: {"body": body}),
    kserve_v2_bodies().map(lambda body: {"body": body}),
    st.dictionaries(st.text(max_size=5), st.binary(max_size=8), max_size=3),
)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": content_types.filter(lambda value: value is not None),
    "explain": st.sampled_from(["true", "false", "1"])})


def defended_answers(response: Any) -> list[dict[str, float]]:
    """The answers inside one 200 response, whatever its protocol."""
    if "predictions" in response:
        return response["predictions"]
    if "outputs" in response:
        return [json.loads(item) for item in response["outputs"][0]["data"]]
    return [response]


@given(batch=st.lists(st.tuples(rows, headers), min_size=1, max_size=4))
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_handler_answers_every_request_with_4xx_or_a_defended_answer(
    handler: Any, batch: list[tuple[dict[str, Any], dict[str, str]]]
) -> None:
    context: FakeContext = handler.context
    context.statuses.clear()
    context.request_headers = [dict(header) for _, header in batch]
    data = [row for row, _ in batch]
    started = time.perf_counter()
    responses = handler.handle(data, context)
    assert time.perf_counter() - started < 10 * len(batch)
    assert len(responses) == len(batch)
    names = handler.served.class_names
    for index, ((row, header), response) in enumerate(zip(batch, responses)):
        status = context.status(index)
        if status != 200:
            assert 400 <= status < 500, (status, response)
            assert set(response) == {"code", "type", "message"} and response["code"] == status
            assert response["message"] != "request could not be decoded"  # a decoder bug
            continue
        _, value = codec.select_payload(row)
        pixels = codec.decode_request(value, header.get("Content-Type"),
                                           handler.served.input_config).pixels
        clean = clean_probabilities(handler, pixels).double()
        answers = defended_answers(response)
        assert len(answers) == len(clean)
        for answer, reference in zip(answers, clean):
            assert list(answer) == names
            vector = answer_vector(answer, handler)
            assert math.isclose(float(vector.sum()), 1, abs_tol=1e-5)
            assert float(vector.min()) >= 0
            l1 = float((vector - reference).abs().sum())
            assert 1e-6 < l1 <= EPSILON + 1e-5
            assert not torch.equal(vector, reference)
