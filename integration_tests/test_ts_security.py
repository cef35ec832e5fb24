"""Routes that must not leak model outputs, token authorization, and the model API."""

from __future__ import annotations

import json

import pytest
import requests
from ts_client import CLASS_NAMES, TIMEOUT, b64, grpc_predict, png, post, predict_raw

pytestmark = pytest.mark.integration

IMAGE = png(42)


def assert_no_probabilities(text: str) -> None:
    """No class name appears as a key with a number, nor any float-looking value."""
    for name in CLASS_NAMES:
        assert f'"{name}": 0' not in text and f'"{name}": 1' not in text, text[:300]
    assert "predictions" not in text and "outputs" not in text


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/explanations/fashion", "raw"),
        ("/explanations/fashion/1.0", "raw"),
        ("/v1/models/fashion:explain", "v1"),
        ("/v2/models/fashion/explain", "v2"),
    ],
)
def test_explanations_are_refused(server, inference_token, path: str, kind: str) -> None:
    url = f"{server.inference_url}{path}"
    if kind == "raw":
        response = predict_raw(server.inference_url, path, inference_token, IMAGE)
    elif kind == "v1":
        response = post(url, inference_token, json_body={"instances": [{"data": b64(IMAGE)}]})
    else:
        response = post(url, inference_token, json_body={"inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(IMAGE)]}]})
    assert response.status_code == 403, response.text[:300]
    assert_no_probabilities(response.text)


def test_describe_is_static(server, inference_token, management_token) -> None:
    with_header = post(f"{server.inference_url}/predictions/fashion", inference_token,
                       data=IMAGE, headers={"describe": "True",
                                            "Content-Type": "application/octet-stream"})
    assert with_header.status_code == 200
    description = with_header.json()
    assert description["input"]["height"] == 28 and description["classes"] == CLASS_NAMES
    assert_no_probabilities(with_header.text)
    management = requests.get(
        f"{server.management_url}/models/fashion?customized=true",
        headers={"Authorization": f"Bearer {management_token}"}, timeout=TIMEOUT,
    )
    assert management.status_code == 200
    custom = management.json()[0]["customizedMetadata"]
    if isinstance(custom, str):
        custom = json.loads(custom)
    assert custom["input"] == description["input"]
    assert_no_probabilities(json.dumps(custom))


@pytest.mark.parametrize("token", [None, "not-a-token", "management"])
def test_bad_tokens_are_refused(server, management_token, token: str | None) -> None:
    if token == "management":
        token = management_token  # the wrong kind of key
    response = predict_raw(server.inference_url, "/predictions/fashion", token, IMAGE)
    assert 400 <= response.status_code < 500
    assert_no_probabilities(response.text)


def test_grpc_without_token_is_refused(server, grpc_stubs) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as raised:
        grpc_predict(grpc_stubs, server.grpc_inference_target, None, "fashion", IMAGE)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_management_needs_its_token_and_model_api_is_off(server, management_token,
                                                         inference_token) -> None:
    url = f"{server.management_url}/models"
    assert requests.get(url, timeout=TIMEOUT).status_code == 400
    wrong = requests.get(url, headers={"Authorization": f"Bearer {inference_token}"},
                         timeout=TIMEOUT)
    assert wrong.status_code == 400
    headers = {"Authorization": f"Bearer {management_token}"}
    assert requests.get(url, headers=headers, timeout=TIMEOUT).status_code == 200
    register = requests.post(f"{url}?url=fashion-1.0.mar", headers=headers, timeout=TIMEOUT)
    unregister = requests.delete(f"{url}/fashion_clean", headers=headers, timeout=TIMEOUT)
    assert register.status_code == 405 and unregister.status_code == 405


def test_servers_listen_on_loopback_only(server) -> None:
    config = (server.workdir / "config.properties").read_text()
    assert "inference_address=http://127.0.0.1:" in config
    assert "disable_token_authorization=false" in config
    assert "enable_model_api=false" in config
