r"""Muon's param groups: defaults, validation and normalisation, and the usual model split.

What :class:`optim.Muon` does to a param group before it steps: validate the hyper-parameters
(:func:`_check_hyper`, with the ``ns_coefficients`` triple-or-table check), store
``ns_coefficients``/``ns_steps`` resolved as torch.optim.Muon's keys (:func:`_resolve_ns_steps`),
resolve the ``betas`` alias of ``adamw_betas`` (:func:`_alias_betas`) and route the AdamW lr so
that LR schedulers scale it (:func:`_route_adamw_lr`, :func:`_adamw_lr`); the warning for
embedding-like matrices routed to Muon by ndim (:func:`looks_like_embedding`); and
:func:`muon_param_groups`, the usual Muon / AdamW split of a model. A leaf of
:mod:`optim.muon`, which re-exports the public names.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from matfn.functional import METHODS

from ._math import ADJUST_LR_FNS, DEFAULT_NS_STEPS, MAX_NS_STEPS, is_triple

__all__ = ["looks_like_embedding", "muon_param_groups"]

UPDATES = ("msign", "mclip")
#: AdamW betas when neither ``adamw_betas`` nor its alias ``betas`` is given.
DEFAULT_ADAMW_BETAS = (0.9, 0.95)
#: :func:`looks_like_embedding`: the long side of an embedding/head-like matrix is at least
#: this many rows (vocabulary sizes; hidden widths of 8192 are rare) ...
EMBEDDING_MIN_ROWS = 8192
#: ... and more than this many times the short side (an MLP's 4× expansion is not flagged).
EMBEDDING_MIN_ASPECT = 4
MATRIX_VIEWS = ("auto", "flatten", "batch")
NS_ALGORITHMS = ("auto", "standard", "gram")


# --------------------------------------------------------------------------------------------
# Validation and normalisation of a group
# --------------------------------------------------------------------------------------------


def _alias_betas(
    betas: tuple[float, float] | None, adamw_betas: tuple[float, float] | None
) -> tuple[float, float]:
    """``adamw_betas`` from it and its alias ``betas`` (torch.optim.AdamW's name)."""
    if betas is not None and adamw_betas is not None and tuple(betas) != tuple(adamw_betas):
        raise ValueError(
            "`betas` is an alias of `adamw_betas` (the built-in AdamW's betas; Muon's momentum "
            f"is `momentum`): pass one of them, got betas={betas!r}, adamw_betas={adamw_betas!r}"
        )
    chosen = betas if betas is not None else adamw_betas
    return DEFAULT_ADAMW_BETAS if chosen is None else chosen


def _resolve_ns_steps(group: dict[str, Any]) -> None:
    """Store ``ns_coefficients`` as floats and ``ns_steps`` resolved (torch's group keys).

    With one triple and ``ns_steps`` None, 5 steps run (torch's default); with a table, its
    length. Storing the number makes the group loadable by torch.optim.Muon.
    """
    coefficients = group["ns_coefficients"]
    if coefficients is None:
        return
    if is_triple(coefficients):
        group["ns_coefficients"] = tuple(float(v) for v in coefficients)
        steps = DEFAULT_NS_STEPS
    else:
        group["ns_coefficients"] = tuple(tuple(float(v) for v in row) for row in coefficients)
        steps = len(coefficients)
    if group["ns_steps"] is None:
        group["ns_steps"] = steps


def _route_adamw_lr(
    group: dict[str, Any], *, own_lr: bool, own_adamw_lr: bool, loading: bool = False
) -> None:
    """Make the group's AdamW lr one that LR schedulers scale (see :class:`Muon`).

    ``own_lr``/``own_adamw_lr``: whether the group itself (not the constructor's defaults) set
    ``lr``/``adamw_lr``. ``loading``: a group of a foreign (torch.optim.Muon) checkpoint, whose
    lr may be mid-schedule: the ratio is taken to its ``initial_lr``, and where that is 0 the
    AdamW lr stays constant instead of raising.
    """
    alr = group["adamw_lr"]
    if group["use_muon"] is not None and not group["use_muon"]:
        if alr is not None and (own_adamw_lr or not own_lr):
            if own_lr and own_adamw_lr and float(group["lr"]) != float(alr):
                raise ValueError(
                    "a use_muon=False group's lr is its AdamW lr: set `lr` or `adamw_lr`, not "
                    f"both (got lr={group['lr']!r}, adamw_lr={alr!r})"
                )
            group["lr"] = alr
        group["adamw_lr"] = None
        group["adamw_lr_ref"] = None
    elif group["use_muon"] is None and alr is not None and group["adamw_lr_ref"] is None:
        ref = float(group.get("initial_lr", group["lr"]) if loading else group["lr"])
        if loading and not ref > 0:
            return
        if not ref > 0:
            raise ValueError(
                "`adamw_lr` in a group routed by ndim follows the group's lr by ratio, which "
                f"needs lr > 0 (got lr={group['lr']!r}); put the AdamW parameters in a "
                "use_muon=False group with its own lr (muon_param_groups does)"
            )
        group["adamw_lr_ref"] = ref


def _adamw_lr(group: Mapping[str, Any]) -> float | Tensor:
    """The lr of a group's AdamW parameters this step (scaled with ``lr``; see :class:`Muon`)."""
    alr, ref = group["adamw_lr"], group.get("adamw_lr_ref")
    if alr is None:
        return group["lr"]
    if ref is None:
        return alr
    return alr * (group["lr"] / ref)  # exactly adamw_lr while lr is unscheduled (lr/ref = 1)


def looks_like_embedding(p: Tensor) -> bool:
    """Whether a matrix has an embedding's or output head's shape, ``(vocab, d)`` or its transpose.

    2-D with its long side at least :data:`EMBEDDING_MIN_ROWS` (8192) and more than
    :data:`EMBEDDING_MIN_ASPECT` (4) times the short side. Why: Muon's orthogonalised update
    suits hidden matrices; embeddings and heads train better on AdamW. A shape heuristic: a
    hidden matrix this elongated is flagged too, a small-vocabulary head is not.
    """
    if p.ndim != 2:
        return False
    long, short = max(p.shape), min(p.shape)
    return long >= EMBEDDING_MIN_ROWS and long > EMBEDDING_MIN_ASPECT * short


def _warn_embedding_like(groups: Iterable[Mapping[str, Any]], stacklevel: int) -> None:
    """Warn once for embedding-like matrices that ndim routing (``use_muon`` None) sends to Muon."""
    shapes = [
        tuple(p.shape)
        for g in groups
        if g["use_muon"] is None
        for p in g["params"]
        if looks_like_embedding(p)
    ]
    if shapes:
        warnings.warn(
            f"Muon: parameter(s) of shape {', '.join(map(str, shapes))} look like an embedding "
            "or output head (2-D, long side >= 8192 and > 4x the short side) and go to Muon "
            "because they are 2-D; those usually train better on AdamW: build the groups with "
            "optim.muon_param_groups(model), or put them in a group with use_muon=False "
            "(use_muon=True keeps them on Muon without this warning)",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _check_hyper(group: Mapping[str, Any]) -> None:
    """Validate one group's hyper-parameters (quoting the bad value, as torch.optim does)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor `lr` must have 1 element, got shape {tuple(lr.shape)}")
    elif not 0.0 <= lr:
        raise ValueError(f"`lr` must be >= 0, got {lr}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"`weight_decay` must be >= 0, got {group['weight_decay']}")
    for flag in ("batched", "cuda_graphs"):
        if not isinstance(group.get(flag, False), bool):
            raise ValueError(f"`{flag}` must be a bool, got {group[flag]!r}")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"`momentum` must lie in [0, 1), got {group['momentum']}")
    if not group["eps"] > 0:
        raise ValueError(f"`eps` must be > 0, got {group['eps']}")
    coeffs = group["ns_coefficients"]
    steps = group["ns_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"`ns_steps` must be a positive int or None, got {steps!r}")
    if steps is not None and steps >= MAX_NS_STEPS:
        raise ValueError(
            f"`ns_steps` must be < {MAX_NS_STEPS} (torch.optim.Muon's limit), got {steps}"
        )
    if coeffs is not None:
        _check_coefficients(coeffs, steps)
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(
            f"`adjust_lr_fn` must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}"
        )
    if group["msign"] not in METHODS:
        raise ValueError(f"`msign` must be one of {METHODS}, got {group['msign']!r}")
    if group["msign"] == "tuned" and steps is not None and steps < 5 and coeffs is None:
        raise ValueError(f"msign='tuned' needs ns_steps >= 5, got {steps}")
    if group["update"] not in UPDATES:
        raise ValueError(f"`update` must be one of {UPDATES}, got {group['update']!r}")
    if group["update"] == "mclip" and coeffs is not None:
        raise ValueError(
            "`ns_coefficients` applies to update='msign' only; choose the schedule of "
            "update='mclip' with `msign=`"
        )
    if not group["mclip_scale"] > 0:
        raise ValueError(f"`mclip_scale` must be > 0, got {group['mclip_scale']}")
    if group["ns_algorithm"] not in NS_ALGORITHMS:
        raise ValueError(
            f"`ns_algorithm` must be one of {NS_ALGORITHMS}, got {group['ns_algorithm']!r}"
        )
    dt = group["ns_dtype"]
    if dt is not None and dt not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"`ns_dtype` must be a floating dtype or None, got {dt!r}")
    if group["matrix_view"] not in MATRIX_VIEWS:
        raise ValueError(
            f"`matrix_view` must be one of {MATRIX_VIEWS}, got {group['matrix_view']!r}"
        )
    b1, b2 = group["adamw_betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"`adamw_betas` must lie in [0, 1), got {group['adamw_betas']!r}")
    if not group["adamw_eps"] >= 0:
        raise ValueError(f"`adamw_eps` must be >= 0, got {group['adamw_eps']}")
    wd = group["adamw_weight_decay"]
    if wd is not None and not wd >= 0:
        raise ValueError(f"`adamw_weight_decay` must be >= 0 or None, got {wd}")
    alr = group["adamw_lr"]
    if alr is not None and not isinstance(alr, Tensor) and not alr >= 0:
        raise ValueError(f"`adamw_lr` must be >= 0 or None, got {alr}")


def _check_coefficients(coeffs: object, steps: int | None) -> None:
    """Validate ``ns_coefficients`` (a triple or a per-step table) against ``ns_steps``."""
    table = not is_triple(coeffs)
    rows = coeffs if table else [coeffs]
    if table and (
        isinstance(coeffs, str | bytes | Tensor)
        or not isinstance(coeffs, Sequence)
        or not coeffs
        or not all(is_triple(row) for row in coeffs)
    ):
        raise ValueError(
            "`ns_coefficients` must be None, one (a, b, c) or a non-empty table "
            f"[(a₁, b₁, c₁), …] with one triple per step, got {coeffs!r}"
        )
    if not all(math.isfinite(float(v)) for row in rows for v in row):  # type: ignore[union-attr]
        raise ValueError(f"`ns_coefficients` must be finite, got {coeffs!r}")
    if table:
        n = len(coeffs)  # type: ignore[arg-type]
        if n >= MAX_NS_STEPS:
            raise ValueError(
                f"an `ns_coefficients` table must have < {MAX_NS_STEPS} rows (torch.optim.Muon's "
                f"step limit), got {n}"
            )
        if steps is not None and steps != n:
            raise ValueError(
                f"`ns_steps`={steps} does not match the {n}-step `ns_coefficients` table; pass "
                f"ns_steps=None or {n}"
            )


# --------------------------------------------------------------------------------------------
# Param-group helper
# --------------------------------------------------------------------------------------------

HEAD_NAMES = ("lm_head", "head", "output", "classifier", "fc_out", "out_proj_head")


def muon_param_groups(
    model: nn.Module,
    *,
    head_names: Iterable[str] = HEAD_NAMES,
    last_linear_to_adamw: bool = True,
    muon_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a Muon group and an AdamW group.

    AdamW gets: every parameter with ndim < 2 (biases, norm gains), every ``nn.Embedding`` /
    ``nn.EmbeddingBag`` weight, the output head (a module whose name's last component is in
    ``head_names``, and the last ``nn.Linear`` in registration order if
    ``last_linear_to_adamw``), and any weight shared (tied) with one of these. Muon gets the
    other ≥ 2-D parameters; ``nn.Conv1d`` weights go to a third group with
    ``matrix_view="flatten"``. Empty groups are dropped; frozen parameters are left out.

    Parameters
    ----------
    model : nn.Module
    head_names : iterable of str
        Module names (last dotted component) treated as the output head.
    last_linear_to_adamw : bool
        Treat the last ``nn.Linear`` as the head.
    muon_options, adamw_options : mapping, optional
        Extra keys for the Muon / AdamW groups (e.g. ``{"lr": 3e-4}`` for the AdamW group).

    Returns
    -------
    list of dict
        Param groups for :class:`Muon` (``use_muon`` set in each).
    """
    heads = set(head_names)
    adamw_ids: set[int] = set()
    conv1d_ids: set[int] = set()
    last_linear: nn.Linear | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            adamw_ids.add(id(module.weight))
        if isinstance(module, nn.Linear):
            last_linear = module
            if name.rsplit(".", 1)[-1] in heads:
                adamw_ids.update(id(p) for p in module.parameters(recurse=False))
        elif name and name.rsplit(".", 1)[-1] in heads:
            adamw_ids.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, nn.Conv1d):
            conv1d_ids.add(id(module.weight))
    if last_linear_to_adamw and last_linear is not None:
        adamw_ids.update(id(p) for p in last_linear.parameters(recurse=False))

    muon_params, conv1d_params, adamw_params = [], [], []
    # parameters() deduplicates tied weights; the id sets already hold the shared tensor
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in adamw_ids:
            adamw_params.append(p)
        elif id(p) in conv1d_ids:
            conv1d_params.append(p)
        else:
            muon_params.append(p)
    groups = []
    if muon_params:
        groups.append({"params": muon_params, "use_muon": True, **(muon_options or {})})
    if conv1d_params:
        groups.append(
            {
                "params": conv1d_params,
                "use_muon": True,
                "matrix_view": "flatten",
                **(muon_options or {}),
            }
        )
    if adamw_params:
        groups.append({"params": adamw_params, "use_muon": False, **(adamw_options or {})})
    return groups
