"""Radial Fourier filters on real volumes/images (centred, see :mod:`.fourier`)."""

from __future__ import annotations

import numpy as np

from .backend import array_module
from .fourier import centred_irfftn, centred_rfftn, rfft_radius


def raised_cosine_lowpass(radius, cutoff, edge_width):
    """1 below ``cutoff − edge_width/2``, 0 above ``cutoff + edge_width/2``, raised cosine between.

    ``radius``, ``cutoff`` and ``edge_width`` in the same units (e.g. Fourier pixels).
    """
    xp = array_module(radius)
    lo = cutoff - 0.5 * edge_width
    t = xp.clip((radius - lo) / max(edge_width, 1e-12), 0.0, 1.0)
    return 0.5 * (1.0 + xp.cos(np.pi * t))


def lowpass_filter(volume, resolution_A: float, pixel_size_A: float, edge_width_px: float = 2.0,
                   ndim: int | None = None):
    """Low-pass a real map/image to ``resolution_A`` with a raised-cosine edge (RELION-like).

    The edge is ``edge_width_px`` Fourier pixels wide and centred on the cutoff shell
    ``D · pixel_size_A / resolution_A``. Returns an array of the input's dtype and shape.
    """
    ndim = volume.ndim if ndim is None else ndim
    box = volume.shape[-1]
    cutoff = box * pixel_size_A / resolution_A
    f = centred_rfftn(volume, ndim)
    f *= raised_cosine_lowpass(rfft_radius(box, ndim, array_module(volume)), cutoff, edge_width_px)
    return centred_irfftn(f, ndim, box).astype(volume.dtype)


def apply_shell_filter(volume, shell_values):
    """Multiply a real volume's transform by a per-shell value ``(D//2 + 1,)`` (0 beyond D/2).

    Shell of a coefficient = ``round(|k|)``; linear interpolation between shells is not applied,
    matching RELION's shell-wise FSC weighting.
    """
    xp = array_module(volume)
    box = volume.shape[-1]
    values = xp.asarray(np.append(np.asarray(shell_values, dtype=np.float64), 0.0))
    shells = xp.minimum(xp.rint(rfft_radius(box, 3, xp)).astype(xp.int64), len(values) - 1)
    f = centred_rfftn(volume, 3) * values[shells]
    return centred_irfftn(f, 3, box).astype(volume.dtype)
