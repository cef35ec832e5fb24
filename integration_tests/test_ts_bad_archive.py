"""An archive whose ``defense:`` section is bad never becomes READY, and the log names the
key; ``grad2 archive`` refuses to build one in the first place."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests
import yaml
from conftest import stop_and_check_gone, write_model_config
from ts_client import png

from grad2.config import ConfigError
from grad2.serve import Ports, build_archive, start_server

pytestmark = pytest.mark.integration


def with_model_config(source: Path, destination: Path, edit) -> Path:
    """Copy a ``.mar`` with its ``model-config.yaml`` edited (bypassing grad2 archive)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as copy:
        for item in original.infolist():
            data = original.read(item.filename)
            if item.filename == "model-config.yaml":
                raw = yaml.safe_load(data)
                edit(raw)
                data = yaml.safe_dump(raw).encode()
            copy.writestr(item, data)
    return destination


def test_bad_defense_section_never_becomes_ready(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()

    def break_epsilon(raw: dict) -> None:
        raw["defense"]["epsilon"] = 7

    with_model_config(model_store / "fashion-1.0.mar", store / "broken.mar", break_epsilon)
    server = start_server(store, ["broken=broken.mar"], workdir=tmp_path / "ts",
                          ports=Ports.free(), wait=False)
    try:
        with pytest.raises(RuntimeError, match=r"defense\.epsilon"):
            server.wait_ready(timeout=120)
        assert not server.ready("broken")
        log = (server.log_dir / "model_log.log").read_text(errors="replace")
        assert "defense.epsilon: must be a number in [0, 2], got 7" in log
        try:  # TorchServe queues it for a worker that never comes: no answer either way
            response = requests.post(
                f"{server.inference_url}/predictions/broken", data=png(0), timeout=5,
                headers={"Authorization": f"Bearer {server.tokens().inference}",
                         "Content-Type": "application/octet-stream"})
        except requests.Timeout:
            pass
        else:
            assert response.status_code != 200 and "tshirt" not in response.text
    finally:
        stop_and_check_gone(server)


@pytest.mark.parametrize(
    ("defense", "key"),
    [
        ({"epsilon": -1}, "defense.epsilon"),
        ({"method": "magic"}, "defense.method"),
        ({"scores": "guess"}, "defense.scores"),
        ({"typo_key": 1}, "defense.typo_key"),
        ({"target": "watermark", "target_file": "wm.pt"}, "defense.target"),
        ({"target": "file"}, "defense.target_file"),
    ],
)
def test_archive_refuses_bad_config_naming_the_key(checkpoints, tmp_path: Path,
                                                   defense: dict, key: str) -> None:
    defense = {"epsilon": 0.5, **defense}
    config = write_model_config(tmp_path / "model-config.yaml", **defense)
    with pytest.raises(ConfigError) as raised:
        build_archive("m", "1.0", checkpoints["victim"], config, tmp_path / "store",
                      surrogate=checkpoints["surrogate"])
    assert raised.value.key == key
    assert not list((tmp_path / "store").glob("*.mar"))


def test_archive_refuses_a_surrogate_that_does_not_fit(checkpoints, tmp_path: Path) -> None:
    import torch

    from grad2.models import build_model, save_checkpoint

    save_checkpoint(build_model("small_cnn", num_classes=7), tmp_path / "other.pt")
    config = write_model_config(tmp_path / "model-config.yaml", 0.5)
    with pytest.raises(ConfigError, match=r"defense\.surrogate"):
        build_archive("m", "1.0", checkpoints["victim"], config, tmp_path / "store",
                      surrogate=tmp_path / "other.pt")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wm.pt")
    config = write_model_config(tmp_path / "model-config.yaml", 0.5, target="file",
                                target_file="wm.pt")
    with pytest.raises(ConfigError, match=r"defense\.target_file"):
        build_archive("m", "1.0", checkpoints["victim"], config, tmp_path / "store",
                      surrogate=checkpoints["surrogate"],
                      files={"target_file": tmp_path / "wm.pt"})


def test_archive_cli_names_the_key(checkpoints, tmp_path: Path) -> None:
    config = write_model_config(tmp_path / "model-config.yaml", 2.5)
    result = subprocess.run(
        [sys.executable, "-m", "grad2.cli", "archive", "--name", "m", "--version", "1",
         "--victim", str(checkpoints["victim"]), "--surrogate", str(checkpoints["surrogate"]),
         "--config", str(config), "--export-path", str(tmp_path / "store")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "defense.epsilon" in result.stderr
    good = write_model_config(tmp_path / "good.yaml", 0.5)
    archive = build_archive("m", "1.0", checkpoints["victim"], good, tmp_path / "store",
                            surrogate=checkpoints["surrogate"])
    with zipfile.ZipFile(archive) as bundle:
        names = set(bundle.namelist())
    assert {"victim.pt", "victim.json", "surrogate.pt", "surrogate.json",
            "model-config.yaml", "grad2_handler.py"} <= names
    with pytest.raises(FileExistsError):
        build_archive("m", "1.0", checkpoints["victim"], good, tmp_path / "store",
                      surrogate=checkpoints["surrogate"])
