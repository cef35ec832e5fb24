"""Answers of every shipped example ``model-config.yaml`` on one fixed batch, computed the
way the worker computes them (archive files unpacked, :func:`load_served_model`, batch
plans, clean probabilities, defense).

``python tests/shipped_answers.py`` writes ``tests/data/shipped_answers.pt``: the inputs,
each config's ``defense:`` section and its answers (``python tests/shipped_answers.py
NAME...`` recomputes those entries only and keeps every other one as stored: a deliberate
change of some answers). ``test_shipped_answers.py`` recomputes
them with the code of the day and compares bit for bit, so a refactor that changes an
answer fails. Networks, keys, gate and target files are seeded, not trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

STORED = Path(__file__).parent / "data" / "shipped_answers.pt"
TEMPLATES = Path(__file__).resolve().parents[1] / "grad2" / "serve" / "templates" / "model-configs"
KEY = b"shipped-answers-key-0123456789ab"
BATCH = 12
#: Stored configs no longer shipped, and the keys that serve them now: `target: watermark`
#: became the lab's research, served as the `file` target it always was.
RENAMED: dict[str, dict] = {"watermark": {"target": "file"}}


def shipped_configs() -> dict[str, dict]:
    """``name -> whole model-config mapping`` of every shipped example."""
    return {path.stem: yaml.safe_load(path.read_text())
            for path in sorted(TEMPLATES.glob("*.yaml"))}


def inputs(seed: int = 0) -> torch.Tensor:
    """``[BATCH, 1, 28, 28]`` seeded pixels in ``[0, 1]``; a few rows nearly blank (OOD)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(BATCH, 1, 28, 28, generator=generator)
    pixels[::3] *= 0.05
    return pixels


def stage(model_dir: Path, defense: dict) -> None:
    """Write the seeded files ``defense`` names into ``model_dir``."""
    from grad2.gate import fit_feature_gate
    from grad2.models import build_model, penultimate, save_checkpoint
    from grad2.targets import random as random_target
    from grad2.targets import save as save_target

    torch.manual_seed(1)
    save_checkpoint(build_model("small_cnn", 10, 1), model_dir / "victim.pt")
    surrogate = None
    if defense.get("surrogate"):
        torch.manual_seed(2)
        surrogate = build_model("small_cnn", 10, 1).eval()
        save_checkpoint(surrogate, model_dir / defense["surrogate"])
    if defense.get("target_file"):
        save_target(random_target(surrogate, 3), model_dir / defense["target_file"])
    if defense.get("mapping_key"):
        (model_dir / defense["mapping_key"]).write_bytes(KEY.hex().encode())
    if defense.get("gate_file"):
        reference = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            features = penultimate(surrogate, reference)
        gate_tensors = fit_feature_gate(features, torch.arange(64) % 10, 10)
        torch.save(gate_tensors, model_dir / defense["gate_file"])


def answers(model_dir: Path, config: dict, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` answers of the archive staged in ``model_dir`` for ``pixels``, each row
    computed as a pair with itself, on one thread (as a worker runs)."""
    from grad2.serve import load_served_model, normalise

    served = load_served_model(model_dir, config)
    # Every row as a pair with itself: the reference that the worker's batch plans
    # reproduce, without the plans' timing-dependent choice of sizes.
    served.defense.batch_sizes, served.defense.lone = (), False
    x = normalise(pixels, served.input_config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probs = served.probabilities(x)
        with torch.enable_grad():
            return served.defense(x, probs).detach()
    finally:
        torch.set_num_threads(threads)


def served_config(config: dict) -> dict:
    """A shipped config as the snapshot serves it: the gated example's threshold moved so
    that about half of the fixed batch is gated (its shipped value gates nothing here)."""
    config = {**config, "defense": dict(config["defense"])}
    if config["defense"].get("gate_score") == "features":
        config["defense"]["gate_threshold"] = -4000.0
        config["defense"]["gate_slope"] = 0.005
    return config


def compute(configs: dict[str, dict], workdir: Path) -> dict[str, torch.Tensor]:
    """Stage and answer each config, all on one thread: the staged gate file is fitted on
    a surrogate's features, whose last bits depend on the thread count."""
    pixels = inputs()
    result = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, config in configs.items():
            model_dir = workdir / name
            model_dir.mkdir(parents=True)
            stage(model_dir, config["defense"])
            result[name] = answers(model_dir, config, pixels)
    finally:
        torch.set_num_threads(threads)
    return result


def main() -> None:
    import tempfile

    configs = {name: served_config(config) for name, config in shipped_configs().items()}
    only = sys.argv[1:]
    if only:
        stored = torch.load(STORED, weights_only=False)
        configs = {**stored["configs"], **{name: configs[name] for name in only}}
        redo = {name: configs[name] for name in only}
    else:
        stored, redo = {"answers": {}}, configs
    with tempfile.TemporaryDirectory() as workdir:
        result = {**stored["answers"], **compute(redo, Path(workdir))}
    STORED.parent.mkdir(exist_ok=True)
    torch.save({"pixels": inputs(), "configs": configs, "answers": result,
                "torch": torch.__version__}, STORED)
    print(f"wrote {STORED}: {', '.join(redo)} computed", file=sys.stderr)


if __name__ == "__main__":
    main()
