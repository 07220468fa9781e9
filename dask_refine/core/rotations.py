"""Rotations: RELION ZYZ Euler angles ↔ 3×3 matrices, and uniformly random rotations.

Matrices follow RELION's ``Euler_angles2matrix`` (src/euler.cpp): a 2D Fourier pixel ``(x, y)``
of a projection samples the 3D transform at ``Aᵀ (x, y, 0)``, and the real-space projection is
``∫ V(Aᵀ r) dz``. Angles are in degrees only here, at the I/O boundary; internally rotations are
``(..., 3, 3)`` matrices.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module


def euler_to_matrix(rot_deg, tilt_deg, psi_deg):
    """RELION ``Euler_angles2matrix``: ZYZ angles in degrees → rotation matrices ``(..., 3, 3)``.

    Inputs broadcast against each other; the output has their broadcast shape plus ``(3, 3)``.
    """
    xp = array_module(rot_deg, tilt_deg, psi_deg)
    a, b, g = (xp.deg2rad(xp.asarray(v, dtype=xp.float64)) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = xp.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler(matrices):
    """RELION ``Euler_matrix2angles``: rotation matrices ``(..., 3, 3)`` → (rot, tilt, psi) in degrees.

    Returns three arrays of shape ``(...)``; tilt is in [0, 180]. At the poles (tilt 0 or 180)
    rot is set to 0 and the whole in-plane angle goes into psi, as RELION does.
    """
    xp = array_module(matrices)
    A = xp.asarray(matrices, dtype=xp.float64)
    abs_sb = xp.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    gamma = xp.arctan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = xp.arctan2(A[..., 2, 1], A[..., 2, 0])
    beta = xp.arctan2(abs_sb, A[..., 2, 2])  # sign_sb = +1 branch: tilt in [0, π]
    north = A[..., 2, 2] > 0
    gamma_pole = xp.where(north, xp.arctan2(-A[..., 1, 0], A[..., 0, 0]),
                          xp.arctan2(A[..., 1, 0], -A[..., 0, 0]))
    alpha = xp.where(regular, alpha, 0.0)
    beta = xp.where(regular, beta, xp.where(north, 0.0, np.pi))
    gamma = xp.where(regular, gamma, gamma_pole)
    return xp.rad2deg(alpha), xp.rad2deg(beta), xp.rad2deg(gamma)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly from SO(3) (Haar measure), float64 ``(n, 3, 3)``.

    Uses normalised 4-D Gaussian vectors as unit quaternions (Shoemake 1992).
    """
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return quaternion_to_matrix(q)


def quaternion_to_matrix(q):
    """Unit quaternions ``(..., 4)`` as (w, x, y, z) → rotation matrices ``(..., 3, 3)``."""
    xp = array_module(q)
    w, x, y, z = (q[..., i] for i in range(4))
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def angular_distance_deg(rotations_a, rotations_b):
    """Geodesic angle in degrees between pairs of rotations ``(..., 3, 3)``: acos((tr(AᵀB) − 1)/2)."""
    xp = array_module(rotations_a, rotations_b)
    trace = xp.einsum("...ij,...ij->...", rotations_a, rotations_b)
    return xp.rad2deg(xp.arccos(xp.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
