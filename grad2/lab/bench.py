"""``grad2 bench``: what the defenses cost inside one process (issue 6).

Everything is timed in one run, on one machine, so the ratios compare like with like:

- **per batch** (1, 8, 32, 128 by default): the victim's forward pass alone (as the handler
  runs it: ``softmax(victim(x))`` under ``inference_mode``) against the victim's forward plus
  each defense — GRAD² with ``jvp``, ``double_backward`` and ``finite_difference`` scores
  (and ``jvp`` with ``preserve_top1``), MAD, MAD-argmax, MAD in closed form, reverse
  sigmoid, random — with a surrogate of the victim's size and one about half its size;
  and the JVP scores alone against one plain forward pass of the same surrogate on the
  same batch;
- **classes** (10, 100, 1000): GRAD² and MAD on the same trunk with a wider head, MAD both
  as the library runs it (``vmap(jacrev)`` over the batch), one query at a time with
  ``K + 1`` backward passes (its reference code's way), on a few queries, and in closed form
  (the same answers from the surrogate's probabilities alone, no Jacobian);
- **reference-style GRAD²**: double-backward scores and a per-example Python loop for the
  greedy step, against the vectorised defense, at batch 32 (K = 10 and 1000);
- **solver alone** on a 10,000 x 1,000 batch against one torchvision ResNet-18 forward of
  batch 32 (3x224x224; ``--quick``: 3x32x32);
- optionally (``--compile``) the JVP under ``torch.compile``, with its start-up cost.

Each item is warmed up, then the items of a group are timed in interleaved rounds (so a
background load hits them alike) and summarised by medians; a ratio is the median over
rounds of the two items' times in the same round. The table goes to stdout, everything
(every repeat's time included) to a JSON file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grad2 import gate, targets
from grad2.config import MEMORY_FORMATS
from grad2.defenses import (
    GRAD2,
    MAD,
    AdaptiveMisinformation,
    Defense,
    GatedGRAD2,
    MADArgmax,
    RandomNoise,
    ReverseSigmoid,
)
from grad2.models import build_model, last_linear, penultimate, set_memory_format
from grad2.redirect import redirect
from grad2.scores import METHODS as SCORE_METHODS
from grad2.scores import jvp_kernel, path_scores, redirection_scores
from grad2.tools.progress import progress_bar

#: The victim's input: one-channel 28x28 images (Fashion-MNIST-like, normalised).
INPUT_SHAPE = (1, 28, 28)
#: Width of the benchmark's own CNN that gives about half the parameters of ``small_cnn``.
HALF_WIDTH = 11

GOALS = {
    "jvp_over_forward": 2.5,
    "victim_grad2_over_victim": 3.5,
    "mad_over_grad2_k10": 20.0,
    "vectorised_over_reference": 5.0,
}


# ---------------------------------------------------------------------------------------
# Models


class BenchCNN(nn.Sequential):
    """Three conv / batch-norm / ReLU / max-pool blocks (``w``, ``2w``, ``4w`` channels) and
    a linear head: ``small_cnn``'s layout with a width knob (``width=16`` is its size)."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        super().__init__(*layers, nn.Flatten(), nn.Linear(channels * 3 * 3, num_classes))


def victim_model(num_classes: int, own_cnn: bool = False) -> tuple[nn.Module, str]:
    """The victim (and same-size surrogate) architecture: ``grad2.models``' ``small_cnn``,
    or with ``own_cnn`` :class:`BenchCNN` at width 16."""
    if not own_cnn:
        return build_model("small_cnn", num_classes, INPUT_SHAPE[0]), "small_cnn"
    return BenchCNN(num_classes, 16, INPUT_SHAPE[0]), "bench_cnn(width=16)"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Timing


@dataclass
class Item:
    """One timed call: ``fn()`` runs the work once."""

    name: str
    fn: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    #: The round of each time (-1: a first call that sized the plan, without warm-up).
    rounds: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.info,
            "median_s": statistics.median(self.times),
            "min_s": min(self.times),
            "max_s": max(self.times),
            "repeats": len(self.times),
            "times_s": self.times,
            "rounds": self.rounds,
        }


def paired_ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """Median over rounds of ``numerator / denominator`` timed in the same round (a slow
    drift of the machine's load cancels); the ratio of medians when no round is shared."""
    times = dict(zip(denominator["rounds"], denominator["times_s"]))
    ratios = [t / times[r] for r, t in zip(numerator["rounds"], numerator["times_s"])
              if r >= 0 and r in times]
    if not ratios:
        return numerator["median_s"] / denominator["median_s"]
    return statistics.median(ratios)


class Timer:
    """Warm-up, then interleaved rounds; at most ``budget_s`` seconds of repeats per item
    (but never fewer than ``min_repeats``)."""

    def __init__(self, device: torch.device, repeats: int, warmup: int, budget_s: float,
                 progress: bool) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.budget_s, self.progress = budget_s, progress
        self.min_repeats = min(3, repeats)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def run(self, items: Sequence[Item], label: str) -> list[dict[str, Any]]:
        planned = {}
        bar = progress_bar(total=len(items) * (self.warmup + self.repeats), desc=label,
                           leave=False, disable=not self.progress, file=sys.stderr)
        for item in items:
            first = None
            for _ in range(self.warmup):
                first = self.once(item.fn)
                bar.update()
            if first is None:  # no warm-up asked: the first timed call sizes the plan
                first = self.once(item.fn)
                item.times.append(first)
                item.rounds.append(-1)
            affordable = int(self.budget_s / max(first, 1e-9))
            planned[item.name] = max(self.min_repeats, min(self.repeats, affordable))
        for round_ in range(self.repeats):
            for item in items:
                if len(item.times) < planned[item.name] and round_ < planned[item.name]:
                    item.times.append(self.once(item.fn))
                    item.rounds.append(round_)
                bar.update()
        bar.close()
        return [item.summary() for item in items]


# ---------------------------------------------------------------------------------------
# The work being timed


#: The JVP scores computed other ways, timed beside the library's default: forward-mode
#: autograd instead of the explicit tangent rules (what the rules save), and without
#: batch-norm folding too (the library's JVP before both).
#: Item name -> (label, path of :data:`grad2.scores.JVP_PATHS`).
JVP_VARIANTS: dict[str, tuple[str, str]] = {
    "jvp_scores_autograd": ("forward-mode autograd", "forward_ad"),
    "jvp_scores_autograd_unfolded": ("autograd, batch-norms not folded", "forward_ad_unfolded"),
}


def victim_forward(victim: nn.Module, x: Tensor) -> Tensor:
    """What the handler's ``inference`` step does."""
    with torch.inference_mode():
        return torch.softmax(victim(x), dim=-1)


def plain_forward(model: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(x)


def reference_style_grad2(surrogate: nn.Module, target: dict[str, Tensor], x: Tensor,
                          probs: Tensor, epsilon: float) -> Tensor:
    """GRAD² the way research code writes it: double-backward scores, then the greedy step
    one example at a time and one class at a time, in Python."""
    scores = redirection_scores(surrogate, x, target, "double_backward")
    defended = probs.clone()
    for row in range(probs.shape[0]):
        y, c = defended[row], scores[row]
        receiver = int(torch.argmax(c))
        mass = max(min(epsilon / 2, 1.0 - float(y[receiver])), 0.0)
        remaining = mass
        for donor in torch.argsort(c, stable=True).tolist():
            if remaining <= 0:
                break
            if donor == receiver:
                continue
            take = min(float(y[donor]), remaining)
            y[donor] -= take
            remaining -= take
        y[receiver] += mass
    return defended


def mad_loop_query(surrogate: nn.Module, x: Tensor, probs: Tensor, epsilon: float) -> Tensor:
    """MAD the way its reference code runs: one query at a time, ``K + 1`` backward passes
    over the last layer (the clean gradient, then one per class vertex), in Python."""
    weights = list(last_linear(surrogate)[1].parameters())
    defended = probs.clone()
    with torch.enable_grad():
        for row in range(x.shape[0]):
            log_probs = torch.log_softmax(surrogate(x[row : row + 1]), dim=-1)[0]
            y = probs[row].to(log_probs.dtype).clone()  # probs may be an inference tensor
            clean = torch.cat([g.flatten() for g in torch.autograd.grad(
                (y * log_probs).sum(), weights, retain_graph=True)])
            best, vertex = -math.inf, 0
            for k in range(log_probs.shape[0]):
                grad = torch.cat([g.flatten() for g in torch.autograd.grad(
                    log_probs[k], weights, retain_graph=True)])
                deviation = float(1 - torch.nn.functional.cosine_similarity(grad, clean, 0))
                if deviation > best:
                    best, vertex = deviation, k
            distance = 2 * (1 - float(y[vertex]))
            alpha = min(1.0, epsilon / distance) if distance > 0 else 0.0
            defended[row] *= 1 - alpha
            defended[row, vertex] += alpha
    return defended


def mad_bytes_per_query(surrogate: nn.Module, num_classes: int, element_size: int) -> int:
    """MAD materialises ``[K, P_last]`` per query about three times (Jacobian, normalised
    copy, deviations); ``P_last`` is the last layer's parameter count."""
    last_params = sum(p.numel() for p in last_linear(surrogate)[1].parameters())
    return 3 * num_classes * last_params * element_size


# ---------------------------------------------------------------------------------------
# Sections


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    epsilon: float
    own_cnn: bool
    mad_memory_bytes: int
    mad_loop_queries: int = 4
    seed: int = 0
    #: Layout of the networks' 4-D tensors, as ``handler.memory_format`` sets it.
    memory_format: str = "channels_last"

    def inputs(self, batch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + batch)
        return torch.randn((batch, *INPUT_SHAPE), generator=generator).to(self.device,
                                                                          self.dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        return set_memory_format(model.to(self.device, self.dtype).eval(), self.memory_format)


def build_models(setup: Setup, num_classes: int) -> dict[str, Any]:
    torch.manual_seed(setup.seed)
    victim, arch = victim_model(num_classes, setup.own_cnn)
    same, _ = victim_model(num_classes, setup.own_cnn)
    half = BenchCNN(num_classes, HALF_WIDTH, INPUT_SHAPE[0])
    return {
        "arch": arch,
        "victim": setup.prepare(victim),
        "surrogates": {"same": setup.prepare(same), "half": setup.prepare(half)},
    }


def timed_defenses(setup: Setup, surrogates: dict[str, nn.Module]
                   ) -> list[tuple[str, str | None, Defense]]:
    """The per-batch section's defenses, ``(item name, surrogate size or None, defense)``.

    Not the lab's defense families (:mod:`grad2.lab.families`): served defense classes at
    ``setup.epsilon``, GRAD² once per score method (``grad2_<method>``), MAD also in closed
    form, each with every surrogate of ``surrogates``; the item names are the JSON's.
    """
    eps = setup.epsilon
    rows: list[tuple[str, str | None, Defense]] = []
    for size, surrogate in surrogates.items():
        for method in SCORE_METHODS:
            rows.append((f"grad2_{method}", size, GRAD2(surrogate, eps, score_method=method)))
        rows.append(("grad2_jvp_top1", size, GRAD2(surrogate, eps, preserve_top1=True)))
        rows.append(("mad", size, MAD(surrogate, eps)))
        rows.append(("mad_argmax", size, MADArgmax(surrogate, eps)))
        rows.append(("mad_closed_form", size, MAD(surrogate, eps, closed_form=True)))
        # The gate fitted on seeded random inputs: its cost, not its accuracy, is timed.
        reference = setup.inputs(64)
        features = penultimate(surrogate, reference)
        gate_tensors = gate.fit_feature_gate(features, torch.arange(64) % 10, 10)
        threshold = float(gate.feature_score(features, gate_tensors).median())
        rows.append(("grad2_gated", size, GatedGRAD2(
            surrogate, 0.2, 2.0, threshold, 1.0, "permute", gate.keyed_mapping(b"k" * 32, 10),
            gate_tensors=gate_tensors)))
        rows.append(("adaptive_misinformation", size,
                     AdaptiveMisinformation(surrogate, threshold=0.5, slope=50.0)))
    rows.append(("reverse_sigmoid", None, ReverseSigmoid()))
    rows.append(("random", None, RandomNoise(eps, seed=setup.seed)))
    return rows


def per_batch_section(setup: Setup, timer: Timer, batches: Sequence[int]) -> dict[str, Any]:
    models = build_models(setup, 10)
    victim, surrogates = models["victim"], models["surrogates"]
    defenses = timed_defenses(setup, surrogates)
    records, scores_records = [], []
    for batch in batches:
        x = setup.inputs(batch)
        items = [Item("victim", lambda x=x: victim_forward(victim, x),
                      {"batch": batch, "surrogate": None})]
        for name, size, defense in defenses:
            def run(x=x, defense=defense):
                return defense(x, victim_forward(victim, x))

            items.append(Item(f"victim+{name}", run, {"batch": batch, "surrogate": size}))
        for size, surrogate in surrogates.items():
            target = targets.all_ones(surrogate)
            items.append(Item("surrogate_forward", lambda x=x, s=surrogate: plain_forward(s, x),
                              {"batch": batch, "surrogate": size}))
            items.append(Item("jvp_scores",
                              lambda x=x, s=surrogate, t=target: redirection_scores(s, x, t),
                              {"batch": batch, "surrogate": size}))
            for variant, (_, path) in JVP_VARIANTS.items():
                items.append(Item(variant, lambda x=x, s=surrogate, t=target, p=path:
                                  path_scores(s, x, t, p),
                                  {"batch": batch, "surrogate": size}))
            if batch == 1:  # what computing a lone query as a batch of two costs
                kernel = jvp_kernel(surrogate.eval(), target)
                items.append(Item("jvp_scores_batch_of_one", lambda x=x, f=kernel: f(x),
                                  {"batch": batch, "surrogate": size}))
        summaries = timer.run(items, f"batch {batch}")
        for summary in summaries:
            if summary["name"] in ("surrogate_forward", "jvp_scores", *JVP_VARIANTS,
                                   "jvp_scores_batch_of_one"):
                scores_records.append(summary)
                continue
            summary["ratio_to_victim"] = paired_ratio(summary, summaries[0])
            summary["ratio_of_medians"] = summary["median_s"] / summaries[0]["median_s"]
            summary["per_query_s"] = summary["median_s"] / batch
            records.append(summary)
    scores = []
    for batch in batches:
        for size in surrogates:
            forward = _find(scores_records, "surrogate_forward", batch, size)
            jvp = _find(scores_records, "jvp_scores", batch, size)
            record = {"batch": batch, "surrogate": size, "forward_s": forward["median_s"],
                      "jvp_s": jvp["median_s"], "ratio": paired_ratio(jvp, forward),
                      "ratio_of_medians": jvp["median_s"] / forward["median_s"],
                      "forward": forward, "jvp": jvp, "variants": {}}
            for variant in JVP_VARIANTS:
                timing = _find(scores_records, variant, batch, size)
                record["variants"][variant] = {
                    "median_s": timing["median_s"], "ratio": paired_ratio(timing, forward),
                    "over_jvp": paired_ratio(timing, jvp), "timing": timing}
            if batch == 1:
                raw = _find(scores_records, "jvp_scores_batch_of_one", batch, size)
                record["jvp_batch_of_one_s"] = raw["median_s"]
            scores.append(record)
    return {
        "models": {
            "arch": models["arch"],
            "victim_params": count_parameters(victim),
            "surrogate_params": {k: count_parameters(v) for k, v in surrogates.items()},
        },
        "per_batch": records,
        "scores": scores,
    }


def _find(records: list[dict], name: str, batch: int, surrogate: str | None) -> dict:
    for record in records:
        if (record["name"], record["batch"], record["surrogate"]) == (name, batch, surrogate):
            return record
    raise KeyError((name, batch, surrogate))


def classes_section(setup: Setup, timer: Timer, class_counts: Sequence[int], batch: int
                    ) -> list[dict[str, Any]]:
    out = []
    x = setup.inputs(batch)
    element_size = torch.empty((), dtype=setup.dtype).element_size()
    for num_classes in class_counts:
        models = build_models(setup, num_classes)
        victim, surrogate = models["victim"], models["surrogates"]["same"]
        probs = victim_forward(victim, x)
        grad2 = GRAD2(surrogate, setup.epsilon)
        items = [
            Item("victim", lambda v=victim: victim_forward(v, x)),
            Item("grad2_jvp", lambda d=grad2, p=probs: d(x, p)),
        ]
        per_query = mad_bytes_per_query(surrogate, num_classes, element_size)
        mad_batch = min(batch, setup.mad_memory_bytes // per_query)
        record: dict[str, Any] = {"classes": num_classes, "batch": batch,
                                  "mad_batch": int(mad_batch),
                                  "mad_bytes_per_query": per_query}
        if mad_batch >= 1:
            mad = MAD(surrogate, setup.epsilon)
            xm, pm = x[:mad_batch], probs[:mad_batch]
            items.append(Item("mad", lambda d=mad, xm=xm, pm=pm: d(xm, pm)))
        else:
            record["mad_skipped"] = (
                f"MAD's last-layer Jacobian needs about {per_query / 2**30:.1f} GiB per query "
                f"(limit {setup.mad_memory_bytes / 2**30:.1f} GiB, --mad-memory-gb)"
            )
        closed = MAD(surrogate, setup.epsilon, closed_form=True)
        items.append(Item("mad_closed_form", lambda d=closed, p=probs: d(x, p)))
        if mad_batch >= 1:  # the closed form must answer as the Jacobian MAD does
            record["mad_closed_form_max_abs_difference"] = float(
                (closed(x[:mad_batch], probs[:mad_batch])
                 - MAD(surrogate, setup.epsilon)(x[:mad_batch], probs[:mad_batch])).abs().max())
        loop_queries = min(batch, setup.mad_loop_queries)
        record["mad_loop_queries"] = loop_queries
        if loop_queries >= 1:
            xl, pl = x[:loop_queries], probs[:loop_queries]
            if loop_queries <= mad_batch:  # the two MADs must agree
                record["mad_loop_max_abs_difference"] = float(
                    (mad_loop_query(surrogate, xl, pl, setup.epsilon)
                     - MAD(surrogate, setup.epsilon)(xl, pl)).abs().max())
            items.append(Item("mad_loop", lambda s=surrogate, xl=xl, pl=pl: mad_loop_query(
                s, xl, pl, setup.epsilon)))
        summaries = {s["name"]: s for s in timer.run(items, f"K={num_classes}")}
        record.update({
            "victim_s": summaries["victim"]["median_s"],
            "grad2_s": summaries["grad2_jvp"]["median_s"],
            "grad2_per_query_s": summaries["grad2_jvp"]["median_s"] / batch,
            "timings": list(summaries.values()),
        })
        grad2_timing = summaries["grad2_jvp"]
        if "mad" in summaries:
            record["mad_s"] = summaries["mad"]["median_s"]
            record["mad_per_query_s"] = record["mad_s"] / mad_batch
            record["mad_over_grad2"] = (paired_ratio(summaries["mad"], grad2_timing)
                                        * batch / mad_batch)
        record["mad_closed_form_per_query_s"] = summaries["mad_closed_form"]["median_s"] / batch
        record["mad_closed_form_over_grad2"] = paired_ratio(summaries["mad_closed_form"],
                                                            grad2_timing)
        if "mad_loop" in summaries:
            record["mad_loop_per_query_s"] = summaries["mad_loop"]["median_s"] / loop_queries
            record["mad_loop_over_grad2"] = (paired_ratio(summaries["mad_loop"], grad2_timing)
                                             * batch / loop_queries)
        out.append(record)
    return out


def reference_section(setup: Setup, timer: Timer, batch: int, class_counts: Sequence[int]
                      ) -> list[dict[str, Any]]:
    out = []
    x = setup.inputs(batch)
    for num_classes in class_counts:
        models = build_models(setup, num_classes)
        victim, surrogate = models["victim"], models["surrogates"]["same"]
        probs = victim_forward(victim, x)
        target = targets.all_ones(surrogate)
        vectorised = GRAD2(surrogate, setup.epsilon)
        reference = reference_style_grad2(surrogate, target, x, probs, setup.epsilon)
        difference = float((reference - vectorised(x, probs)).abs().max())
        summaries = timer.run([
            Item("reference_style", lambda s=surrogate, t=target, p=probs:
                 reference_style_grad2(s, t, x, p, setup.epsilon)),
            Item("vectorised", lambda d=vectorised, p=probs: d(x, p)),
        ], f"reference K={num_classes}")
        out.append({
            "batch": batch, "classes": num_classes,
            "reference_s": summaries[0]["median_s"], "vectorised_s": summaries[1]["median_s"],
            "speedup": paired_ratio(summaries[0], summaries[1]),
            "max_abs_difference": difference,
            "timings": summaries,
        })
    return out


def solver_section(setup: Setup, timer: Timer, rows: int, classes: int, resnet_batch: int,
                   resnet_size: int, top1: bool) -> dict[str, Any]:
    import torchvision

    generator = torch.Generator().manual_seed(setup.seed)
    logits = torch.randn(rows, classes, generator=generator) * 3
    probs = torch.softmax(logits, dim=1).to(setup.device, setup.dtype)
    scores = torch.randn(rows, classes, generator=generator).to(setup.device, setup.dtype)
    torch.manual_seed(setup.seed)
    resnet = setup.prepare(torchvision.models.resnet18(num_classes=1000))
    images = torch.randn(resnet_batch, 3, resnet_size, resnet_size, generator=generator)
    images = images.to(setup.device, setup.dtype)
    items = [
        Item("solver", lambda: redirect(probs, scores, setup.epsilon)),
        Item("resnet18_forward", lambda: plain_forward(resnet, images)),
    ]
    if top1:
        items.append(Item("solver_top1", lambda: redirect(probs, scores, setup.epsilon, True)))
    summaries = {s["name"]: s for s in timer.run(items, "solver")}
    record = {
        "rows": rows, "classes": classes,
        "solver_s": summaries["solver"]["median_s"],
        "resnet18_s": summaries["resnet18_forward"]["median_s"],
        "resnet18_input": [resnet_batch, 3, resnet_size, resnet_size],
        "solver_over_resnet18": paired_ratio(summaries["solver"],
                                             summaries["resnet18_forward"]),
        "timings": list(summaries.values()),
    }
    if top1:
        record["solver_top1_s"] = summaries["solver_top1"]["median_s"]
    return record


#: The real-size case: victim, its input and classes, and the surrogates it is defended by.
REAL_VICTIM = "torchvision:resnet50"
REAL_SHAPE = (3, 224, 224)
REAL_CLASSES = 1000
REAL_SURROGATES = ("torchvision:resnet18", "torchvision:mobilenet_v3_small")


def real_size_section(setup: Setup, timer: Timer, batches: Sequence[int]) -> list[dict]:
    """ResNet-50 victim (3x224x224, K=1000) alone and with GRAD² by each real-size
    surrogate, plain and top-1-preserving solver, per batch size; plus each surrogate's
    JVP kernel on a lone query alone and as the pair the library runs it as."""
    torch.manual_seed(setup.seed)
    victim = setup.prepare(build_model(REAL_VICTIM, REAL_CLASSES, REAL_SHAPE[0]))
    surrogates = {arch.split(":")[-1]: setup.prepare(build_model(arch, REAL_CLASSES,
                                                                 REAL_SHAPE[0]))
                  for arch in REAL_SURROGATES}
    records = []
    for batch in batches:
        generator = torch.Generator().manual_seed(setup.seed + batch)
        x = torch.randn((batch, *REAL_SHAPE), generator=generator).to(setup.device, setup.dtype)
        items = [Item("victim_forward", lambda x=x: victim_forward(victim, x),
                      {"batch": batch})]
        for name, surrogate in surrogates.items():
            for top1 in (False, True):
                defense = GRAD2(surrogate, setup.epsilon, "all_ones", preserve_top1=top1)
                label = f"victim_grad2_{name}{'_top1' if top1 else ''}"
                items.append(Item(label, lambda x=x, d=defense: d(x, victim_forward(victim, x)),
                                  {"batch": batch, "surrogate": name, "preserve_top1": top1}))
            if batch == 1:
                kernel = jvp_kernel(surrogate.eval(), targets.all_ones(surrogate))
                pair = torch.cat([x, x])
                items.append(Item(f"jvp_{name}_alone", lambda x=x, f=kernel: f(x),
                                  {"batch": 1, "surrogate": name}))
                items.append(Item(f"jvp_{name}_pair", lambda p=pair, f=kernel: f(p),
                                  {"batch": 2, "surrogate": name}))
        summaries = timer.run(items, f"real sizes, batch {batch}")
        for summary in summaries[1:]:
            summary["ratio_to_victim"] = paired_ratio(summary, summaries[0])
        records.extend(summaries)
    return records


def compile_section(setup: Setup, timer: Timer, batches: Sequence[int]) -> list[dict]:
    """The JVP scores under ``torch.compile(dynamic=True)``: first-call (compile) cost per
    batch size, steady-state time, and the difference from eager."""
    models = build_models(setup, 10)
    surrogate = models["surrogates"]["same"]
    # forward-mode autograd: the kernel the compile figures were measured with
    scores = jvp_kernel(surrogate.eval(), targets.all_ones(surrogate), "forward_ad")
    out = []
    torch._dynamo.reset()
    # One function for every batch size, as a server would hold; a new shape may still
    # recompile, which the first call at each batch size shows.
    compiled = torch.compile(scores, dynamic=True)
    for batch in batches:
        x = setup.inputs(max(batch, 2))  # a lone query is computed as a batch of two
        startup = timer.once(lambda x=x: compiled(x))
        eager_s = timer.once(lambda x=x: scores(x))
        difference = float((compiled(x) - scores(x)).abs().max())
        eager, fast, forward = timer.run(
            [Item("eager", lambda x=x: scores(x)), Item("compiled", lambda x=x: compiled(x)),
             Item("forward", lambda x=x: plain_forward(surrogate, x))], f"compile {batch}")
        out.append({
            "batch": batch, "first_call_s": startup, "first_eager_s": eager_s,
            "eager_s": eager["median_s"], "compiled_s": fast["median_s"],
            "forward_s": forward["median_s"],
            "speedup": paired_ratio(eager, fast),
            "eager_over_forward": paired_ratio(eager, forward),
            "compiled_over_forward": paired_ratio(fast, forward),
            "max_abs_difference": difference,
            "timings": [eager, fast, forward],
        })
    # Does a row get the same bits whatever its batch size (as eager scores do)?
    largest = setup.inputs(max(max(batches), 2))
    full = compiled(largest)
    for record in out:
        rows = max(record["batch"], 2)
        record["first_row_bit_identical_to_largest_batch"] = bool(
            torch.equal(compiled(largest[:rows])[0], full[0]))
    return out


# ---------------------------------------------------------------------------------------
# Goals, table, entry point


def goals(result: dict[str, Any], goal_batch: int) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float | None, at_most: bool, detail: str) -> None:
        threshold = GOALS[name]
        met = None if value is None else (value <= threshold if at_most else value >= threshold)
        out.append({"goal": name, "value": value, "threshold": threshold,
                    "comparison": "<=" if at_most else ">=", "met": met, "detail": detail})

    scores = [s for s in result["scores"] if s["batch"] == goal_batch and
              s["surrogate"] == "same"]
    add("jvp_over_forward", scores[0]["ratio"] if scores else None, True,
        f"JVP scores / one plain surrogate forward, same-size surrogate, batch {goal_batch}")
    grad2 = [r for r in result["per_batch"] if r["batch"] == goal_batch
             and r["name"] == "victim+grad2_jvp" and r["surrogate"] == "same"]
    add("victim_grad2_over_victim", grad2[0]["ratio_to_victim"] if grad2 else None, True,
        f"victim + GRAD² (jvp, same-size surrogate) / victim alone, batch {goal_batch}")
    k10 = [c for c in result["classes"] if c["classes"] == 10 and "mad_over_grad2" in c]
    add("mad_over_grad2_k10", k10[0]["mad_over_grad2"] if k10 else None, False,
        "MAD / GRAD² per query at K=10 (defense only)")
    growth = [c.get("mad_over_grad2") for c in result["classes"]]
    measured = [g for g in growth if g is not None]
    out[-1]["grows_with_k"] = (
        all(b > a for a, b in itertools.pairwise(measured)) if len(measured) > 1 else None
    )
    out[-1]["by_classes"] = {c["classes"]: c.get("mad_over_grad2") for c in result["classes"]}
    # The same MAD in closed form (no Jacobian): what the goal's premise leaves out.
    out[-1]["closed_form_by_classes"] = {c["classes"]: c.get("mad_closed_form_over_grad2")
                                         for c in result["classes"]}
    reference = [r for r in result["reference"] if r["classes"] == 10]
    add("vectorised_over_reference", reference[0]["speedup"] if reference else None, False,
        "reference-style GRAD² / vectorised GRAD², K=10, batch "
        f"{reference[0]['batch'] if reference else '-'}")
    out[-1]["by_classes"] = {r["classes"]: r["speedup"] for r in result["reference"]}
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def format_real_sizes(records: Sequence[dict[str, Any]]) -> str:
    """The real-size section as a markdown table (medians, ratio to the victim alone)."""
    lines = ["| batch | item | median ms | ratio to victim forward |", "| --- | --- | --- | --- |"]
    for record in records:
        ratio = record.get("ratio_to_victim")
        lines.append(f"| {record['batch']} | {record['name']} | {1e3 * record['median_s']:.1f} "
                     f"| {'—' if ratio is None else f'{ratio:.2f}×'} |")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    lines = []
    meta = result["meta"]
    lines.append(
        f"grad2 bench — device {meta['device']}, {meta['threads']} thread(s), {meta['dtype']}, "
        f"epsilon {meta['epsilon']}, medians of up to {meta['repeats']} repeats"
    )
    if "real_sizes" in result:
        return "\n".join([*lines, format_real_sizes(result["real_sizes"])])
    if meta.get("load_average_start") is not None:
        lines.append(f"load average (1, 5, 15 min) at start {meta['load_average_start']}, "
                     f"at end {meta.get('load_average_end')} on {meta['cpu_count']} cores")
    models = result["models"]
    lines.append(
        f"victim {models['arch']} ({models['victim_params']:,} params); surrogates: same "
        f"{models['surrogate_params']['same']:,}, half {models['surrogate_params']['half']:,}"
    )
    batches = sorted({r["batch"] for r in result["per_batch"]})
    header = f"{'per batch, ms (x victim alone), K=10':44s}" + "".join(
        f" | {'B=' + str(b):>16s}" for b in batches)
    lines += ["", header, "-" * len(header)]
    names = []
    for record in result["per_batch"]:
        key = (record["name"], record["surrogate"])
        if key not in names:
            names.append(key)
    for name, surrogate in names:
        label = name + (f" [{surrogate}]" if surrogate else "")
        cells = []
        for batch in batches:
            record = _find(result["per_batch"], name, batch, surrogate)
            ratio = "" if name == "victim" else f" ({record['ratio_to_victim']:.1f}x)"
            cells.append(f" | {_ms(record['median_s']) + ratio:>16s}")
        lines.append(f"{label:44s}" + "".join(cells))
    lines += ["", f"{'JVP scores vs one surrogate forward, ms':44s}" + "".join(
        f" | {'B=' + str(b):>16s}" for b in batches)]
    for size in ("same", "half"):
        cells = []
        for batch in batches:
            s = next(r for r in result["scores"] if r["batch"] == batch and r["surrogate"] == size)
            cell = f"{_ms(s['jvp_s'])}/{_ms(s['forward_s'])} {s['ratio']:.1f}x"
            cells.append(f" | {cell:>16s}")
        lines.append(f"{'  surrogate ' + size:44s}" + "".join(cells))
        for variant, (label, _) in JVP_VARIANTS.items():
            cells = []
            for batch in batches:
                s = next(r for r in result["scores"]
                         if r["batch"] == batch and r["surrogate"] == size)
                timing = s["variants"][variant]
                cell = f"{_ms(timing['median_s'])} {timing['ratio']:.1f}x"
                cells.append(f" | {cell:>16s}")
            lines.append(f"{'    ' + label:44s}" + "".join(cells))
    lone = [s for s in result["scores"] if "jvp_batch_of_one_s" in s]
    for s in lone:
        lines.append(f"  lone query, {s['surrogate']} surrogate: JVP as a batch of two "
                     f"{_ms(s['jvp_s'])} ms, as a batch of one {_ms(s['jvp_batch_of_one_s'])} "
                     "ms (the batch of two keeps its answer bit-identical to a batched one)")
    if result["classes"]:
        lines += ["", "classes (same trunk, batch "
                  f"{result['classes'][0]['batch']}): per-query ms"]
        lines.append(f"{'K':>6s} | {'victim':>9s} | {'GRAD² jvp':>9s} | {'MAD':>9s} | "
                     f"{'MAD/GRAD²':>9s} | {'MAD loop':>9s} | {'loop/GRAD²':>10s} | "
                     f"{'MAD closed':>10s} | {'closed/GRAD²':>12s}")
        for c in result["classes"]:
            mad = _ms(c.get("mad_per_query_s")) if "mad_s" in c else "skipped"
            ratio = f"{c['mad_over_grad2']:.1f}x" if "mad_over_grad2" in c else "-"
            loop = _ms(c.get("mad_loop_per_query_s"))
            loop_ratio = (f"{c['mad_loop_over_grad2']:.1f}x" if "mad_loop_over_grad2" in c
                          else "-")
            closed = (f"{_ms(c['mad_closed_form_per_query_s']):>10s} | "
                      f"{c['mad_closed_form_over_grad2']:>11.2f}x")
            lines.append(f"{c['classes']:>6d} | {_ms(c['victim_s'] / c['batch']):>9s} | "
                         f"{_ms(c['grad2_per_query_s']):>9s} | {mad:>9s} | {ratio:>9s} | "
                         f"{loop:>9s} | {loop_ratio:>10s} | {closed}")
            if "mad_skipped" in c:
                lines.append(f"         MAD skipped: {c['mad_skipped']}")
    if result.get("reference"):
        lines += ["", "reference-style GRAD² (double backward + per-example Python greedy) vs "
                  "vectorised (jvp + batched solver):"]
        for r in result["reference"]:
            lines.append(f"  K={r['classes']}, batch {r['batch']}: {_ms(r['reference_s'])} ms "
                         f"vs {_ms(r['vectorised_s'])} ms = {r['speedup']:.1f}x (answers "
                         f"differ by at most {r['max_abs_difference']:.1e})")
    if result.get("solver"):
        s = result["solver"]
        shape = "x".join(str(v) for v in s["resnet18_input"])
        top1 = (f"; with preserve_top1 {_ms(s['solver_top1_s'])} ms"
                if "solver_top1_s" in s else "")
        lines += ["", f"solver alone {s['rows']:,} x {s['classes']:,}: {_ms(s['solver_s'])} ms"
                  f"{top1}; resnet18 forward {shape}: {_ms(s['resnet18_s'])} ms "
                  f"(solver = {s['solver_over_resnet18']:.2f}x the forward)"]
    if result.get("compile"):
        lines += ["", "torch.compile(dynamic=True) on the JVP (same-size surrogate): first call "
                  "(compile) s, eager ms, compiled ms, eager/forward, compiled/forward, "
                  "max |compiled - eager|, row bits same as in the largest batch"]
        for c in result["compile"]:
            lines.append(f"  B={c['batch']}: {c['first_call_s']:.1f} s, {_ms(c['eager_s'])}, "
                         f"{_ms(c['compiled_s'])}, {c['eager_over_forward']:.2f}x, "
                         f"{c['compiled_over_forward']:.2f}x, {c['max_abs_difference']:.1e}, "
                         f"{c['first_row_bit_identical_to_largest_batch']}")
    lines += ["", "goals:"]
    for g in result["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        extra = ""
        if "by_classes" in g:
            by_k = ", ".join(f"K={k}: " + ("-" if v is None else f"{v:.1f}x")
                             for k, v in g["by_classes"].items())
            grows = f"; grows with K: {g['grows_with_k']}" if "grows_with_k" in g else ""
            closed = ""
            if g.get("closed_form_by_classes"):
                closed = "; MAD in closed form / GRAD²: " + ", ".join(
                    f"K={k}: " + ("-" if v is None else f"{v:.2f}x")
                    for k, v in g["closed_form_by_classes"].items())
            extra = f" [{by_k}{grows}{closed}]"
        lines.append(f"  {g['goal']}: {value} {g['comparison']} {g['threshold']:g} → "
                     f"{verdict} — {g['detail']}{extra}")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section ``args`` asks for; returns the JSON-ready result."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    setup = Setup(device, dtype, args.epsilon, args.own_cnn,
                  int(args.mad_memory_gb * 2**30), args.mad_loop_queries, args.seed,
                  args.memory_format)
    timer = Timer(device, args.repeats, args.warmup, args.budget, not args.no_progress)
    started = time.perf_counter()
    result: dict[str, Any] = {"meta": {
        "command": "grad2 " + " ".join(args.argv) if args.argv is not None else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "dtype": args.dtype,
        "memory_format": args.memory_format,
        "epsilon": args.epsilon,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "budget_s": args.budget,
        "quick": args.quick,
        "load_average_start": _load_average(),
    }}
    if args.real_sizes:
        result["real_sizes"] = real_size_section(setup, timer, args.real_batches)
        result["meta"]["wall_s"] = time.perf_counter() - started
        result["meta"]["load_average_end"] = _load_average()
        return result
    section = per_batch_section(setup, timer, args.batches)
    result.update(section)
    result["classes"] = classes_section(setup, timer, args.classes, args.class_batch)
    result["reference"] = reference_section(setup, timer, args.reference_batch,
                                            args.reference_classes)
    result["solver"] = solver_section(setup, timer, args.solver_rows, args.solver_classes,
                                      args.resnet_batch, args.resnet_size, args.solver_top1)
    result["compile"] = compile_section(setup, timer, args.compile_batches) if args.compile \
        else None
    goal_batch = 32 if 32 in args.batches else max(args.batches)
    result["goals"] = goals(result, goal_batch)
    result["meta"]["wall_s"] = time.perf_counter() - started
    result["meta"]["load_average_end"] = _load_average()
    return result


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other work competes for the cores)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


#: (full run, --quick) defaults for the options left unset.
DEFAULTS = {
    "batches": ([1, 8, 32, 128], [1, 32]),
    "classes": ([10, 100, 1000], [10, 100]),
    "repeats": (15, 5),
    "warmup": (3, 1),
    "budget": (6.0, 1.5),
    "solver_rows": (10_000, 2_000),
    "solver_classes": (1_000, 1_000),
    "resnet_size": (224, 32),
    "compile_batches": ([1, 32], [32]),
    "reference_classes": ([10, 1000], [10]),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time the defenses in-process (victim forward vs victim + defense)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=main)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a short run: batches 1,32, K 10,100, 5 repeats, small solver "
                             "and ResNet inputs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1, the serving default)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="channels_last",
                        help="layout of the networks' 4-D tensors, as handler.memory_format "
                             "(default channels_last, the serving default)")
    parser.add_argument("--batches", type=_int_list, help="default 1,8,32,128")
    parser.add_argument("--classes", type=_int_list, help="default 10,100,1000")
    parser.add_argument("--class-batch", type=int, default=32,
                        help="batch for the classes section (default 32)")
    parser.add_argument("--reference-batch", type=int, default=32)
    parser.add_argument("--reference-classes", type=_int_list,
                        help="class counts for the reference-style comparison (default 10,1000)")
    parser.add_argument("--repeats", type=int, help="timed repeats per item (default 15)")
    parser.add_argument("--warmup", type=int, help="warm-up calls per item (default 3)")
    parser.add_argument("--budget", type=float,
                        help="at most this many seconds of repeats per item (at least 3 "
                             "repeats); default 6")
    parser.add_argument("--solver-rows", type=int, help="default 10000")
    parser.add_argument("--solver-classes", type=int, help="default 1000")
    parser.add_argument("--solver-top1", action="store_true",
                        help="also time the preserve_top1 solver on that batch")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--resnet-size", type=int, help="ResNet-18 input side (default 224)")
    parser.add_argument("--mad-memory-gb", type=float, default=3.0,
                        help="largest MAD Jacobian to materialise (default 3 GiB); bigger "
                             "ones are run at a smaller batch or skipped")
    parser.add_argument("--mad-loop-queries", type=int, default=4,
                        help="queries timed for MAD run one query at a time with K backward "
                             "passes (reference style); 0 skips it (default 4)")
    parser.add_argument("--own-cnn", action="store_true",
                        help="victim = the benchmark's own BN CNN, not grad2.models small_cnn")
    parser.add_argument("--real-sizes", action="store_true",
                        help="only the real-size case: ResNet-50 victim at 3x224x224, K=1000, "
                             "GRAD² by ResNet-18 and MobileNetV3 surrogates, plain and "
                             "top-1-preserving solver")
    parser.add_argument("--real-batches", type=_int_list, default=[1, 4, 16],
                        help="batch sizes of --real-sizes (default 1,4,16)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the JVP under torch.compile (minutes of start-up)")
    parser.add_argument("--compile-batches", type=_int_list, help="default 1,32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("runs/bench.json"),
                        help="where to write the full result (default runs/bench.json)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options with the full-run or ``--quick`` defaults; check the rest."""
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--threads and --repeats must be >= 1, --warmup >= 0")
    if not 0 <= args.epsilon <= 2 or math.isnan(args.epsilon):
        raise ValueError("--epsilon must lie in [0, 2]")
    if not hasattr(args, "argv"):
        args.argv = None
    return args


def main(args: argparse.Namespace) -> int:
    args = resolve(args)
    if args.argv is None:
        args.argv = sys.argv[1:]
    result = run_benchmark(args)
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}")
    return 0
