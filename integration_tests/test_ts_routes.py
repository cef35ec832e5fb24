"""Every inference route of a real TorchServe gives defended answers: on the simplex,
within the version's L1 budget of the undefended answer, and different from it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import EPSILON_V1, EPSILON_V2
from ts_client import (
    answer_of,
    assert_on_simplex,
    b64,
    grpc_answer,
    png,
    post,
    predict_raw,
    vector,
)

pytestmark = pytest.mark.integration

IMAGES = [png(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def undefended(server, inference_token) -> list[np.ndarray]:
    """Answers of the epsilon-0 model: the victim's clean probabilities."""
    return [answer_of(predict_raw(server.inference_url, "/predictions/fashion_clean",
                                  inference_token, image)) for image in IMAGES]


def route_answers(server, token, grpc_stubs, image: bytes) -> dict[str, np.ndarray]:
    """The default version's answer for ``image`` through every route."""
    base = server.inference_url
    answers = {
        "/predictions/NAME": answer_of(predict_raw(base, "/predictions/fashion", token, image)),
        "/predictions/NAME/VERSION": answer_of(
            predict_raw(base, "/predictions/fashion/1.0", token, image)),
        "multipart": answer_of(post(f"{base}/predictions/fashion", token,
                                    files={"data": ("x.png", image, "image/png")})),
        "json base64": answer_of(post(f"{base}/predictions/fashion", token,
                                      json_body={"image": b64(image)})),
    }
    v1 = post(f"{base}/v1/models/fashion:predict", token,
              json_body={"instances": [{"data": b64(image)}]})
    assert v1.status_code == 200, v1.text[:300]
    [answers["/v1/models/NAME:predict"]] = [vector(a) for a in v1.json()["predictions"]]
    v2 = post(f"{base}/v2/models/fashion/infer", token, json_body={
        "id": "q1", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                "data": [b64(image)]}]})
    assert v2.status_code == 200, v2.text[:300]
    body = v2.json()
    assert body["id"] == "q1" and body["model_name"] == "fashion"
    answers["/v2/models/NAME/infer"] = vector(json.loads(body["outputs"][0]["data"][0]))
    answers["gRPC Predictions"] = grpc_answer(grpc_stubs, server.grpc_inference_target, token,
                                              "fashion", image)
    return answers


def test_every_route_gives_a_defended_answer(server, inference_token, grpc_stubs,
                                             undefended) -> None:
    for image, clean in zip(IMAGES, undefended):
        assert_on_simplex(clean)
        answers = route_answers(server, inference_token, grpc_stubs, image)
        reference = answers["/predictions/NAME"]
        for route, answer in answers.items():
            assert_on_simplex(answer)
            l1 = float(np.abs(answer - clean).sum())
            assert l1 <= EPSILON_V1 + 1e-5, (route, l1)
            assert l1 > 1e-3, f"{route} answered the undefended probabilities"
            assert np.array_equal(answer, reference), f"{route} differs from /predictions"


def test_versions_follow_their_own_epsilon(server, inference_token, undefended) -> None:
    base = server.inference_url
    spent = {"1.0": [], "2.0": []}
    for image, clean in zip(IMAGES, undefended):
        for version in spent:
            answer = answer_of(predict_raw(base, f"/predictions/fashion/{version}",
                                           inference_token, image))
            assert_on_simplex(answer)
            spent[version].append(float(np.abs(answer - clean).sum()))
    assert max(spent["1.0"]) <= EPSILON_V1 + 1e-5
    assert max(spent["2.0"]) <= EPSILON_V2 + 1e-5
    assert max(spent["2.0"]) > EPSILON_V1 + 1e-3, "version 2.0 should spend its larger budget"
    versions = server.model_versions("fashion")
    assert sorted(v["modelVersion"] for v in versions) == ["1.0", "2.0"]


def test_kserve_v1_batch_of_instances(server, inference_token) -> None:
    instances = [{"data": b64(image)} for image in IMAGES]
    response = post(f"{server.inference_url}/v1/models/fashion:predict", inference_token,
                    json_body={"instances": instances})
    assert response.status_code == 200
    predictions = [vector(answer) for answer in response.json()["predictions"]]
    assert len(predictions) == len(IMAGES)
    for image, answer in zip(IMAGES, predictions):
        alone = answer_of(predict_raw(server.inference_url, "/predictions/fashion",
                                      inference_token, image))
        assert np.array_equal(answer, alone)


def test_metrics_endpoint_reports_the_defense(server, inference_token) -> None:
    import requests

    answer_of(predict_raw(server.inference_url, "/predictions/fashion", inference_token,
                          IMAGES[0]))
    names = ("DefenseTime", "DefenseL1", "DefendedAnswers", "DefenseLabelFlips")
    deadline = time.monotonic() + 15
    while True:  # the frontend reads the worker's metric lines asynchronously
        text = requests.get(server.metrics_url, timeout=30).text
        missing = [n for n in names if f'{n}{{ModelName="fashion",ModelVersion="1.0"' not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, text[-2000:]
