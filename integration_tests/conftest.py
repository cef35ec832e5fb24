"""Session fixtures: tiny random-init models, their archives, and one real TorchServe
serving every model the tests need (one server is much cheaper than many on 2 cores).

Served models (all share one victim and one surrogate, both ``small_cnn``):

- ``fashion`` 1.0 — GRAD², epsilon 0.5, batchSize 8, maxBatchDelay 50 ms (the default);
- ``fashion`` 2.0 — GRAD², epsilon 1.0;
- ``fashion_clean`` — GRAD² with epsilon 0: the undefended answer, for reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
import torch
import yaml
from ts_client import CLASS_NAMES, build_grpc_stubs

from grad2.models import build_model, save_checkpoint
from grad2.serve import Ports, TorchServeServer, build_archive, start_server, stop_server

EPSILON_V1 = 0.5
EPSILON_V2 = 1.0
SERVED = ["fashion=fashion-1.0.mar", "fashion=fashion-2.0.mar", "fashion_clean=fashion_clean.mar"]


def write_model_config(path: Path, epsilon: float, batch_size: int = 8,
                       max_batch_delay: int = 5, **defense: Any) -> Path:
    raw = {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay, "responseTimeout": 60,
        "defense": {"method": "grad2", "epsilon": epsilon, "target": "all_ones",
                    "surrogate": "surrogate.pt", **defense},
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353],
                  "max_side": 1024, "threads": 1},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_checkpoints(folder: Path, victim_seed: int, surrogate_seed: int,
                      class_names: list[str] | tuple[str, ...]) -> Path:
    """Random-init ``small_cnn`` victim and surrogate (``victim.pt``, ``surrogate.pt`` with
    their metadata) and ``index_to_name.json`` in ``folder``; returns the names file."""
    torch.manual_seed(victim_seed)
    save_checkpoint(build_model("small_cnn"), folder / "victim.pt")
    torch.manual_seed(surrogate_seed)
    save_checkpoint(build_model("small_cnn"), folder / "surrogate.pt")
    names = folder / "index_to_name.json"
    names.write_text(json.dumps({str(i): name for i, name in enumerate(class_names)}))
    return names


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init victim and surrogate (different seeds) and class names."""
    folder = tmp_path_factory.mktemp("checkpoints")
    names = write_checkpoints(folder, 0, 1, CLASS_NAMES)
    return {"victim": folder / "victim.pt", "surrogate": folder / "surrogate.pt",
            "index_to_name": names, "folder": folder}


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    configs = tmp_path_factory.mktemp("configs")
    archives = [
        ("fashion", "1.0", "fashion-1.0", write_model_config(
            configs / "v1.yaml", EPSILON_V1, batch_size=8, max_batch_delay=50)),
        ("fashion", "2.0", "fashion-2.0", write_model_config(configs / "v2.yaml", EPSILON_V2)),
        ("fashion_clean", "1.0", "fashion_clean", write_model_config(configs / "v0.yaml", 0.0)),
    ]
    for name, version, archive_name, config in archives:
        build_archive(
            name=name, version=version, victim=checkpoints["victim"], config=config,
            export_path=store, surrogate=checkpoints["surrogate"],
            index_to_name=checkpoints["index_to_name"], archive_name=archive_name,
        )
    return store


def stop_and_check_gone(server: Any, stop: Callable[[Path], list[int]] = stop_server) -> None:
    """Stop ``server`` (a TorchServe, or with ``stop_kserve`` a KServe model server) and
    check its processes (frontend and workers) have all exited."""
    pids = [process.pid for process in server.processes()]
    stopped = stop(server.workdir)
    assert set(pids) <= set(stopped)
    alive = [pid for pid in pids if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"{type(server).__name__} processes still running: {alive}"


@pytest.fixture(scope="session")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TorchServeServer]:
    """One TorchServe with every model in ``SERVED``, READY; stopped at the end."""
    workdir = tmp_path_factory.mktemp("torchserve")
    started = start_server(model_store, SERVED, workdir=workdir, ports=Ports.free(),
                           timeout=300)
    try:
        yield started
    finally:
        stop_and_check_gone(started)


@pytest.fixture(scope="session")
def inference_token(server: TorchServeServer) -> str:
    return server.tokens().inference


@pytest.fixture(scope="session")
def management_token(server: TorchServeServer) -> str:
    return server.tokens().management


@pytest.fixture(scope="session")
def grpc_stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """TorchServe's gRPC inference client, generated from its own ``inference.proto``."""
    return build_grpc_stubs(tmp_path_factory.mktemp("grpc"))
