"""A thief that is not ours: IBM's Adversarial Robustness Toolbox (ART) runs Knockoff Nets
against the live, defended TorchServe endpoint.

ART's ``BlackBoxClassifier`` wraps a predict function that sends each batch through the
inference API (``APIClient``); ``KnockoffNets`` (random sampling, probability labels)
queries it with Animal-MNIST images and trains ART's ``PyTorchClassifier`` around a small
CNN defined here. Checked: the queries reached TorchServe (its own request counter), the
stolen classifier answers ``[N, 10]``, it trained on the soft vectors, and every answer the
thief received was defended (L1 distance to the epsilon-0 twin in ``(0, epsilon]``).
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import requests
import torch
from art.attacks.extraction import KnockoffNets
from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
from conftest import EPSILON_V1
from torch import nn

from grad2.lab.attack import APIClient
from grad2.lab.data import FASHION_MEAN, FASHION_STD, thief_pool
from grad2.serve import TorchServeServer

pytestmark = pytest.mark.integration

STOLEN = 200
QUERY_BATCH = 50
CLASSES = 10


def served_requests(server: TorchServeServer, model: str) -> int:
    text = requests.get(server.metrics_url, timeout=30).text
    pattern = rf'^ts_inference_requests_total\{{[^}}]*model_name="{model}"[^}}]*\}} (\S+)$'
    return int(sum(float(value) for value in re.findall(pattern, text, re.MULTILINE)))


class RecordingCrossEntropy(nn.CrossEntropyLoss):
    """ART keeps probability labels for a ``CrossEntropyLoss`` (and reduces one-hot ones
    to indices); this records which kind of target the thief trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.target_shapes: list[tuple[int, ...]] = []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.target_shapes.append(tuple(target.shape))
        return super().forward(logits, target)


def thief_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, CLASSES),
    )


def test_art_knockoff_nets_against_the_live_endpoint(server, inference_token) -> None:
    url = f"{server.inference_url}/predictions/fashion/1.0"
    client = APIClient(url, inference_token, concurrency=4, timeout=30)
    received: list[tuple[np.ndarray, np.ndarray]] = []
    spent = {"calls": 0, "requests": 0, "failed": 0}

    def predict(x: np.ndarray) -> np.ndarray:
        """ART's view of the API: float pixel values ``[B, 1, 28, 28]`` in, ``[B, 10]`` out."""
        pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8)[:, 0]
        assert np.array_equal(pixels, x[:, 0]), "ART should pass the pool's pixels unchanged"
        answers, answered, _, stats = client.query(pixels, progress=False)
        spent["calls"] += 1
        spent["requests"] += stats.requests
        spent["failed"] += stats.failed
        assert len(answered) == len(pixels), stats.errors
        received.append((pixels, answers.numpy()))
        return answers.numpy()

    victim = BlackBoxClassifier(predict, input_shape=(1, 28, 28), nb_classes=CLASSES,
                                clip_values=(0, 255))
    torch.manual_seed(0)
    network = thief_network()
    loss = RecordingCrossEntropy()
    thief = PyTorchClassifier(
        model=network, loss=loss, optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        input_shape=(1, 28, 28), nb_classes=CLASSES, clip_values=(0, 255),
        preprocessing=(255 * FASHION_MEAN, 255 * FASHION_STD), device_type="cpu",
    )
    initial = [p.detach().clone() for p in network.parameters()]
    pool = thief_pool("animal", size=400, seed=3).images[:, None].astype(np.float32)
    attack = KnockoffNets(classifier=victim, batch_size_fit=64, batch_size_query=QUERY_BATCH,
                          nb_epochs=1, nb_stolen=STOLEN, sampling_strategy="random",
                          use_probability=True, verbose=False)

    before = served_requests(server, "fashion")
    state = np.random.get_state()
    np.random.seed(0)  # ART draws the stolen subset with numpy's global generator
    try:
        stolen = attack.extract(pool, thieved_classifier=thief)
    finally:
        np.random.set_state(state)

    # ART queried the live endpoint, in batches of QUERY_BATCH, STOLEN images in all
    assert spent["calls"] == STOLEN // QUERY_BATCH and spent["failed"] == 0
    assert sum(len(pixels) for pixels, _ in received) == STOLEN
    deadline = time.monotonic() + 15
    while (seen := served_requests(server, "fashion") - before) < spent["requests"] \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert seen == spent["requests"] >= STOLEN

    # the stolen classifier is a trained [N, 10] classifier, trained on soft labels
    test = thief_pool("fashion_heldout", size=64, seed=0).images[:, None].astype(np.float32)
    predictions = stolen.predict(test)
    assert predictions.shape == (64, CLASSES) and np.isfinite(predictions).all()
    assert any(not torch.equal(a, b) for a, b in zip(initial, network.parameters()))
    assert loss.target_shapes and all(len(shape) == 2 and shape[1] == CLASSES
                                      for shape in loss.target_shapes)

    # every answer ART received was defended: within epsilon of the undefended twin, not 0
    pixels = np.concatenate([p for p, _ in received])
    answers = np.concatenate([a for _, a in received]).astype(np.float64)
    twin = APIClient(f"{server.inference_url}/predictions/fashion_clean", inference_token,
                     concurrency=4, timeout=30)
    clean, answered, _, _ = twin.query(pixels, progress=False)
    assert len(answered) == STOLEN
    assert np.allclose(answers.sum(axis=1), 1, atol=1e-5) and answers.min() >= 0
    l1 = np.abs(answers - clean.numpy().astype(np.float64)).sum(axis=1)
    assert l1.max() <= EPSILON_V1 + 1e-5, l1.max()
    assert (l1 > 0).all(), np.sort(l1)[:5]
    print(f"ART KnockoffNets: {STOLEN} queries, L1 to the clean twin: mean {l1.mean():.4f}, "
          f"max {l1.max():.4f}")
