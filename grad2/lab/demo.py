"""``make demo``: the whole product at work on this machine.

Trains (or loads from the cache) the Fashion-MNIST victim; fits the defender's parts on
defender-side data only (an early-stopped surrogate distilled on 10,000 of the victim's
training images, the surrogate's feature gate, its threshold calibrated on half of the
test split for an accuracy drop of at most 0.8 point there; :class:`grad2.lab.ood.Defender`)
and writes a fresh secret mapping key; archives version 1.0 (no defense) and version 2.0
(``grad2_gated``: small redirection in distribution, keyed relabelling of OOD queries);
serves both on TorchServe with token authorization on; shows answers side by side; runs a
live thief against each version through the standard inference API (Animal-MNIST
queries; soft and labels-only clones of the surrogate's architecture and soft clones of
another, wider one, the lab's strongest thief; two seeds each, a collapsed clone retrained
as in the lab; the best thief is the highest mean of the three); tests three stolen
clones, the undefended clone and an independent model for the secret mapping with
``verify`` on the fresh Animal-MNIST images the archive moves (images the thief never
sent), against reference models trained without the answers; prints, plots and stops
the server.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from grad2 import gate
from grad2.lab import ood, thieves
from grad2.lab.attack import APIClient
from grad2.lab.data import cache_dir, load_fashion_mnist, thief_pool, to_tensor
from grad2.lab.evaluate import Lab
from grad2.lab.train import set_threads
from grad2.models import save_checkpoint
from grad2.serve import Ports, build_archive, start_server, stop_server
from grad2.serve.templates import template_path
from grad2.tools.ownership import verify_suspect
from grad2.tools.progress import progress_bar

MODEL = "fashion"
VERSIONS = {"1.0": "none", "2.0": "grad2_gated"}
#: The demo's thieves: name -> (clone architecture, trains on top-1 labels only).
THIEVES = {"soft": ("small_cnn", False), "labels": ("small_cnn", True),
           "arch": (ood.MISMATCH_ARCH, False)}
THIEF_NAMES = {"soft": "soft clone", "labels": "labels-only clone",
               "arch": f"{ood.MISMATCH_ARCH} clone"}
SEEDS = (0, 1)
#: Models trained without the archive's answers that verify compares suspects with.
REFERENCES = 4
VERIFY_ALPHA = 1e-3


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _gated_config(path: Path, defender: ood.Defender) -> Path:
    raw = yaml.safe_load(template_path("model-configs/grad2_gated.yaml").read_text())
    raw["defense"].update({
        "epsilon": ood.GATED_EPSILON, "epsilon_ood": ood.GATED_EPSILON_OOD,
        "surrogate": "surrogate_defender.pt", "gate_file": "gate.pt",
        "mapping_key": "mapping.key",
        "gate_threshold": float(defender.knobs["grad2_gated_permute"]),
        "gate_slope": float(defender.feature_slope),
    })
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _side_by_side(answers: dict[str, list[dict[str, float]]], labels: list[str]) -> str:
    lines = []
    for index, label in enumerate(labels):
        lines.append(f"image {index} ({label})")
        for version, rows in answers.items():
            top = sorted(rows[index].items(), key=lambda item: -item[1])[:3]
            shown = ", ".join(f"{name} {prob:.3f}" for name, prob in top)
            lines.append(f"   v{version} ({VERSIONS[version]:>11}): {shown}")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{100 * np.mean(values):5.1f} ({', '.join(f'{100 * v:.1f}' for v in values)})"


def run_demo(out: Path, budget: int, clone_epochs: int) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _say("1/7 victim and the defender's parts (trained once, then cached)")
    lab = Lab(cache_dir() / "eval")
    key_path = out / "secret" / "mapping.key"
    if not key_path.exists():
        gate.write_key(key_path)
    defender = ood.Defender(lab, key=gate.read_key(key_path), names=("grad2_gated_permute",))
    print(f"victim test accuracy: {100 * lab.victim_accuracy:.2f}%")
    print(f"secret mapping key: {key_path} (kept out of model-config.yaml; the archive packs "
          "it for the worker)")

    _say("2/7 the gate, fitted and calibrated on defender-side images only")
    threshold = defender.knobs["grad2_gated_permute"]
    validation = defender.lab.test_inputs[defender.validation]
    flagged = (defender.gate_scores(validation) < threshold).float().mean().item()
    print(f"feature gate on the surrogate's features, fitted on {len(defender.fit_images):,} "
          f"of the victim's training images; threshold {threshold:.1f} flags "
          f"{100 * flagged:.1f}% of {len(validation):,} validation images (Fashion-MNIST test "
          f"1-5,000), the largest share whose accuracy drop there is <= "
          f"{ood.VALIDATION_DROP:g} point")
    gate_path = out / "gate.pt"
    torch.save(defender.feature_gate, gate_path)

    _say("3/7 archiving fashion 1.0 (no defense) and 2.0 (grad2_gated, keyed mapping)")
    store = out / "model_store"
    models_dir = lab.folder / "models"
    names = out / "index_to_name.json"
    names.write_text(json.dumps(dict(enumerate(lab.test.class_names))))
    archives = {}
    for version, method in VERSIONS.items():
        gated = method == "grad2_gated"
        config = (_gated_config(out / "model-config-2.0.yaml", defender) if gated
                  else template_path("model-configs/none.yaml"))
        archives[version] = build_archive(
            MODEL, version, models_dir / "victim.pt", config, store,
            surrogate=models_dir / "surrogate_defender.pt" if gated else None,
            files={"gate_file": gate_path, "mapping_key": key_path} if gated else None,
            index_to_name=names, archive_name=f"{MODEL}_v{version}", force=True,
        )
        print(f"built {archives[version]}")

    _say("4/7 starting TorchServe (token authorization on, model API off)")
    specs = [f"{MODEL}={path.name}" for path in archives.values()]
    server = start_server(store, specs, workdir=out / "torchserve", ports=Ports.free())
    pool = thief_pool("animal", size=budget, seed=0)
    test = load_fashion_mnist("test")
    report_rows = slice(ood.VALIDATION_SIZE, ood.VALIDATION_SIZE + 1000)
    stolen: dict[str, torch.Tensor] = {}
    rows = []
    try:
        token = server.tokens().inference
        urls = {v: f"{server.inference_url}/predictions/{MODEL}/{v}" for v in VERSIONS}
        print(f"serving {', '.join(urls.values())}; token in {server.key_file}")

        _say("5/7 the same images through both versions: two test images, two animals")
        shown_images = np.concatenate([test.images[:2], pool.images[:2]])
        shown = {}
        for version, url in urls.items():
            answers, _, names_order, _ = APIClient(url, token).query(shown_images,
                                                                      progress=False)
            shown[version] = [dict(zip(names_order, row.tolist())) for row in answers]
        labels = [f"test, true {test.class_names[i]}" for i in test.labels[:2]]
        labels += ["Animal-MNIST (out of distribution)"] * 2
        print(_side_by_side(shown, labels))

        _say(f"6/7 a live thief: {budget:,} Animal-MNIST queries per version")
        for version, url in urls.items():
            client = APIClient(url, token)
            answers, answered, _, stats = client.query(test.images[report_rows])
            truth = test.labels[report_rows][answered]
            defender_accuracy = float((answers.argmax(1).numpy() == truth).mean())
            pool_answers, pool_answered, _, pool_stats = client.query(
                pool.images, expected_classes=test.class_names)
            if len(pool_answered) != len(pool.images):
                raise RuntimeError(f"v{version}: {pool_stats.failed} thief queries failed")
            stolen[version] = pool_answers
            rows.append({"version": version, "defense": VERSIONS[version],
                         "defender_accuracy": defender_accuracy,
                         "failed": stats.failed + pool_stats.failed})
    finally:
        stop_server(server.workdir)
        print("TorchServe stopped")

    inputs = to_tensor(pool.images)
    clones: dict[tuple[str, str, int], Path] = {}
    bar = progress_bar(total=len(rows) * len(THIEVES) * len(SEEDS), desc="clones",
                       unit="clone")
    for row in rows:
        version = row["version"]
        for thief, (arch, hard_labels) in THIEVES.items():
            accuracies = []
            for seed in SEEDS:
                clone, _ = ood.fit_clone(inputs, stolen[version], seed, arch=arch,
                                         hard_labels=hard_labels, epochs=clone_epochs)
                accuracies.append(ood.clone_accuracy(clone, lab)[0])
                path = out / "clones" / f"v{version}-{thief}-{seed}.pt"
                save_checkpoint(clone, path, {"role": "clone", "version": version,
                                              "thief": thief, "seed": seed})
                clones[version, thief, seed] = path
                bar.update()
            row[thief] = accuracies
    bar.close()
    for row in rows:
        for thief in THIEVES:
            print(f"v{row['version']} {THIEF_NAMES[thief]:>17}s (seeds "
                  f"{', '.join(map(str, SEEDS))}): {_spread(row[thief])}% Fashion-MNIST test "
                  "accuracy")

    _say("7/7 verify: does a suspect follow the secret mapping? (fresh Animal-MNIST images "
         "the thief never sent, against models trained without the answers)")
    verification = out / "verification.npz"
    # Fresh natural OOD images: Animal-MNIST images the thief never sent. The defender's
    # own training images, transformed, do not work as well (docs/results.md).
    np.savez(verification, images=ood.fresh_ood_pixels(budget))
    # Models trained without the archive's answers: one is a suspect, the others are the
    # reference models verify's null needs (innocents share the victim's confusions).
    innocents = [save_checkpoint(model, out / "clones" / f"{name}.pt", {"role": "innocent"}
                                 ).with_suffix(".pt")
                 for name, model in ood.innocent_models(lab, count=1 + REFERENCES)]
    innocent_path, references = innocents[0], innocents[1:]
    suspects = {
        "clone of v2.0 (soft, seed 0)": clones["2.0", "soft", SEEDS[0]],
        "clone of v2.0 (labels-only, seed 0)": clones["2.0", "labels", SEEDS[0]],
        f"clone of v2.0 ({ood.MISMATCH_ARCH}, seed 0)": clones["2.0", "arch", SEEDS[0]],
        "clone of v1.0, undefended (soft, seed 0)": clones["1.0", "soft", SEEDS[0]],
        "independently trained model": innocent_path,
    }
    verdicts = {}
    for name, path in progress_bar(suspects.items(), desc="verify", unit="suspect"):
        verdict = verify_suspect(archives["2.0"], str(path), verification, progress=False,
                                 references=references)
        verdicts[name] = {"p_value": verdict.p_value, "follows": verdict.follows_receiver,
                          "reference_mean": verdict.reference_mean,
                          "images": verdict.informative}
    print(f"(the null: {len(references)} reference models trained without the answers)")
    for name, verdict in verdicts.items():
        accused = "accused" if verdict["p_value"] < VERIFY_ALPHA else "not accused"
        print(f"{name:>42}: puts {100 * verdict['follows']:5.1f}% of {verdict['images']} "
              f"moved images in their receiving class (reference models "
              f"{100 * verdict['reference_mean']:.1f}%), p = {verdict['p_value']:.2g}: "
              f"{accused}")

    columns = [THIEF_NAMES[thief] for thief in THIEVES]
    print("\nversion  defense       defender acc (1,000 test)  " + "  ".join(columns)
          + "  best thief")
    for row in rows:
        means = {thief: float(np.mean(row[thief])) for thief in THIEVES}
        row["best_thief_name"], row["best_thief"] = thieves.best_thief(means)
        cells = "  ".join(f"{100 * means[thief]:{len(column)}.1f}"
                          for thief, column in zip(THIEVES, columns, strict=True))
        print(f"{row['version']:>7}  {row['defense']:<12}  {100 * row['defender_accuracy']:24.1f}"
              f"  {cells}  {100 * row['best_thief']:5.1f} ({row['best_thief_name']})")
    effect = 100 * (rows[0]["best_thief"] - rows[-1]["best_thief"])
    print(f"the defense removes {effect:.1f} points from the best thief at an honest-user "
          f"cost of {100 * (rows[0]['defender_accuracy'] - rows[-1]['defender_accuracy']):.1f}")
    _plot(rows, out / "demo.png")
    elapsed = time.perf_counter() - started
    report = {"rows": rows, "verify": verdicts, "gate_threshold": threshold,
              "validation_flagged": flagged, "wall_time_s": elapsed}
    (out / "demo.json").write_text(json.dumps(report, indent=1))
    print(f"\nplot: {out / 'demo.png'}; report: {out / 'demo.json'}; took {elapsed:.0f} s")
    return report


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    labels = [f"v{r['version']} {r['defense']}" for r in rows]
    bars = {"defender_accuracy": "honest users (test)", **THIEF_NAMES}
    width = 0.8 / len(bars)
    for offset, (key, name) in enumerate(bars.items()):
        values = [100 * float(np.mean(r[key])) for r in rows]
        positions = [index + (offset - (len(bars) - 1) / 2) * width
                     for index in range(len(rows))]
        axis.bar(positions, values, width, label=name)
    axis.set_xticks(range(len(rows)), labels)
    axis.set_ylabel("Fashion-MNIST test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _demo_command(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    run_demo(Path(args.out), args.budget, args.clone_epochs)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the whole product at work (make demo)")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--budget", type=int, default=4000, help="thief queries per version")
    parser.add_argument("--clone-epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the figures in docs/results.md)")
    parser.set_defaults(func=_demo_command)
