"""The wheel as a fleet operator installs it: built from this checkout, installed into a
fresh virtual environment outside the checkout (the pinned torch via constraints.txt, so
the install is served from pip's cache), then, from an empty directory and with nothing
of the checkout on the path, ``grad2 archive`` packs a model, ``grad2 serve`` serves it
and the inference API gives the defended answer the library computes; then the ``kserve``
extra, installed beside it, serves the same archive with the same answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
import yaml
from ts_client import assert_on_simplex, png

from grad2.serve import clean_probabilities, decode_image, load_served_model, normalise

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
#: What a worker must find in the wheel besides the Python modules.
SHIPPED = ("grad2/serve/templates/grad2_handler.py", "grad2/serve/templates/config.properties",
           "grad2/serve/templates/metrics.yaml", "grad2/serve/templates/model-configs/grad2.yaml")


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900
        ) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (a build in the checkout would leave
    ``build/`` behind, whose stale files could end up in a later wheel)."""
    source = tmp_path_factory.mktemp("source") / "grad2-serve"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".cache", "build", "dist", "runs", "model_store", "__pycache__",
        "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis"))
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)], cwd=out, env=dict(os.environ))
    (built,) = out.glob("grad2_serve-*.whl")
    return built


def test_wheel_holds_the_serving_files_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in SHIPPED:
        assert shipped in names
    assert not [name for name in names if name.startswith(("tests/", "integration_tests/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    required = [line for line in text.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    # The worker's needs only, as ranges: installing the plugin keeps the fleet's torch.
    assert sorted(line.split()[1].split(">")[0].split("<")[0].split("=")[0]
                  for line in required) == ["numpy", "pillow", "pyyaml", "torch", "torchvision"]
    assert not any("==" in line for line in required)
    assert "License-Expression: MIT" in text


@pytest.fixture
def fleet_venv(tmp_path: Path) -> Iterator[Path]:
    """A fresh virtual environment's path, deleted afterwards (it holds a whole torch:
    pytest keeps its last three temporary folders, 5 GB each otherwise)."""
    venv = tmp_path / "fleet-venv"
    try:
        yield venv
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def test_installed_wheel_archives_serves_and_defends(wheel: Path, tmp_path: Path,
                                                     fleet_venv: Path) -> None:
    venv = fleet_venv
    work = tmp_path / "operator"  # an empty directory, not the checkout
    work.mkdir()
    run([sys.executable, "-m", "venv", str(venv)], cwd=work, env=dict(os.environ))
    python, grad2 = venv / "bin" / "python", venv / "bin" / "grad2"
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "GRAD2_CACHE")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
         f"{wheel}[serve]"], cwd=work, env=env, timeout=1200)

    where = run([str(python), "-c", "import importlib.util, grad2; print(grad2.__file__); "
                 "print(sorted(m for m in ('tqdm', 'matplotlib', 'requests') "
                 "if importlib.util.find_spec(m)))"], cwd=work, env=env)
    location, lab_packages = where.stdout.splitlines()
    assert str(venv) in location and str(REPO) not in location
    assert lab_packages == "[]"  # the serve extra brings no lab dependency

    run([str(python), "-c",
         "import torch; from grad2 import build_model, save_checkpoint\n"
         "torch.manual_seed(0); save_checkpoint(build_model('small_cnn'), 'victim.pt')\n"
         "torch.manual_seed(1); save_checkpoint(build_model('small_cnn'), 'surrogate.pt')"],
        cwd=work, env=env)
    run([str(grad2), "archive", "--name", "fashion", "--version", "1.0",
         "--victim", "victim.pt", "--surrogate", "surrogate.pt", "--config", "grad2",
         "--export-path", "store"], cwd=work, env=env)
    run([str(grad2), "serve", "--model-store", "store", "--workdir", "ts", "--free-ports",
         "--timeout", "300"], cwd=work, env=env)
    try:
        state = json.loads((work / "ts" / "server.json").read_text())
        token = json.loads((work / "ts" / "key_file.json").read_text())["inference"]["key"]
        image = png(7)
        response = requests.post(
            f"http://127.0.0.1:{state['ports']['inference']}/predictions/fashion",
            data=image, timeout=60,
            headers={"Authorization": f"Bearer {token}",
                     "Content-Type": "application/octet-stream"})
        assert response.status_code == 200, response.text
        answer = response.json()
        probabilities = torch.tensor(list(answer.values()), dtype=torch.float64)
        assert_on_simplex(probabilities.numpy())
    finally:
        run([str(grad2), "serve", "--stop", "--workdir", "ts"], cwd=work, env=env)

    # The kserve extra beside it: the same archive, the same answer, through KServe's V1.
    run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
         f"{wheel}[kserve]"], cwd=work, env=env, timeout=1200)
    run([str(grad2), "serve", "--runtime", "kserve", "--model-store", "store", "--models",
         "fashion=fashion.mar", "--workdir", "ks", "--free-ports", "--timeout", "300"],
        cwd=work, env=env)
    try:
        port = json.loads((work / "ks" / "kserve.json").read_text())["port"]
        response = requests.post(f"http://127.0.0.1:{port}/v1/models/fashion:predict",
                                 data=image, headers={"Content-Type": "image/png"},
                                 timeout=60)
        assert response.status_code == 200, response.text
        assert response.json() == answer
    finally:
        run([str(grad2), "serve", "--stop", "--workdir", "ks"], cwd=work, env=env)

    # The same answer from this checkout's library on the same files: the wheel serves
    # the defense, not the clean probabilities.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(work / "store" / "fashion.mar").extractall(unpacked)
    raw = yaml.safe_load((unpacked / "model-config.yaml").read_text())
    served = load_served_model(unpacked, raw)
    x = normalise(decode_image(image, served.input_config).unsqueeze(0), served.input_config)
    probs = clean_probabilities(served.victim, x)
    with torch.enable_grad():
        defended = served.defense(x, probs)[0].double()
    order = [answer_name for answer_name in answer]
    expected = dict(zip(served.class_names, defended.tolist(), strict=True))
    assert torch.allclose(probabilities, torch.tensor([expected[n] for n in order],
                                                      dtype=torch.float64),
                          atol=1e-5)
    assert float((defended - probs[0].double()).abs().sum()) > 0.1
