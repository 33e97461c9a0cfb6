r"""Triton kernels for ``tri_inv`` / ``tri_solve`` on ``T = Λ + tril(Q Kᵀ, −1)`` (math spec §5).

Torch twins: :mod:`matfn.triangular` (``_tri_inv_torch`` and the chunked forms). Everything runs in
float32. ``precision`` / ``scan_precision`` pick how the products are done: ``"3xtf32"`` (the
default) splits each fp32 operand into a tf32 ``hi`` and a ``lo`` part in the kernel and adds three
tf32 tensor-core products (:func:`matfn.kernels.triangular_chunk._mm`), fp32-accurate (≈ 1e-6
relative at n = 4096 against float64) and the fastest measured; ``"tf32x3"`` is Triton's own
version of it; ``"ieee"`` is fp32 FMA (3–4× slower); ``"tf32"`` is one tf32 product (≈ 1e-4
relative, as fla's ``chunk_scaled_dot_kkt``; an option for speed, never a default).

Known trap (H100, Triton 3.6): a tensor-core ``tl.dot`` of a 64-row tile by a 16-column tile in a
kernel launched with 8 warps returned wrong results in the solve's group kernel (0.6 relative
error, with ``"tf32x3"`` and ``"3xtf32"`` alike; the interpreter and ``"ieee"`` were right). The
same kernel with 4 warps, with 32 columns, or with 32-row chunks is right (errors ≤ 1.5e-6), so
the launcher never picks that shape (``scan_block`` is 32 for 64-row chunks with 8 warps).

**Chunk kernel** (one program per ``C``-row chunk, :mod:`matfn.kernels.triangular_chunk`):
``Y_cc = (Λ_c + tril(Q_c K_cᵀ, −1))⁻¹`` and the products ``P = Y_cc Q_c``, ``R = Y_ccᵀ K_c``,
``U = Y_cc V_c`` that the levels below start from.

**Inverse** (divide and conquer). With ``P^{(s)} = blkdiag_s(T)⁻¹ Q`` and
``R^{(s)} = blkdiag_s(T)⁻ᵀ K`` (blocks of ``s`` rows), the off-diagonal block of a ``2s``-block
``[[A,0],[C,B]]`` (``C = Q₂K₁ᵀ`` is rank ``d``) is ``−B⁻¹Q₂K₁ᵀA⁻¹ = −P₂^{(s)} R₁^{(s)ᵀ}``.
Levels are built bottom-up, each fully parallel: ``G_b = K_bᵀ P_b^{(s)}`` (``d×d`` per block),
then ``P₂^{(2s)} = P₂^{(s)} (I − G₁)`` and ``R₁^{(2s)} = R₁^{(s)} (I − G₂)ᵀ``. Only the chunks'
Grams contract over rows (one launch); a parent's Gram follows from its children's,
``G = G₁ + G₂ − G₂ G₁`` (``d³`` per pair), computed by extra programs of the level launch before
it, so each level is one launch. One last launch writes every ``C×C`` tile ``(I, J)``, ``I > J``,
as ``−P_I^{(s)} R_J^{(s)ᵀ}`` at the level ``s = C·2^{⌊log₂(I xor J)⌋}`` where the two chunks
first share a block. Launches: ``L + 2`` with ``L = ⌈log₂(n/C)⌉`` (8 at n = 4096, C = 64;
contracting each level's Grams over its ``s`` rows took ``2L + 2`` launches and 72 µs of the
230 µs on the H100); FLOPs ``d n² + 2 n d² L + (n/C) d³`` plus the chunk inverses.

**Solve, tree** (``algorithm="tree"``; divide and conquer as the inverse). With
``W^{(s)} = blkdiag_s(T)⁻¹ [V | Q] = [X^{(s)} | P^{(s)}]`` (``n × F``, ``F = e + d``) and
``M_b = K_bᵀ W_b^{(s)}`` (``d × F`` per block, the Gram ``G_b = K_bᵀ P_b`` in its last ``d``
columns), the block formula gives, for a ``2s``-block, ``W₂^{(2s)} = W₂^{(s)} − P₂^{(s)} M₁``
(first half unchanged) and ``M = M₁ + K₂ᵀ W₂^{(2s)} = M₁ + M₂ − G₂ M₁``. Launches: (1) the
chunk kernel writes ``X^{(C)}`` into the output and ``P^{(C)}``; (2) level ``C → 2C`` per chunk
pair and column tile: ``M₁ = K₁ᵀ W₁``, ``W₂ −= P₂ M₁`` and the pair's ``M = M₁ + K₂ᵀ W₂``
contracted over its ``2C`` rows (``3 n d F`` FLOPs; chunk ``M``s, then an update and a combine
as below would take ``n d² F / C`` more and one more launch); (3) one launch per level ``s → 2s``,
``s ≥ 2C``: ``W₂ −= P₂ M₁`` on ``rows × columns`` tiles of the odd blocks (``n d F`` FLOPs; ``X``
in place, ``P`` into a second buffer, even blocks copied, since every tile reads all ``d``
columns of the old ``P₂``) and, by extra programs, the next level's ``M = M₁ + M₂ − G₂ M₁``
(``2 d² F`` per pair, ``n d² F / s`` per level). The last level updates only ``X`` (``n d e``).
Launches ``L + 1`` with ``L = ⌈log₂(n/C)⌉`` (8 at n = 4096, C = 32; 1 for n ≤ C), each parallel
over row tiles × column tiles × batch; FLOPs ``≈ n d F (L + 1 + d/C) + n d e`` (1.7 GFLOP at
n = 4096, d = e = 128, C = 32) plus the chunk inverses: 2.4× the scan's, but no sequential chain.

**Solve, scan** (``algorithm="scan"``). Chunks form groups. (1) chunk kernel:
``W = [Y_cc V_c | Y_cc Q_c]``; (2) group kernel: inside each group, sequentially over its
chunks, the chunk recursion on ``W``'s columns from a zero state (parallel over groups × column
tiles), giving ``[X^{grp} | P^{grp}]`` and the group sums
``[K_gᵀ X^{grp} | K_gᵀ P^{grp}] = [B_g | G_g]``; (3) the state scan
``Z_{g+1} = (I − G_g) Z_g + B_g`` over groups (parallel over ``e`` tiles); (4) the corrections
``X_g = X^{grp}_g − P^{grp}_g Z_g`` (parallel). FLOPs ``≈ 4 n d F + 2 n d e``; what costs is the
chain of dependent small products, a group step (two products contracting over ``d`` and ``C``)
and a state step (one over ``d``), ≈ 1.85 and 3.3 µs on the H200 (session 11, measured inside
the kernels with timer stamps: ``benchmarks/gpu_triangular_parts.py --sections timeline``). At
n = 4096, d = e = 128 the fused form below takes ≈ 0.070 ms graph-replayed (0.0716 measured at
scan ratio 2.5, timelines ≈ 1.5 µs less at 2.0; session 10: 0.076;
session 9's four launches: 0.098).

* The group kernel keeps its ``d×BF`` state as ``NS`` slices and contracts over them with
  batched dots: ``NS`` short independent chains of tensor-core products instead of one long
  one. 16-column tiles, 4 warps, ``NS = 4`` (session 10).
* **Fused** (the default; session 12: the state step now runs in the group kernel's ``U``
  tiles after their chain, see :func:`_tri_group_sliced_kernel`, and the chunk kernel loads whole
  tiles; 0.0589 ms at n = 4096, docs/benchmarks.md; what follows is session 11's form, whose
  corrections and flags are unchanged): the state scan (one program per
  batch entry and ``e`` tile) and the corrections (:func:`_tri_chain_correct_kernel`, one per
  chunk and ``e`` tile) are launched with programmatic dependent launch while the group kernel
  runs, and wait for their data instead of for the launch before: a group's programs count
  themselves done in a flag (release), the state programs wait for it (acquire) and store each
  ``Z_g`` into a buffer that the chunk kernel filled with a sentinel NaN, and a correction runs
  once its group is done and its ``Z_g`` tile holds no sentinel. Each launch waits only for
  programs of the launches before it, which all run before it starts: no deadlock, whatever
  runs at once. The chunk kernel also zeroes the flags (no memset). The state scan takes group
  ``g`` as soon as that group ends, so groups grow with ``g`` (:func:`_chain_schedule`): the
  early, small ones end first, and the scan reaches the large ones as they end; the chain is
  ≈ √(2·NC·ratio) group steps instead of ``GS + NG ≥ 2√NC``. The groups are capped so that the
  group kernel's programs fit one per SM (:func:`_groups_per_wave`: 8 groups of 7 … 23 chunks
  at n = 4096, B = 1); where fewer than :data:`MIN_GROUPS_PER_WAVE` groups would fit (batches),
  the unfused form runs. Without PDL the launches run one after another and find every flag set.
* **Unfused** (``scan_fused=False``): equal groups of ``≈ √(NC·d/2C)`` chunks and separate state
  and correction launches (the form before session 10).

**Which solve** (``algorithm="auto"``, the default). Measured on the H200 (d = e = 128, C = 32,
B = 1, session 11, docs/benchmarks.md): graph-replayed, the tree is faster up to ``B·n = 1024``
rows (0.030 against 0.033 ms at n = 512, 0.040 against 0.043 at 1024) and slower beyond (0.062
against 0.053 at 2048, 0.109 against 0.071 at 4096, 0.221 against 0.118 at 8192: it does 2.4×
the FLOPs and cannot overlap its levels); eager, its extra launches cost more than its shorter
chain saves at every size (session 10: 0.197 against 0.151 ms at n = 512). So ``"auto"`` takes
the tree only while a CUDA graph is being captured and ``B·n ≤`` :data:`TREE_MAX_ROWS`.

**Programmatic dependent launch** (compute capability ≥ 9, :func:`matfn.kernels.launch.use_pdl`):
every launch after the chunk kernel (but the fused scan's state and correction launches, which
wait for their data instead) waits for the one before (``griddepcontrol.wait``) before any
memory access and is launched early, which hides part of each launch's start (1–4 % of the
graph-replayed times above).

All offsets are 64-bit. ``tl.dot`` needs every block dim ≥ 16.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, use_pdl
from .launch import pdl_flags as _pdl_flags
from .launch import sm_count as _sm_count
from .launch import wait_for_previous_launch as _wait_for_previous_launch
from .triangular_chunk import SENTINEL, _mm, _tri_chunk_blocked_kernel, _tri_chunk_kernel

__all__ = ["tri_inv_triton", "tri_solve_triton", "PRECISIONS", "CHUNK_IMPLS"]

PRECISIONS = ("ieee", "tf32x3", "3xtf32", "tf32")
#: ``algorithm="auto"`` solves by the tree up to this many rows ``B·n``, under CUDA-graph capture.
TREE_MAX_ROWS = 1024
CHUNK_IMPLS = ("dense", "blocked")


@triton.jit
def _tri_gram_kernel(
    k_ptr,
    p_ptr,
    g_ptr,
    n,
    d,
    stride_kb,
    stride_kn,
    stride_pb,
    stride_pn,
    stride_gb,
    stride_gk,
    BT: tl.constexpr,
    BG: tl.constexpr,
    PREC: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """``G_c = K_cᵀ P_c`` over the ``BT`` rows of chunk ``c`` (one ``BG×BG`` tile).

    Only the chunks' Grams contract over rows; the levels above combine them
    (:func:`_gram_combine_tile`).
    """
    _wait_for_previous_launch(USE_PDL)
    blk = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ng = tl.cdiv(d, BG)
    ci = (t // ng) * BG + tl.arange(0, BG)
    cj = (t % ng) * BG + tl.arange(0, BG)
    rows = blk * BT + tl.arange(0, BT)
    rm = rows < n
    kt = tl.load(
        k_ptr + b * stride_kb + rows[:, None] * stride_kn + ci[None, :],
        mask=rm[:, None] & (ci < d)[None, :],
        other=0.0,
    )
    pt = tl.load(
        p_ptr + b * stride_pb + rows[:, None] * stride_pn + cj[None, :],
        mask=rm[:, None] & (cj < d)[None, :],
        other=0.0,
    )
    acc = _mm(tl.trans(kt), pt, PREC)
    gp = g_ptr + b * stride_gb + blk * stride_gk + ci[:, None] * d + cj[None, :]
    tl.store(gp, acc, mask=(ci < d)[:, None] & (cj < d)[None, :])


@triton.jit
def _update_tile(
    t,
    jt,
    b,
    pin_ptr,
    rin_ptr,
    g_ptr,
    pout_ptr,
    rout_ptr,
    n,
    d,
    s,
    stride_pb,
    stride_pn,
    stride_gb,
    stride_gk,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Level ``s → 2s`` on one ``BT×BD`` tile of ``P`` and ``R``.

    ``P₂ ← P₂ (I − G₁)`` on second halves, ``R₁ ← R₁ (I − G₂)ᵀ`` on first halves (``BT`` divides
    ``s``, so a tile lies in one block).
    """
    rows = t * BT + tl.arange(0, BT)
    rm = rows < n
    blk = (t * BT) // s
    odd = (blk % 2) == 1
    partner = (blk + 1) * s < n
    base = b * stride_pb + rows[:, None] * stride_pn
    cj = jt * BD + tl.arange(0, BD)
    mj = rm[:, None] & (cj < d)[None, :]
    accP = tl.load(pin_ptr + base + cj[None, :], mask=mj, other=0.0)
    accR = tl.load(rin_ptr + base + cj[None, :], mask=mj, other=0.0)
    if odd:
        gb = g_ptr + b * stride_gb + (blk - 1) * stride_gk
        for k0 in range(0, d, BD):
            ck = k0 + tl.arange(0, BD)
            mk = rm[:, None] & (ck < d)[None, :]
            xk = tl.load(pin_ptr + base + ck[None, :], mask=mk, other=0.0)
            gt = tl.load(
                gb + ck[:, None] * d + cj[None, :],
                mask=(ck < d)[:, None] & (cj < d)[None, :],
                other=0.0,
            )
            accP -= _mm(xk, gt, PREC)
    elif partner:
        gb = g_ptr + b * stride_gb + (blk + 1) * stride_gk
        for k0 in range(0, d, BD):
            ck = k0 + tl.arange(0, BD)
            mk = rm[:, None] & (ck < d)[None, :]
            xk = tl.load(rin_ptr + base + ck[None, :], mask=mk, other=0.0)
            gt = tl.load(
                gb + cj[None, :] * d + ck[:, None],
                mask=(ck < d)[:, None] & (cj < d)[None, :],
                other=0.0,
            )
            accR -= _mm(xk, gt, PREC)
    tl.store(pout_ptr + base + cj[None, :], accP, mask=mj)
    tl.store(rout_ptr + base + cj[None, :], accR, mask=mj)


@triton.jit
def _gram_combine_tile(
    pair,
    tile,
    b,
    gin_ptr,
    gout_ptr,
    nblk,
    d,
    e,
    stride_gb,
    stride_gk,
    BG: tl.constexpr,
    PREC: tl.constexpr,
):
    """One ``BG×BG`` tile of the parent ``M = M₁ + M₂ − G₂ M₁`` (``d×(e+d)`` per block).

    ``M_b = K_bᵀ [X_b | P_b]`` with the Gram ``G_b = K_bᵀ P_b`` in its last ``d`` columns; the
    inverse has ``e = 0`` (``M = G``), the solve carries ``e`` right-hand-side columns in front.
    The children are blocks ``2·pair`` and ``2·pair + 1`` (``M₂ = 0`` when the second lies past
    ``n``): with ``W₂^{(2s)} = W₂ − P₂ M₁`` (``W = [X | P]``),
    ``K_bᵀ W_b^{(2s)} = M₁ + K₂ᵀ W₂ − G₂ M₁ = M₁ + M₂ − G₂ M₁``.
    """
    F = e + d
    ngj = tl.cdiv(F, BG)
    ci = (tile // ngj) * BG + tl.arange(0, BG)
    cj = (tile % ngj) * BG + tl.arange(0, BG)
    mij = (ci < d)[:, None] & (cj < F)[None, :]
    g1 = gin_ptr + b * stride_gb + (2 * pair) * stride_gk
    g2 = g1 + stride_gk
    acc = tl.load(g1 + ci[:, None] * F + cj[None, :], mask=mij, other=0.0)
    if 2 * pair + 1 < nblk:
        acc += tl.load(g2 + ci[:, None] * F + cj[None, :], mask=mij, other=0.0)
        for k0 in range(0, d, BG):
            ck = k0 + tl.arange(0, BG)
            a = tl.load(
                g2 + ci[:, None] * F + e + ck[None, :],
                mask=(ci < d)[:, None] & (ck < d)[None, :],
                other=0.0,
            )
            c = tl.load(
                g1 + ck[:, None] * F + cj[None, :],
                mask=(ck < d)[:, None] & (cj < F)[None, :],
                other=0.0,
            )
            acc -= _mm(a, c, PREC)
    tl.store(
        gout_ptr + b * stride_gb + pair * stride_gk + ci[:, None] * F + cj[None, :], acc, mask=mij
    )


@triton.jit
def _tri_level_kernel(
    pin_ptr,
    rin_ptr,
    gin_ptr,
    pout_ptr,
    rout_ptr,
    gout_ptr,
    n,
    d,
    s,
    n_update,
    stride_pb,
    stride_pn,
    stride_gb,
    stride_gk,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    COMBINE: tl.constexpr,
    PREC: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One level ``s → 2s`` in one launch.

    Programs ``< n_update`` update ``P, R`` tiles (:func:`_update_tile`); with ``COMBINE`` the
    rest build the next level's Grams from this level's (:func:`_gram_combine_tile`).
    """
    _wait_for_previous_launch(USE_PDL)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_update:
        ntj = tl.cdiv(d, BD)
        _update_tile(
            (pid // ntj).to(tl.int64),
            (pid % ntj).to(tl.int64),
            b,
            pin_ptr,
            rin_ptr,
            gin_ptr,
            pout_ptr,
            rout_ptr,
            n,
            d,
            s,
            stride_pb,
            stride_pn,
            stride_gb,
            stride_gk,
            BT,
            BD,
            PREC,
        )
    elif COMBINE:
        q = pid - n_update
        ngt = tl.cdiv(d, BG) * tl.cdiv(d, BG)
        _gram_combine_tile(
            (q // ngt).to(tl.int64),
            q % ngt,
            b,
            gin_ptr,
            gout_ptr,
            tl.cdiv(n, s),
            d,
            0,
            stride_gb,
            stride_gk,
            BG,
            PREC,
        )


@triton.jit
def _tri_offdiag_kernel(
    p_ptr,
    r_ptr,
    y_ptr,
    n,
    d,
    stride_pl,
    stride_pb,
    stride_pn,
    stride_yb,
    stride_yn,
    BT: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Tile ``(I, J)``: zeros above the diagonal, ``−P_I^{(s)} R_J^{(s)ᵀ}`` below it."""
    _wait_for_previous_launch(USE_PDL)
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = ti.to(tl.int64) * BT + tl.arange(0, BT)
    rj = tj.to(tl.int64) * BT + tl.arange(0, BT)
    mi = ri < n
    mj = rj < n
    yp = y_ptr + b * stride_yb + ri[:, None] * stride_yn + rj[None, :]
    if ti < tj:
        tl.store(yp, tl.zeros((BT, BT), dtype=tl.float32), mask=mi[:, None] & mj[None, :])
    elif ti > tj:
        x = ti ^ tj
        lvl = 0
        for k in tl.static_range(1, 31):
            lvl += ((x >> k) > 0).to(tl.int32)
        pb = p_ptr + lvl.to(tl.int64) * stride_pl + b * stride_pb
        rb = r_ptr + lvl.to(tl.int64) * stride_pl + b * stride_pb
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        for d0 in range(0, d, BD):
            cd = d0 + tl.arange(0, BD)
            md = (cd < d)[None, :]
            pt = tl.load(
                pb + ri[:, None] * stride_pn + cd[None, :], mask=mi[:, None] & md, other=0.0
            )
            rt = tl.load(
                rb + rj[:, None] * stride_pn + cd[None, :], mask=mj[:, None] & md, other=0.0
            )
            acc -= _mm(pt, tl.trans(rt), PREC)
        tl.store(yp, acc, mask=mi[:, None] & mj[None, :])


@triton.jit
def _stamp(ptr, i, TRACE: tl.constexpr):
    """With ``TRACE``: store the GPU's nanosecond timer at ``ptr[i]`` (the bench's timelines)."""
    if TRACE:
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
        tl.store(ptr + i, now)


@triton.jit
def _group_start(g, S0, RNUM, RDEN, NC):
    """First chunk of group ``g``: groups of ``S0 + g·RNUM/RDEN`` chunks (``RNUM = 0``: equal)."""
    return tl.minimum(g * S0 + (g * (g - 1) * RNUM) // (2 * RDEN), NC)


@triton.jit
def _state_step(Z, sb, cd, ce, d, e, PREC: tl.constexpr):
    """``Z − G_g Z + B_g`` with ``[B_g | G_g]`` the group's sums at ``sb`` (row stride ``F``)."""
    md = (cd < d)[:, None]
    G = tl.load(sb + e + cd[None, :], mask=md & (cd < d)[None, :], other=0.0)
    Bg = tl.load(sb + ce[None, :], mask=md & (ce < e)[None, :], other=0.0)
    return Z - _mm(G, Z, PREC) + Bg


@triton.jit
def _group_of(c, S0, RNUM, RDEN, NC):
    """The group that chunk ``c`` belongs to (:func:`_group_start`)."""
    g = 0
    while _group_start(g + 1, S0, RNUM, RDEN, NC) <= c:
        g += 1
    return g


@triton.jit
def _group_rows(
    wg_ptr,
    b,
    c,
    et,
    n,
    d,
    e,
    stride_wb,
    stride_wn,
    BC: tl.constexpr,
    BE: tl.constexpr,
    DP: tl.constexpr,
    CACHE: tl.constexpr,
):
    """Chunk ``c``'s rows of ``X^{grp}`` (``BE``-column tile ``et``) and of ``P^{grp}`` (all).

    ``CACHE=".cg"`` reads around L1, for data that other programs of the same launch wrote.
    """
    rows = c.to(tl.int64) * BC + tl.arange(0, BC)
    rm = (rows < n)[:, None]
    ce = et * BE + tl.arange(0, BE)
    cd = tl.arange(0, DP)
    wrow = wg_ptr + b * stride_wb + rows[:, None] * stride_wn
    Xg = tl.load(wrow + ce[None, :], mask=rm & (ce < e)[None, :], other=0.0, cache_modifier=CACHE)
    Pg = tl.load(
        wrow + e + cd[None, :], mask=rm & (cd < d)[None, :], other=0.0, cache_modifier=CACHE
    )
    return Xg, Pg


@triton.jit
def _store_corrected(
    x_ptr, X, b, c, et, n, e, stride_xb, stride_xn, BC: tl.constexpr, BE: tl.constexpr
):
    """Store chunk ``c``'s corrected ``BE``-column tile ``et``, ``X = X^{grp} − P^{grp} Z_g``."""
    rows = c.to(tl.int64) * BC + tl.arange(0, BC)
    ce = et * BE + tl.arange(0, BE)
    mask = (rows < n)[:, None] & (ce < e)[None, :]
    tl.store(x_ptr + b * stride_xb + rows[:, None] * stride_xn + ce[None, :], X, mask=mask)


@triton.jit
def _group_tile_columns(y, d, e, ND, BF: tl.constexpr):
    """Columns of ``[U | P]`` (and their mask) of the group kernel's column tile ``y``.

    Tiles ``y < ND`` cover ``P``'s ``d`` columns, the rest ``U``'s ``e``: the ``P`` tiles come
    first, so the fused state step of a ``U`` tile only waits for programs of lower index.
    """
    is_p = y < ND
    cf = tl.where(is_p, e + y * BF, (y - ND) * BF) + tl.arange(0, BF)
    return cf, cf < tl.where(is_p, e + d, e)


@triton.jit
def _tri_group_sliced_kernel(
    w_ptr,
    k_ptr,
    wg_ptr,
    sg_ptr,
    z_ptr,
    done_ptr,
    n,
    d,
    e,
    F,
    NC,
    NG,
    ND,
    S0,
    RNUM,
    RDEN,
    stride_wb,
    stride_wn,
    stride_kb,
    stride_kn,
    stride_sb,
    stride_sg,
    stride_zb,
    stride_zg,
    BC: tl.constexpr,
    BF: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    NS: tl.constexpr,
    FUSED: tl.constexpr,
    SLEEP: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
    trace_ptr=None,
    TRACE: tl.constexpr = False,
):
    """Chunk recursion from a zero state inside group ``g`` on ``BF`` columns of ``[U | P]``.

    Program ``(g, y, b)``; column tile ``y`` as :func:`_group_tile_columns` (``ND`` tiles of
    ``P`` first). The state is kept as ``NS`` slices of ``DP / NS`` rows, and the products
    contract over them with batched dots: ``NS`` short independent chains of tensor-core
    products instead of one long one (the step is latency-bound: 2.2 against 3.2 µs on the
    H200). Groups may grow with ``g`` (:func:`_group_start`).

    ``FUSED``: the program then counts its tile done (release) in ``done[0, b, g]`` (``P``
    tiles) or ``done[1, b, g]`` (``U`` tiles), for the corrections, and a ``U`` tile (columns
    ``J``) goes on with the state step of the scan across groups on its own columns,
    ``Z_{g+1}[:, J] = Z_g[:, J] − G_g Z_g[:, J] + B_g[:, J]``: its ``B_g[:, J]`` is the state
    it holds, it waits (acquire) until the group's ``P`` tiles are done and reads
    ``G_g = K_gᵀ P^{grp}`` (their sums), and ``Z_g[:, J]`` from the same tile of group
    ``g − 1`` once no element is :data:`SENTINEL` (the chunk kernel filled ``Z`` so;
    ``Z_0 = 0`` is not stored). Every wait is on programs of lower linear index (smaller
    ``g``, or smaller ``y`` in the same group), which are dispatched first, and in the
    interpreter run first: no deadlock.

    ``TRACE`` (B = 1): timer stamps at ``trace[(g·NFT + y)·(NC + 5) + i]``, ``i = 0`` at the
    start, ``1 + c`` after chunk ``c``, ``NC + 1`` at the end of the chain, then (``U``
    tiles) ``NC + 2`` once the group's ``P`` tiles were seen done, ``NC + 3`` once ``Z_g``
    was, and ``NC + 4`` after the state step.
    """
    g = tl.program_id(0).to(tl.int64)
    y = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cf, mcf = _group_tile_columns(y, d, e, ND, BF)
    mf = mcf[None, :]
    _wait_for_previous_launch(USE_PDL)
    tp = (g * tl.num_programs(1) + y) * (NC + 5)
    _stamp(trace_ptr, tp, TRACE)
    KS: tl.constexpr = DP // NS
    sl = tl.arange(0, NS)[:, None, None]
    cP = sl * KS + tl.arange(0, KS)[None, None, :]  # (NS, 1, KS): column of P
    cK = sl * KS + tl.arange(0, KS)[None, :, None]  # (NS, KS, 1): column of K
    S = tl.zeros((NS, KS, BF), dtype=tl.float32)
    for c in range(_group_start(g, S0, RNUM, RDEN, NC), _group_start(g + 1, S0, RNUM, RDEN, NC)):
        rows = c * BC + tl.arange(0, BC)
        rm = (rows < n)[:, None]
        Wc = tl.load(
            w_ptr + b * stride_wb + rows[:, None] * stride_wn + cf[None, :], mask=rm & mf, other=0.0
        )
        r3 = rows[None, :, None]
        Pc = tl.load(
            w_ptr + b * stride_wb + r3 * stride_wn + e + cP, mask=(r3 < n) & (cP < d), other=0.0
        )
        r3t = rows[None, None, :]
        Kct = tl.load(
            k_ptr + b * stride_kb + r3t * stride_kn + cK, mask=(r3t < n) & (cK < d), other=0.0
        )
        Xc = Wc - tl.sum(_mm(Pc, S, PREC), axis=0)
        tl.store(wg_ptr + b * stride_wb + rows[:, None] * stride_wn + cf[None, :], Xc, mask=rm & mf)
        S += _mm(Kct, tl.broadcast_to(Xc[None, :, :], (NS, BC, BF)), PREC)
        _stamp(trace_ptr, tp + 1 + c, TRACE)
    cd = tl.arange(0, DP)
    md = (cd < d)[:, None]
    S2 = tl.reshape(S, (DP, BF))
    sp = sg_ptr + b * stride_sb + g * stride_sg + cd[:, None] * F
    tl.store(sp + cf[None, :], S2, mask=md & mf)
    if FUSED:
        is_u = (y >= ND).to(tl.int64)
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_add(done_ptr + (is_u * NG + g) * tl.num_programs(2) + b, 1, sem="release")
        _stamp(trace_ptr, tp + NC + 1, TRACE)
        if (y >= ND) & (g + 1 < NG):
            zb = z_ptr + b * stride_zb
            zs = zb + cd[:, None] * e + cf[None, :]
            if g == 0:
                Z = S2  # Z_1 = B_0: Z_0 = 0
            else:
                _wait_flag(done_ptr + g * tl.num_programs(2) + b, ND, SLEEP)
                _stamp(trace_ptr, tp + NC + 2, TRACE)
                # transposed, Zᵀ Gᵀ: 16-row mma.sync products (the fastest of the forms measured
                # in session 12, docs/benchmarks.md), G loaded before the wait for Z_g
                Gt = tl.load(
                    sg_ptr + b * stride_sb + g * stride_sg + cd[None, :] * F + e + cd[:, None],
                    mask=md & (cd < d)[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                _spin_until_written(zb + g * stride_zg + (y - ND) * BF, SLEEP)
                Z = _load_written(zs + g * stride_zg, md & mf)
                _stamp(trace_ptr, tp + NC + 3, TRACE)
                GZ = tl.trans(_mm(tl.trans(Z), Gt, PREC))
                Z = Z - GZ + S2
            tl.store(zs + (g + 1) * stride_zg, Z, mask=md & mf)
            if TRACE:
                tl.debug_barrier()
            _stamp(trace_ptr, tp + NC + 4, TRACE)
    else:
        _stamp(trace_ptr, tp + NC + 1, TRACE)


@triton.jit
def _wait_flag(ptr, target, SLEEP: tl.constexpr = False):
    """Spin until ``*ptr ≥ target``, then acquire it for the whole program.

    Polls with plain volatile reads (no atomic traffic while waiting), then one acquire. Polling
    with acquire atomics instead was slower (0.0801 against 0.0763 ms at n = 4096, session 10).
    """
    while tl.load(ptr, volatile=True) < target:
        _back_off(SLEEP)
    tl.atomic_add(ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _written(x):
    """Whether no element of tile ``x`` is still :data:`SENTINEL` (one program-wide test)."""
    unwritten = tl.where(x.to(tl.int32, bitcast=True) == SENTINEL, 1, 0)
    if len(x.shape) == 3:
        unwritten = tl.max(unwritten, axis=2)
    return tl.max(tl.max(unwritten, axis=1), axis=0) == 0


@triton.jit
def _load_written(ptrs, mask, SLEEP: tl.constexpr = False):
    """Load tile ``ptrs`` once other programs (running at the same time) have written all of it.

    The buffer was filled with :data:`SENTINEL` by the solve's first launch and each element is
    written once, with its final value, so a tile with no sentinel left is complete, whatever
    the order in which the writes land: no fence or barrier between writer and reader. The
    first load is a plain one around L1 (``.cg``); the retries are ``volatile``, which the
    compiler cannot hoist out of the loop, but are ≈ 3× slower on a 64 KB tile (session 11),
    so callers first wait on a cheap hint (a flag or one element) that the tile is there.
    """
    x = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    while not _written(x):
        _back_off(SLEEP)
        x = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
    return x


@triton.jit
def _back_off(SLEEP: tl.constexpr):
    """With ``SLEEP`` (not in the interpreter): pause ≈ 0.1 µs (``nanosleep``) between polls.

    Waiting programs then leave the issue slots and L2 to the group kernel's programs beside
    them.
    """
    if SLEEP:
        tl.inline_asm_elementwise(
            "nanosleep.u32 100;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _spin_until_written(ptr, SLEEP: tl.constexpr):
    """Spin (volatile reads) until the float at ``ptr`` is no longer :data:`SENTINEL`."""
    while tl.load(ptr, volatile=True).to(tl.int32, bitcast=True) == SENTINEL:
        _back_off(SLEEP)


@triton.jit
def _tri_chain_correct_kernel(
    wg_ptr,
    z_ptr,
    x_ptr,
    done_ptr,
    n,
    d,
    e,
    NC,
    NG,
    ND,
    NU,
    S0,
    RNUM,
    RDEN,
    stride_wb,
    stride_wn,
    stride_zb,
    stride_zg,
    stride_xb,
    stride_xn,
    BC: tl.constexpr,
    BE: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    SLEEP: tl.constexpr,
    trace_ptr=None,
    TRACE: tl.constexpr = False,
):
    """``X = X^{grp} − P^{grp} Z_g`` on chunk ``c``'s ``BE``-column tile, as soon as it can.

    Waits until its group's ``ND`` ``P`` tiles and ``NU`` ``U`` tiles are counted done
    (acquire, :func:`_tri_group_sliced_kernel` with ``FUSED``), loads its rows of the group
    solution, then (``g > 0``; ``Z_0 = 0``) waits for ``Z_g`` (:func:`_spin_until_written`,
    :func:`_load_written`). Launched with programmatic dependent launch after the group
    kernel, whose programs all run before this launch starts: no deadlock. Its programs are
    small (4 warps, 32-column tiles), so they fit beside the group kernel's and wait there.

    Programs are launched chunk by chunk (the column tile varies fastest), so the early groups'
    corrections, which can run first, are not queued behind the late ones'. ``SLEEP``: back off
    between polls (:func:`_back_off`).

    ``TRACE`` (B = 1): timer stamps at ``trace[3·(c·NE + et) + {0, 1, 2}]`` (start, inputs
    seen, stored).
    """
    et = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    B = tl.num_programs(2)
    tq = 3 * (c * tl.num_programs(0) + et)
    _stamp(trace_ptr, tq, TRACE)
    g = _group_of(c, S0, RNUM, RDEN, NC)
    _wait_flag(done_ptr + g * B + b, ND, SLEEP)
    _wait_flag(done_ptr + (NG + g) * B + b, NU, SLEEP)
    # the group's rows first: only the product waits for Z_g
    Xg, Pg = _group_rows(wg_ptr, b, c, et, n, d, e, stride_wb, stride_wn, BC, BE, DP, ".cg")
    if g == 0:
        X = Xg
    else:
        cd = tl.arange(0, DP)
        ce = et * BE + tl.arange(0, BE)
        zb = z_ptr + b * stride_zb + g * stride_zg
        _spin_until_written(zb + et * BE, SLEEP)
        Zg = _load_written(
            zb + cd[:, None] * e + ce[None, :], (cd < d)[:, None] & (ce < e)[None, :]
        )
        X = Xg - _mm(Pg, Zg, PREC)
    _stamp(trace_ptr, tq + 1, TRACE)
    _store_corrected(x_ptr, X, b, c, et, n, e, stride_xb, stride_xn, BC, BE)
    if TRACE:
        tl.debug_barrier()
    _stamp(trace_ptr, tq + 2, TRACE)


@triton.jit
def _tri_state_kernel(
    sg_ptr,
    z_ptr,
    d,
    e,
    F,
    NG,
    stride_sb,
    stride_sg,
    stride_zb,
    stride_zg,
    BE: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The state scan across groups (unfused): store ``Z_g``, then ``Z ← Z − G_g Z + B_g``.

    One program per batch entry and ``BE``-column tile of ``e``, after the group kernel
    (``griddepcontrol.wait``). The fused scan does these steps in the group kernel instead.
    """
    et = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    _wait_for_previous_launch(USE_PDL)
    cd = tl.arange(0, DP)
    md = (cd < d)[:, None]
    ce = et * BE + tl.arange(0, BE)
    me = (ce < e)[None, :]
    Z = tl.zeros((DP, BE), dtype=tl.float32)
    for g in range(0, NG):
        tl.store(
            z_ptr + b * stride_zb + g * stride_zg + cd[:, None] * e + ce[None, :], Z, mask=md & me
        )
        if g + 1 < NG:  # the last group's outgoing state is not needed
            Z = _state_step(Z, sg_ptr + b * stride_sb + g * stride_sg + cd[:, None] * F,
                            cd, ce, d, e, PREC)  # fmt: skip


@triton.jit
def _tri_correct_kernel(
    wg_ptr,
    z_ptr,
    x_ptr,
    n,
    d,
    e,
    NC,
    S0,
    RNUM,
    RDEN,
    stride_wb,
    stride_wn,
    stride_zb,
    stride_zg,
    stride_xb,
    stride_xn,
    BC: tl.constexpr,
    BE: tl.constexpr,
    DP: tl.constexpr,
    PREC: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """``X = X^{grp} − P^{grp} Z_g`` on chunk ``c``'s ``BE``-column tile (unfused scan)."""
    c = tl.program_id(0)
    et = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    g = _group_of(c, S0, RNUM, RDEN, NC)
    _wait_for_previous_launch(USE_PDL)
    cd = tl.arange(0, DP)
    ce = et * BE + tl.arange(0, BE)
    Zg = tl.load(
        z_ptr + b * stride_zb + g * stride_zg + cd[:, None] * e + ce[None, :],
        mask=(cd < d)[:, None] & (ce < e)[None, :],
        other=0.0,
    )
    Xg, Pg = _group_rows(wg_ptr, b, c, et, n, d, e, stride_wb, stride_wn, BC, BE, DP, "")
    _store_corrected(x_ptr, Xg - _mm(Pg, Zg, PREC), b, c, et, n, e, stride_xb, stride_xn, BC, BE)


@triton.jit
def _tri_solve_first_kernel(
    k_ptr,
    x_ptr,
    pin_ptr,
    pout_ptr,
    m_ptr,
    n,
    d,
    e,
    stride_kb,
    stride_kn,
    stride_xb,
    stride_xn,
    stride_pb,
    stride_pn,
    stride_mb,
    stride_mk,
    BC: tl.constexpr,
    BF: tl.constexpr,
    DP: tl.constexpr,
    STORE: tl.constexpr,
    PREC: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Tree solve, level ``C → 2C`` for chunk pair ``p`` on ``BF`` columns of ``W = [X | P]``.

    ``M₁ = K₁ᵀ W₁``, ``W₂ ← W₂ − P₂ M₁`` and (``STORE``: levels follow) the pair's
    ``M = M₁ + K₂ᵀ W₂``, contracted over the pair's ``2C`` rows: the chunks' ``M`` never reach
    memory and need no ``d×d @ d×(e+d)`` combine. Column tiles ``< cdiv(e, BF)`` update ``X`` in
    place; the others write ``P`` to ``pout`` (both chunks: the next level reads all rows).
    """
    _wait_for_previous_launch(USE_PDL)
    p = tl.program_id(0).to(tl.int64)
    jt = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ntu = tl.cdiv(e, BF)
    if jt < ntu:
        c0 = jt * BF
        ncols = e
        moff = 0
        src = x_ptr + b * stride_xb
        dst = src
        stride_sn = stride_xn
    else:
        c0 = (jt - ntu) * BF
        ncols = d
        moff = e
        src = pin_ptr + b * stride_pb
        dst = pout_ptr + b * stride_pb
        stride_sn = stride_pn
    cj = c0 + tl.arange(0, BF)
    mj = (cj < ncols)[None, :]
    cd = tl.arange(0, DP)
    md = (cd < d)[None, :]
    r1 = 2 * p * BC + tl.arange(0, BC)
    r2 = r1 + BC
    m1 = (r1 < n)[:, None]
    m2 = (r2 < n)[:, None]
    kb = k_ptr + b * stride_kb
    W1 = tl.load(src + r1[:, None] * stride_sn + cj[None, :], mask=m1 & mj, other=0.0)
    K1 = tl.load(kb + r1[:, None] * stride_kn + cd[None, :], mask=m1 & md, other=0.0)
    M = _mm(tl.trans(K1), W1, PREC)
    if (2 * p + 1) * BC < n:
        W2 = tl.load(src + r2[:, None] * stride_sn + cj[None, :], mask=m2 & mj, other=0.0)
        P2 = tl.load(
            pin_ptr + b * stride_pb + r2[:, None] * stride_pn + cd[None, :],
            mask=m2 & md,
            other=0.0,
        )
        W2 -= _mm(P2, M, PREC)
        tl.store(dst + r2[:, None] * stride_sn + cj[None, :], W2, mask=m2 & mj)
        if STORE:
            K2 = tl.load(kb + r2[:, None] * stride_kn + cd[None, :], mask=m2 & md, other=0.0)
            M += _mm(tl.trans(K2), W2, PREC)
    if STORE:
        if jt >= ntu:
            tl.store(dst + r1[:, None] * stride_sn + cj[None, :], W1, mask=m1 & mj)
        mp = m_ptr + b * stride_mb + p * stride_mk + cd[:, None] * (e + d) + moff + cj[None, :]
        tl.store(mp, M, mask=(cd < d)[:, None] & mj)


@triton.jit
def _solve_update_tile(
    r0,
    c0,
    b,
    src_ptr,
    dst_ptr,
    pin_ptr,
    m_ptr,
    ncols,
    moff,
    odd,
    n,
    d,
    e,
    stride_sb,
    stride_sn,
    stride_pb,
    stride_pn,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dst = src − P_in M₁[:, moff + c]`` on rows ``r0 : r0 + BT`` (``odd``), else a copy.

    ``m_ptr`` points at ``M₁``, the ``d×(e+d)`` ``M`` of the even partner block.
    """
    rows = r0 + tl.arange(0, BT)
    rm = (rows < n)[:, None]
    cj = c0 + tl.arange(0, BF)
    mj = rm & (cj < ncols)[None, :]
    acc = tl.load(
        src_ptr + b * stride_sb + rows[:, None] * stride_sn + cj[None, :], mask=mj, other=0.0
    )
    if odd:
        pb = pin_ptr + b * stride_pb + rows[:, None] * stride_pn
        for k0 in range(0, d, BD):
            ck = k0 + tl.arange(0, BD)
            pk = tl.load(pb + ck[None, :], mask=rm & (ck < d)[None, :], other=0.0)
            mt = tl.load(
                m_ptr + ck[:, None] * (e + d) + moff + cj[None, :],
                mask=(ck < d)[:, None] & (cj < ncols)[None, :],
                other=0.0,
            )
            acc -= _mm(pk, mt, PREC)
    tl.store(dst_ptr + b * stride_sb + rows[:, None] * stride_sn + cj[None, :], acc, mask=mj)


@triton.jit
def _tri_solve_level_kernel(
    x_ptr,
    pin_ptr,
    pout_ptr,
    min_ptr,
    mout_ptr,
    n,
    d,
    e,
    s,
    n_x,
    n_p,
    stride_xb,
    stride_xn,
    stride_pb,
    stride_pn,
    stride_mb,
    stride_mk,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BD: tl.constexpr,
    BG: tl.constexpr,
    COMBINE: tl.constexpr,
    PREC: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Tree solve, one level ``s → 2s`` (``s ≥ 2C``) in one launch.

    Programs ``< n_x``: ``X₂ ← X₂ − P₂ M₁[:, :e]`` in place on the row tiles of odd blocks;
    the next ``n_p``: ``P_out = P_in − P₂ G₁`` on odd blocks, a copy on even ones (``n_p = 0`` on
    the last level); with ``COMBINE`` the rest build the next level's ``M``
    (:func:`_gram_combine_tile`).
    """
    _wait_for_previous_launch(USE_PDL)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_x:
        ntj = tl.cdiv(e, BF)
        tile = (pid // ntj).to(tl.int64)
        tpb = s // BT  # row tiles per block
        blk = 2 * (tile // tpb) + 1
        _solve_update_tile(
            blk * s + (tile % tpb) * BT,
            (pid % ntj) * BF,
            b,
            x_ptr,
            x_ptr,
            pin_ptr,
            min_ptr + b * stride_mb + (blk - 1) * stride_mk,
            e,
            0,
            True,
            n,
            d,
            e,
            stride_xb,
            stride_xn,
            stride_pb,
            stride_pn,
            BT,
            BF,
            BD,
            PREC,
        )
    elif pid < n_x + n_p:
        qp = pid - n_x
        ntj = tl.cdiv(d, BF)
        r0 = (qp // ntj).to(tl.int64) * BT
        blk = r0 // s
        _solve_update_tile(
            r0,
            (qp % ntj) * BF,
            b,
            pin_ptr,
            pout_ptr,
            pin_ptr,
            min_ptr + b * stride_mb + (blk - 1) * stride_mk,
            d,
            e,
            (blk % 2) == 1,
            n,
            d,
            e,
            stride_pb,
            stride_pn,
            stride_pb,
            stride_pn,
            BT,
            BF,
            BD,
            PREC,
        )
    elif COMBINE:
        qc = pid - n_x - n_p
        ngt = tl.cdiv(d, BG) * tl.cdiv(e + d, BG)
        _gram_combine_tile(
            (qc // ngt).to(tl.int64),
            qc % ngt,
            b,
            min_ptr,
            mout_ptr,
            tl.cdiv(n, s),
            d,
            e,
            stride_mb,
            stride_mk,
            BG,
            PREC,
        )


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


def _check(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    chunk_size: int,
    block_s: int,
    precision: str,
) -> None:
    if Q.dtype != torch.float32 or K.dtype != torch.float32 or lam.dtype != torch.float32:
        raise TypeError("the triangular kernels take float32 Q, K and diag")
    if Q.ndim != 3 or K.shape != Q.shape or lam.shape != Q.shape[:2]:
        raise ValueError(
            f"expected Q, K (B, n, d) and diag (B, n), got {Q.shape}, {K.shape}, {lam.shape}"
        )
    if (
        chunk_size not in (16, 32, 64)
        or block_s not in (1, 2, 4, 8, 16, 32)
        or block_s > chunk_size
    ):
        raise ValueError(
            f"chunk_size must be 16/32/64 and block_s 1/2/4/8/16/32 ≤ chunk_size, got "
            f"{chunk_size}, {block_s}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _out(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"`out` must be a contiguous float32 tensor of shape {shape}")
    return out


class _Chunk(NamedTuple):
    """The chunk kernel of a launch and how it runs."""

    kernel: object  # _tri_chunk_kernel or _tri_chunk_blocked_kernel
    meta: dict  # its BC / BS / LOG_M meta-parameters
    size: int  # C, rows per chunk
    precision: str
    warps: int


def _chunk_kernel(
    chunk_impl: str, chunk_size: int, block_s: int, precision: str, warps: int
) -> _Chunk:
    """The chunk kernel and its ``BC/BS/LOG_M`` meta-parameters for ``chunk_impl``."""
    if chunk_impl not in CHUNK_IMPLS:
        raise ValueError(f"chunk_impl must be one of {CHUNK_IMPLS}, got {chunk_impl!r}")
    if chunk_impl == "blocked":
        if chunk_size != 64:
            raise ValueError(f"chunk_impl='blocked' needs chunk_size=64, got {chunk_size}")
        meta = {"BC": 64, "BS": 16, "LOG_M": 2}  # block_s unused
        return _Chunk(_tri_chunk_blocked_kernel, meta, chunk_size, precision, warps)
    meta = {"BC": chunk_size, "BS": block_s, "LOG_M": int(math.log2(chunk_size // block_s))}
    return _Chunk(_tri_chunk_kernel, meta, chunk_size, precision, warps)


def _chunk_pass(
    chunk: _Chunk,
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    *,
    V: torch.Tensor | None = None,
    Y: torch.Tensor | None = None,
    P: torch.Tensor | None = None,
    R: torch.Tensor | None = None,
    U: torch.Tensor | None = None,
    BE: int,
    scratch: tuple[torch.Tensor, int] | None = None,
    whole: bool = False,
) -> None:
    """One launch of the chunk kernel over every ``C``-row chunk of every batch entry.

    Stores, where given: ``Y`` the chunk inverses ``Y_cc = T_cc⁻¹`` (in place in the ``n×n``
    result), ``P = Y_cc Q_c``, ``R = Y_ccᵀ K_c`` (same strides as ``P``), ``U = Y_cc V_c``.
    ``scratch = (buffer, n_zero)``: also set the int32 ``buffer``'s first ``n_zero`` elements
    to 0 and the rest to :data:`~matfn.kernels.triangular_chunk.SENTINEL`.
    """
    B, n, d = Q.shape
    if P is not None and R is not None and P.stride()[:2] != R.stride()[:2]:
        raise ValueError("P and R share their strides in the chunk kernel")

    def strides(T: torch.Tensor | None) -> tuple[int, int]:
        return (T.stride(0), T.stride(1)) if T is not None else (0, 0)

    def ptr(T: torch.Tensor | None) -> torch.Tensor:
        return T if T is not None else Q  # never read or written (its STORE/HAS flag is off)

    chunk.kernel[(triton.cdiv(n, chunk.size), B)](
        Q,
        K,
        lam,
        ptr(V),
        ptr(Y),
        ptr(P),
        ptr(R),
        ptr(U),
        n,
        d,
        V.shape[-1] if V is not None else 0,
        Q.stride(0),
        Q.stride(1),
        lam.stride(0),
        *strides(V),
        *strides(Y),
        *strides(P if P is not None else R),
        *strides(U),
        BD=_pow2(d) if whole else min(64, _pow2(d)),
        BE=_pow2(V.shape[-1]) if whole and V is not None else BE,
        WHOLE=whole,
        STORE_Y=Y is not None,
        STORE_P=P is not None,
        STORE_R=R is not None,
        HAS_V=V is not None,
        PREC=chunk.precision,
        num_warps=chunk.warps,
        scratch_ptr=None if scratch is None else scratch[0],
        n_zero=0 if scratch is None else scratch[1],
        n_fill=0 if scratch is None else scratch[0].numel() - scratch[1],
        INIT=scratch is not None,
        **chunk.meta,
    )


def tri_inv_triton(
    Q: torch.Tensor,
    K: torch.Tensor,
    lam: torch.Tensor,
    *,
    chunk_size: int = 64,
    block_s: int = 16,
    precision: str = "3xtf32",
    chunk_impl: str = "dense",
    chunk_warps: int = 4,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻¹`` for float32 ``Q, K`` ``(B, n, d)`` and ``λ`` ``(B, n)``; returns ``(B, n, n)``.

    ``out``: an optional contiguous float32 ``(B, n, n)`` result buffer (tests poison it);
    ``chunk_warps``: warps of the chunk kernel (a tuning knob for the benchmark);
    ``chunk_impl``: ``"dense"`` (``_tri_chunk_kernel``) or ``"blocked"``
    (``_tri_chunk_blocked_kernel``, ``chunk_size = 64`` only, ``block_s`` ignored).
    """
    _check(Q, K, lam, chunk_size, block_s, precision)
    chunk = _chunk_kernel(chunk_impl, chunk_size, block_s, precision, chunk_warps)
    Q, K, lam = Q.contiguous(), K.contiguous(), lam.contiguous()
    B, n, d = Q.shape
    Y = _out(out, (B, n, n), Q.device)
    if B == 0 or n == 0:
        return Y
    C = chunk_size
    NC = triton.cdiv(n, C)
    L = (NC - 1).bit_length()
    if L == 0:  # one chunk: its inverse is the result
        _chunk_pass(chunk, Q, K, lam, Y=Y, BE=16)
        return Y
    BD = min(64, _pow2(d))
    P_all = torch.empty(L, B, n, d, dtype=torch.float32, device=Q.device)
    R_all = torch.empty_like(P_all)
    G_cur = torch.empty(B, NC, d, d, dtype=torch.float32, device=Q.device)
    G_next = torch.empty_like(G_cur) if L > 2 else G_cur  # L ≤ 2: no level combines
    _chunk_pass(chunk, Q, K, lam, Y=Y, P=P_all[0], R=R_all[0], BE=16)
    # Grams of the chunks, G_c = K_cᵀ P_c; each level's launch also combines its Grams into
    # the next level's (G = G₁ + G₂ − G₂ G₁), so no launch contracts over more than C rows
    BG = min(32, _pow2(d))
    ngt = triton.cdiv(d, BG) ** 2
    pdl = _pdl_flags(use_pdl(Q))  # every launch after the chunk kernel waits for the one before
    _tri_gram_kernel[(NC, ngt, B)](
        K,
        P_all[0],
        G_cur,
        n,
        d,
        K.stride(0),
        K.stride(1),
        n * d,
        d,
        G_cur.stride(0),
        G_cur.stride(1),
        BT=C,
        BG=BG,
        PREC=precision,
        num_warps=4,
        **pdl,
    )
    BTu = min(32, C)  # more programs: at B = 1 a level is only n/BTu × d/BD tiles
    n_update = triton.cdiv(n, BTu) * triton.cdiv(d, BD)
    for lv in range(L - 1):
        s = C << lv
        combine = lv < L - 2  # the last level's Grams are not used
        n_combine = triton.cdiv(triton.cdiv(n, s), 2) * ngt if combine else 0
        _tri_level_kernel[(n_update + n_combine, B)](
            P_all[lv],
            R_all[lv],
            G_cur,
            P_all[lv + 1],
            R_all[lv + 1],
            G_next,
            n,
            d,
            s,
            n_update,
            n * d,
            d,
            G_cur.stride(0),
            G_cur.stride(1),
            BT=BTu,
            BD=BD,
            BG=BG,
            COMBINE=combine,
            PREC=precision,
            num_warps=4,
            **pdl,
        )
        G_cur, G_next = G_next, G_cur
    _tri_offdiag_kernel[(NC, NC, B)](
        P_all,
        R_all,
        Y,
        n,
        d,
        P_all.stride(0),
        P_all.stride(1),
        P_all.stride(2),
        Y.stride(0),
        Y.stride(1),
        BT=C,
        BD=BD,
        PREC=precision,
        num_warps=4,
        **pdl,
    )
    return Y


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def tri_solve_triton(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    lam: torch.Tensor,
    *,
    algorithm: str = "auto",
    chunk_size: int = 32,
    block_s: int = 4,
    precision: str = "3xtf32",
    chunk_impl: str = "dense",
    chunk_warps: int = 4,
    tree_rows: int = 32,
    tree_cols: int = 32,
    tree_gram_block: int = 32,
    tree_warps: int = 4,
    group_size: int | None = None,
    scan_precision: str = "3xtf32",
    scan_warps: int | None = None,
    scan_block: int | None = None,
    scan_slices: int | None = None,
    state_block: int | None = None,
    state_warps: int | None = None,
    scan_fused: bool = True,
    scan_ratio: float | None = 1.4,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T⁻¹ V`` for float32 ``Q, K`` ``(B, n, d)``, ``V`` ``(B, n, e)``, ``λ`` ``(B, n)``.

    Parameters
    ----------
    algorithm : {"auto", "tree", "scan"}
        ``"tree"``: divide and conquer over ``⌈log₂(n/C)⌉`` levels, each one parallel launch;
        ``"scan"``: the two-level scan (3 launches, the last overlapped); ``"auto"``: the tree
        while a CUDA graph is being captured and ``B·n ≤`` :data:`TREE_MAX_ROWS`, else the scan
        (the measurements are in the module docstring).
    chunk_size, block_s, precision, chunk_impl, chunk_warps
        As in :func:`tri_inv_triton`; ``precision`` is also the dot mode of the tree's levels.
    tree_rows, tree_cols, tree_warps
        ``"tree"`` only: row tile (16/32/64, at most ``2·chunk_size``) and column tile
        (16/32/64) of the level updates (``tree_cols`` also for the first level's pair
        kernel) and warps of the tree kernels (1/2/4/8).
    tree_gram_block : int
        ``"tree"`` only: tile (16/32/64) of the ``M = M₁ + M₂ − G₂ M₁`` combines.
    group_size : int, optional
        ``"scan"`` only: equal groups of this many chunks (default: groups that grow, see
        ``scan_ratio``; unfused: ``≈ √(NC·d/2C)`` chunks).
    scan_precision : str
        ``"scan"`` only: the dot mode of the group, state and correction kernels.
    scan_warps, scan_block, scan_slices
        ``"scan"`` only: warps (default 4), column tile (16/32/64, default 16) and state slices
        (1/2/4/8, each ≥ 16 rows; default ``min(4, d_pad/16)``) of the group kernel.
    state_block, state_warps
        ``"scan"`` only: column tile (16/32/64, default 32) and warps (default 8) of the state
        scan (and, fused, of the corrections).
    scan_fused : bool
        ``"scan"`` only: state scan and corrections in one flag-driven launch that overlaps the
        group kernel (default), or two launches after it.
    scan_ratio : float or None
        ``"scan"``, fused, no ``group_size``: the cost of a state step in group steps, which
        sets how fast the groups grow (:func:`_chain_schedule`; default 1.4, measured in
        session 12); None: equal groups.
    out : Tensor, optional
        A contiguous float32 ``(B, n, e)`` result buffer.

    Returns
    -------
    Tensor
        ``X`` ``(B, n, e)`` with ``T X = V``.
    """
    _check(Q, K, lam, chunk_size, block_s, precision)
    if algorithm not in ("auto", "tree", "scan"):
        raise ValueError(f"algorithm must be 'auto', 'tree' or 'scan', got {algorithm!r}")
    if scan_precision not in PRECISIONS:
        raise ValueError(f"scan_precision must be one of {PRECISIONS}, got {scan_precision!r}")
    if scan_block not in (None, 16, 32, 64) or scan_warps not in (None, 1, 2, 4, 8):
        raise ValueError(
            f"scan_block must be 16/32/64 and scan_warps 1/2/4/8, got {scan_block}, {scan_warps}"
        )
    if scan_slices not in (None, 1, 2, 4, 8) or _pow2(Q.shape[-1]) // (scan_slices or 1) < 16:
        raise ValueError(
            f"scan_slices must be 1/2/4/8 with ≥ 16 rows a slice, got {scan_slices} "
            f"(d = {Q.shape[-1]})"
        )
    if state_block not in (None, 16, 32, 64) or state_warps not in (None, 1, 2, 4, 8):
        raise ValueError(
            f"state_block must be 16/32/64 and state_warps 1/2/4/8, got {state_block}, "
            f"{state_warps}"
        )
    if scan_ratio is not None and not (isinstance(scan_ratio, int | float) and scan_ratio > 0):
        raise ValueError(f"scan_ratio must be a positive number or None, got {scan_ratio!r}")
    if tree_rows not in (16, 32, 64) or tree_rows > 2 * chunk_size:
        raise ValueError(
            f"tree_rows must be 16/32/64 and ≤ 2·chunk_size, got {tree_rows} (C = {chunk_size})"
        )
    if tree_cols not in (16, 32, 64) or tree_gram_block not in (16, 32, 64):
        raise ValueError(
            f"tree_cols and tree_gram_block must be 16/32/64, got {tree_cols}, {tree_gram_block}"
        )
    if tree_warps not in (1, 2, 4, 8):
        raise ValueError(f"tree_warps must be 1/2/4/8, got {tree_warps}")
    if algorithm != "scan" and tree_cols == 16 and tree_warps == 8 and precision != "ieee":
        raise ValueError(
            "tree_cols=16 with 8 tree warps puts 64+-row by 16-column tensor-core products in "
            "8-warp kernels, wrong on the H100 with Triton 3.6 (module docstring); use "
            "tree_cols ≥ 32 or tree_warps ≤ 4"
        )
    chunk = _chunk_kernel(chunk_impl, chunk_size, block_s, precision, chunk_warps)
    if V.dtype != torch.float32 or V.ndim != 3 or V.shape[:2] != Q.shape[:2]:
        raise ValueError(f"expected float32 V (B, n, e), got {V.dtype} {tuple(V.shape)}")
    if Q.shape[-1] > 128:
        # the scan's group/state kernels and the tree's pair kernel keep d-wide tiles on chip
        # (> 227 KB of shared memory for d = 256)
        raise ValueError(f"tri_solve_triton supports d ≤ 128, got d = {Q.shape[-1]}")
    Q, K, V, lam = Q.contiguous(), K.contiguous(), V.contiguous(), lam.contiguous()
    B, n, d = Q.shape
    e = V.shape[-1]
    X = _out(out, (B, n, e), Q.device)
    if B == 0 or n == 0 or e == 0:
        return X
    if algorithm == "auto":
        algorithm = "tree" if _capturing(Q.device) and B * n <= TREE_MAX_ROWS else "scan"
    if algorithm == "tree":
        tiles = dict(BT=tree_rows, BF=tree_cols, BG=tree_gram_block, warps=tree_warps)
        return _solve_tree(Q, K, V, lam, X, chunk, **tiles)
    scan = _Scan(
        group_size=group_size,
        precision=scan_precision,
        warps=scan_warps,
        block=scan_block,
        slices=scan_slices,
        state_block=state_block,
        state_warps=state_warps,
        fused=scan_fused,
        ratio=scan_ratio,
    )
    return _solve_scan(Q, K, V, lam, X, chunk, scan)


def _solve_tree(Q, K, V, lam, X, chunk: _Chunk, BT, BF, BG, warps):
    """The tree solve (module docstring): ``X`` holds ``W``'s first ``e`` columns throughout."""
    C, precision = chunk.size, chunk.precision
    B, n, d = Q.shape
    e = V.shape[-1]
    F = e + d
    NC = triton.cdiv(n, C)
    L = (NC - 1).bit_length()
    if L == 0:  # one chunk: its solve is the result
        _chunk_pass(chunk, Q, K, lam, V=V, U=X, BE=32)
        return X
    DP = _pow2(d)
    BD = min(64, DP)
    P_cur = torch.empty(B, n, d, dtype=torch.float32, device=Q.device)
    P_next = torch.empty_like(P_cur)
    # M of the 2C-blocks (from the pair kernel), then of each level's parents: two ping-pong
    # views of one buffer (same strides), NC2 and ⌈NC2 / 2⌉ blocks
    NC2 = triton.cdiv(NC, 2)
    M_buf = torch.empty(B, NC2 + triton.cdiv(NC2, 2), d, F, dtype=torch.float32, device=Q.device)
    M_cur, M_next = M_buf[:, :NC2], M_buf[:, NC2:]
    _chunk_pass(chunk, Q, K, lam, V=V, P=P_cur, U=X, BE=32)
    pdl = _pdl_flags(use_pdl(Q))  # every launch after the chunk kernel waits for the one before
    # level C → 2C, the M of the 2C-blocks contracted over their rows (no chunk M / combine);
    # on the last level only X's columns
    n_cols = triton.cdiv(e, BF) + (triton.cdiv(d, BF) if L > 1 else 0)
    _tri_solve_first_kernel[(NC2, n_cols, B)](
        K,
        X,
        P_cur,
        P_next,
        M_cur,
        n,
        d,
        e,
        K.stride(0),
        K.stride(1),
        X.stride(0),
        X.stride(1),
        n * d,
        d,
        M_buf.stride(0),
        M_buf.stride(1),
        BC=C,
        BF=BF,
        DP=DP,
        STORE=L > 1,
        PREC=precision,
        num_warps=warps,
        **pdl,
    )
    P_cur, P_next = P_next, P_cur
    ngt = triton.cdiv(d, BG) * triton.cdiv(F, BG)
    for lv in range(1, L):
        s = C << lv
        last = lv == L - 1
        nb = triton.cdiv(n, s)
        n_x = (nb // 2) * (s // BT) * triton.cdiv(e, BF)
        n_p = 0 if last else triton.cdiv(n, BT) * triton.cdiv(d, BF)
        n_combine = 0 if last else triton.cdiv(nb, 2) * ngt
        _tri_solve_level_kernel[(n_x + n_p + n_combine, B)](
            X,
            P_cur,
            P_next,
            M_cur,
            M_next,
            n,
            d,
            e,
            s,
            n_x,
            n_p,
            X.stride(0),
            X.stride(1),
            n * d,
            d,
            M_buf.stride(0),
            M_buf.stride(1),
            BT=BT,
            BF=BF,
            BD=BD,
            BG=BG,
            COMBINE=not last,
            PREC=precision,
            num_warps=warps,
            **pdl,
        )
        P_cur, P_next = P_next, P_cur
        M_cur, M_next = M_next, M_cur
    return X


class _Scan(NamedTuple):
    """How the scan solve runs (:func:`tri_solve_triton`'s ``group_size`` and ``scan_*``)."""

    group_size: int | None = None  # chunks per group; None: √-balanced (equal groups)
    precision: str = "3xtf32"
    warps: int | None = None  # group kernel
    block: int | None = None  # group kernel's column tile
    slices: int | None = None  # group kernel's NS
    state_block: int | None = None
    state_warps: int | None = None
    fused: bool = True  # state scan and corrections in one flag-driven launch
    ratio: float | None = None  # growing groups: a state step costs ``ratio`` group steps
    trace: torch.Tensor | None = None  # int64 timer stamps of the fused kernels (the bench, B = 1)
    group_stages: int | None = None  # the group kernel's num_stages (None: Triton's default)
    chunk_whole: bool = True  # chunk kernel: Q, K, V as whole tiles, loaded first (e ≤ 128)


def _trace_layout(NG: int, NFT: int, NC: int, NE: int) -> tuple[int, int, int]:
    """Offsets of the group and correction stamps in ``_Scan.trace``, and its length.

    The fused scan's kernels write timer stamps there (B = 1; the bench's timelines).
    """
    group_at, correct_at = 0, NG * NFT * (NC + 5)
    return group_at, correct_at, correct_at + 3 * NC * NE


def _group_sizes(S0: int, RNUM: int, RDEN: int, NC: int) -> list[int]:
    """Chunks per group, in order (:func:`_group_start` on the host)."""
    sizes, g = [], 0
    while _group_start_host(g, S0, RNUM, RDEN, NC) < NC:
        sizes.append(
            _group_start_host(g + 1, S0, RNUM, RDEN, NC) - _group_start_host(g, S0, RNUM, RDEN, NC)
        )
        g += 1
    return sizes


def _modelled_end(sizes: list[int], ratio: float) -> float:
    """End of the fused scan, in group steps, for groups of ``sizes`` chunks.

    Every group starts at 0 and ends after its size; the state scan takes group ``g`` once it
    has ended and ``ratio`` after group ``g − 1``; one step of corrections follows the last group.
    """
    T = 0.0
    for i, size in enumerate(sizes):
        T = max(T, float(size)) + (1.0 if i == len(sizes) - 1 else ratio)
    return T


@functools.lru_cache(maxsize=256)
def _chain_schedule(NC: int, ratio: float, max_groups: int | None = None) -> tuple[int, int, int]:
    """Group sizes for the fused scan, as :func:`_group_start`'s ``(S0, RNUM, RDEN)``.

    The sizes ``S0 + g·q/4`` that minimise :func:`_modelled_end` are taken: ``≈ √(2·NC·ratio)``
    group steps, against ``2√(NC·ratio)`` for equal groups, whose ends all wait for the whole
    state scan. ``max_groups``: at most that many groups (equal groups of ``⌈NC / m⌉`` chunks,
    ``m ≤ max_groups``, are candidates too, so there always is one).
    """
    limit = max_groups or NC
    best = (math.inf, NC, 0)
    candidates = [(S0, q) for S0 in range(1, min(NC, 16) + 1) for q in range(0, 17)]
    candidates += [(-(-NC // m), 0) for m in range(1, min(limit, NC) + 1)]
    for S0, q in candidates:
        sizes = _group_sizes(S0, q, 4, NC)
        if len(sizes) <= limit:
            T = _modelled_end(sizes, ratio)
            if T < best[0]:
                best = (T, S0, q)
    return best[1], best[2], 4


#: The fused scan keeps to one group-kernel program per SM when that leaves this many groups.
MIN_GROUPS_PER_WAVE = 6


def _groups_per_wave(Q: torch.Tensor, programs_per_group: int) -> int | None:
    """The most groups whose group-kernel programs fit one per SM (0: too few; None: no limit).

    None in the interpreter and off CUDA; 0 where fewer than :data:`MIN_GROUPS_PER_WAVE` fit,
    and then the unfused scan runs. A program that shares its SM runs its steps ≈ 1.7× slower
    (3.1–3.3 against 1.8 µs on the H200, session 11): at n = 4096, B = 1, 10 groups of 16
    programs put 28 of the long groups' programs beside another for their first steps (0.0816
    against 0.0746 ms with 8 groups).
    With fewer groups the fused scan lost to the unfused one (batches: B = 2 and 4 at n = 4096
    took 0.137 and 0.255 ms fused, 0.112 and 0.193 unfused).
    """
    if INTERPRET or not Q.is_cuda:
        return None
    groups = _sm_count(Q.device.index) // programs_per_group
    return groups if groups >= MIN_GROUPS_PER_WAVE else 0


def _solve_scan(Q, K, V, lam, X, chunk: _Chunk, opt: _Scan):
    """The two-level scan solve (module docstring)."""
    C = chunk.size
    B, n, d = Q.shape
    e = V.shape[-1]
    NC = triton.cdiv(n, C)
    F = e + d
    DP = _pow2(d)
    BF = opt.block or 16
    ND, NU = triton.cdiv(d, BF), triton.cdiv(e, BF)  # column tiles of P and of U
    NFT = ND + NU
    per_wave = _groups_per_wave(Q, B * NFT)
    fused = opt.fused and per_wave != 0
    if fused and opt.ratio is not None and opt.group_size is None:
        S0, RNUM, RDEN = _chain_schedule(NC, opt.ratio, per_wave)
    else:
        # balance the two sequential parts: a group step costs ≈ 4·C·d per column, a state
        # step ≈ 2·d² per column, so GS ≈ √(NC · d / 2C) chunks per group
        S0, RNUM, RDEN = opt.group_size or max(1, round(math.sqrt(NC * d / (2 * C)))), 0, 1
    NG = len(_group_sizes(S0, RNUM, RDEN, NC))
    warps = opt.warps or 4
    NS = opt.slices or max(1, min(4, DP // 16))
    if C >= 64 and BF == 16 and warps == 8 and opt.precision != "ieee":
        raise ValueError(
            "chunk_size=64 with scan_block=16 and 8 scan warps gives wrong tensor-core products "
            "on the H100 with Triton 3.6 (module docstring); use scan_block=32 or scan_warps=4"
        )
    fused = fused and NG > 1
    W = torch.empty(B, n, F, dtype=torch.float32, device=Q.device)
    Wg = torch.empty_like(W)
    Sg = torch.empty(B, NG, d, F, dtype=torch.float32, device=Q.device)
    # fused: [done (2, NG, B) | pad | Z] in one buffer, which the chunk kernel zeroes (the
    # flags) and fills with SENTINEL (Z: not yet written)
    n_zero = 32 * triton.cdiv(2 * NG * B, 32)
    scratch = torch.empty(n_zero + B * NG * d * e, dtype=torch.int32, device=Q.device)
    done = scratch[:n_zero]
    Z = scratch[n_zero:].view(torch.float32).view(B, NG, d, e)
    init = (scratch, n_zero) if fused else None
    _chunk_pass(
        chunk,
        Q,
        K,
        lam,
        V=V,
        P=W[..., e:],
        U=W,
        BE=32,
        scratch=init,
        whole=opt.chunk_whole and e <= 128,
    )
    pdl_on = use_pdl(Q)
    pdl = _pdl_flags(pdl_on)  # every launch after the chunk kernel waits for the one before
    _tri_group_sliced_kernel[(NG, NFT, B)](
        W,
        K,
        Wg,
        Sg,
        Z,
        done,
        n,
        d,
        e,
        F,
        NC,
        NG,
        ND,
        S0,
        RNUM,
        RDEN,
        W.stride(0),
        W.stride(1),
        K.stride(0),
        K.stride(1),
        Sg.stride(0),
        Sg.stride(1),
        Z.stride(0),
        Z.stride(1),
        BC=C,
        BF=BF,
        DP=DP,
        PREC=opt.precision,
        NS=NS,
        FUSED=fused,
        SLEEP=not INTERPRET,
        num_warps=warps,
        trace_ptr=opt.trace,
        TRACE=opt.trace is not None,
        **({} if opt.group_stages is None else {"num_stages": opt.group_stages}),
        **pdl,
    )
    if NG == 1:
        X.copy_(Wg[..., :e])
        return X
    BE = opt.state_block or 32
    NE = triton.cdiv(e, BE)
    if fused:
        # no griddepcontrol.wait: the flags and sentinels order every access (docstrings)
        trace = opt.trace
        _, correct_at, _ = _trace_layout(NG, NFT, NC, NE)
        _tri_chain_correct_kernel[(NE, NC, B)](
            Wg,
            Z,
            X,
            done,
            n,
            d,
            e,
            NC,
            NG,
            ND,
            NU,
            S0,
            RNUM,
            RDEN,
            Wg.stride(0),
            Wg.stride(1),
            Z.stride(0),
            Z.stride(1),
            X.stride(0),
            X.stride(1),
            BC=C,
            BE=BE,
            DP=DP,
            PREC=opt.precision,
            SLEEP=not INTERPRET,
            num_warps=4,
            trace_ptr=None if trace is None else trace[correct_at:],
            TRACE=trace is not None,
            **({"launch_pdl": True} if pdl_on else {}),
        )
        return X
    _tri_state_kernel[(NE, B)](
        Sg,
        Z,
        d,
        e,
        F,
        NG,
        Sg.stride(0),
        Sg.stride(1),
        Z.stride(0),
        Z.stride(1),
        BE=BE,
        DP=DP,
        PREC=opt.precision,
        num_warps=opt.state_warps or 8,
        **pdl,
    )
    BEc = 32
    _tri_correct_kernel[(NC, triton.cdiv(e, BEc), B)](
        Wg,
        Z,
        X,
        n,
        d,
        e,
        NC,
        S0,
        RNUM,
        RDEN,
        Wg.stride(0),
        Wg.stride(1),
        Z.stride(0),
        Z.stride(1),
        X.stride(0),
        X.stride(1),
        BC=C,
        BE=BEc,
        DP=DP,
        PREC=opt.precision,
        num_warps=4,
        **pdl,
    )
    return X


def _group_start_host(g: int, S0: int, RNUM: int, RDEN: int, NC: int) -> int:
    """:func:`_group_start` on the host."""
    return min(g * S0 + (g * (g - 1) * RNUM) // (2 * RDEN), NC)
