"""Shared test helpers: relative error the way the report defines it."""
import torch


def rel_err(y, ref) -> float:
    y = torch.as_tensor(y).detach().double()
    ref = torch.as_tensor(ref).detach().double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
