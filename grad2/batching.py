"""Row results that do not depend on batch-mates, for any network.

CPU kernels choose their algorithm by batch size, so one row can get other last bits in
another batch. Measured here (one thread, ``MKL_CBWR=AUTO,STRICT``): oneDNN convolutions
take another kernel for one row than for two; ``small_cnn`` and ``resnet18`` then agree at
every size from 2 on, but ``wide_cnn`` and torchvision's MobileNetV3 agree only at 2 and 3
rows. A defended answer must be a function of its query alone (any worker, any replica, any
batching), and preserve_top1's answers follow the scores' last bits.

The reference result of a row is the row evaluated as a pair with itself.
:func:`probe_sizes` finds the batch sizes at which every row of a function equals its
reference (kernels are chosen by shape, not content, so a probe on random rows stands for
every input of that shape on that machine and thread count); :func:`invariant_map` then
evaluates any batch in chunks of those sizes only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

RowFunction = Callable[..., Tensor]
"""``fn(*inputs) -> [B, ...]``: row ``i`` of the result depends on row ``i`` of each input."""


def chunk_sizes(batch: int, sizes: Sequence[int]) -> list[int]:
    """Chunk sizes summing to ``batch``, each one of ``sizes`` or 1 (a row evaluated as a
    pair with itself); largest first."""
    allowed = sorted({size for size in sizes if size >= 2}, reverse=True)
    chunks, left = [], batch
    while left > 0:
        size = next((size for size in allowed if size <= left), 1)
        chunks.append(size)
        left -= size
    return chunks


def invariant_map(fn: RowFunction, inputs: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """``fn(*inputs)`` evaluated in chunks of ``sizes`` (see :func:`chunk_sizes`), so that
    each row's result is the one it gets in any batch of those sizes."""
    if len(inputs[0]) == 0:
        return fn(*inputs)
    results, start = [], 0
    for size in chunk_sizes(len(inputs[0]), sizes):
        chunk = [tensor[start : start + size] for tensor in inputs]
        results.append(_as_pair(fn, chunk) if size == 1 else fn(*chunk))
        start += size
    return torch.cat(results)


def probe_sizes(fn: RowFunction, inputs: Sequence[Tensor], max_batch: int) -> tuple[int, ...]:
    """The batch sizes in ``2..max_batch`` at which every row of ``fn`` equals its
    reference (the row as a pair with itself), up to the size that costs least per row.

    Larger batches are not always cheaper: a small CNN's working set outgrows the CPU's
    cache (``small_cnn``'s JVP costs 1.3x more per row at 16 rows than at 8 here), so
    sizes beyond the fastest agreeing one are left out (:func:`time_agreeing_sizes`).
    """
    seconds_per_row = time_agreeing_sizes(fn, inputs, max_batch)
    if not seconds_per_row:
        return ()
    fastest = min(seconds_per_row, key=seconds_per_row.__getitem__)
    return tuple(size for size in seconds_per_row if size <= fastest)


def time_agreeing_sizes(
    fn: RowFunction, inputs: Sequence[Tensor], max_batch: int
) -> dict[int, float]:
    """Seconds per row (one warm call) of every batch size in ``2..max_batch`` at which
    every row of ``fn`` equals its reference (the row as a pair with itself).

    Args:
        fn: the row function to check.
        inputs: example rows, ``[N, ...]`` each with ``N >= max_batch``; every size is
            tried on other rows at other positions.
        max_batch: the largest batch the function will see.
    """
    rows = len(inputs[0])
    if rows < max_batch:
        raise ValueError(f"probing up to batch {max_batch} needs as many rows, got {rows}")
    reference = torch.cat([
        _as_pair(fn, [tensor[i : i + 1] for tensor in inputs]) for i in range(rows)
    ])
    seconds_per_row: dict[int, float] = {}
    for size in range(2, max_batch + 1):
        index = (torch.arange(size) + 5 * size) % rows
        chunk = [tensor[index] for tensor in inputs]
        if torch.equal(fn(*chunk), reference[index]):
            started = time.perf_counter()
            fn(*chunk)
            seconds_per_row[size] = (time.perf_counter() - started) / size
    return seconds_per_row


def describe_sizes(sizes: Sequence[int]) -> str:
    """``"2-32"``, ``"2-3, 8"`` or ``"none (every row as a pair)"``, for logs."""
    if not sizes:
        return "none (every row as a pair)"
    runs: list[list[int]] = []
    for size in sorted(sizes):
        if runs and size == runs[-1][-1] + 1:
            runs[-1].append(size)
        else:
            runs.append([size])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _as_pair(fn: RowFunction, rows: Sequence[Tensor]) -> Tensor:
    return fn(*[torch.cat([row, row]) for row in rows])[:1]
