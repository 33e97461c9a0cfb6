"""optim: a drop-in Muon optimizer for whole models, and QK-Clip."""

__all__: list[str] = []
