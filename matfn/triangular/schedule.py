r"""Group schedule of the scan solve (pure Python: the host side of :mod:`matfn.triangular.scan`).

The scan splits the ``NC`` chunks into groups; group ``g`` covers chunks
``[start(g), start(g + 1))`` with ``start(g) = min(g·S0 + ⌊g(g−1)·RNUM / (2·RDEN)⌋, NC)``: groups
of ``S0 + g·RNUM/RDEN`` chunks, equal for ``RNUM = 0``. The kernels evaluate the same formula
(:func:`matfn.triangular.scan.group_start`).

**Fused scan** (:func:`scan_plan`, one group-kernel program per SM leaves at least
``min_groups_per_wave`` groups): every group's chain starts at once and the state scan takes
group ``g`` as soon as it ends, so groups grow with ``g`` (:func:`chain_schedule`): the early,
small ones end first, and the scan reaches the large ones as they end. The chain is
``≈ √(2·NC·ratio)`` group steps instead of ``2√(NC·ratio)`` for equal groups, whose ends all
wait for the whole state scan. The groups are capped so that the group kernel's programs fit
one per SM: a program that shares its SM steps ≈ 1.7× slower.

**Unfused scan** (fewer groups would fit: batched inputs): equal groups of
``≈ √(NC·d / 2C)`` chunks, which balances the group chain (a step ≈ ``4·C·d`` per column)
against the state chain (a step ≈ ``2·d²`` per column); there the fused form measured slower
(docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

__all__ = [
    "ScanPlan",
    "scan_plan",
    "chain_schedule",
    "group_start",
    "group_sizes",
    "modelled_end",
    "groups_per_wave",
]


class ScanPlan(NamedTuple):
    """How one scan solve runs: fused or not, and its groups (:func:`group_start`)."""

    fused: bool
    S0: int
    RNUM: int
    RDEN: int
    groups: int  # NG, the number of groups


def group_start(g: int, S0: int, RNUM: int, RDEN: int, NC: int) -> int:
    """First chunk of group ``g`` (module docstring); ``NC`` past the last group."""
    return min(g * S0 + (g * (g - 1) * RNUM) // (2 * RDEN), NC)


def group_sizes(S0: int, RNUM: int, RDEN: int, NC: int) -> list[int]:
    """Chunks per group, in order."""
    sizes, g = [], 0
    while group_start(g, S0, RNUM, RDEN, NC) < NC:
        sizes.append(group_start(g + 1, S0, RNUM, RDEN, NC) - group_start(g, S0, RNUM, RDEN, NC))
        g += 1
    return sizes


def modelled_end(sizes: list[int], ratio: float) -> float:
    """End of the fused scan, in group steps, for groups of ``sizes`` chunks.

    Every group starts at 0 and ends after its size; the state scan takes group ``g`` once it
    has ended and ``ratio`` after group ``g − 1``; one step of corrections follows the last group.
    """
    T = 0.0
    for i, size in enumerate(sizes):
        T = max(T, float(size)) + (1.0 if i == len(sizes) - 1 else ratio)
    return T


@functools.lru_cache(maxsize=256)
def chain_schedule(NC: int, ratio: float, max_groups: int | None = None) -> tuple[int, int, int]:
    """Group sizes for the fused scan, as :func:`group_start`'s ``(S0, RNUM, RDEN)``.

    The sizes ``S0 + g·q/4`` (``S0 ≤ 16``, ``q ≤ 16``) that minimise :func:`modelled_end` are
    taken. ``max_groups``: at most that many groups (equal groups of ``⌈NC / m⌉`` chunks,
    ``m ≤ max_groups``, are candidates too, so there always is one).
    """
    limit = max_groups or NC
    best = (math.inf, NC, 0)
    candidates = [(S0, q) for S0 in range(1, min(NC, 16) + 1) for q in range(0, 17)]
    candidates += [(-(-NC // m), 0) for m in range(1, min(limit, NC) + 1)]
    for S0, q in candidates:
        sizes = group_sizes(S0, q, 4, NC)
        if len(sizes) <= limit:
            T = modelled_end(sizes, ratio)
            if T < best[0]:
                best = (T, S0, q)
    return best[1], best[2], 4


def groups_per_wave(sms: int | None, programs_per_group: int, min_groups: int) -> int | None:
    """The most groups whose group-kernel programs fit one per SM.

    ``sms``: the device's SMs, None for no limit (the interpreter, off CUDA). 0 where fewer
    than ``min_groups`` fit: then the unfused scan runs.
    """
    if sms is None:
        return None
    groups = sms // programs_per_group
    return groups if groups >= min_groups else 0


@functools.lru_cache(maxsize=256)
def scan_plan(
    NC: int,
    C: int,
    d: int,
    programs_per_group: int,
    sms: int | None,
    ratio: float,
    min_groups: int,
) -> ScanPlan:
    """The scan's plan for ``NC`` chunks of ``C`` rows and ``d`` columns of ``Q, K``.

    ``programs_per_group``: the group kernel's programs per group (batch × column tiles);
    ``sms``, ``min_groups``: as in :func:`groups_per_wave`; ``ratio``: the cost of a state step
    in group steps (:func:`chain_schedule`). A single group needs no state scan and runs
    unfused.
    """
    per_wave = groups_per_wave(sms, programs_per_group, min_groups)
    fused = per_wave != 0
    if fused:
        S0, RNUM, RDEN = chain_schedule(NC, ratio, per_wave)
    else:
        S0, RNUM, RDEN = max(1, round(math.sqrt(NC * d / (2 * C)))), 0, 1
    NG = len(group_sizes(S0, RNUM, RDEN, NC))
    return ScanPlan(fused and NG > 1, S0, RNUM, RDEN, NG)
