"""optim: a drop-in Muon optimizer for whole models, and QK-Clip."""

from .distributed import distributed_muon
from .muon import Muon, muon_param_groups
from .qk_clip import QKClip

__all__: list[str] = ["Muon", "muon_param_groups", "QKClip", "distributed_muon"]
