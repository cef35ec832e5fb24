"""Row results that do not depend on batch-mates, for any network.

CPU kernels choose their algorithm by batch size, so one row can get other last bits in
another batch. Measured here (one thread, ``MKL_CBWR=AUTO,STRICT``): oneDNN convolutions
take another kernel for one row than for two; ``small_cnn`` and ``resnet18`` then agree at
every size from 2 on, but ``wide_cnn`` and torchvision's MobileNetV3 agree only at 2 and 3
rows. A defended answer must be a function of its query alone (any worker, any replica, any
batching), and preserve_top1's answers follow the scores' last bits.

The reference result of a row is the row evaluated as a pair with itself.
:func:`probe_sizes` finds the batch sizes at which every row of a function equals its
reference; :func:`invariant_map` then evaluates any batch in chunks of those sizes only.
Kernels are chosen by shape, not content, so a probe on random rows stands for every input
of that shape on that machine and thread count; but another summation order can still give
a few rows the same bits by chance (one window of 32 at a size that differs elsewhere), so
each size is checked on :data:`PROBE_WINDOWS` windows of other rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

#: How many windows of example rows each batch size must match its reference on.
PROBE_WINDOWS = 4

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


def invariant_map(fn: RowFunction, inputs: Sequence[Tensor], sizes: Sequence[int],
                  lone: RowFunction | None = None) -> Tensor:
    """``fn(*inputs)`` evaluated in chunks of ``sizes`` (see :func:`chunk_sizes`), so that
    each row's result is the one it gets in any batch of those sizes. A chunk of one row
    runs through ``lone`` when given (a batch-1 path checked to give the pair's bits, see
    :func:`lone_agrees`), else as a pair with itself."""
    if len(inputs[0]) == 0:
        return fn(*inputs)
    results, start = [], 0
    for size in chunk_sizes(len(inputs[0]), sizes):
        chunk = [tensor[start : start + size] for tensor in inputs]
        if size > 1:
            results.append(fn(*chunk))
        else:
            results.append(lone(*chunk) if lone is not None else _as_pair(fn, chunk))
        start += size
    return torch.cat(results)


def lone_agrees(fn: RowFunction, inputs: Sequence[Tensor], rows: int = 4) -> bool:
    """Does ``fn`` on one row give each of the first ``rows`` rows of ``inputs`` the bits it
    gives the row as a pair with itself (so ``fn`` may serve as :func:`invariant_map`'s
    ``lone``)?"""
    for index in range(min(rows, len(inputs[0]))):
        row = [tensor[index : index + 1] for tensor in inputs]
        if not torch.equal(fn(*row), _as_pair(fn, row)):
            return False
    return True


def module_lone_plan(module: nn.Module, example: Tensor, trials: int = 3
                     ) -> frozenset[str] | None:
    """The leaf submodules (by name) that a lone input must run as a pair so that
    ``module``'s output has the bits of the input as a pair with itself (see
    :func:`run_lone`), found on inputs like ``example`` (``[1, ...]``) and checked end to
    end on ``trials`` seeded inputs; ``None`` when no such plan reproduces them.

    Many networks differ at batch 1 in a few layers only (at 224x224, torchvision's
    ResNets only in their last linear layer: MKL's matrix-vector product), so the rest
    of a lone query runs at its own size."""
    leaves = {name: leaf for name, leaf in module.named_modules()
              if name and not any(True for _ in leaf.children())}
    generator = torch.Generator().manual_seed(0)

    def draw() -> Tensor:
        return torch.randn(example.shape, generator=generator, dtype=example.dtype).to(
            example.device).contiguous(memory_format=memory_layout(example))

    def recorder(captured: dict[str, tuple], name: str) -> Callable:
        def record(_: nn.Module, args: tuple) -> None:
            # The first call's inputs, copied before an in-place layer overwrites them.
            captured.setdefault(name, tuple(a.clone() if isinstance(a, Tensor) else a
                                            for a in args))
        return record

    try:
        differing: set[str] = set()
        with torch.no_grad():
            for trial in range(trials):
                x = example if trial == 0 else draw()
                captured: dict[str, tuple] = {}
                hooks = [leaf.register_forward_pre_hook(recorder(captured, name))
                         for name, leaf in leaves.items()]
                try:
                    module(torch.cat([x, x]))
                finally:
                    for hook in hooks:
                        hook.remove()
                for name, args in captured.items():
                    paired = leaves[name](*[a.clone() if isinstance(a, Tensor) else a
                                            for a in args])
                    alone = leaves[name](*[a[:1].clone() if isinstance(a, Tensor) else a
                                           for a in args])
                    if not (isinstance(paired, Tensor) and torch.equal(alone, paired[:1])):
                        differing.add(name)
            plan = frozenset(differing)
            for _ in range(trials):
                x = draw()
                if not torch.equal(run_lone(module, x, plan), module(torch.cat([x, x]))[:1]):
                    return None
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    return plan


def run_lone(module: nn.Module, x: Tensor, plan: frozenset[str]) -> Tensor:
    """``module(x)`` for one row ``x``, with the leaves named in ``plan`` run on the row
    stacked twice (their first half kept)."""
    hooks = []
    for name, leaf in module.named_modules():
        if name in plan:
            hooks.append(leaf.register_forward_pre_hook(
                lambda _, args: tuple(torch.cat([a, a]) if isinstance(a, Tensor) else a
                                      for a in args)))
            hooks.append(leaf.register_forward_hook(
                lambda _, __, output: output[: output.shape[0] // 2]))
    try:
        return module(x)
    finally:
        for hook in hooks:
            hook.remove()


def memory_layout(tensor: Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D NHWC tensor, else ``contiguous_format``: the layout a
    probe input must share with the inputs it stands for."""
    if tensor.ndim == 4 and not tensor.is_contiguous() and tensor.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def probe_sizes(fn: RowFunction, inputs: Sequence[Tensor], max_batch: int) -> tuple[int, ...]:
    """The batch sizes in ``2..max_batch`` at which every row of ``fn`` equals its
    reference (the row as a pair with itself) in all :data:`PROBE_WINDOWS` windows of
    ``inputs``, up to the size that costs least per row.

    Larger batches are not always cheaper per row (a small CNN's working set can outgrow
    the CPU's cache: docs/performance.md, "Batch plans"), so sizes beyond the fastest
    agreeing one are left out. Every size is tried and timed on its first window
    (:func:`time_agreeing_sizes` with ``windows=1``); only the sizes up to the fastest
    are checked on the other windows, which keeps the probe's cost near one window's
    for networks that agree at every size.
    """
    reference = pair_reference(fn, inputs, max_batch)
    first = time_agreeing_sizes(fn, inputs, max_batch, windows=1, reference=reference)
    if not first:
        return ()
    fastest = min(first, key=first.__getitem__)
    kept = [size for size in first if size <= fastest
            and _agrees(fn, inputs, reference, size, range(1, PROBE_WINDOWS))]
    if not kept:
        return ()
    fastest = min(kept, key=first.__getitem__)
    return tuple(size for size in kept if size <= fastest)


def pair_reference(fn: RowFunction, inputs: Sequence[Tensor], max_batch: int) -> Tensor:
    """``fn``'s reference result of every row of ``inputs`` (``[N, ...]``, ``N >=
    max_batch``): the row evaluated as a pair with itself."""
    rows = len(inputs[0])
    if rows < max_batch:
        raise ValueError(f"probing up to batch {max_batch} needs as many rows, got {rows}")
    return torch.cat([_as_pair(fn, [tensor[i : i + 1] for tensor in inputs])
                      for i in range(rows)])


def _window(size: int, window: int, inputs: Sequence[Tensor]) -> Tensor:
    """Row indices of a probe window: ``size`` rows from ``5 size`` plus ``window``
    quarters of the rows on (wrapping), so each size and window tries other rows."""
    rows = len(inputs[0])
    return (torch.arange(size) + 5 * size + window * rows // PROBE_WINDOWS) % rows


def _agrees(fn: RowFunction, inputs: Sequence[Tensor], reference: Tensor, size: int,
            windows: range) -> bool:
    """Does ``fn`` on each of these ``windows`` of ``size`` rows give every row its
    reference?"""
    return all(torch.equal(fn(*[tensor[index] for tensor in inputs]), reference[index])
               for index in (_window(size, window, inputs) for window in windows))


def time_agreeing_sizes(
    fn: RowFunction, inputs: Sequence[Tensor], max_batch: int,
    windows: int = PROBE_WINDOWS, reference: Tensor | None = None,
) -> dict[int, float]:
    """Seconds per row (one warm call) of every batch size in ``2..max_batch`` at which
    every row of ``fn`` equals its reference (the row as a pair with itself) in each of the
    first ``windows`` windows of the example rows.

    Args:
        fn: the row function to check.
        inputs: example rows, ``[N, ...]`` each with ``N >= max_batch``; each size is
            tried on windows of rows that start a quarter of ``N`` apart (wrapping).
        max_batch: the largest batch the function will see.
        windows: how many windows, ``1..PROBE_WINDOWS``.
        reference: :func:`pair_reference` of ``fn`` on ``inputs``, when already computed.
    """
    if reference is None:
        reference = pair_reference(fn, inputs, max_batch)
    seconds_per_row: dict[int, float] = {}
    for size in range(2, max_batch + 1):
        if _agrees(fn, inputs, reference, size, range(windows)):
            chunk = [tensor[_window(size, 0, inputs)] for tensor in inputs]
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
