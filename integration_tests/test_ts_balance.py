"""A class-balanced target (``grad2 target --balance-epsilon``) served by a real TorchServe:
its answers through the inference API are the library's, keep every label, and keep the
victim's mean answer on the images it was balanced on, where the unbalanced target does
not."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stop_and_check_gone, write_model_config

from grad2 import targets
from grad2.balance import marginal_gap
from grad2.cli import main
from grad2.defenses import GRAD2
from grad2.lab.attack import APIClient, encode_png
from grad2.lab.data import FASHION_CLASSES, thief_pool
from grad2.models import build_model, load_checkpoint, save_checkpoint
from grad2.serve import (
    Ports,
    TorchServeServer,
    build_archive,
    decode_image,
    load_served_model,
    normalise,
    start_server,
)

pytestmark = pytest.mark.integration

MODEL = "fashion_balanced"
EPSILON = 1.0
#: The images the target is computed and balanced on: ``thief_pool("animal", N, seed=99)``.
REFERENCES = 160


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchServeServer, Path]]:
    """A server with GRAD² preserve_top1 at ``EPSILON`` on a balanced misdirection target
    written by the CLI; yields it and the folder of its files."""
    folder = tmp_path_factory.mktemp("balanced")
    torch.manual_seed(3)
    save_checkpoint(build_model("small_cnn"), folder / "victim.pt")
    torch.manual_seed(4)
    save_checkpoint(build_model("small_cnn"), folder / "surrogate.pt")
    assert main(["target", "misdirect", "--surrogate", str(folder / "surrogate.pt"),
                 "--victim", str(folder / "victim.pt"), "--references", str(REFERENCES),
                 "--balance-epsilon", str(EPSILON), "--preserve-top1",
                 "--balance-steps", "300", "--out", str(folder / "balanced.pt")]) == 0
    names = folder / "index_to_name.json"
    names.write_text(json.dumps({str(i): name for i, name in enumerate(FASHION_CLASSES)}))
    config = write_model_config(folder / "config.yaml", EPSILON, batch_size=8,
                                target="file", target_file="balanced.pt", preserve_top1=True)
    store = folder / "store"
    build_archive(MODEL, "1.0", folder / "victim.pt", config, store,
                  surrogate=folder / "surrogate.pt", files={"target_file": folder / "balanced.pt"},
                  index_to_name=names)
    server = start_server(store, [f"{MODEL}={MODEL}.mar"], workdir=folder / "ts",
                          ports=Ports.free(), timeout=300)
    try:
        yield server, folder
    finally:
        stop_and_check_gone(server)


def test_served_balanced_answers_keep_the_mean_answer(balanced) -> None:
    server, folder = balanced
    images = thief_pool("animal", size=REFERENCES, seed=99).images
    client = APIClient(f"{server.inference_url}/predictions/{MODEL}",
                       server.tokens().inference, concurrency=4)
    served, answered, classes, stats = client.query(images, progress=False)
    assert stats.failed == 0 and classes == list(FASHION_CLASSES)
    assert answered.tolist() == list(range(REFERENCES))

    surrogate, _ = load_checkpoint(folder / "surrogate.pt")
    # The worker's computation in process: the archive loaded as the worker loads it
    # (channels-last networks, batch plans), each PNG decoded and normalised as it is.
    unpacked = folder / "unpacked"
    with zipfile.ZipFile(folder / "store" / f"{MODEL}.mar") as bundle:
        bundle.extractall(unpacked)
    model = load_served_model(unpacked, yaml.safe_load((unpacked / "model-config.yaml")
                                                       .read_text()))
    model.plan_batches(8)
    spec = model.input_config
    x = normalise(torch.stack([decode_image(encode_png(image), spec) for image in images]), spec)
    clean = model.probabilities(x)
    with torch.enable_grad():
        expected = model.defense(x, clean)
    torch.testing.assert_close(served, expected.float(), atol=1e-4, rtol=0)
    assert torch.equal(served.argmax(dim=1), clean.argmax(dim=1))

    plain = GRAD2(surrogate, EPSILON, targets.misdirect(surrogate, x), preserve_top1=True)
    unbalanced_gap = float(marginal_gap(plain(x, clean), clean).abs().sum())
    served_gap = float(marginal_gap(served, clean).abs().sum())
    assert unbalanced_gap > 0.1
    assert served_gap < 0.25 * unbalanced_gap
