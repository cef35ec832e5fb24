"""The shipped ``config/config.properties`` is safe as it stands, ``grad2 serve`` keeps it
safe when the template is edited, and a running server listens on loopback only.

Files are read the way TorchServe's Java ``Properties.load`` reads them (a key ends at the
first unescaped ``=``, ``:`` or blank; the last assignment of a key wins), so an edit that
a plain ``key=value`` reading would miss is seen here as TorchServe sees it."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

from grad2.serve import Ports
from grad2.serve.server import DEFAULT_TS_CONFIG, read_java_properties, write_server_config

pytestmark = pytest.mark.integration

ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_ADDRESS_KEYS = ("grpc_inference_address", "grpc_management_address")
#: Largest request body the shipped config may allow (TorchServe's default is 6,553,500).
REQUEST_SIZE_LIMIT = 16 * 2**20


def java_properties(text: str) -> dict[str, str]:
    """``key -> value`` as ``java.util.Properties.load`` reads ``text`` (the product's
    reader, checked against Java's rules by the next test)."""
    return read_java_properties(text)


def test_java_properties_reader() -> None:
    text = "# c\n! c\na=1\nb : 2\nc 3\nd=x\\\n   y\ne\\=f=4\na=5\n  g  =  6 \n"
    assert java_properties(text) == {"a": "5", "b": "2", "c": "3", "d": "xy", "e=f": "4",
                                     "g": "6 "}


def test_shipped_config_keeps_the_service_private() -> None:
    text = DEFAULT_TS_CONFIG.read_text()
    properties = java_properties(text)
    keys = [line.split("=", 1)[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert len(keys) == len(set(keys)), "a key is set twice; the last one would win"
    assert properties["disable_token_authorization"] == "false"
    assert properties["enable_model_api"] == "false"
    for key in ADDRESS_KEYS:
        assert urlparse(properties[key]).hostname == "127.0.0.1", key
    for key in GRPC_ADDRESS_KEYS:
        assert properties[key] == "127.0.0.1", key
    for key in ("max_request_size", "max_response_size"):
        assert 0 < int(properties[key]) <= REQUEST_SIZE_LIMIT, key
    assert properties["install_py_dep_per_model"] == "false"  # no pip install from a .mar
    assert properties.get("enable_envvars_config", "false") == "false"  # TS_* cannot override


def generated_from(folder: Path, template_text: str) -> dict[str, str]:
    """The properties ``grad2 serve`` generates from a template with this text, parsed
    as Java reads them (fixed ports 18080-18082, 17070-17071)."""
    template = folder / "config.properties"
    template.write_text(template_text)
    ports = Ports(18080, 18081, 18082, 17070, 17071)
    written = write_server_config(template, folder / "generated.properties", "127.0.0.1",
                                  ports)
    return java_properties(written.read_text())


@pytest.mark.parametrize(
    "edits",
    [
        # plain edits of the template
        {"disable_token_authorization": "disable_token_authorization=true",
         "enable_model_api": "enable_model_api=true",
         "inference_address": "inference_address=http://0.0.0.0:8080",
         "grpc_inference_address": "grpc_inference_address=0.0.0.0"},
        # the other separators Java accepts, and blanks around them
        {"disable_token_authorization": "disable_token_authorization : true",
         "enable_model_api": "enable_model_api true",
         "management_address": "management_address:http://0.0.0.0:8081",
         "grpc_management_address": "grpc_management_address   =   0.0.0.0"},
        # keys removed from the template altogether
        {key: "" for key in ("disable_token_authorization", "enable_model_api",
                             "metrics_address", "grpc_inference_address")},
    ],
    ids=["edited", "java-separators", "removed"],
)
def test_generated_config_forces_tokens_loopback_and_no_model_api(
    tmp_path: Path, edits: dict[str, str]
) -> None:
    lines = []
    for line in DEFAULT_TS_CONFIG.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        lines.append(edits.get(key, line))
    lines.append("enable_model_api=true")  # a later line would win in Java
    (tmp_path / "metrics.yaml").write_text("model_metrics: {}\n")
    properties = generated_from(tmp_path, "\n".join(lines) + "\n")
    assert properties["disable_token_authorization"] == "false"
    assert properties["enable_model_api"] == "false"
    for key, port in zip(ADDRESS_KEYS, (18080, 18081, 18082)):
        assert properties[key] == f"http://127.0.0.1:{port}", key
    for key in GRPC_ADDRESS_KEYS:
        assert properties[key] == "127.0.0.1", key
    assert properties["grpc_inference_port"] == "17070"
    assert properties["max_request_size"] == java_properties(
        DEFAULT_TS_CONFIG.read_text())["max_request_size"]


def test_running_server_listens_on_loopback_only(server) -> None:
    """Every socket the frontend listens on (HTTP, management, metrics, both gRPC ports)
    is bound to 127.0.0.1, and the generated config says what the shipped one says."""
    java = server.processes()[0]
    connections = getattr(java, "net_connections", None) or java.connections  # psutil < 6
    listening = [c for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    assert {server.ports.inference, server.ports.management, server.ports.metrics,
            server.ports.grpc_inference, server.ports.grpc_management} <= ports
    addresses = {ipaddress.ip_address(c.laddr.ip) for c in listening}
    # Java binds IPv4 addresses as IPv4-mapped IPv6 (::ffff:127.0.0.1)
    addresses = {getattr(a, "ipv4_mapped", None) or a for a in addresses}
    assert addresses == {ipaddress.ip_address("127.0.0.1")}, listening
    generated = java_properties((server.workdir / "config.properties").read_text())
    shipped = java_properties(DEFAULT_TS_CONFIG.read_text())
    for key in ("disable_token_authorization", "enable_model_api", "max_request_size",
                "max_response_size", "install_py_dep_per_model"):
        assert generated[key] == shipped[key], key


def test_generated_config_wins_over_colon_separated_and_env_overrides(tmp_path) -> None:
    """Java also splits ``key:value`` and ``key value``: such template lines must not slip
    a public address or the model API past ``grad2 serve``, nor may TS_* variables."""
    properties = generated_from(tmp_path, (
        "inference_address:http://0.0.0.0:8080/?a=b\n"
        "enable_model_api true\n"
        "disable_token_authorization : true\n"
        "enable_envvars_config=true\n"
    ))
    assert properties["inference_address"] == "http://127.0.0.1:18080"
    assert properties["enable_model_api"] == "false"
    assert properties["disable_token_authorization"] == "false"
    assert properties["enable_envvars_config"] == "false"
    assert int(properties["max_request_size"]) <= REQUEST_SIZE_LIMIT
