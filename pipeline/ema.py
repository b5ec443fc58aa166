"""An exponential moving average of the trained weights. DGPO's Algorithm 1 keeps one ("EMA decay mu
(optional)") as its online sampling model; offline there is no sampling, so here the average is the model that
is exported, evaluated and selected.

float32 copies of the trainable parameters, updated after every optimiser step: e <- mu e + (1 - mu) w. Under
ZeRO stages 0-2 every rank holds the full parameters, so every rank keeps the same EMA and checkpoints carry it
in DeepSpeed's client state; ZeRO-3 (partitioned parameters) is refused by the config check.
"""
from __future__ import annotations

import torch


class WeightEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: v.cpu() for n, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
            raise ValueError(f"EMA state does not fit the model: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")
        for n, v in state.items():
            self.shadow[n].copy_(v)

    def over(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full module state dict with the averaged values in place of the trained parameters."""
        return averaged(state, self.shadow)


def averaged(state: dict[str, torch.Tensor], shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the averages of `shadow` (a WeightEMA's, or as a checkpoint stores it) in place of its
    trained entries, each in the entry's dtype; buffers and frozen weights as they are."""
    return {k: (shadow[k].to(v.dtype) if k in shadow else v) for k, v in state.items()}


@torch.no_grad()
def update_module_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """e <- decay e + (1 - decay) w for a whole-module copy (the toy recipes keep one beside the model)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
