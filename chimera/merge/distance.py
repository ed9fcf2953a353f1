"""Normalized distances between two parents' versions of a tensor (threshold delta, `chimera diff`).

On dequantized float32 values A (a parent) and B (the base), accumulated in float64 over row chunks
(converted to float64 a tile of TILE elements at a time, so the temporaries stay a few MB whatever
the chunk):

    relative   d = ||A - B||_F / ||B||_F
    symmetric  d = 2 ||A - B||_F / (||A||_F + ||B||_F)
    rms        d = ||A - B||_F / sqrt(numel)

With more than two parents the merge uses the largest distance of any parent to the base.
Identical tensors give 0; a zero denominator gives 0 if A == B, else inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TILE = 1 << 18  # elements per float64 tile (2 MB)


@dataclass
class Norms:
    """Running sums of squares: ||A-B||^2, ||A||^2, ||B||^2 and the element count."""

    diff2: float = 0.0
    a2: float = 0.0
    b2: float = 0.0
    numel: int = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1), b.reshape(-1)
        for i in range(0, a.numel(), TILE):
            a64, b64 = a[i:i + TILE].to(torch.float64), b[i:i + TILE].to(torch.float64)   # [TILE]
            self.a2 += float(torch.dot(a64, a64))
            self.b2 += float(torch.dot(b64, b64))
            d = a64.sub_(b64)
            self.diff2 += float(torch.dot(d, d))
        self.numel += a.numel()

    def distance(self, metric: str) -> float:
        diff = math.sqrt(self.diff2)
        if metric == "relative":
            den = math.sqrt(self.b2)
        elif metric == "symmetric":
            den = (math.sqrt(self.a2) + math.sqrt(self.b2)) / 2
        elif metric == "rms":
            den = math.sqrt(self.numel)
        else:
            raise ValueError(f"unknown metric {metric}")
        if den == 0:
            return 0.0 if diff == 0 else math.inf
        return diff / den


def distance(a: torch.Tensor, b: torch.Tensor, metric: str = "relative") -> float:
    """Distance of two whole tensors (see module docstring)."""
    n = Norms()
    n.add(a, b)
    return n.distance(metric)
