"""Real-space masks ``[z, y, x]`` / ``[y, x]`` centred at index D//2."""

from __future__ import annotations

import numpy as np


def soft_sphere_mask(box_size: int, radius_px: float, soft_edge_px: float = 5.0, ndim: int = 3,
                     xp=np):
    """1 inside ``radius_px``, raised-cosine fall-off to 0 over ``soft_edge_px`` pixels (float64).

    As RELION's ``softMaskOutsideMap``: ``0.5 + 0.5·cos(π (r − radius) / soft_edge)`` on the edge.
    """
    c = xp.arange(box_size) - box_size // 2
    grids = xp.meshgrid(*([c] * ndim), indexing="ij")
    r = xp.sqrt(sum(g.astype(xp.float64) ** 2 for g in grids))
    edge = xp.clip((r - radius_px) / max(soft_edge_px, 1e-12), 0.0, 1.0)
    return 0.5 + 0.5 * xp.cos(np.pi * edge)
