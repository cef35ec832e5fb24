"""Training: the victim, the defender's early-stopped surrogate, and the thief's clone.

One optimisation recipe serves all three (:func:`distill`, the thief's recipe of the GRAD²
paper): SGD with Nesterov momentum 0.9, weight decay 5e-4, learning rate 0.1, batch 128, a
per-step cosine schedule planned for ``planned_epochs`` and stopped after ``epochs``, random
crop (padding 2) and horizontal flip done on whole batches. Soft-label cross-entropy on
probability vectors, or plain cross-entropy on their argmax (a labels-only thief).

- Victim: ``small_cnn`` on the first 50,000 Fashion-MNIST training images, one-hot labels.
- Surrogate: distilled from the victim's clean answers on a thief pool, planned for the
  clone's length (:data:`CLONE_EPOCHS`) and stopped after :data:`SURROGATE_EPOCHS` — the
  paper's "10 of 50", scaled to this data.
- Clone: distilled from (possibly defended) answers for :data:`CLONE_EPOCHS` epochs.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grad2.config import InputConfig
from grad2.lab.data import (
    FASHION_MEAN,
    FASHION_STD,
    THIEF_POOLS,
    Dataset,
    load_fashion_mnist,
    thief_pool,
    to_tensor,
    victim_train_split,
)
from grad2.models import (
    build_model,
    load_checkpoint,
    model_spec,
    predict_probs,
    save_checkpoint,
)
from grad2.tools.progress import progress_bar

VICTIM_ARCH = "small_cnn"
VICTIM_EPOCHS = 20
#: A thief's clone trains this many epochs on its pool (soft labels, augmentation).
CLONE_EPOCHS = 12
#: The surrogate's cosine schedule is planned for the clone's length and stopped early,
#: as in the paper (10 of 50 epochs): 3 of 12 here.
SURROGATE_PLANNED_EPOCHS = CLONE_EPOCHS
SURROGATE_EPOCHS = 3
#: Normalised value of a black pixel: what random-crop padding fills in.
BLACK = -FASHION_MEAN / FASHION_STD


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialisation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; ``None`` keeps torch's default."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- augmentation


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    padding: int = 2,
    flip: bool = True,
    fill: float = BLACK,
) -> torch.Tensor:
    """Random crop after ``padding`` pixels of ``fill`` on every side, and a random
    horizontal flip, drawn independently for each image. ``[B, C, H, W] -> [B, C, H, W]``.

    One gather does both: each output pixel reads the padded image at a per-image
    row/column offset (columns reversed for flipped images); no loop over images.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), value=fill)
    padded_width = width + 2 * padding
    device = images.device
    shift_y = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator).to(device)
    shift_x = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator).to(device)
    columns = torch.arange(width, device=device).expand(batch, width)
    if flip:
        flipped = torch.rand(batch, 1, generator=generator).to(device) < 0.5
        columns = torch.where(flipped, width - 1 - columns, columns)
    rows = torch.arange(height, device=device) + shift_y  # [B, H]
    columns = columns + shift_x  # [B, W]
    flat_index = (rows[:, :, None] * padded_width + columns[:, None, :]).reshape(batch, 1, -1)
    gathered = padded.reshape(batch, channels, -1).gather(
        2, flat_index.expand(batch, channels, height * width)
    )
    return gathered.reshape(batch, channels, height, width)


# --------------------------------------------------------------------------- inference


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 1024,
             device: str = "cpu") -> float:
    """Fraction of ``dataset`` whose label is the model's argmax."""
    if dataset.labels is None:
        raise ValueError(f"{dataset.name or 'dataset'} has no labels")
    predicted = predict_probs(model, to_tensor(dataset.images), batch_size, device).argmax(1)
    return (predicted == torch.from_numpy(dataset.labels)).float().mean().item()


def agreement(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor,
              batch_size: int = 1024, device: str = "cpu") -> float:
    """Fraction of ``inputs [N, C, H, W]`` on which both models' argmax agree."""
    top_a = predict_probs(model_a, inputs, batch_size, device).argmax(1)
    top_b = predict_probs(model_b, inputs, batch_size, device).argmax(1)
    return (top_a == top_b).float().mean().item()


# --------------------------------------------------------------------------- distillation


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-(targets * log_softmax(logits)).sum(1).mean()`` for ``[B, K]`` inputs."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` at step 0 to 0 at ``total_steps``."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def distill(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    planned_epochs: int | None = None,
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    augment: bool = True,
    hard_labels: bool = False,
    progress: bool = True,
    device: str = "cpu",
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    on_epoch_end: Callable[[int, float], None] | None = None,
    fill: float = BLACK,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``inputs [N, C, H, W]`` (normalised floats) against
    ``targets [N, K]`` (probability vectors) and return it in eval mode.

    SGD with Nesterov momentum, weight decay, and a per-step cosine schedule planned for
    ``planned_epochs`` (default ``epochs``) but stopped after ``epochs`` — early stopping,
    still at a high learning rate, for surrogates. Loss: soft-label cross-entropy, or
    cross-entropy on ``targets.argmax(1)`` with ``hard_labels``. ``seed`` fixes the batch
    order and the augmentation (model initialisation is the caller's). Full batches only
    (the last partial batch of each epoch is dropped) unless ``N < batch_size``.
    ``on_epoch_end(epoch, mean_loss)`` is called after each epoch. ``fill`` is the
    normalised value random-crop padding fills in (default: a black Fashion-MNIST pixel).
    ``loss(logits, targets)`` replaces both losses when given.
    """
    if inputs.ndim != 4 or targets.ndim != 2 or len(inputs) != len(targets):
        raise ValueError(f"expected inputs [N, C, H, W] and targets [N, K], got "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    if len(inputs) == 0 or epochs < 0:
        raise ValueError(f"need at least one example and epochs >= 0, got {len(inputs)}, {epochs}")
    planned_epochs = epochs if planned_epochs is None else planned_epochs
    if planned_epochs < epochs or planned_epochs < 1:
        raise ValueError(f"planned_epochs ({planned_epochs}) must be >= epochs ({epochs}) and >= 1")
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                nesterov=momentum > 0, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(inputs) // batch_size)
    effective_batch = min(batch_size, len(inputs))
    total_steps = planned_epochs * steps_per_epoch
    labels = targets.argmax(dim=1) if hard_labels else None
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        running, seen = 0.0, 0
        bar = progress_bar(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}",
                           leave=False, disable=not progress, unit="batch")
        for index in bar:
            chosen = order[index * effective_batch:(index + 1) * effective_batch]
            batch = inputs[chosen]
            if augment:
                batch = augment_batch(batch, generator, fill=fill)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total_steps)
            logits = model(batch.to(device))
            if loss is not None:
                value = loss(logits, targets[chosen].to(device))
            elif labels is not None:
                value = F.cross_entropy(logits, labels[chosen].to(device))
            else:
                value = soft_cross_entropy(logits, targets[chosen].to(device))
            if not torch.isfinite(value):
                raise RuntimeError(f"training diverged (loss {value.item()}) at epoch "
                                   f"{epoch + 1}, step {index}; lower the learning rate (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            step += 1
            running += value.item() * len(chosen)
            seen += len(chosen)
            bar.set_postfix(loss=f"{running / seen:.3f}")
        bar.close()
        if on_epoch_end is not None:
            on_epoch_end(epoch, running / seen)
    return model.eval()


# ----------------------------------------------------------------- victim, surrogate, clone


def train_victim(
    arch: str = VICTIM_ARCH,
    epochs: int = VICTIM_EPOCHS,
    seed: int = 0,
    lr: float = 0.1,
    batch_size: int = 128,
    data_dir: Path | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the victim on the first 50,000 Fashion-MNIST training images (augmented,
    one-hot labels, :func:`distill`'s recipe). Returns ``(model in eval mode, metrics)``
    with the test accuracy."""
    started, cpu_started = time.perf_counter(), time.process_time()
    train = victim_train_split(data_dir)
    test = load_fashion_mnist("test", data_dir)
    set_seed(seed)
    model = build_model(arch, num_classes=train.num_classes)
    one_hot = F.one_hot(torch.from_numpy(train.labels), train.num_classes).float()
    distill(model, to_tensor(train.images), one_hot, epochs, lr=lr, batch_size=batch_size,
            seed=seed, hard_labels=True, progress=progress, device=device)
    metrics = {
        "role": "victim",
        "dataset": train.name,
        "train_size": len(train),
        "test_accuracy": round(accuracy(model, test, device=device), 4),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "cpu_time_s": round(time.process_time() - cpu_started, 1),
    }
    return model, metrics


def step_matched_epochs(epochs: int, queries: int, size: int) -> int:
    """Epochs on ``size`` examples that take as many SGD steps as ``epochs`` on ``queries``
    (never fewer than ``epochs``)."""
    return max(epochs, round(epochs * queries / size))


def train_clone(
    pool_inputs: torch.Tensor,
    answers: torch.Tensor,
    arch: str = VICTIM_ARCH,
    epochs: int = CLONE_EPOCHS,
    seed: int = 0,
    hard_labels: bool = False,
    planned_epochs: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    lr: float = 0.1,
    fill: float = BLACK,
) -> nn.Module:
    """A thief's clone: a fresh ``arch`` network (seeded) distilled on ``answers [N, K]`` to
    ``pool_inputs [N, C, H, W]``, with augmentation (padding filled with ``fill``).
    Returned in eval mode."""
    set_seed(seed)
    model = build_model(arch, num_classes=answers.shape[1], in_channels=pool_inputs.shape[1])
    check_input_size(model, tuple(pool_inputs.shape[1:]), arch)
    return distill(model, pool_inputs, answers, epochs, planned_epochs=planned_epochs, lr=lr,
                   seed=seed, hard_labels=hard_labels, progress=progress, device=device,
                   fill=fill)


def misinformation_loss(logits: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """Adaptive Misinformation's objective: mean ``−log(1 − p_y)``, small when the model
    puts little mass on the true class ``y`` (``one_hot [B, K]``); computed from logits as
    ``logsumexp(z) − logsumexp(z without y)``."""
    others = logits.masked_fill(one_hot.bool(), -torch.inf)
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()


def train_misinformation(
    inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, arch: str = VICTIM_ARCH,
    epochs: int = 3, seed: int = 0, progress: bool = True, device: str = "cpu",
) -> nn.Module:
    """Adaptive Misinformation's misinformation network: a fresh ``arch`` trained on the
    defender's labelled images ``inputs [N, C, H, W]``, ``labels [N]`` to minimise
    :func:`misinformation_loss` (its answers put little mass on the true class)."""
    set_seed(seed)
    model = build_model(arch, num_classes=num_classes, in_channels=inputs.shape[1])
    one_hot = F.one_hot(labels.long(), num_classes).float()
    return distill(model, inputs, one_hot, epochs, lr=0.05, seed=seed, progress=progress,
                   device=device, loss=misinformation_loss)


def check_input_size(model: nn.Module, shape: tuple[int, ...], arch: str) -> None:
    """Refuse, with a clear message, an architecture that cannot take ``[C, H, W]`` inputs
    (``small_cnn`` and ``wide_cnn`` take 28x28 only)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *shape))
    except RuntimeError as error:
        raise ValueError(f"architecture {arch} cannot take {'x'.join(map(str, shape))} "
                         f"inputs ({str(error).splitlines()[0]}); choose another --arch "
                         f"(small_cnn and wide_cnn need 28x28, torchvision:NAME and "
                         f"resnet18_gray take other sizes) or --size") from None
    finally:
        model.train(was_training)


def padding_fill(spec: InputConfig) -> float:
    """The normalised value of a black pixel, averaged over channels: what random-crop
    padding fills in for a model with ``spec``'s normalisation."""
    return float(sum(-m / s for m, s in zip(spec.mean, spec.std, strict=True)) / len(spec.mean))


def train_surrogate(
    victim: nn.Module,
    pool: Dataset,
    epochs: int = SURROGATE_EPOCHS,
    planned_epochs: int = SURROGATE_PLANNED_EPOCHS,
    arch: str | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> nn.Module:
    """The defender's surrogate: distilled from ``victim``'s clean probabilities on
    ``pool`` with the clone's recipe, cosine schedule planned for ``planned_epochs`` and
    stopped after ``epochs``. ``arch`` defaults to the victim's."""
    if arch is None:
        arch = model_spec(victim)["arch"]
    inputs = to_tensor(pool.images)
    answers = predict_probs(victim, inputs, device=device)
    return train_clone(inputs, answers, arch=arch, epochs=epochs, seed=seed,
                       planned_epochs=planned_epochs, progress=progress, device=device)


# ------------------------------------------------------------ on a user's image folders


def folder_channels(folder: Path, sample: int = 64) -> int:
    """1 when every sampled image of ``folder`` is grey (one band, or equal R, G, B),
    else 3: the channel count a victim of this folder takes."""
    from PIL import Image

    from grad2.tools.images import image_files

    files = image_files(Path(folder))
    for path in files[:: max(1, len(files) // sample)]:
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
        except (OSError, ValueError):
            continue
        if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
            return 3
    return 1


def train_victim_on_images(
    folder: Path, arch: str, size: int | None = None, channels: int | None = None,
    epochs: int = VICTIM_EPOCHS, seed: int = 0, lr: float = 0.1, holdout: float = 0.1,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], InputConfig, list[str]]:
    """A victim trained on a labelled folder (one sub-folder per class, sorted names are
    the classes): ``(model, metrics, input spec, class names)``. Images are decoded at
    ``size`` x ``size`` (default: the first image's height) with ``channels`` (default:
    1 for an all-grey folder, else 3), as the worker will decode requests; the spec's
    mean/std are the training pixels'. ``holdout`` of the images (seeded) measure accuracy.
    """
    from PIL import Image

    from grad2.serve import normalise
    from grad2.tools.images import folder_classes, image_files, open_images

    started, cpu_started = time.perf_counter(), time.process_time()
    class_names = folder_classes(Path(folder))
    if size is None:
        files = image_files(Path(folder))
        if not files:
            raise ValueError(f"{folder} holds no image files")
        with Image.open(files[0]) as first:
            size = first.size[1]
    channels = channels or folder_channels(Path(folder))
    raw_spec = InputConfig.from_dict({"channels": channels, "height": size, "width": size})
    images = open_images(Path(folder), raw_spec, class_names, labelled=True)
    print(images.describe())
    pixels, labels = images.load(progress=progress)
    if images.skipped:
        print(f"skipped {len(images.skipped)} unreadable file(s), first: {images.skipped[0][0]}")
    unit = pixels.float() / 255.0
    mean = unit.mean(dim=(0, 2, 3)).tolist()
    std = unit.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    spec = InputConfig.from_dict({"channels": channels, "height": size, "width": size,
                                  "mean": [round(m, 4) for m in mean],
                                  "std": [round(s, 4) for s in std]})
    inputs = normalise(unit, spec)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    held = order[: int(len(inputs) * holdout)] if len(inputs) >= 10 else order[:0]
    kept = order[len(held):]
    set_seed(seed)
    model = build_model(arch, num_classes=len(class_names), in_channels=channels)
    check_input_size(model, tuple(inputs.shape[1:]), arch)
    one_hot = F.one_hot(labels[kept], len(class_names)).float()
    distill(model, inputs[kept], one_hot, epochs, lr=lr, seed=seed, hard_labels=True,
            progress=progress, fill=padding_fill(spec))
    held_accuracy = None
    if len(held):
        predicted = predict_probs(model, inputs[held]).argmax(1)
        held_accuracy = round(float((predicted == labels[held]).float().mean()), 4)
    metrics = {
        "role": "victim", "images": str(folder), "train_size": len(kept),
        "holdout_size": len(held), "holdout_accuracy": held_accuracy, "epochs": epochs,
        "lr": lr, "seed": seed, "class_names": class_names,
        "input": {"channels": channels, "height": size, "width": size,
                  "mean": list(spec.mean), "std": list(spec.std)},
        "skipped_files": len(images.skipped),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "cpu_time_s": round(time.process_time() - cpu_started, 1),
    }
    return model, metrics, spec, class_names


def distill_from_archive(
    archive: Path, folder: Path, arch: str | None = None, epochs: int = SURROGATE_EPOCHS,
    planned_epochs: int = SURROGATE_PLANNED_EPOCHS, seed: int = 0, limit: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The defender's early-stopped surrogate, distilled in process from the clean answers
    of ``archive``'s victim on the images of ``folder`` (any folder of images, decoded at
    the archive's input size). ``arch`` defaults to the victim's."""
    from grad2.serve import normalise, open_archive
    from grad2.tools.images import open_images

    started = time.perf_counter()
    with open_archive(Path(archive)) as opened:
        served = opened.load()
        spec, victim = served.input_config, served.victim
        images = open_images(Path(folder), spec)
        if limit is not None and limit < len(images):
            images = images.subset(range(limit))
        print(images.describe())
        pixels, _ = images.load(progress=progress)
        inputs = normalise(pixels.float() / 255.0, spec)
        answers = predict_probs(victim, inputs)
        arch = arch or model_spec(victim)["arch"]
        surrogate = train_clone(inputs, answers, arch=arch, epochs=epochs, seed=seed,
                                planned_epochs=planned_epochs, progress=progress,
                                fill=padding_fill(spec))
        agreement_rate = float((predict_probs(surrogate, inputs).argmax(1)
                                == answers.argmax(1)).float().mean())
    metrics = {
        "role": "surrogate", "archive": str(archive), "images": str(folder),
        "pool_size": len(inputs), "epochs": epochs, "planned_epochs": planned_epochs,
        "seed": seed, "agreement_with_victim_on_images": round(agreement_rate, 4),
        "skipped_files": len(images.skipped),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    return surrogate, metrics


# --------------------------------------------------------------------------- CLI


def _load_answers(path: Path, pool: Dataset) -> torch.Tensor:
    """Answers saved by an attack: a ``[N, K]`` tensor, or a dict with key ``answers``."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    answers = loaded.get("answers") if isinstance(loaded, dict) else loaded
    if not isinstance(answers, torch.Tensor) or answers.ndim != 2 or len(answers) != len(pool):
        shape = tuple(answers.shape) if isinstance(answers, torch.Tensor) else type(answers)
        raise ValueError(f"{path}: expected answers [{len(pool)}, K] for pool {pool.name}, "
                         f"got {shape}")
    answers = answers.float()
    if (answers < 0).any() or not torch.allclose(answers.sum(1), torch.ones(len(answers)),
                                                 atol=1e-3):
        raise ValueError(f"{path}: answers must be probability vectors (rows >= 0, summing to 1)")
    return answers


def _common_metrics(victim: nn.Module, model: nn.Module, data_dir: Path | None) -> dict:
    """Test accuracy of ``model`` and of ``victim``, and their top-1 agreement, on the
    Fashion-MNIST test set (one forward pass per model)."""
    test = load_fashion_mnist("test", data_dir)
    inputs, labels = to_tensor(test.images), torch.from_numpy(test.labels)
    predicted = predict_probs(model, inputs).argmax(1)
    victim_predicted = predict_probs(victim, inputs).argmax(1)
    return {
        "test_accuracy": round((predicted == labels).float().mean().item(), 4),
        "victim_test_accuracy": round((victim_predicted == labels).float().mean().item(), 4),
        "agreement_with_victim": round((predicted == victim_predicted).float().mean().item(), 4),
        "dataset": test.name,
    }


def _train_victim_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.images is not None:
        return _train_victim_on_images_command(args)
    model, metrics = train_victim(arch=args.arch, epochs=args.epochs, seed=args.seed,
                                  lr=args.lr, data_dir=args.data_dir, progress=not args.quiet)
    save_checkpoint(model, args.out, metrics)
    print(f"victim {args.arch}: test accuracy {metrics['test_accuracy']:.4f} in "
          f"{metrics['wall_time_s']} s -> {args.out}")
    return 0


def _train_victim_on_images_command(args: argparse.Namespace) -> int:
    import json

    import yaml

    model, metrics, spec, class_names = train_victim_on_images(
        args.images, args.arch, args.size, args.channels,
        args.epochs, args.seed, args.lr, progress=not args.quiet)
    out = Path(args.out)
    save_checkpoint(model, out, metrics)
    names = out.with_name(f"{out.stem}.index_to_name.json")
    names.write_text(json.dumps({str(i): name for i, name in enumerate(class_names)}, indent=1))
    config = out.with_name(f"{out.stem}.model-config.yaml")
    config.write_text(yaml.safe_dump({
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 16, "maxBatchDelay": 5,
        "responseTimeout": 60,
        "input": {**metrics["input"], "threads": 1},
        "defense": {"method": "none", "surrogate": None},
    }, sort_keys=False))
    accuracy_text = ("no hold-out" if metrics["holdout_accuracy"] is None
                     else f"hold-out accuracy {metrics['holdout_accuracy']:.4f}")
    print(f"victim {args.arch} on {len(class_names)} classes "
          f"({spec.channels}x{spec.height}x{spec.width}): {accuracy_text} in "
          f"{metrics['wall_time_s']} s -> {out}\n"
          f"class names -> {names}\nmodel-config.yaml to archive it with -> {config}")
    return 0


def _train_surrogate_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.archive is not None:
        if args.images is None:
            raise ValueError("--archive needs --images (a folder of images to distil on)")
        surrogate, metrics = distill_from_archive(
            args.archive, args.images, args.arch, args.epochs, args.planned_epochs,
            args.seed, args.pool_size, progress=not args.quiet)
        save_checkpoint(surrogate, args.out, metrics)
        print(f"surrogate {model_spec(surrogate)['arch']} distilled from {args.archive} on "
              f"{metrics['pool_size']} images: top-1 agreement with the victim "
              f"{metrics['agreement_with_victim_on_images']:.4f} in {metrics['wall_time_s']} s "
              f"-> {args.out}")
        return 0
    if args.victim is None or args.pool is None:
        raise ValueError("give --archive A.mar --images DIR, or --victim V.pt --pool NAME")
    started, cpu_started = time.perf_counter(), time.process_time()
    victim, _ = load_checkpoint(args.victim)
    pool = thief_pool(args.pool, args.pool_size, seed=args.pool_seed, data_dir=args.data_dir)
    surrogate = train_surrogate(victim, pool, epochs=args.epochs,
                                planned_epochs=args.planned_epochs, arch=args.arch,
                                seed=args.seed, progress=not args.quiet)
    extra = {"planned_epochs": args.planned_epochs}
    label = f"surrogate {model_spec(surrogate)['arch']} on {args.pool}"
    return _save_pool_model("surrogate", surrogate, victim, pool, args, extra, label,
                            started, cpu_started)


def _train_clone_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    victim, _ = load_checkpoint(args.victim)
    pool = thief_pool(args.pool, args.pool_size, seed=args.pool_seed, data_dir=args.data_dir)
    inputs = to_tensor(pool.images)
    if args.answers is None:
        answers, source = predict_probs(victim, inputs), "clean victim"
    else:
        answers, source = _load_answers(args.answers, pool), str(args.answers)
    arch = args.arch or model_spec(victim)["arch"]
    clone = train_clone(inputs, answers, arch=arch, epochs=args.epochs, seed=args.seed,
                        hard_labels=args.hard_labels, progress=not args.quiet)
    extra = {"answers": source, "hard_labels": args.hard_labels}
    label = f"clone {arch} on {args.pool} ({source} answers)"
    return _save_pool_model("clone", clone, victim, pool, args, extra, label,
                            started, cpu_started)


def _save_pool_model(
    role: str, model: nn.Module, victim: nn.Module, pool: Dataset, args: argparse.Namespace,
    extra: dict[str, Any], label: str, started: float, cpu_started: float,
) -> int:
    """Save a surrogate or clone trained on a thief pool with its metrics, and report."""
    metrics = {
        "role": role,
        "victim": str(args.victim),
        "pool": args.pool,
        "pool_size": len(pool),
        "pool_seed": args.pool_seed,
        "epochs": args.epochs,
        "seed": args.seed,
        **extra,
        "threads": torch.get_num_threads(),
        **_common_metrics(victim, model, args.data_dir),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "cpu_time_s": round(time.process_time() - cpu_started, 1),
    }
    save_checkpoint(model, args.out, metrics)
    print(f"{label}: test accuracy {metrics['test_accuracy']:.4f}, agreement with victim "
          f"{metrics['agreement_with_victim']:.4f} in {metrics['wall_time_s']} s -> {args.out}")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="checkpoint to write (.pt; metadata goes to the .json beside it)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_pool(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--victim", type=Path, required=required,
                        help="victim checkpoint (.pt)")
    parser.add_argument("--pool", choices=THIEF_POOLS, required=required,
                        help="the lab's thief query pool")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="random subset of the pool (default: all 10,000)")
    parser.add_argument("--pool-seed", type=int, default=0,
                        help="seed of the --pool-size subset (must match saved answers)")
    parser.add_argument("--arch", default=None, help="architecture (default: the victim's)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train-victim``, ``train-surrogate`` and ``train-clone`` to ``grad2``."""
    victim = subparsers.add_parser(
        "train-victim", help="train a victim: on a labelled image folder, or Fashion-MNIST")
    _add_common(victim)
    victim.add_argument("--images", type=Path, default=None,
                        help="labelled folder: one sub-folder of images per class (default: "
                        "the lab's Fashion-MNIST)")
    victim.add_argument("--size", type=int, default=None,
                        help="with --images: side the images are decoded at (default: the "
                        "first image's height)")
    victim.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="with --images: 1 or 3 (default: 1 if every image is grey)")
    victim.add_argument("--arch", default=VICTIM_ARCH,
                        help=f"small_cnn, wide_cnn, resnet18_gray or torchvision:NAME "
                        f"(default {VICTIM_ARCH})")
    victim.add_argument("--epochs", type=int, default=VICTIM_EPOCHS,
                        help=f"epochs (default {VICTIM_EPOCHS})")
    victim.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    victim.set_defaults(func=_train_victim_command)

    surrogate = subparsers.add_parser(
        "train-surrogate", help="distil an early-stopped surrogate from an archive's victim "
        "on a folder of images (or a victim checkpoint on a lab pool)")
    _add_common(surrogate)
    surrogate.add_argument("--archive", type=Path, default=None,
                           help="the served model version (.mar) whose victim is distilled")
    surrogate.add_argument("--images", type=Path, default=None,
                           help="with --archive: a folder of images (searched recursively) "
                           "or an .npz; decoded as the worker decodes requests")
    _add_pool(surrogate, required=False)
    surrogate.add_argument("--epochs", type=int, default=SURROGATE_EPOCHS,
                           help=f"epochs actually run (default {SURROGATE_EPOCHS})")
    surrogate.add_argument("--planned-epochs", type=int, default=SURROGATE_PLANNED_EPOCHS,
                           help="length the cosine schedule is planned for "
                                f"(default {SURROGATE_PLANNED_EPOCHS})")
    surrogate.set_defaults(func=_train_surrogate_command)

    clone = subparsers.add_parser(
        "train-clone", help="train a thief's clone on a victim's (or saved defended) answers")
    _add_common(clone)
    _add_pool(clone)
    clone.add_argument("--answers", type=Path, default=None,
                       help="saved answers [N, K] (tensor, or dict with 'answers') in pool "
                            "order; default: query the clean victim")
    clone.add_argument("--epochs", type=int, default=CLONE_EPOCHS,
                       help=f"epochs (default {CLONE_EPOCHS})")
    clone.add_argument("--hard-labels", action="store_true",
                       help="train on argmax of the answers (labels-only thief)")
    clone.set_defaults(func=_train_clone_command)
