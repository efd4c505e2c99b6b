"""Helpers shared by the tests: the project root on sys.path, weight perturbation, relative error."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter (norm gains and biases included) away from its default init, so that a
    wiring bug (swapped norms, a missing bias, k/v swapped) cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        spread = p.float().std().item() if p.numel() > 1 else 0.0
        scale = 0.5 * spread if spread > 0 else 0.1
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, computed in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm()).item()
