"""Out-of-distribution gating and keyed class mappings: pure functions on ``[B, K]`` rows.

- :func:`ood_weight`: Adaptive Misinformation's gate ``α(x) = σ(ν (τ − max_k y_k))``, near 1
  for queries the victim is unsure about (likely out of distribution), near 0 otherwise;
  :func:`gate_weight` the same for any in-distribution score ``s(x)``.
- :func:`fit_feature_gate`, :func:`feature_score`: a Mahalanobis detector on a network's
  penultimate features (:func:`grad2.models.penultimate`; class means and a shared
  precision fitted on in-distribution images), a score ``s(x)`` that separates far-OOD
  queries much better than the maximum softmax probability (docs/results.md).
- :func:`keyed_mapping`: a class permutation without fixed points drawn from a secret key
  (SHA-256 in counter mode), the same on every machine.
- :func:`permuted_mix`: move a row toward its relabelling by that permutation, within an
  exact L1 budget, without creating zeros or tell-tale entries.

Every function treats each row alone, so answers stay a function of their own query.
"""

from __future__ import annotations

import hashlib
import secrets
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor

#: Bytes of a new mapping key (hex-encoded in its file).
KEY_BYTES = 32


def max_softmax(probs: Tensor) -> Tensor:
    """``[B]``: the maximum softmax probability, the OOD score (low = likely OOD)."""
    return probs.max(dim=1).values


def gate_weight(scores: Tensor, threshold: float, slope: float) -> Tensor:
    """``[B]`` gate ``α = sigmoid(slope · (threshold − scores))`` in ``[0, 1]`` for
    in-distribution ``scores`` ``[B]`` (low = likely OOD)."""
    return torch.sigmoid(slope * (threshold - scores))


def ood_weight(probs: Tensor, threshold: float, slope: float) -> Tensor:
    """``[B]``: :func:`gate_weight` of the maximum softmax probability of ``probs``."""
    return gate_weight(max_softmax(probs), threshold, slope)


def calibrate_threshold(scores: Tensor, flagged_share: float) -> float:
    """The threshold ``τ`` below which ``flagged_share`` of in-distribution ``scores`` [N]
    lie (the share of honest queries the gate treats as OOD)."""
    if not 0 <= flagged_share < 1:
        raise ValueError(f"flagged_share must lie in [0, 1), got {flagged_share}")
    return float(torch.quantile(scores.double(), flagged_share))


def new_key() -> str:
    """A fresh random key, hex-encoded (``KEY_BYTES`` bytes)."""
    return secrets.token_hex(KEY_BYTES)


def write_key(path: str | PathLike, key: str | None = None) -> Path:
    """Write ``key`` (default: :func:`new_key`) to ``path``, readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((key or new_key()) + "\n", encoding="ascii")
    path.chmod(0o600)
    return path


def read_key(path: str | PathLike) -> bytes:
    """The key bytes of a key file (hex text, at least 16 bytes)."""
    text = Path(path).read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{Path(path).name}: a mapping key file holds hex digits") from None
    if len(key) < 16:
        raise ValueError(f"{Path(path).name}: a mapping key needs at least 16 bytes, "
                         f"got {len(key)}")
    return key


def _key_stream(key: bytes, label: bytes) -> object:
    counter = 0
    while True:
        block = hashlib.sha256(key + label + counter.to_bytes(8, "big")).digest()
        for start in range(0, len(block), 8):
            yield int.from_bytes(block[start:start + 8], "big")
        counter += 1


def keyed_mapping(key: bytes, num_classes: int) -> Tensor:
    """``[K]`` int64 ``σ``: a permutation of ``0..K-1`` with ``σ(k) ≠ k`` for every ``k``,
    drawn uniformly among such permutations by a Fisher–Yates shuffle driven by
    SHA-256(key), redrawn until it has no fixed point."""
    if num_classes < 2:
        raise ValueError(f"a mapping without fixed points needs K >= 2, got {num_classes}")
    stream = _key_stream(key, b"grad2-mapping")
    while True:
        order = list(range(num_classes))
        for index in range(num_classes - 1, 0, -1):
            # 64-bit draws: the modulo bias is below 2^-50 for any K a classifier has.
            swap = next(stream) % (index + 1)
            order[index], order[swap] = order[swap], order[index]
        if all(order[k] != k for k in range(num_classes)):
            return torch.tensor(order, dtype=torch.int64)


def relabel(probs: Tensor, mapping: Tensor) -> Tensor:
    """``[B, K]`` with ``out[:, σ(k)] = probs[:, k]``: the row relabelled by ``σ``."""
    return torch.empty_like(probs).index_copy_(1, mapping.to(probs.device), probs)


def permuted_mix(probs: Tensor, mapping: Tensor, budget: Tensor) -> Tensor:
    """``[B, K]``: ``y + λ (relabel(y) − y)`` with the largest ``λ ∈ [0, 1]`` whose L1 move
    ``λ ‖relabel(y) − y‖₁`` stays within ``budget`` ``[B]``.

    At ``λ = 1`` the answer is the clean vector under other class names: same entropy,
    same sorted values, no zeros; a row already equal to its relabelling stays unchanged.
    """
    moved = relabel(probs, mapping)
    distance = (moved - probs).abs().sum(dim=1)
    step = torch.where(distance > 0, budget.to(probs.dtype) / distance.clamp_min(1e-30),
                       torch.zeros_like(distance)).clamp(0, 1)
    # lerp returns ``moved`` exactly at step 1 (no rounding residue of y + (y' − y)).
    return torch.lerp(probs, moved, step.unsqueeze(1))


def fit_feature_gate(features: Tensor, labels: Tensor, num_classes: int,
                     ridge: float = 1e-3) -> dict[str, Tensor]:
    """Class means ``[K', D]`` and the shared precision ``[D, D]`` of in-distribution
    ``features [N, D]`` with ``labels [N]`` (Lee et al. 2018's Mahalanobis detector),
    fitted in float64 with ``ridge`` added to the covariance's diagonal. Classes with
    fewer than two images get no mean (``K' ≤ K``; :func:`feature_gate_classes` names
    them)."""
    features = features.double()
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)
    present = torch.nonzero(counts >= 2).squeeze(1)
    if len(present) == 0:
        raise ValueError("a feature gate needs at least one class with >= 2 images")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, features)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    kept = torch.isin(labels, present)
    centred = features[kept] - means[labels[kept]]
    covariance = centred.T @ centred / max(int(kept.sum()), 1)
    covariance += ridge * torch.eye(features.shape[1], dtype=torch.float64)
    precision = torch.linalg.inv(covariance)
    return {"means": means[present].float(),
            "precision": ((precision + precision.T) / 2).float()}


def feature_gate_classes(labels: Tensor, num_classes: int) -> list[int]:
    """The classes :func:`fit_feature_gate` leaves out (fewer than two images)."""
    counts = torch.bincount(labels.long(), minlength=num_classes)
    return torch.nonzero(counts < 2).squeeze(1).tolist()


def check_feature_gate(gate_tensors: object, feature_size: int | None = None) -> None:
    """Raise ``ValueError`` unless ``gate_tensors`` is a feature gate ``{means [K, D],
    precision [D, D]}`` with finite values (and ``D == feature_size`` when given)."""
    if not isinstance(gate_tensors, dict) or set(gate_tensors) != {"means", "precision"}:
        raise ValueError("a feature gate file holds exactly the tensors 'means' and "
                         "'precision'")
    means, precision = gate_tensors["means"], gate_tensors["precision"]
    if not (isinstance(means, Tensor) and isinstance(precision, Tensor)):
        raise ValueError("feature gate entries must be tensors")
    if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
        raise ValueError(f"feature gate shapes do not fit: means {tuple(means.shape)}, "
                         f"precision {tuple(precision.shape)}")
    if feature_size is not None and means.shape[1] != feature_size:
        raise ValueError(f"feature gate has {means.shape[1]} features, the surrogate's last "
                         f"layer takes {feature_size}")
    if not (torch.isfinite(means).all() and torch.isfinite(precision).all()):
        raise ValueError("feature gate has non-finite values")


def feature_score(features: Tensor, gate_tensors: dict[str, Tensor],
                  class_terms: Tensor | None = None) -> Tensor:
    """``[B]`` in-distribution score: minus the smallest Mahalanobis distance of
    ``features [B, D]`` to a class mean (low = likely OOD). ``class_terms``: the gate's
    :func:`mean_terms`, computed once (the bits this computes when it is ``None``). A lone
    row gets the bits it gets as a pair with itself, like every other row."""
    if features.shape[0] == 1:
        # A one-row product runs MKL's matrix-vector kernel, which rounds otherwise than
        # the matrix product of any larger batch.
        return feature_score(torch.cat([features, features]), gate_tensors, class_terms)[:1]
    means = gate_tensors["means"].to(features)
    precision = gate_tensors["precision"].to(features)
    projected = features @ precision  # [B, D]
    if class_terms is None:
        class_terms = mean_terms(gate_tensors, features.dtype)
    # (f − μ)ᵀ P (f − μ) = fᵀPf − 2 fᵀPμ + μᵀPμ for every class at once.
    distances = ((projected * features).sum(1, keepdim=True) - 2 * projected @ means.T
                 + class_terms.to(features))
    return -distances.min(dim=1).values


def mean_terms(gate_tensors: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``[K]``: ``μᵀPμ`` of each class mean of a feature gate (what every
    :func:`feature_score` call adds), in ``dtype``."""
    means = gate_tensors["means"].to(dtype)
    precision = gate_tensors["precision"].to(dtype)
    return ((means @ precision) * means).sum(1)
