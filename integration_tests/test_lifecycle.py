"""The whole lifecycle on a model and images that are not the project's: RGB 32x32 images
of four made-up classes written as PNG and JPEG files into folders, a torchvision
architecture, every step through the ``grad2`` command line:

train-victim -> archive v1.0 (no defense) -> train-surrogate from that archive -> archive
v2.0 (GRAD²) -> tune on a validation folder (builds v2.1) -> evaluate --quick -> serve v2.1
on a real TorchServe -> attack through the inference API with a folder of images.

It checks plumbing and consistency (the served answer is the library's answer for the
same file), not accuracy: epochs are tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from grad2.serve import clean_probabilities, decode_image, load_served_model, normalise

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

GRAD2 = Path(sys.executable).with_name("grad2")
CLASSES = ["apple", "boat", "cloud", "drum"]


def write_folder(root: Path, per_class: int, seed: int, labelled: bool = True) -> Path:
    """Images whose dominant colour is their class (learnable), noise on top; PNG and JPEG
    alternate, sizes vary (the decoder resizes as the worker does)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / name if labelled else root / f"batch{label % 2}" / f"part{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            side = (32, 40, 48)[index % 3]
            pixels = rng.integers(0, 90, (side, side, 3)).astype(np.int16)
            pixels[..., label % 3] += 150 if label < 3 else 0
            if label == 3:
                pixels += 120  # the fourth class: bright grey
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
            suffix, form = (".png", "PNG") if index % 2 else (".jpg", "JPEG")
            image.save(folder / f"{name}_{index}{suffix}", format=form)
    return root


def grad2(*args: str, cwd: Path, timeout: float = 600) -> str:
    started = time.perf_counter()
    threads = ["--threads", "1"] if args[0] not in ("archive", "serve", "verify") else []
    result = subprocess.run([str(GRAD2), *args, *threads], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, check=False,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"grad2 {' '.join(args)}:\n{result.stderr[-3000:]}"
    print(f"grad2 {args[0]}: {time.perf_counter() - started:.1f} s")
    return result.stdout


def test_lifecycle_on_another_model_and_other_images(tmp_path: Path) -> None:
    started = time.perf_counter()
    work = tmp_path
    write_folder(work / "train", 24, seed=0)
    write_folder(work / "validation", 20, seed=1)
    write_folder(work / "defender_images", 15, seed=2, labelled=False)
    write_folder(work / "thief_pool", 15, seed=3, labelled=False)
    write_folder(work / "test", 10, seed=4)

    grad2("train-victim", "--images", "train", "--arch", "torchvision:resnet18", "--epochs",
          "2", "--out", "victim.pt", "--quiet", cwd=work)
    names = json.loads((work / "victim.index_to_name.json").read_text())
    assert list(names.values()) == CLASSES
    config = yaml.safe_load((work / "victim.model-config.yaml").read_text())
    assert config["input"]["channels"] == 3 and config["input"]["height"] == 32

    grad2("archive", "--name", "pics", "--version", "1.0", "--victim", "victim.pt",
          "--config", "victim.model-config.yaml", "--index-to-name",
          "victim.index_to_name.json", "--export-path", "store", "--archive-name",
          "pics_v1.0", cwd=work)
    grad2("train-surrogate", "--archive", "store/pics_v1.0.mar", "--images",
          "defender_images", "--arch", "torchvision:mobilenet_v3_small", "--epochs", "1",
          "--out", "surrogate.pt", "--quiet", cwd=work)
    config["defense"] = {"method": "grad2", "epsilon": 0.5, "surrogate": "surrogate.pt"}
    (work / "v2.yaml").write_text(yaml.safe_dump(config))
    grad2("archive", "--name", "pics", "--version", "2.0", "--victim", "victim.pt",
          "--surrogate", "surrogate.pt", "--config", "v2.yaml", "--index-to-name",
          "victim.index_to_name.json", "--export-path", "store", "--archive-name",
          "pics_v2.0", cwd=work)

    tune_started = time.perf_counter()
    table = grad2("tune", "--archive", "store/pics_v2.0.mar", "--validation", "validation",
                  "--max-accuracy-drop", "10", "--precision", "20", "--epsilons", "0",
                  "0.5", "1", "--export-path", "store", "--out", "tune", "--no-progress",
                  cwd=work)
    tune_seconds = time.perf_counter() - tune_started
    report = json.loads((work / "tune" / "tune.json").read_text())
    chosen = report["chosen"]["epsilon"]
    print(table, f"tune chose epsilon {chosen} in {tune_seconds:.1f} s")
    assert report["version"] == "2.1" and (work / "store" / "pics_v2.1.mar").is_file()
    assert (work / "tune" / "tune.png").is_file()
    assert [point["epsilon"] for point in report["points"]] == [0.0, 0.5, 1.0]

    grad2("evaluate", "--archive", "store/pics_v2.1.mar", "--pool", "thief_pool", "--test",
          "test", "--out", "evaluation", "--quick", "--clone-epochs", "1", "--no-progress",
          cwd=work)
    evaluation = json.loads((work / "evaluation" / "evaluate.json").read_text())
    assert {row["thief"] for row in evaluation["rows"]} == {"soft", "labels_only", "arch"}
    assert evaluation["thief_arch"] == "torchvision:mobilenet_v3_small"
    assert (work / "evaluation" / "evaluate.png").is_file()

    grad2("serve", "--model-store", "store", "--models", "pics=pics_v2.1.mar", "--workdir",
          "ts", "--free-ports", "--timeout", "300", cwd=work)
    try:
        state = json.loads((work / "ts" / "server.json").read_text())
        url = f"http://127.0.0.1:{state['ports']['inference']}/predictions/pics"
        grad2("attack", "--url", url, "--token-file", "ts/key_file.json", "--pool",
              "thief_pool", "--test", "test", "--out", "attack", "--epochs", "1",
              "--budget", "40", "--concurrency", "4", "--no-progress", cwd=work)
        attack = json.loads((work / "attack" / "attack.json").read_text())
        assert attack["classes"] == CLASSES
        assert attack["sent"] == attack["answered"] == 40 and attack["failed"] == 0
        assert attack["test_images"] == 40 and (work / "attack" / "clone.pt").is_file()

        # Consistency: the API's answer to a file is the library's for the same archive.
        probe = sorted((work / "thief_pool").rglob("*.jpg"))[0]
        token = json.loads((work / "ts" / "key_file.json").read_text())["inference"]["key"]
        response = requests.post(url, data=probe.read_bytes(), timeout=60, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
        assert response.status_code == 200, response.text
        served_answer = response.json()
    finally:
        grad2("serve", "--stop", "--workdir", "ts", cwd=work)
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(work / "store" / "pics_v2.1.mar").extractall(unpacked)
    model = load_served_model(unpacked, yaml.safe_load((unpacked / "model-config.yaml")
                                                       .read_text()))
    assert model.defense_config.params["epsilon"] == chosen
    x = normalise(decode_image(probe.read_bytes(), model.input_config)[None], model.input_config)
    clean = clean_probabilities(model.victim, x)
    with torch.enable_grad():
        defended = model.defense(x, clean)[0]
    assert list(served_answer) == CLASSES
    assert np.allclose(list(served_answer.values()), defended.tolist(), atol=1e-5)
    # verify tests only the images whose answer the archive moves to another top-1 class:
    # this in-distribution pool of 60 has too few, so it refuses with the counts, before it
    # reads the suspect (a missing file here).
    refusal = subprocess.run([str(GRAD2), "verify", "--archive", "store/pics_v2.1.mar",
                              "--suspect", "attack/missing.pt", "--images", "thief_pool"],
                             cwd=work, capture_output=True, text=True, timeout=600, check=False)
    assert refusal.returncode == 2 and "of 60 images are moved by this archive" in refusal.stderr
    assert "need >= 100" in refusal.stderr
    print(refusal.stderr, f"lifecycle: {time.perf_counter() - started:.1f} s")
