"""The serving tools' pieces that need no running server."""

from __future__ import annotations

from pathlib import Path

import pytest

from grad2.config import ConfigError
from grad2.serve import Ports, check_model_config, read_manifest, stop_server
from grad2.serve.server import DEFAULT_TS_CONFIG, parse_model_specs, write_server_config

pytestmark = pytest.mark.integration


def test_server_config_forces_loopback_tokens_and_no_model_api(tmp_path: Path) -> None:
    template = tmp_path / "template.properties"
    template.write_text(
        DEFAULT_TS_CONFIG.read_text().replace("disable_token_authorization=false",
                                              "disable_token_authorization=true")
        + "enable_model_api=true\n"
    )
    (tmp_path / "metrics.yaml").write_text("model_metrics: {}\n")
    ports = Ports(1, 2, 3, 4, 5)
    written = write_server_config(template, tmp_path / "out.properties", "127.0.0.1", ports)
    properties = dict(line.split("=", 1) for line in written.read_text().splitlines()
                      if "=" in line and not line.startswith("#"))
    assert properties["inference_address"] == "http://127.0.0.1:1"
    assert properties["management_address"] == "http://127.0.0.1:2"
    assert properties["metrics_address"] == "http://127.0.0.1:3"
    assert properties["grpc_inference_port"] == "4" and properties["grpc_management_port"] == "5"
    assert properties["grpc_inference_address"] == "127.0.0.1"
    assert properties["disable_token_authorization"] == "false"
    assert properties["enable_model_api"] == "false"
    assert properties["metrics_config"] == str((tmp_path / "metrics.yaml").resolve())
    assert properties["max_request_size"] == "6553500"
    assert properties["vmargs"] == "-Xmx1g"


def test_shipped_config_is_complete() -> None:
    text = DEFAULT_TS_CONFIG.read_text()
    for line in ("metrics_mode=prometheus", "install_py_dep_per_model=false",
                 "default_workers_per_model=1", "disable_token_authorization=false",
                 "enable_model_api=false"):
        assert line in text
    assert (DEFAULT_TS_CONFIG.parent / "metrics.yaml").is_file()


def test_model_specs(model_store: Path) -> None:
    assert parse_model_specs(model_store, ["x=fashion-1.0.mar"]) == ["x=fashion-1.0.mar"]
    assert parse_model_specs(model_store, ["fashion-2.0.mar"]) == ["fashion=fashion-2.0.mar"]
    every = parse_model_specs(model_store, None)
    assert "fashion_clean=fashion_clean.mar" in every and len(every) == 3
    assert read_manifest(model_store / "fashion-2.0.mar")["model"]["modelVersion"] == "2.0"
    with pytest.raises(FileNotFoundError):
        parse_model_specs(model_store, ["y=missing.mar"])


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"defense": {"method": "none"}, "batchSize": 0}, "batchSize"),
        ({"defense": {"method": "none"}, "minWorkers": 3, "maxWorkers": 1}, "minWorkers"),
        ({"defense": {"method": "none"}, "input": {"channels": 9}}, "input.channels"),
        ({"defense": {"method": "none"}, "handler": {"batch_invariant": 1}},
         "handler.batch_invariant"),
        ({"input": {}}, "defense"),
    ],
)
def test_check_model_config(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        check_model_config(raw)
    assert raised.value.key == key


def test_stop_without_a_server_is_a_no_op(tmp_path: Path) -> None:
    assert stop_server(tmp_path) == []
