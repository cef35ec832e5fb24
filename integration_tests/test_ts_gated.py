"""A ``grad2_gated`` model version built with the operator's commands (``grad2 keygen``,
``grad2 gate``, ``grad2 archive --mapping-key --gate-file``) and served by a real
TorchServe: its answers are the library's and do not depend on batch-mates; the key stays
out of the public config; ``grad2 verify`` accuses a suspect that follows the secret
mapping (the served model itself, through its URL) and not the undefended version."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import stop_and_check_gone, write_checkpoints, write_model_config
from ts_client import predict_raw

from grad2 import gate
from grad2.cli import main
from grad2.lab.attack import APIClient, encode_png
from grad2.lab.data import FASHION_CLASSES, load_fashion_mnist, thief_pool
from grad2.serve import (
    Ports,
    TorchServeServer,
    build_archive,
    clean_probabilities,
    open_archive,
    start_server,
)
from grad2.tools.ownership import verify_suspect

pytestmark = pytest.mark.integration

MODEL = "fashion_gated"


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        (folder / f"{index:04d}.png").write_bytes(encode_png(image))
    return folder


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[TorchServeServer, Path, dict]]:
    folder = tmp_path_factory.mktemp("gated")
    names = write_checkpoints(folder, 5, 6, FASHION_CLASSES)
    fashion = load_fashion_mnist("test").images
    images = {
        "train": write_pngs(folder / "train", fashion[:300]),
        "validation": write_pngs(folder / "validation", fashion[300:500]),
        "animal": write_pngs(folder / "animal", thief_pool("animal", size=120, seed=3).images),
    }
    store = folder / "store"
    first = write_model_config(folder / "v1.yaml", 0.2)
    build_archive(MODEL, "1.0", folder / "victim.pt", first, store,
                  surrogate=folder / "surrogate.pt", index_to_name=names,
                  archive_name=f"{MODEL}-1.0")
    assert main(["keygen", "--out", str(folder / "secret" / "mapping.key")]) == 0
    assert main(["gate", "--archive", str(store / f"{MODEL}-1.0.mar"), "--images",
                 str(images["train"]), "--validation", str(images["validation"]),
                 "--flag-share", "0.3", "--out", str(folder / "gate.pt")]) == 0
    keys = json.loads((folder / "gate.json").read_text())
    config = write_model_config(
        folder / "v2.yaml", 0.2, method="grad2_gated", epsilon_ood=2.0,
        ood_answer="permute", mapping_key="mapping.key", gate_score="features",
        gate_file="gate.pt", gate_threshold=keys["gate_threshold"],
        gate_slope=keys["gate_slope"])
    build_archive(MODEL, "2.0", folder / "victim.pt", config, store,
                  surrogate=folder / "surrogate.pt", index_to_name=names,
                  files={"mapping_key": folder / "secret" / "mapping.key",
                         "gate_file": folder / "gate.pt"},
                  archive_name=f"{MODEL}-2.0")
    none = folder / "none.yaml"
    raw = yaml.safe_load(first.read_text())
    raw["defense"] = {"method": "none"}
    none.write_text(yaml.safe_dump(raw))
    build_archive(f"{MODEL}_none", "1.0", folder / "victim.pt", none, store,
                  index_to_name=names)
    server = start_server(store, [f"{MODEL}={MODEL}-2.0.mar", f"{MODEL}_none={MODEL}_none.mar"],
                          workdir=folder / "ts", ports=Ports.free(), timeout=300)
    try:
        yield server, folder, images
    finally:
        stop_and_check_gone(server)


def test_served_answers_are_the_librarys_and_gated_ones_are_relabelled(gated) -> None:
    server, folder, images = gated
    files = sorted(images["animal"].iterdir()) + sorted(images["validation"].iterdir())[:40]
    client = APIClient(f"{server.inference_url}/predictions/{MODEL}",
                       server.tokens().inference, concurrency=4)
    served, _, classes, stats = client.query_bodies(
        [path.read_bytes() for path in files], progress=False)
    assert stats.failed == 0 and classes == list(FASHION_CLASSES)
    with open_archive(folder / "store" / f"{MODEL}-2.0.mar") as archive:
        model = archive.load()
        secret = (folder / "secret" / "mapping.key").read_text().strip()
        assert secret not in archive.file("model-config.yaml").read_text()
        from grad2.tools.images import open_images

        x = torch.cat([batch for batch, _, _ in open_images(
            images["animal"], model.input_config).batches(256, progress=False)]
            + [batch for batch, _, _ in open_images(
                images["validation"], model.input_config).batches(256, progress=False)])
        x = x[:len(files)]
        clean = clean_probabilities(model.victim, x, None)
        with torch.enable_grad():
            expected = model.defense(x, clean)
        weights = model.defense.gate_weights(x, clean)
        mapping = model.defense.mapping
    torch.testing.assert_close(served, expected.float(), atol=1e-5, rtol=0)
    full = weights > 0.999
    assert full.sum() >= 10 and (~full).sum() >= 10  # both kinds of answers were seen
    # Fully gated answers are the redirected row under other names: exact L1 budget, no
    # drained class, top class sigma(top).
    assert (served[full] > 0).all()
    assert (served[full].argmax(1) == mapping[clean[full].argmax(1)]).float().mean() > 0.9
    assert mapping.tolist() == gate.keyed_mapping(
        gate.read_key(folder / "secret" / "mapping.key"), 10).tolist()


def test_same_bits_alone_and_in_a_batch(gated) -> None:
    server, _, images = gated
    token = server.tokens().inference
    files = sorted(images["animal"].iterdir())[:8]
    bodies = [path.read_bytes() for path in files]
    alone = [predict_raw(server.inference_url, f"/predictions/{MODEL}", token, body).text
             for body in bodies]
    start = threading.Barrier(len(bodies))

    def send(body: bytes) -> str:
        start.wait()
        return predict_raw(server.inference_url, f"/predictions/{MODEL}", token, body).text

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(send, bodies))
    assert together == alone


def test_verify_accuses_a_follower_of_the_mapping_and_not_the_undefended_model(gated) -> None:
    server, folder, images = gated
    token = server.tokens().inference
    archive = folder / "store" / f"{MODEL}-2.0.mar"
    # 120 images: verify's default of 100 moved images would refuse most draws here.
    follower = verify_suspect(archive, f"{server.inference_url}/predictions/{MODEL}",
                              images["animal"], token=token, progress=False, min_moved=20)
    # A random-init victim puts nearly every image in one or two top classes, and a random
    # mapping agrees with sigma on one class with chance 1/9: that bounds the p-value here
    # (a trained victim spreads OOD images over many classes; docs/results.md).
    assert follower.informative >= 20 and follower.follows_receiver > 0.9
    assert follower.p_value < 0.05
    honest = verify_suspect(archive, f"{server.inference_url}/predictions/{MODEL}_none",
                            images["animal"], token=token, progress=False, min_moved=20)
    assert honest.p_value > 0.05 and honest.follows_receiver < 0.2
