"""How much the secret mapping's draw changes grad2_gated's effect: the study's defender
(cached in GRAD2_CACHE/eval), soft, labels-only and other-architecture (``arch``) clones on
4,000 Animal-MNIST queries.

    GRAD2_CACHE=.cache .venv/bin/python scripts/key_spread.py plain --keys 8
    GRAD2_CACHE=.cache .venv/bin/python scripts/key_spread.py selected --keys 8
    GRAD2_CACHE=.cache .venv/bin/python scripts/key_spread.py floor --seeds 0 1 2

``plain``: keys ``SHA-256("key spread i")`` (the plain draw), ``selected``: keys drawn by
``grad2 keygen``'s selection (:func:`grad2.tools.keys.select_key`) against the study's
victim on defender-chosen images, from a seeded key source; ``floor``: one key over
several clone seeds (the clone-seed noise); ``landing``: where gated answers land, the
thief's pool against the defender's OOD images (analysis only); ``anova``: from the cache
only, per clone kind and key group, the spread of the key means against what clone-seed
noise alone gives, and a one-way ANOVA of the key; ``transfer``: one clone per key of the
16 (plain and selected) on other query sources (other thieves' pools, the defender's own
OOD images) and the rank correlation with the main pool's means; ``regions``: several
mappings per key, one per region of the queries (``--region-kind``: keyed directions of the
surrogate's features, the victim's runner-up class, or a keyed table of (top-1, runner-up)
pairs), and the key ANOVA over them (a lab experiment, not the product's defense). Every
clone's accuracy is cached in GRAD2_CACHE/eval/key_spread.json, so reruns only add what is
missing.

    GRAD2_CACHE=.cache .venv/bin/python scripts/key_spread.py anova --seeds 0 1 2 --clones arch
    GRAD2_CACHE=.cache .venv/bin/python scripts/key_spread.py transfer --clones arch
    GRAD2_CACHE=.cache .venv/bin/python scripts/key_spread.py regions --region-kind pairs \
        --regions 4 --keys 8 --seeds 0 1 --clones arch --sources
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch

from grad2 import gate
from grad2.defenses import GatedGRAD2
from grad2.lab import ood
from grad2.lab.data import FASHION_CLASSES, cache_dir, to_tensor
from grad2.lab.evaluate import Lab, apply_defense
from grad2.models import predict_probs
from grad2.scores import penultimate_features
from grad2.tools import keys
from grad2.tools.progress import progress_bar

#: The clone kinds measured per key: name -> (architecture, hard_labels). ``arch`` is the
#: lab's best thief on every pool (docs/results/thieves/thieves.md).
CLONES = {"soft": ("small_cnn", False), "labels": ("small_cnn", True),
          "arch": (ood.MISMATCH_ARCH, False)}
#: The defender's own in-distribution images the criterion reads (of its 10,000 fit images).
OWN_IMAGES = 2000


def plain_key(index: int) -> bytes:
    """The ``index``-th plain key of this study (SHA-256 of a label)."""
    return hashlib.sha256(f"key spread {index}".encode()).digest()


def seeded_source(seed: int):
    """A reproducible stand-in for :func:`gate.new_key` (hex keys from a seeded stream)."""
    counter = iter(range(1 << 62))
    return lambda: hashlib.sha256(f"keygen source {seed} {next(counter)}".encode()).hexdigest()


def defender_images(defender: ood.Defender) -> torch.Tensor:
    """The defender-chosen OOD images the criterion reads (transformed training images)."""
    return to_tensor(ood.verification_pixels(defender.train.images))


class Measure:
    """Clone accuracies per (mapping, clone kind, seed), cached in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lab = Lab(cache_dir() / "eval", progress=False)
        self.defender = ood.Defender(self.lab, progress=False, names=("grad2_gated_permute",))
        self.inputs, self.clean, _ = self.defender.answers("none", ood.MAIN_POOL)
        self.rows: dict = json.loads(path.read_text()) if path.exists() else {}
        self._scorer: keys.MappingScorer | None = None
        self._queries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def scorer(self) -> keys.MappingScorer:
        if self._scorer is None:
            own = to_tensor(self.defender.fit_images.images[:OWN_IMAGES])
            self._scorer = keys.MappingScorer.fit(self.lab.victim,
                                                  defender_images(self.defender), own,
                                                  self.gate_weights)
        return self._scorer

    def save(self, name: str, cell: str, value: float) -> None:
        """Add one accuracy to the cache file (re-read first: runs may share it)."""
        rows = json.loads(self.path.read_text()) if self.path.exists() else {}
        rows.setdefault(name, {})[cell] = value
        self.rows = {**rows, **{k: {**rows.get(k, {}), **v} for k, v in self.rows.items()}}
        self.path.write_text(json.dumps(self.rows, indent=1))

    def gate_weights(self, x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        """``[B]``: the calibrated feature gate's ``α`` of the study's defense."""
        return gate.gate_weight(self.defender.gate_scores(x),
                                self.defender.knobs["grad2_gated_permute"],
                                self.defender.feature_slope)

    def queries(self, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, clean)`` a thief of ``source`` sends: the main pool, another pool of
        :data:`ood.POOLS`, or ``defender`` (the defender's own OOD images)."""
        if source == ood.MAIN_POOL:
            return self.inputs, self.clean
        if source not in self._queries:
            inputs = (defender_images(self.defender) if source == "defender"
                      else to_tensor(ood.pool_images(source)))
            self._queries[source] = inputs, predict_probs(self.lab.victim, inputs)
        return self._queries[source]

    def answers(self, mapping: torch.Tensor | None, source: str = ood.MAIN_POOL
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, answers)`` of ``source`` under ``mapping`` (None: undefended)."""
        inputs, clean = self.queries(source)
        if mapping is None:
            return inputs, clean
        defense = GatedGRAD2(self.defender.surrogate, ood.GATED_EPSILON,
                             ood.GATED_EPSILON_OOD, self.defender.knobs["grad2_gated_permute"],
                             self.defender.feature_slope, "permute", mapping,
                             gate_tensors=self.defender.feature_gate)
        return inputs, apply_defense(defense, inputs, clean, progress=False)

    def accuracy(self, mapping: torch.Tensor | None, clone: str, seed: int,
                 source: str = ood.MAIN_POOL) -> float:
        """``clone``'s Fashion-MNIST test accuracy (%) against ``mapping`` (None:
        undefended) when it queries ``source``, cached."""
        return self.named_accuracy(mapping_name(mapping), lambda: self.answers(mapping, source),
                                   clone, seed, source)

    def named_accuracy(self, name: str, answers, clone: str, seed: int,
                       source: str = ood.MAIN_POOL) -> float:
        """:meth:`accuracy` for the answer set ``answers()`` (``(inputs, answers)``) cached
        under ``name``."""
        row = self.rows.setdefault(name, {})
        cell = cell_name(clone, seed, source)
        if cell not in row:
            inputs, answers = answers()
            arch, hard_labels = CLONES[clone]
            model, _ = ood.fit_clone(inputs, answers, seed=seed, arch=arch,
                                     hard_labels=hard_labels)
            row[cell] = round(100 * ood.clone_accuracy(model, self.lab)[0], 2)
            self.save(name, cell, row[cell])
        return row[cell]


def cell_name(clone: str, seed: int, source: str = ood.MAIN_POOL) -> str:
    """The cache cell of one clone: kind and seed, and the query source when not the main
    pool."""
    return f"{clone}-{seed}" if source == ood.MAIN_POOL else f"{clone}@{source}-{seed}"


def mapping_name(mapping: torch.Tensor | None) -> str:
    """The cache row of ``mapping``: its digits (K <= 10), or ``none`` for undefended."""
    return "none" if mapping is None else "".join(map(str, mapping.tolist()))


def mapping_of(name: str) -> torch.Tensor:
    """The mapping ``[K]`` a cache row is named by (its digits, K <= 10)."""
    return torch.tensor([int(c) for c in name])


def rank_correlation(first: list[float], second: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (ties broken by order)."""
    ranks = [np.argsort(np.argsort(values)) for values in (first, second)]
    return float(np.corrcoef(*ranks)[0, 1])


def summary(values: list[float]) -> str:
    array = np.array(values)
    return (f"mean {array.mean():.1f}, min {array.min():.1f}, max {array.max():.1f}, "
            f"spread {array.max() - array.min():.1f}")


def landing(measure: Measure) -> None:
    """Print where the gated answers land, by class: the thief's pool (analysis only, never
    used by the criterion) against the defender's own OOD images."""
    def shares(probs: torch.Tensor, weights: torch.Tensor) -> list[float]:
        mass = torch.zeros(probs.shape[1], dtype=torch.float64).index_add_(
            0, probs.argmax(1), weights.double())
        return (100 * mass / mass.sum()).tolist()

    pool = shares(measure.clean, measure.gate_weights(measure.inputs, measure.clean))
    scorer = measure.scorer
    own = shares(scorer.ood_probs, scorer.ood_moved)
    print("class | Animal-MNIST pool, gated % | defender OOD images, gated %")
    for name, thief, defender in zip(FASHION_CLASSES, pool, own, strict=True):
        print(f"{name} | {thief:.1f} | {defender:.1f}")


def key_anova(by_key: list[list[float]]) -> dict[str, float]:
    """One-way ANOVA of clone accuracies grouped by key (``[keys][seeds]``, equal seeds):
    the spread of the key means, the within-key seed sd, F and its p-value, the key sd the
    mean squares imply, and the range of that many means that seed noise alone gives
    (expected range of normal samples times the sd of a mean)."""
    from scipy import stats

    values = np.array(by_key)
    keys_n, seeds_n = values.shape
    means = values.mean(1)
    within = float(((values - means[:, None]) ** 2).sum() / (keys_n * (seeds_n - 1)))
    between = float(seeds_n * means.var(ddof=1))
    f_value = between / within
    rng = np.random.default_rng(0)
    expected_range = float(np.ptp(rng.standard_normal((100_000, keys_n)), axis=1).mean())
    return {"keys": keys_n, "seeds": seeds_n, "mean": float(means.mean()),
            "spread": float(np.ptp(means)), "seed_sd": within ** 0.5, "F": f_value,
            "p": float(stats.f.sf(f_value, keys_n - 1, keys_n * (seeds_n - 1))),
            "key_sd": max(between - within, 0.0) ** 0.5 / seeds_n ** 0.5,
            "noise_spread": expected_range * (within / seeds_n) ** 0.5}


#: The header of :func:`anova_line`'s table.
ANOVA_HEADER = ("| clone | keys | undefended | mean of key means (effect) | spread of key means "
                "| seed sd | spread from seeds alone | ANOVA F, p | key sd |\n"
                + "| --- " * 9 + "|")


def anova_line(clone: str, group: str, undefended: float, by_key: list[list[float]]) -> str:
    """One row of :data:`ANOVA_HEADER`: :func:`key_anova` of a key group's clones."""
    result = key_anova(by_key)
    return (f"| {clone} | {group} ({result['keys']}) | {undefended:.1f} | "
            f"{result['mean']:.1f} ({undefended - result['mean']:.1f}) | "
            f"{result['spread']:.1f} | {result['seed_sd']:.1f} | "
            f"{result['noise_spread']:.1f} | {result['F']:.2f}, {result['p']:.2g} | "
            f"{result['key_sd']:.1f} |")


def anova(measure: Measure, groups: dict[str, list[torch.Tensor]], clones: list[str],
          seeds: list[int]) -> None:
    """Print, per clone kind and key group, :func:`key_anova` over the cached clones."""
    print(ANOVA_HEADER)
    for clone in clones:
        cells = [cell_name(clone, seed) for seed in seeds]
        undefended = np.mean([measure.rows["none"][cell] for cell in cells])
        groups_all = {**groups, "all": [m for ms in groups.values() for m in ms]}
        for group, mappings in groups_all.items():
            by_key = [[measure.rows.get(mapping_name(m), {}).get(cell) for cell in cells]
                      for m in mappings]
            by_key = [row for row in by_key if None not in row]
            if len(by_key) >= 2:
                print(anova_line(clone, group, undefended, by_key))


def transfer(measure: Measure, mappings: list[torch.Tensor], clone: str, sources: list[str],
             seed: int, main_seeds: list[int]) -> None:
    """Print, per query source, one ``clone`` per key against the main pool's mean over
    ``main_seeds``: does the order of the keys carry over to other thieves' images, and to
    the defender's own OOD images (a criterion a defender could compute)?"""
    jobs = [(mapping, source) for source in sources for mapping in [None, *mappings]]
    for mapping, source in progress_bar(jobs, desc="transfer", unit="clone"):
        measure.accuracy(mapping, clone, seed, source)
    names = [mapping_name(m) for m in mappings]
    main = [float(np.mean([measure.rows[name][cell_name(clone, s)] for s in main_seeds]))
            for name in names]
    print(f"| {clone} clones, seed {seed} | undefended | mean of keys (effect) | spread | "
          f"rank correlation with {ood.MAIN_POOL} (seeds {main_seeds}) |")
    print("| --- | --- | --- | --- | --- |")
    for source in sources:
        cell = cell_name(clone, seed, source)
        values = [measure.rows[name][cell] for name in names]
        undefended = measure.rows["none"][cell]
        print(f"| {source} | {undefended:.1f} | {np.mean(values):.1f} "
              f"({undefended - np.mean(values):.1f}) | {np.ptp(values):.1f} | "
              f"{rank_correlation(values, main):+.2f} |")


def region_mappings(index: int, regions: int) -> list[torch.Tensor]:
    """The ``regions`` mappings of plain key ``index`` (one derived key per region)."""
    return [gate.keyed_mapping(hashlib.sha256(plain_key(index) + f"region {r}".encode())
                               .digest(), 10) for r in range(regions)]


#: How a query's region is found: keyed directions of the surrogate's features, the
#: victim's runner-up class, or a keyed assignment of (top-1, runner-up) pairs.
REGION_KINDS = ("features", "runner_up", "pairs")


def region_of(measure: Measure, index: int, regions: int, inputs: torch.Tensor,
              kind: str = "features") -> torch.Tensor:
    """``[B]`` region of each input in ``0..regions-1``.

    ``features``: the sign bits of ``log2(regions)`` keyed random directions of the
    surrogate's penultimate features, each cut at its median on the defender's own OOD
    images. ``runner_up``: the victim's second class (``regions`` = K). ``pairs``: the
    (top-1, runner-up) pair's region in a keyed table of ``[K, K]`` draws."""
    if kind != "features":
        top = predict_probs(measure.lab.victim, inputs).topk(2, dim=1).indices
        if kind == "runner_up":
            return top[:, 1]
        seed = int.from_bytes(hashlib.sha256(plain_key(index) + b"pairs").digest()[:8],
                              "little")
        table = torch.randint(regions, (10, 10), generator=torch.Generator().manual_seed(seed))
        return table[top[:, 0], top[:, 1]]
    bits = regions.bit_length() - 1
    if 1 << bits != regions:
        raise SystemExit("--regions must be a power of two")
    seed = int.from_bytes(hashlib.sha256(plain_key(index) + b"directions").digest()[:8],
                          "little")
    surrogate = measure.defender.surrogate
    own = penultimate_features(surrogate, defender_images(measure.defender)).double()
    directions = torch.randn(own.shape[1], bits, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
    cuts = (own @ directions).median(0).values
    above = (penultimate_features(surrogate, inputs).double() @ directions) > cuts
    return (above.long() * (1 << torch.arange(bits))).sum(1)


def region_answers(measure: Measure, index: int, regions: int, source: str = ood.MAIN_POOL,
                   kind: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, answers)`` of ``source`` when each query is relabelled by its region's
    mapping: each region's rows of a full pass under that region's mapping (every step of
    the defense is a function of the row alone)."""
    inputs, _ = measure.queries(source)
    region = region_of(measure, index, regions, inputs, kind)
    answers = torch.stack([measure.answers(mapping, source)[1]
                           for mapping in region_mappings(index, regions)])
    return inputs, answers[region, torch.arange(len(inputs))]


def regions_study(measure: Measure, args: argparse.Namespace) -> None:
    """Clones per key when the gated queries of each region (``--region-kind``) get their
    own mapping, and the undefended clones; then, per query source, how key 0's regions
    split the gated queries and the key ANOVA (``--keys 0``: the split only)."""
    if args.region_kind == "runner_up":
        args.regions = 10
    sources = [ood.MAIN_POOL, *args.sources]
    label = "" if args.region_kind == "features" else f"{args.region_kind}-"
    names = [f"regions{label}{args.regions}-{index}" for index in range(args.keys)]
    answer_sets = cache(partial(region_answers, measure, regions=args.regions,
                                kind=args.region_kind))
    jobs = [(index, clone, seed, source) for source in sources if args.keys
            for index in [None, *range(args.keys)] for clone in args.clones
            for seed in args.seeds]
    for index, clone, seed, source in progress_bar(jobs, desc="regions", unit="clone"):
        if index is None:
            measure.accuracy(None, clone, seed, source)
        else:
            measure.named_accuracy(names[index], partial(answer_sets, index, source=source),
                                   clone, seed, source)
    for source in sources:
        inputs, clean = measure.queries(source)
        region = region_of(measure, 0, args.regions, inputs, args.region_kind)
        gated = torch.zeros(args.regions, dtype=torch.float64).index_add_(
            0, region, measure.gate_weights(inputs, clean).double())
        print(f"{source}: gated mass per region of key 0 "
              f"{[round(mass) for mass in gated.tolist()]} (of {gated.sum():.0f})")
        if not args.keys:
            continue
        print(ANOVA_HEADER)
        for clone in args.clones:
            cells = [cell_name(clone, seed, source) for seed in args.seeds]
            undefended = float(np.mean([measure.rows["none"][cell] for cell in cells]))
            by_key = [[measure.rows[name][cell] for cell in cells] for name in names]
            print(anova_line(clone, f"{args.regions} {args.region_kind} mappings", undefended,
                             by_key))


def plain_mappings(count: int) -> list[torch.Tensor]:
    """The mappings of the first ``count`` plain keys."""
    return [gate.keyed_mapping(plain_key(i), 10) for i in range(count)]


def selected_mappings(measure: Measure, count: int, source_seed: int) -> list[torch.Tensor]:
    """The mappings of the first ``count`` keys keygen's selection draws from the seeded
    source ``source_seed``."""
    source = seeded_source(source_seed)
    return [gate.keyed_mapping(keys.select_key(measure.scorer, source)[0], 10)
            for _ in range(count)]


def run(args: argparse.Namespace) -> None:
    measure = Measure(cache_dir() / "eval" / "key_spread.json")
    if args.what == "regions":
        regions_study(measure, args)
        return
    if args.what == "landing":
        landing(measure)
        return
    if args.what == "anova":
        groups = {"plain": plain_mappings(args.keys),
                  "selected": selected_mappings(measure, args.keys, args.source_seed)}
        anova(measure, groups, args.clones, args.seeds)
        return
    if args.what == "transfer":
        mappings = (plain_mappings(args.keys)
                    + selected_mappings(measure, args.keys, args.source_seed))
        transfer(measure, mappings, args.clones[0], args.sources, args.seeds[0],
                 args.main_seeds)
        return
    if args.what == "plain":
        mappings = plain_mappings(args.keys)
    elif args.what == "selected":
        mappings = selected_mappings(measure, args.keys, args.source_seed)
    else:
        mappings = [gate.keyed_mapping(plain_key(args.floor_key), 10)]
    jobs = [(mapping, clone, seed) for mapping in [None, *mappings]
            for clone in args.clones for seed in args.seeds]
    results = {}
    for mapping, clone, seed in progress_bar(jobs, desc=args.what, unit="clone"):
        name = mapping_name(mapping)
        results.setdefault(clone, {}).setdefault(name, []).append(
            measure.accuracy(mapping, clone, seed))
    for clone, by_mapping in results.items():
        undefended = np.mean(by_mapping.pop("none"))
        print(f"{args.what} {clone} (undefended {undefended:.1f}):")
        for name, values in by_mapping.items():
            criteria = measure.scorer.criteria(mapping_of(name))
            shown = ", ".join(f"{k} {v:.3f}" for k, v in criteria.items())
            print(f"  σ={name}: {', '.join(f'{v:.1f}' for v in values)} | {shown}")
        means = [float(np.mean(v)) for v in by_mapping.values()]
        print(f"  {summary(means)}; effect mean {undefended - np.mean(means):.1f}")
        if len(means) >= 4:
            table = [measure.scorer.criteria(mapping_of(name)) for name in by_mapping]
            print("  rank correlation of clone accuracy with: " + ", ".join(
                f"{k} {rank_correlation([c[k] for c in table], means):+.2f}"
                for k in table[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("plain", "selected", "floor", "landing", "anova",
                                             "transfer", "regions"))
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--clones", nargs="+", default=list(CLONES), choices=list(CLONES))
    parser.add_argument("--source-seed", type=int, default=0)
    parser.add_argument("--floor-key", type=int, default=0)
    parser.add_argument("--regions", type=int, default=4,
                        help="regions: mappings per key (a power of 2 for features; runner_up: K)")
    parser.add_argument("--region-kind", choices=REGION_KINDS, default="features")
    parser.add_argument("--sources", nargs="*", default=["animal_rotated", "animal_shifted",
                                                         "defender"],
                        help="transfer: query sources besides the main pool")
    parser.add_argument("--main-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="transfer: the main pool's clone seeds to compare with")
    run(parser.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main()
