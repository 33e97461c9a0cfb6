r"""Newton–Schulz polynomial schedules.

Every Newton–Schulz method in :mod:`matfn` iterates ``X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X`` with a
per-step triple ``(a, b, c)``. On the singular values this is the scalar map
``x ↦ p_t(x) = a x + b x³ + c x⁵``, so a schedule is judged by the composition
``f = p_T ∘ … ∘ p_1`` on ``[ℓ, 1]`` (docs/math.md §1.2–1.3).

Schedules here:

* ``keller``: Keller Jordan's fixed quintic ``(3.4445, −4.7750, 2.0315)``.
* ``tuned``: Su Jianlin's per-step tables (Ours-X3 for 5 steps, Ours-X for 6).
* ``polar_express``: the greedy minimax (Remez) quintics of Amsel et al., generated for any step
  count and lower bound by :func:`polar_express_coefficients` and cached.
* ``cubic``: the classic ``(1.5, −0.5)``.
* ``polar_express_modded`` and ``youjiacheng``: fixed published tables (:data:`NAMED_TABLES`).

Any per-step table ``[(a, b, c), …]`` runs as well (``msign(M, method=table)``); it is checked by
:func:`check_table` and normalised by ``‖M‖_F`` alone, as ``torch.optim.Muon`` does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Literal, TypeAlias

import numpy as np

from ._validation import check_real

__all__ = [
    "KELLER",
    "CUBIC",
    "CONVERGENT_QUINTIC",
    "TUNED_5",
    "TUNED_6",
    "POLAR_EXPRESS_MODDED",
    "YOUJIACHENG_6",
    "NAMED_TABLES",
    "NAME_FACTORS",
    "DEFAULT_STEPS",
    "MAX_TABLE_ROWS",
    "Coefficients",
    "Table",
    "MethodName",
    "Method",
    "check_table",
    "check_table_steps",
    "polar_express_coefficients",
    "schedule",
    "scalar_map",
    "max_scalar_error",
    "auto_schedule",
]

Coefficients: TypeAlias = tuple[float, float, float]
#: A validated per-step table: one float triple per step (hashable, so it can key a CUDA graph).
Table: TypeAlias = tuple[Coefficients, ...]
#: The named schedules (``msign`` also takes ``"svd"``, the exact result).
MethodName = Literal[
    "polar_express", "tuned", "keller", "cubic", "polar_express_modded", "youjiacheng"
]
#: What ``method=`` accepts: a name, or a per-step table ``[(a, b, c), …]``.
Method: TypeAlias = MethodName | Sequence[tuple[float, float, float]]
#: Longest table accepted: a longer one is more likely a mistake than a schedule (the longest
#: ``steps="auto"`` schedule, float64, has 15 steps).
MAX_TABLE_ROWS = 99

#: Keller Jordan's quintic (kellerjordan.github.io/posts/muon); maximises the slope at 0, does
#: not converge to 1 (fixed points 0.868 and 1.264): after 5 steps ``[0.01, 1]`` maps into
#: ``[0.68, 1.13]``.
KELLER: Coefficients = (3.4445, -4.7750, 2.0315)
#: The classic cubic Newton–Schulz step ``1.5 x − 0.5 x³``.
CUBIC: Coefficients = (1.5, -0.5, 0.0)
#: The quintic with fixed point 1 and zero first and second derivative there (cubic convergence).
CONVERGENT_QUINTIC: Coefficients = (15 / 8, -10 / 8, 3 / 8)

#: Su's "Ours-X3" 5-step table (kexue.fm/archives/10922): max |f − 1| = 0.050 on [1e-2, 1].
TUNED_5: tuple[Coefficients, ...] = (
    (4.6182, -12.9582, 9.3299),
    (3.8496, -7.9585, 4.3052),
    (3.5204, -7.2918, 4.0606),
    (3.2067, -6.8243, 4.2802),
    (3.2978, -5.7848, 3.8917),
)
#: Su's "Ours-X" (k = 50) 6-step table, numbers /1024: max |f − 1| = 0.025 on [1e-3, 1].
TUNED_6: tuple[Coefficients, ...] = tuple(
    (a / 1024, b / 1024, c / 1024)
    for a, b, c in (
        (4140, -7553, 3571),
        (3892, -6637, 2973),
        (3668, -6456, 3021),
        (3248, -6211, 3292),
        (2792, -5759, 3796),
        (3176, -5507, 4048),
    )
)

#: The 5-step Polar-Express table of modded-nanogpt's Muon (github.com/KellerJordan/modded-nanogpt,
#: ``train_gpt.py``), used there with the input divided by ``1.02·‖M‖_F``: the greedy minimax
#: quintics of Amsel et al. (arXiv:2505.16932) for ℓ = 1e-3 with safety factor 1.02 and cushion
#: 0.02, i.e. ``polar_express_coefficients(5, 1e-3, 1.02, 0.02)`` (docs/math.md §1.3(d), table
#: PE-modded). With that normalisation ``[1e-3, 1]`` maps into ``[0.847, 1.141]``.
POLAR_EXPRESS_MODDED: Table = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
#: You Jiacheng's 6-step table, numbers /1024, found by numerically optimising the composed
#: scalar map with an added stability term (x.com/YouJiacheng/status/1893704552689303901; the
#: optimiser: gist.github.com/YouJiacheng/393c90cbdc23b09d5688815ba382288b), used with
#: ``X₀ = M/‖M‖_F``. It maps ``[1e-3, 1]`` into ``[0.866, 0.9994]`` and ``[2e-3, 1]`` into
#: ``[0.9956, 0.9994]``: it approaches 1 from below.
YOUJIACHENG_6: Table = tuple(
    (a / 1024, b / 1024, c / 1024)
    for a, b, c in (
        (3955, -8306, 5008),
        (3735, -6681, 3463),
        (3799, -6499, 3211),
        (4019, -6385, 2906),
        (2677, -3029, 1162),
        (2172, -1833, 682),
    )
)
#: Fixed published tables selectable by name (``method="polar_express_modded"`` etc.). Each runs
#: with exactly its own length of steps and with its source's input normalisation
#: (:data:`NAME_FACTORS`).
NAMED_TABLES: Mapping[str, Table] = {
    "polar_express_modded": POLAR_EXPRESS_MODDED,
    "youjiacheng": YOUJIACHENG_6,
}
#: ``sf`` in ``X₀ = M / (sf·‖M‖_F)`` per named method; 1 for the others and for tables.
NAME_FACTORS: Mapping[str, float] = {"polar_express": 1.01, "polar_express_modded": 1.02}

#: Default step count per method (``steps=None``).
DEFAULT_STEPS: dict[str, int] = {
    "polar_express": 5,
    "tuned": 5,
    "keller": 5,
    "cubic": 12,
    **{name: len(table) for name, table in NAMED_TABLES.items()},
}


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_table(table: object, name: str = "method") -> Table:
    """Validate a per-step table ``[(a, b, c), …]`` and return it as a tuple of float triples.

    Parameters
    ----------
    table : sequence of (a, b, c)
        One triple of finite real numbers per step (step ``t`` maps ``x ↦ a x + b x³ + c x⁵``),
        1 to :data:`MAX_TABLE_ROWS` rows; a list, a tuple or a ``(T, 3)`` numpy array.
    name : str
        The argument's name, quoted in the messages (``"method"``, ``"ns_coefficients"``).

    Returns
    -------
    tuple of (float, float, float)
        The same values as Python floats: hashable, so a CUDA graph's key can hold it.

    Raises
    ------
    TypeError
        Not a sequence of sequences of real numbers (e.g. a string, a dict, a tensor entry, a
        bool or complex value).
    ValueError
        No rows, :data:`MAX_TABLE_ROWS` + 1 rows or more, a row that is not a triple, a NaN or
        infinite entry.
    """
    if isinstance(table, np.ndarray):
        table = table.tolist()
    if isinstance(table, (str, bytes)) or not isinstance(table, Sequence):
        raise TypeError(
            f"`{name}` must be a method name or a sequence of (a, b, c) triples, "
            f"got {type(table).__name__}"
        )
    if not 1 <= len(table) <= MAX_TABLE_ROWS:
        raise ValueError(
            f"`{name}` must have 1 to {MAX_TABLE_ROWS} rows (one (a, b, c) per step), "
            f"got {len(table)}"
        )
    rows = []
    for t, row in enumerate(table):
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(
                f"`{name}` row {t} must be an (a, b, c) triple, got {type(row).__name__}"
            )
        if len(row) != 3:
            raise ValueError(f"`{name}` row {t} must have 3 entries (a, b, c), got {len(row)}")
        if not all(_is_real(v) for v in row):
            raise TypeError(f"`{name}` row {t} must hold real numbers, got {tuple(row)!r}")
        values = tuple(float(v) for v in row)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"`{name}` row {t} must be finite, got {values!r}")
        rows.append(values)
    return tuple(rows)


def _poly(coeffs: Coefficients, x: float) -> float:
    return sum(v * x ** (2 * i + 1) for i, v in enumerate(coeffs))


def _optimal_quintic(lower: float, upper: float) -> Coefficients:
    """Minimax odd quintic for the constant 1 on ``[lower, upper]`` (simplified Remez).

    The optimum equioscillates at ``lower`` (value ``1 − E``), its two interior critical points
    (``1 + E``, ``1 − E``) and ``upper`` (``1 + E``); alternate between solving that 4×4 linear
    system for ``(a, b, c, E)`` and moving the interior points to the roots of ``p′``.
    """
    if lower / upper >= 1 - 5e-6:
        return (15 / 8 / upper, -10 / 8 / upper**3, 3 / 8 / upper**5)
    # Arithmetic mirrors the authors' reference code operation for operation: near-degenerate
    # intervals make the 4×4 system ill-conditioned and the published tables are its output.
    lo, hi = lower, upper
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err, err_prev = math.inf, None
    for _ in range(1000):
        if err_prev is not None and abs(err_prev - err) <= 1e-15:
            break
        err_prev = err
        system = np.array(
            [
                [lo, lo**3, lo**5, 1],
                [q, q**3, q**5, -1],
                [r, r**3, r**5, 1],
                [hi, hi**3, hi**5, -1],
            ]
        )
        a, b, c, err = np.linalg.solve(system, np.ones(4))
        disc = 9 * b**2 - 20 * a * c
        roots = (-3 * b + np.array([-1, 1]) * math.sqrt(max(disc, 0.0))) / (10 * c)
        if disc < 0 or not np.all(roots > 0):
            # A nearly degenerate interval (ℓ/u → 1) makes the 4×4 system singular to working
            # precision; the limit of the minimax quintic there is the convergent one.
            return (15 / 8 / upper, -10 / 8 / upper**3, 3 / 8 / upper**5)
        q, r = np.sqrt(roots)
    return (float(a), float(b), float(c))


@lru_cache(maxsize=256)
def _polar_express_cached(
    steps: int, lower: float, safety: float, cushion: float
) -> tuple[Coefficients, ...]:
    upper = 1.0
    out = []
    for t in range(steps):
        fit_lower = max(lower, cushion * upper) if cushion > 0 else lower
        coeffs = _optimal_quintic(fit_lower, upper)
        if cushion * upper > lower:
            # Fitted on [λu, u]; recentre so the true interval [ℓ, u] is centred on 1.
            gamma = 2 / (_poly(coeffs, lower) + _poly(coeffs, upper))
            coeffs = tuple(gamma * v for v in coeffs)
        if t < steps - 1:
            # p(x / sf): a singular value slightly above u (rounding) cannot blow up. The last
            # step stays unscaled so that the limit fixed point is exactly 1.
            coeffs = tuple(v / safety ** (2 * i + 1) for i, v in enumerate(coeffs))
        out.append(tuple(float(v) for v in coeffs))
        lower = _poly(coeffs, lower)
        upper = 2 - lower
        lower = min(lower, upper)
    return tuple(out)


def polar_express_coefficients(
    steps: int,
    lower: float = 1e-3,
    safety: float = 1.01,
    cushion: float = 0.02,
) -> list[Coefficients]:
    r"""Polar-Express schedule: the greedy minimax odd quintics for ``steps`` steps.

    Step ``t`` is the minimax odd quintic approximating 1 on the current interval
    ``[ℓ_t, u_t]`` (``ℓ_1 = lower``, ``u_1 = 1``); its image defines the next interval,
    ``ℓ_{t+1} = p_t(ℓ_t)``, ``u_{t+1} = 2 − ℓ_{t+1}``. Amsel et al. prove this greedy choice is
    optimal among all compositions of ``steps`` quintics. Two finite-precision changes follow the
    authors' code (docs/math.md §1.3(d)):

    * **cushion** ``λ``: fit on ``[max(ℓ_t, λ u_t), u_t]`` and rescale by
      ``2 / (p(ℓ_t) + p(u_t))`` so the first steps do not crush values near 1;
    * **safety** ``sf``: every step but the last is ``p(x / sf)``, i.e. ``(a/sf, b/sf³, c/sf⁵)``.
      Use the same factor in the input normalisation ``X₀ = M / (sf ‖M‖_F)``.

    Parameters
    ----------
    steps : int
        Number of quintic steps ``T ≥ 1``. A safety-factored table depends on ``T`` (the last step
        is unscaled), so it is built for exactly this ``T``.
    lower : float
        The smallest normalised singular value ``ℓ`` in ``(0, 1)`` the schedule must lift.
    safety : float
        The factor ``sf ≥ 1``, finite. ``1.0`` disables it.
    cushion : float
        ``λ`` in ``[0, 1)``; ``0`` gives the plain minimax composition.

    Returns
    -------
    list of (a, b, c)
        One triple per step, float64 values.

    Notes
    -----
    Cost: ``steps`` 4×4 Remez solves, cached per argument tuple. ``(5, 1e-3, 1.02, 0.02)`` gives
    the 5-step table of modded-nanogpt; ``(8, 1e-3, 1.0, 0.02407327424182761)`` the raw
    published table (both to 1e-13). With the defaults, ``T = 8`` converges to 1 within 1e-15 on
    ``[1e-3, 1]`` in float64; ``T = 5`` leaves max ``|f − 1| ≈ 0.14`` there.

    References
    ----------
    N. Amsel, D. Persson, C. Musco, R. M. Gower, "The Polar Express: Optimal Matrix Sign Methods
    and Their Application to the Muon Algorithm", arXiv:2505.16932 (2025);
    Su Jianlin, kexue.fm/archives/10996.

    Examples
    --------
    >>> import matfn
    >>> a, b, c = matfn.polar_express_coefficients(5, lower=1e-3, safety=1.02)[0]
    >>> round(a, 6), round(b, 6), round(c, 6)
    (8.156555, -22.483293, 15.87877)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}")
    lower = check_real(lower, "lower", low=0.0, high=1.0, low_open=True, high_open=True)
    safety = check_real(safety, "safety", low=1.0)
    cushion = check_real(cushion, "cushion", low=0.0, high=1.0, high_open=True)
    return list(_polar_express_cached(steps, lower, safety, cushion))


def schedule(method: Method, steps: int | None) -> tuple[list[Coefficients], float]:
    """Coefficients for ``steps`` steps of ``method`` and the input normalisation factor.

    The iteration starts from ``X₀ = M / (factor · ‖M‖_F)``. ``method`` is a name or a per-step
    table; a table (and a name of :data:`NAMED_TABLES`) runs exactly its rows with factor
    :data:`NAME_FACTORS` (1 for a table), so ``steps`` must then be None or the table's length.
    ``steps=None`` is :data:`DEFAULT_STEPS` for the other names.

    Raises
    ------
    ValueError
        Unknown method, non-positive ``steps``, ``steps`` not the length of a table, or
        ``tuned`` with fewer than 5 steps (the published tables have 5 and 6 steps; longer runs
        append the convergent quintic ``(15/8, −10/8, 3/8)``).
    TypeError
        A table that is not a sequence of real triples (:func:`check_table`).
    """
    if not isinstance(method, str):
        table = check_table(method)
        check_table_steps(table, steps)
        return list(table), 1.0
    if method in NAMED_TABLES:
        check_table_steps(NAMED_TABLES[method], steps, method)
        return list(NAMED_TABLES[method]), NAME_FACTORS.get(method, 1.0)
    if steps is None and method in DEFAULT_STEPS:
        steps = DEFAULT_STEPS[method]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, 'auto' or None, got {steps!r}")
    if method == "polar_express":
        return polar_express_coefficients(steps), 1.01
    if method == "keller":
        return [KELLER] * steps, 1.0
    if method == "cubic":
        return [CUBIC] * steps, 1.0
    if method == "tuned":
        if steps < 5:
            raise ValueError(
                f"method='tuned' has tables for 5 and 6 steps, got steps={steps}; "
                "use method='polar_express' for fewer steps"
            )
        base = TUNED_5 if steps == 5 else TUNED_6
        return list(base) + [CONVERGENT_QUINTIC] * (steps - len(base)), 1.0
    raise ValueError(
        f"`method` must be one of {', '.join(map(repr, DEFAULT_STEPS))}, 'svd' or a table "
        f"[(a, b, c), ...]; got {method!r}"
    )


def check_table_steps(table: Table, steps: object, name: str | None = None) -> None:
    """Raise ``ValueError`` unless ``steps`` is None or ``len(table)``.

    A table is a whole schedule: a prefix of a safety-factored table is not a schedule (its last
    step is scaled), and repeating rows has no published meaning, so neither is guessed.
    """
    if steps is None or (
        not isinstance(steps, bool) and isinstance(steps, int) and steps == len(table)
    ):
        return
    what = f"method={name!r}, a fixed table" if name else "the length of the table `method`"
    raise ValueError(f"`steps` must be None or {len(table)} ({what}), got {steps!r}")


def scalar_map(coeffs: list[Coefficients], x: np.ndarray | float) -> np.ndarray:
    """Apply the schedule to scalars in float64: ``f(x) = p_T(… p_1(x))``."""
    y = np.asarray(x, dtype=np.float64)
    for a, b, c in coeffs:
        y2 = y * y
        y = y * (a + y2 * (b + c * y2))
    return y


def max_scalar_error(coeffs: list[Coefficients], lower: float, upper: float = 1.0) -> float:
    """``max |f(x) − 1|`` over ``[lower, upper]`` on a dense log-spaced grid (float64)."""
    x = np.concatenate([np.geomspace(lower, upper, 4001), np.linspace(lower, upper, 4001)])
    return float(np.max(np.abs(scalar_map(coeffs, x) - 1)))


@lru_cache(maxsize=32)
def _auto_schedule_cached(lower: float, tol: float) -> tuple[Coefficients, ...]:
    for steps in range(1, 40):
        coeffs = polar_express_coefficients(steps, lower)
        # The input is divided by 1.01‖M‖_F, so the normalised σ lie in [lower/1.01, 1/1.01].
        if max_scalar_error(coeffs, lower / 1.01, 1 / 1.01) <= tol:
            return tuple(coeffs)
    raise ValueError(f"no Polar-Express schedule reaches tol={tol} from lower={lower}")


def auto_schedule(lower: float, tol: float) -> list[Coefficients]:
    """The shortest Polar-Express schedule whose scalar error on ``[lower, 1]`` is ≤ ``tol``.

    Used by ``steps="auto"``; docs/math.md §1.3(d) tabulates the resulting step counts
    (e.g. 8 steps for ``lower = 1e-3``, ``tol = 1e-12``).
    """
    return list(_auto_schedule_cached(float(lower), float(tol)))
