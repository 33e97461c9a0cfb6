"""optim: a drop-in Muon optimizer for whole models, and QK-Clip.

Modules: :mod:`optim.muon` (the :class:`Muon` class, the functional ``muon()`` and its torch
paths), :mod:`optim._groups` (param-group validation and normalisation, ``muon_param_groups``),
:mod:`optim._fused` (the CUDA path: Triton element-wise passes, bucket CUDA graphs),
:mod:`optim._math` (the update's shared math), :mod:`optim.distributed` (DDP / FSDP2
strategies), :mod:`optim.qk_clip` (:class:`QKClip`), :mod:`optim._qk_layout` (where its
registered rows live) and :mod:`optim.max_logit` (its statistic).
optim uses matfn through :mod:`matfn.functional` and, once a CUDA path runs, the kernel modules
:mod:`matfn.kernels.elementwise` and :mod:`matfn.kernels.max_logit` (through
:func:`matfn.functional.triton_module`), so
``import optim`` does not import Triton. Importing it registers the custom ops
``torch.ops.matfn.max_logits`` (:mod:`optim.max_logit`) and ``torch.ops.matfn.muon_orthogonalize``
(:mod:`optim._math`), through which ``torch.compile`` and ``torch.export`` trace QK-Clip's
statistic and the Muon step.
"""

from .distributed import distributed_muon
from .muon import Muon, muon_param_groups
from .qk_clip import QKClip

__all__: list[str] = ["Muon", "muon_param_groups", "QKClip", "distributed_muon"]
