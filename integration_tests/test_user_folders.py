"""The tools' refusals on a user's archive and folders: each names the file, folder or key
and says what would work (no server needed, but real archives)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from grad2.models import build_model, save_checkpoint
from grad2.serve import build_archive

GRAD2 = Path(sys.executable).with_name("grad2")
CLASSES = ["ant", "bee", "cow"]


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RGB 3x16x16 archive (torchvision ResNet-18, MobileNetV3 surrogate) and folders."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    save_checkpoint(build_model("torchvision:resnet18", 3, 3), root / "victim.pt")
    torch.manual_seed(1)
    save_checkpoint(build_model("torchvision:mobilenet_v3_small", 3, 3), root / "surrogate.pt")
    (root / "names.json").write_text(json.dumps(dict(enumerate(CLASSES))))
    config = {"batchSize": 4, "input": {"channels": 3, "height": 16, "width": 16},
              "defense": {"method": "grad2", "epsilon": 0.5, "surrogate": "surrogate.pt"}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    build_archive(name="m", version="1.0", victim=root / "victim.pt",
                  config=root / "config.yaml", export_path=root / "store",
                  surrogate=root / "surrogate.pt", index_to_name=root / "names.json")
    rng = np.random.default_rng(0)
    for name in [*CLASSES, "yak"]:
        (root / "labelled" / name).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / "labelled" / name / f"{index}.png")
    (root / "small" / "ant").mkdir(parents=True)
    for index in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "small" / "ant" / f"{index}.jpg")
    (root / "no_images").mkdir()
    (root / "no_images" / "readme.txt").write_text("nothing")
    return root


def grad2(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRAD2), *args], cwd=root, capture_output=True, text=True,
                          timeout=300, check=False)


def test_tune_names_the_folder_class_that_is_not_the_archives(user: Path) -> None:
    result = grad2(user, "tune", "--archive", "store/m.mar", "--validation", "labelled",
                   "--precision", "50", "--no-progress")
    assert result.returncode == 2
    assert "sub-folder(s) yak are not classes of the model" in result.stderr


def test_tune_says_how_many_images_a_half_point_answer_needs(user: Path) -> None:
    result = grad2(user, "tune", "--archive", "store/m.mar", "--validation", "small",
                   "--max-accuracy-drop", "1", "--no-progress")
    assert result.returncode == 2
    assert "holds 5 labelled images" in result.stderr and "needs 1537" in result.stderr
    assert "--precision" in result.stderr


def test_a_folder_without_images_is_named(user: Path) -> None:
    result = grad2(user, "train-surrogate", "--archive", "store/m.mar", "--images",
                   "no_images", "--out", "s.pt", "--quiet")
    assert result.returncode == 2 and "no_images holds no image files" in result.stderr


def test_a_missing_archive_and_missing_flags_are_refused(user: Path) -> None:
    result = grad2(user, "evaluate", "--archive", "store/none.mar", "--pool", "small",
                   "--test", "small")
    assert result.returncode == 2 and "store/none.mar not found" in result.stderr
    result = grad2(user, "evaluate", "--archive", "store/m.mar")
    assert result.returncode == 2 and "--pool DIR" in result.stderr
    result = grad2(user, "attack", "--url", "http://127.0.0.1:9/predictions/m", "--pool",
                   "small")
    assert result.returncode == 2 and "--test DIR" in result.stderr


def test_small_cnn_at_another_size_is_refused_with_the_way_out(user: Path) -> None:
    result = grad2(user, "train-victim", "--images", "labelled", "--arch", "small_cnn",
                   "--size", "20", "--epochs", "1", "--out", "v.pt", "--quiet")
    assert result.returncode == 2
    assert "small_cnn cannot take 3x20x20 inputs" in result.stderr
