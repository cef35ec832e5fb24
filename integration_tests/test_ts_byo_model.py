"""Bring your own model: a torchvision ResNet-18 for 3x224x224 images, defended with a
surrogate of another architecture (MobileNetV3-small), archived with ``grad2 archive``'s
library function, served by a real TorchServe, answering a JPEG."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import stop_and_check_gone
from PIL import Image
from ts_client import assert_on_simplex, predict_raw

from grad2.models import build_model, save_checkpoint
from grad2.serve import Ports, TorchServeServer, build_archive, start_server

pytestmark = pytest.mark.integration

EPSILON = 0.8
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLASSES = [f"class_{i}" for i in range(10)]


def _config(path: Path, epsilon: float) -> Path:
    raw = {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 5,
        "responseTimeout": 120,
        "input": {"channels": 3, "height": 224, "width": 224, "mean": IMAGENET_MEAN,
                  "std": IMAGENET_STD, "threads": 1},
        "defense": {"method": "grad2", "epsilon": epsilon, "surrogate": "surrogate.pt"},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def byo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeServer]:
    folder = tmp_path_factory.mktemp("byo")
    victim, surrogate = folder / "victim.pt", folder / "surrogate.pt"
    torch.manual_seed(0)
    save_checkpoint(build_model("torchvision:resnet18", num_classes=10, in_channels=3), victim)
    torch.manual_seed(1)
    save_checkpoint(
        build_model("torchvision:mobilenet_v3_small", num_classes=10, in_channels=3), surrogate
    )
    names = folder / "index_to_name.json"
    names.write_text(json.dumps({str(i): name for i, name in enumerate(CLASSES)}))
    store = folder / "store"
    for model, epsilon in (("resnet", EPSILON), ("resnet_clean", 0.0)):
        build_archive(model, "1.0", victim, _config(folder / f"{model}.yaml", epsilon), store,
                      surrogate=surrogate, index_to_name=names)
    server = start_server(store, ["resnet=resnet.mar", "resnet_clean=resnet_clean.mar"],
                          workdir=folder / "ts", ports=Ports.free(), timeout=300)
    try:
        yield server
    finally:
        stop_and_check_gone(server)


def test_torchvision_model_answers_a_jpeg_with_a_defended_vector(byo_server) -> None:
    token = byo_server.tokens().inference
    image = _jpeg(0)
    answers = {}
    for model in ("resnet", "resnet_clean"):
        response = predict_raw(byo_server.inference_url, f"/predictions/{model}", token, image)
        assert response.status_code == 200, response.text
        assert list(response.json()) == CLASSES
        answers[model] = np.array([response.json()[name] for name in CLASSES])
    defended, clean = answers["resnet"], answers["resnet_clean"]
    assert_on_simplex(defended)
    distance = np.abs(defended - clean).sum()
    assert 1e-4 < distance <= EPSILON + 1e-5
