"""Which member of the evaluation's surrogate ensemble decides GRAD²'s receiving class.

For each thief pool: the RMS of each member's misdirection scores (per-row mean removed,
which the solver ignores) on 500 pool images, and how often the ensemble's receiving
class ``argmax c`` agrees with each member's own. Uses the models and targets cached by
``grad2 evaluate`` (run that first). Run: ``.venv/bin/python scripts/ensemble_balance.py``.
"""

from __future__ import annotations

import torch

from grad2.lab.data import cache_dir
from grad2.lab.evaluate import Lab
from grad2.scores import redirection_scores


def member_target(target: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"members.{index}."
    return {name.removeprefix(prefix): t for name, t in target.items() if name.startswith(prefix)}


def main() -> None:
    lab = Lab(cache_dir() / "eval", progress=False)
    for pool in ("animal", "fashion_heldout"):
        ensemble, target = lab.ensemble(pool), lab.misdirect_target(pool, ensemble=True)
        inputs = lab.pool(pool, 4000)[0][:500]
        combined = redirection_scores(ensemble, inputs, target).argmax(dim=1)
        for index, member in enumerate(ensemble.members):
            scores = redirection_scores(member, inputs, member_target(target, index))
            spread = (scores - scores.mean(dim=1, keepdim=True)).pow(2).mean().sqrt().item()
            agree = (scores.argmax(dim=1) == combined).float().mean().item()
            print(f"{pool:16} member {index} ({member.grad2_arch}): score RMS {spread:8.1f}, "
                  f"receiving class as the ensemble's {agree:.0%}")


if __name__ == "__main__":
    main()
