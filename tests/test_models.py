"""grad2.models: architectures and the checkpoint format."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from grad2.models import (
    ARCHITECTURES,
    CheckpointError,
    build_model,
    load_checkpoint,
    model_spec,
    save_checkpoint,
)


def _exercised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give batch-norm layers non-trivial running statistics, then switch to eval."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 28, 28, generator=generator) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_output_logits(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert model_spec(model) == {"arch": arch, "num_classes": 7, "in_channels": 1}
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_architectures_differ() -> None:
    sizes = {arch: sum(p.numel() for p in build_model(arch).parameters()) for arch in ARCHITECTURES}
    assert len(set(sizes.values())) == len(sizes)
    assert sizes["small_cnn"] < 50_000  # the CPU-friendly victim


def test_torchvision_models_need_three_channels() -> None:
    model = build_model("torchvision:resnet18", num_classes=4, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="3-channel"):
        build_model("torchvision:resnet18", in_channels=1)
    with pytest.raises(ValueError, match="unknown torchvision"):
        build_model("torchvision:no_such_net", in_channels=3)
    with pytest.raises(ValueError, match="small_cnn"):
        build_model("lenet")


@pytest.mark.parametrize("arch", ["small_cnn", "wide_cnn"])
def test_eval_mode_output_ignores_batch_mates(arch: str) -> None:
    torch.manual_seed(1)
    model = _exercised(build_model(arch))
    query = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        alone = model(query)
        with_others = model(torch.cat([torch.randn(5, 1, 28, 28) * 3, query]))[-1:]
    torch.testing.assert_close(alone, with_others, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = _exercised(build_model("small_cnn"))
    json_path = save_checkpoint(model, tmp_path / "sub" / "victim.pt",
                                {"dataset": "fashion", "test_accuracy": 0.91, "seed": 2})
    assert json_path == tmp_path / "sub" / "victim.json"
    loaded, metadata = load_checkpoint(tmp_path / "sub" / "victim.pt")
    assert not loaded.training
    assert metadata["arch"] == "small_cnn" and metadata["num_classes"] == 10
    assert metadata["in_channels"] == 1 and metadata["test_accuracy"] == 0.91
    inputs = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["victim.json", "victim.pt"]
    save_checkpoint(loaded, tmp_path / "copy.pt", {})  # same weights, same bytes
    assert (tmp_path / "copy.pt").read_bytes() == (tmp_path / "sub" / "victim.pt").read_bytes()


def test_save_checkpoint_rejects_contradicting_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contradicts"):
        save_checkpoint(build_model("small_cnn"), tmp_path / "m.pt", {"arch": "wide_cnn"})


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    model = build_model("small_cnn")
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, {})

    metadata_file = path.with_suffix(".json")
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "arch": "wide_cnn"}))
    with pytest.raises(CheckpointError, match="do not fit architecture 'wide_cnn'"):
        load_checkpoint(path)

    metadata_file.write_text(json.dumps(metadata))
    torch.save(build_model("small_cnn", num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)

    metadata_file.unlink()
    with pytest.raises(CheckpointError, match="metadata file missing"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_load_checkpoint_uses_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Payload(), protocol=2))
    path.with_suffix(".json").write_text(
        json.dumps({"arch": "small_cnn", "num_classes": 10, "in_channels": 1}))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
