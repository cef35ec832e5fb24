"""``grad2 archive``'s smoke test warns when a worker's start (load and batch plan) takes
over half of TorchServe's ``startupTimeout``."""

from __future__ import annotations

import itertools
import types
import warnings
from pathlib import Path

import pytest
import yaml
from shipped_answers import served_config, shipped_configs, stage

from grad2.serve import archive
from grad2.serve.archive import DEFAULT_STARTUP_TIMEOUT, smoke_test, startup_warning


def test_the_warning_names_the_key_the_limit_and_the_batch_size() -> None:
    assert startup_warning(DEFAULT_STARTUP_TIMEOUT / 2, {}) is None
    message = startup_warning(DEFAULT_STARTUP_TIMEOUT / 2 + 1, {"batchSize": 16})
    assert message is not None and message.startswith("startupTimeout:")
    assert f"{DEFAULT_STARTUP_TIMEOUT} s" in message and "batchSize = 16" in message
    assert startup_warning(2.5, {"startupTimeout": 5}) is None
    assert "of the 5 s" in startup_warning(3, {"startupTimeout": 5})
    assert startup_warning(300, {"startupTimeout": 900}) is None


@pytest.fixture
def staged(tmp_path: Path) -> tuple[Path, dict]:
    config = served_config(shipped_configs()["grad2_gated"])
    stage(tmp_path, config["defense"])
    (tmp_path / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path, config


def clock(step: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose clock moves ``step`` seconds a reading."""
    readings = itertools.count(0.0, step)
    return types.SimpleNamespace(perf_counter=lambda: next(readings))


def test_a_slow_start_warns_and_still_archives(staged, monkeypatch) -> None:
    folder, config = staged
    monkeypatch.setattr(archive, "time", clock(100.0))
    with pytest.warns(UserWarning, match=r"startupTimeout: .* took 100 s .* 120 s"):
        smoke_test(folder, config)


def test_a_quick_start_does_not_warn(staged, monkeypatch) -> None:
    folder, config = staged
    monkeypatch.setattr(archive, "time", clock(1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smoke_test(folder, config)
    assert not [w for w in caught if "startupTimeout" in str(w.message)]
