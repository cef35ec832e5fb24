"""The GRAD² linear program as HiGHS constraints, shared by the solver tests (not a test
module). Variables of one query: ``ỹ`` (K) then ``d`` (K), with ``d ≥ |ỹ − y|``."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sparse

HIGHS_OPTIONS = {
    "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
    "presolve": True,
}


def answer_constraints(
    y: np.ndarray, epsilon: float, preserve_top1: bool
) -> tuple[sparse.csr_matrix, np.ndarray, sparse.csr_matrix, np.ndarray]:
    """``(A_ub, b_ub, A_eq, b_eq)`` of one query's feasible set: budget, simplex and, with
    ``preserve_top1``, ``ỹ_j ≤ ỹ_a`` for the clean top class ``a`` (first maximum)."""
    k = len(y)
    identity = sparse.identity(k, format="csr")
    blocks = [
        sparse.hstack([identity, -identity]),  # ỹ − d ≤ y
        sparse.hstack([-identity, -identity]),  # −ỹ − d ≤ −y
        sparse.csr_matrix(np.concatenate([np.zeros(k), np.ones(k)])[None]),  # Σ d ≤ ε
    ]
    bounds = [y, -y, [epsilon]]
    if preserve_top1:
        top = int(np.argmax(y))  # first maximum, like torch.argmax
        others = [j for j in range(k) if j != top]
        rows = np.arange(len(others))
        top1 = sparse.csr_matrix(
            (
                np.concatenate([np.ones(len(others)), -np.ones(len(others))]),
                (np.concatenate([rows, rows]), np.concatenate([others, [top] * len(others)])),
            ),
            shape=(len(others), 2 * k),
        )  # ỹ_j − ỹ_a ≤ 0
        blocks.append(top1)
        bounds.append(np.zeros(len(others)))
    a_ub = sparse.vstack(blocks).tocsr()
    b_ub = np.concatenate([np.atleast_1d(np.asarray(b, dtype=float)) for b in bounds])
    a_eq = sparse.csr_matrix(np.concatenate([np.ones(k), np.zeros(k)])[None])
    return a_ub, b_ub, a_eq, np.ones(1)
