"""grad2.lab.train: augmentation, distillation, evaluation helpers and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grad2.lab import data, train
from grad2.lab.data import Dataset
from grad2.lab.train import (
    accuracy,
    agreement,
    augment_batch,
    cosine_lr,
    distill,
    soft_cross_entropy,
    train_clone,
    train_surrogate,
)
from grad2.models import build_model, predict_probs, save_checkpoint


def template_problem(
    count: int = 256, top_mass: float = 0.7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A learnable toy task: ``inputs [count, 1, 28, 28]`` are one of 10 smooth random
    templates plus noise; soft ``targets [count, 10]`` put ``top_mass`` on the template's
    class and spread the rest evenly. Returns ``(inputs, targets, labels)``."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.interpolate(
        torch.randn(10, 1, 7, 7, generator=generator), size=28, mode="bilinear")
    labels = torch.randint(0, 10, (count,), generator=generator)
    inputs = templates[labels] + 0.5 * torch.randn(count, 1, 28, 28, generator=generator)
    targets = torch.full((count, 10), (1 - top_mass) / 9).scatter(1, labels[:, None], top_mass)
    return inputs, targets, labels


def teacher_problem(count: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets, _ = template_problem(count, seed=seed)
    return inputs, targets


# --------------------------------------------------------------------------- augmentation


def test_augmentation_off_is_identity() -> None:
    images = torch.randn(5, 2, 28, 28)
    torch.testing.assert_close(augment_batch(images, padding=0, flip=False), images, rtol=0, atol=0)


def test_augmentation_is_a_per_image_crop_and_flip() -> None:
    images = torch.randn(64, 2, 9, 7)
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(images, generator, padding=2, fill=-5.0)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-5.0)
    choices = []
    for index in range(len(images)):  # reference: try every window and flip
        matches = [
            (dy, dx, flip)
            for dy in range(5) for dx in range(5) for flip in (False, True)
            if torch.equal(
                out[index],
                (lambda window, f: window.flip(-1) if f else window)(
                    padded[index, :, dy:dy + 9, dx:dx + 7], flip),
            )
        ]
        assert matches, f"image {index} is not a padded crop (flipped or not) of its input"
        choices.append(matches[0])
    assert len(set(choices)) > 10  # offsets and flips are drawn per image
    assert {flip for _, _, flip in choices} == {False, True}


def test_distill_without_augmentation_never_augments(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("augment_batch called with augment=False")

    monkeypatch.setattr(train, "augment_batch", forbidden)
    inputs, targets = teacher_problem(64)
    distill(build_model("small_cnn"), inputs, targets, epochs=1, augment=False, progress=False)


# --------------------------------------------------------------------------- distillation


def test_distill_reduces_soft_loss() -> None:
    inputs, targets = teacher_problem()
    torch.manual_seed(0)
    model = build_model("small_cnn")
    losses: list[float] = []
    before = soft_cross_entropy(predict_probs(model, inputs).log(), targets).item()
    distill(model, inputs, targets, epochs=8, batch_size=32, augment=False, progress=False,
            on_epoch_end=lambda epoch, loss: losses.append(loss))
    after = soft_cross_entropy(predict_probs(model, inputs).log(), targets).item()
    entropy = soft_cross_entropy(targets.log(), targets).item()  # the lowest reachable
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert not model.training
    assert after - entropy < 0.5 * (before - entropy)


def test_hard_labels_train_on_the_argmax() -> None:
    """Targets put only 0.2 on their argmax: a soft thief learns flat answers, a
    labels-only thief learns confident answers of the right class."""
    inputs, targets, labels = template_problem(128, top_mass=0.2, seed=3)
    confidence = {}
    for hard in (False, True):
        torch.manual_seed(0)
        model = distill(build_model("small_cnn"), inputs, targets, epochs=12, batch_size=32,
                        augment=False, hard_labels=hard, progress=False)
        probs = predict_probs(model, inputs)
        confidence[hard] = probs.max(1).values.mean().item()
        if hard:
            assert (probs.argmax(1) == labels).float().mean() > 0.95
    assert confidence[False] < 0.3 < 0.9 < confidence[True]


def test_training_is_reproducible_with_a_seed() -> None:
    inputs, targets = teacher_problem(160)
    weights = [
        torch.nn.utils.parameters_to_vector(
            train_clone(inputs, targets, epochs=2, seed=seed, progress=False).parameters())
        for seed in (7, 7, 8)
    ]
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    assert not torch.equal(weights[0], weights[2])


def test_cosine_schedule_and_early_stop_arguments() -> None:
    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0)
    assert cosine_lr(0.1, 20, 100) > 0.09  # 10 of 50 epochs: still a high learning rate
    inputs, targets = teacher_problem(32)
    with pytest.raises(ValueError, match="planned_epochs"):
        distill(build_model("small_cnn"), inputs, targets, epochs=3, planned_epochs=2)


def test_divergence_is_reported() -> None:
    inputs, targets = teacher_problem(64)
    with pytest.raises(RuntimeError, match="diverged"):
        distill(build_model("small_cnn"), inputs, targets, epochs=3, batch_size=16, lr=1e30,
                progress=False)


# --------------------------------------------------------------------------- evaluation helpers


def test_predict_probs_batches_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn").train()
    inputs = torch.randn(50, 1, 28, 28)
    probs = predict_probs(model, inputs, batch_size=7)
    assert probs.shape == (50, 10) and model.training
    torch.testing.assert_close(probs.sum(1), torch.ones(50))
    torch.testing.assert_close(probs, predict_probs(model, inputs, batch_size=50))


def test_accuracy_and_agreement() -> None:
    torch.manual_seed(0)
    model, other = build_model("small_cnn"), build_model("wide_cnn")
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    predicted = predict_probs(model, data.to_tensor(images)).argmax(1).numpy()
    labels = predicted.copy()
    labels[:10] = (labels[:10] + 1) % 10
    dataset = Dataset(images, labels.astype(np.int64), [str(k) for k in range(10)])
    assert accuracy(model, dataset) == pytest.approx(0.75)
    inputs = data.to_tensor(images)
    assert agreement(model, model, inputs) == 1.0
    expected = (predict_probs(other, inputs).argmax(1) == torch.from_numpy(predicted)).float()
    assert agreement(model, other, inputs) == pytest.approx(expected.mean().item())


def test_surrogate_uses_victim_architecture_and_answers() -> None:
    torch.manual_seed(0)
    victim = build_model("wide_cnn").eval()
    images = np.random.default_rng(1).integers(0, 256, (96, 28, 28), dtype=np.uint8)
    pool = Dataset(images, None, [str(k) for k in range(10)], "noise")
    surrogate = train_surrogate(victim, pool, epochs=1, planned_epochs=5, progress=False)
    assert surrogate.grad2_arch == "wide_cnn" and not surrogate.training
    other = train_surrogate(victim, pool, epochs=1, planned_epochs=5, arch="small_cnn",
                            progress=False)
    assert other.grad2_arch == "small_cnn"


# --------------------------------------------------------------------------- CLI

needs_data = pytest.mark.skipif(
    not (data.cache_dir() / data.ANIMAL_NPZ).is_file(),
    reason="datasets not fetched (run `grad2 fetch-data`)",
)


@needs_data
def test_cli_train_clone_writes_checkpoint_and_metadata(tmp_path: Path) -> None:
    from grad2.cli import main

    torch.manual_seed(0)
    victim_path = tmp_path / "victim.pt"
    save_checkpoint(build_model("small_cnn"), victim_path, {"role": "victim"})
    clone_path = tmp_path / "clone.pt"
    common = ["--victim", str(victim_path), "--pool", "animal", "--pool-size", "200",
              "--epochs", "1", "--quiet"]
    assert main(["train-clone", *common, "--out", str(clone_path)]) == 0
    metadata = json.loads(clone_path.with_suffix(".json").read_text())
    assert metadata["arch"] == "small_cnn" and metadata["pool"] == "animal"
    assert metadata["pool_size"] == 200 and metadata["answers"] == "clean victim"
    assert 0 <= metadata["test_accuracy"] <= 1 and 0 <= metadata["agreement_with_victim"] <= 1
    assert metadata["wall_time_s"] >= 0

    answers = tmp_path / "answers.pt"
    torch.save({"answers": torch.full((199, 10), 0.1)}, answers)
    assert main(["train-clone", *common, "--answers", str(answers),
                 "--out", str(tmp_path / "x.pt")]) == 2  # wrong length: a clear error
    torch.save(torch.full((200, 10), 0.1), answers)
    assert main(["train-clone", *common, "--answers", str(answers), "--hard-labels",
                 "--out", str(tmp_path / "y.pt")]) == 0
    assert json.loads((tmp_path / "y.json").read_text())["hard_labels"] is True
