"""Real-space masks ``[z, y, x]`` / ``[y, x]`` centred at index D//2."""

from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy


def soft_sphere_mask(box_size: int, radius_px: float, soft_edge_px: float = 5.0, ndim: int = 3,
                     xp=np, centre_px=None):
    """1 inside ``radius_px``, raised-cosine fall-off to 0 over ``soft_edge_px`` pixels (float64).

    As RELION's ``softMaskOutsideMap``: ``0.5 + 0.5·cos(π (r − radius) / soft_edge)`` on the edge.
    ``centre_px``: the sphere's centre as offsets from the box centre, in array-axis order
    (``(z, y, x)``; default the box centre), as RELION's ``raisedCosineMask``.
    """
    c = xp.arange(box_size, dtype=xp.float64) - box_size // 2
    offsets = (0.0,) * ndim if centre_px is None else tuple(float(v) for v in centre_px)
    r2 = 0.0  # squared distance, summed axis by axis from broadcast 1-D terms
    for axis, o in enumerate(offsets):
        r2 = r2 + ((c - o) ** 2).reshape((-1,) + (1,) * (ndim - 1 - axis))
    edge = xp.clip((xp.sqrt(r2) - radius_px) / max(soft_edge_px, 1e-12), 0.0, 1.0)
    mask = xp.ones_like(edge)
    on_edge = edge > 0  # the cosine only where it is not 1
    mask[on_edge] = 0.5 + 0.5 * xp.cos(np.pi * edge[on_edge])
    return mask


def soft_mask_outside_map(volume, radius_px: float | None = None, soft_edge_px: float = 3.0):
    """Replace everything beyond ``radius_px`` (default D/2) by the background mean, as RELION's
    ``softMaskOutsideMap``: inside ``radius_px`` unchanged, beyond ``radius_px + soft_edge_px`` the
    raised-cosine-weighted mean of the outside, and a cosine blend between. Removes the corner
    noise and aliasing a Fourier reconstruction leaves outside the inscribed sphere.
    """
    xp = array_module(volume)
    box = volume.shape[0]
    radius = box / 2.0 if radius_px is None else float(radius_px)
    # weight of the background value: 0 inside radius, 1 beyond radius + edge
    blend = 1.0 - soft_sphere_mask(box, radius, soft_edge_px, volume.ndim, xp)
    outside = blend > 0
    background = (xp.sum(blend[outside] * volume[outside]) / xp.sum(blend[outside])
                  if bool(outside.any()) else 0.0)
    return (volume * (1.0 - blend) + blend * background).astype(volume.dtype)


def solvent_mask(volume, threshold: float, extend_px: float = 3.0, soft_edge_px: float = 6.0):
    """Soft solvent mask from a map, as ``relion_mask_create``: 1 where the map exceeds
    ``threshold`` and within ``extend_px`` pixels of it, then a raised-cosine fall-off to 0 over
    ``soft_edge_px`` pixels. Low-pass the map first (e.g. to 15 Å) so noise does not seed it.
    Returns float32 ``(D, D, D)`` in [0, 1]. CPU (SciPy distance transform).
    """
    from scipy import ndimage

    core = to_numpy(volume) > threshold
    if not core.any():
        raise ValueError(f"no voxel exceeds the mask threshold {threshold:g}")
    distance = ndimage.distance_transform_edt(~core)  # 0 inside, pixels to the core outside
    edge = np.clip((distance - extend_px) / max(soft_edge_px, 1e-12), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * edge)).astype(np.float32)
