"""Bad requests each get a 4xx with a JSON message, and the model keeps answering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ts_client import (
    answer_of,
    assert_on_simplex,
    grpc_answer,
    grpc_predict,
    png,
    png_bomb,
    post,
    predict_raw,
)

pytestmark = pytest.mark.integration

GOOD = png(7)
BINARY = {"Content-Type": "application/octet-stream"}
JSON = {"Content-Type": "application/json"}

BAD_REQUESTS = {
    # name: (body, headers, expected status)
    "garbage bytes": (b"\x00\x01garbage" * 10, BINARY, 400),
    "empty body": (b"", BINARY, 400),
    "truncated PNG": (png(1)[:100], BINARY, 400),
    "huge image dimensions": (png_bomb(60_000, 60_000), BINARY, 413),
    "side over max_side": (png(2, size=(1500, 8)), BINARY, 413),
    "wrong channels": (json.dumps({"tensor": np.zeros((3, 28, 28)).tolist()}).encode(), JSON,
                       400),
    "wrong tensor size": (json.dumps({"tensor": np.zeros((14, 14)).tolist()}).encode(), JSON,
                          400),
    "JSON with NaN": (b'{"tensor": [[NaN, 0.5]]}', JSON, 400),
    "invalid JSON": (b'{"image": ', JSON, 400),
    "bad base64": (b'{"image": "%%%"}', JSON, 400),
    "PNG declared as JSON": (png(3), JSON, 400),
    "wrong content type": (png(4), {"Content-Type": "text/plain"}, 415),
    "oversized body": (b"\x00" * 7_000_000, BINARY, 413),
    "KServe v2 wrong datatype": (json.dumps({"inputs": [{"name": "x", "shape": [1],
                                 "datatype": "INT8", "data": [1]}]}).encode(), JSON, 400),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_and_the_next_is_answered(server, inference_token,
                                                       case: str) -> None:
    body, headers, status = BAD_REQUESTS[case]
    url = f"{server.inference_url}/predictions/fashion"
    response = post(url, inference_token, data=body, headers=headers)
    assert response.status_code == status, (case, response.status_code, response.text[:300])
    if case != "oversized body":  # the frontend refuses it before the handler: empty body
        message = response.json()
        assert message["code"] == status and message["message"]
    good = answer_of(predict_raw(server.inference_url, "/predictions/fashion",
                                 inference_token, GOOD))
    assert_on_simplex(good)


def test_bad_and_good_requests_in_one_batch(server, inference_token) -> None:
    """Concurrent good and bad requests: each bad one fails alone."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{server.inference_url}/predictions/fashion"
    bodies = [(png(seed), 200) if seed % 2 else (b"junk" * seed, 400) for seed in range(1, 9)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(
            lambda item: post(url, inference_token, data=item[0], headers=BINARY), bodies))
    for (_, status), response in zip(bodies, responses):
        assert response.status_code == status, response.text[:200]
        if status == 200:
            assert_on_simplex(answer_of(response))


def test_bad_grpc_request_gets_the_error_body(server, inference_token, grpc_stubs) -> None:
    """TorchServe 0.12's gRPC path drops the per-request HTTP status the handler sets
    (the call ends OK), so a gRPC client reads the refusal from the JSON body."""
    prediction = grpc_predict(grpc_stubs, server.grpc_inference_target, inference_token,
                              "fashion", b"not an image")
    refusal = json.loads(prediction)
    assert refusal["code"] == 400 and "not an image" in refusal["message"]
    assert_on_simplex(grpc_answer(grpc_stubs, server.grpc_inference_target, inference_token,
                                  "fashion", GOOD))
