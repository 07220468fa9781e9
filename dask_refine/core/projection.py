"""Fourier-slice projection and its exact adjoint, backprojection (trilinear, padded).

Layout: volumes are transformed once to the **centred rfft** of the zero-padded volume,
``volume_rfft`` of shape ``(P, P, P//2+1)`` with ``P = pad * D`` (see :mod:`.fourier`). Images are
centred rffts ``(N, D, D//2+1)``. Rotations are RELION matrices ``(N, 3, 3)``: the image Fourier
pixel (x, y) sits at ``pad * Aᵀ (x, y, 0)`` in the padded 3D grid (RELION ``Projector::project``,
``BackProjector::set2DFourierTransform``). Points with a negative x coordinate are read from / written
to their Hermitian mirror ``-p`` with the conjugate value; the z and y axes wrap periodically.

Only image pixels with ``|k| < r_max`` (default D/2, which excludes the Nyquist row and column) are
used. Insertion weighs the kx = 0 image column by 1/2 and :func:`symmetrize_hermitian_planes`
completes the x = 0 and x = P/2 planes, which makes insertion the exact adjoint of extraction with
respect to the real inner product of the full (Hermitian) transforms.

Trilinear interpolation in Fourier space multiplies real space by the kernel's transform
``g(r) = Π_axes sinc²(r_axis / P)``; :func:`gridding_correction` returns it (on the D-box), and
projection pre-divides the volume by it while reconstruction divides the result by it.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, kernels, scatter_add
from .fourier import (centred_irfftn, centred_rfftn, crop_centred, pad_centred,
                      rfft_frequencies)

#: Default Fourier padding factor (RELION's default too).
DEFAULT_PAD = 2


def gridding_correction(box_size: int, pad: int = DEFAULT_PAD, xp=np):
    """Real-space transform of the trilinear kernel on the D-box: ``(D, D, D)`` float64.

    ``g[z, y, x] = sinc²((z − D/2)/P) · sinc²((y − D/2)/P) · sinc²((x − D/2)/P)`` with ``P = pad·D``
    (the exact, separable form of RELION's radial ``griddingCorrect`` for TRILINEAR).
    """
    r = (xp.arange(box_size) - box_size // 2) / float(pad * box_size)
    s = xp.sinc(r) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def prepare_reference_rfft(volume, pad: int = DEFAULT_PAD):
    """Real volume ``(D, D, D)`` → padded centred rfft ``(P, P, P//2+1)`` ready for extraction.

    Steps: divide by the gridding correction, zero-pad to ``P = pad·D``, centred rfft.
    The transform keeps the input's precision (float32 → complex64, float64 → complex128).
    """
    xp = array_module(volume)
    box = volume.shape[-1]
    corrected = volume / gridding_correction(box, pad, xp).astype(volume.dtype)
    return centred_rfftn(pad_centred(corrected, pad * box, 3), 3)


def image_pixels(box_size: int, r_max: float | None = None, xp=np):
    """The image rfft pixels used by extraction/insertion.

    Returns ``(flat_index, kx, ky)``: flat indices into a ``(D, D//2+1)`` centred rfft and the
    pixel frequencies (Fourier pixels) of every pixel with ``kx² + ky² < r_max²``.
    ``r_max`` defaults to ``D / 2``.
    """
    r_max = box_size / 2 if r_max is None else float(r_max)
    ky, kx = rfft_frequencies(box_size, 2, xp)
    ky, kx = xp.broadcast_arrays(ky, kx)
    keep = (kx * kx + ky * ky) < r_max * r_max
    flat = xp.nonzero(keep.ravel())[0]
    return flat, kx.ravel()[flat], ky.ravel()[flat]


def _corners(rotations, kx, ky, pad: int, padded_size: int, real_dtype):
    """Trilinear corners of the points ``pad · Aᵀ (kx, ky, 0)`` in the padded rfft half-space.

    Returns ``(flat_idx, weights, mirrored)``: flat indices ``(N, M, 8)`` into the
    ``(P, P, P//2+1)`` array, trilinear weights ``(N, M, 8)`` and a bool ``(N, M)`` telling where
    the point was mirrored to ``-p`` (so the value is conjugated).
    """
    xp = array_module(rotations, kx)
    R = xp.asarray(rotations, dtype=real_dtype) * pad
    kx = kx.astype(real_dtype)
    ky = ky.astype(real_dtype)
    # point = Aᵀ (kx, ky, 0) = kx · A[0, :] + ky · A[1, :]
    px = kx[None, :] * R[:, 0, 0, None] + ky[None, :] * R[:, 1, 0, None]
    py = kx[None, :] * R[:, 0, 1, None] + ky[None, :] * R[:, 1, 1, None]
    pz = kx[None, :] * R[:, 0, 2, None] + ky[None, :] * R[:, 1, 2, None]
    return _half_space_corners(px, py, pz, padded_size)


def _half_space_corners(px, py, pz, padded_size: int):
    """Trilinear corners of points ``(px, py, pz)`` (padded index units, origin at 0) in a
    ``(P, P, P//2+1)`` half-space array: flat indices ``(..., 8)``, weights ``(..., 8)`` and where
    the point was mirrored to ``-p`` (its value is then the conjugate)."""
    xp = array_module(px)
    real_dtype = px.dtype
    mirrored = px < 0
    sign = xp.where(mirrored, -1.0, 1.0).astype(real_dtype)
    px, py, pz = px * sign, py * sign, pz * sign
    x0, y0, z0 = xp.floor(px), xp.floor(py), xp.floor(pz)
    fx, fy, fz = px - x0, py - y0, pz - z0
    half = padded_size // 2
    h = half + 1
    x0 = x0.astype(xp.int64)
    y0 = y0.astype(xp.int64) + half
    z0 = z0.astype(xp.int64) + half
    idx = []
    wts = []
    for dz in (0, 1):
        zi = (z0 + dz) % padded_size
        wz = fz if dz else 1 - fz
        for dy in (0, 1):
            yi = (y0 + dy) % padded_size
            wy = fy if dy else 1 - fy
            for dx in (0, 1):
                idx.append((zi * padded_size + yi) * h + (x0 + dx))
                wts.append(wz * wy * (fx if dx else 1 - fx))
    return xp.stack(idx, axis=-1), xp.stack(wts, axis=-1), mirrored


def sample_half_space(volume_rfft, points):
    """Trilinear samples of a padded half-space array at 3D points ``(M, 3)`` ordered (x, y, z)
    in padded index units, conjugated where the point lies in the other half (RELION's
    ``LIN_INTERP`` with ``is_neg_x``). Points must lie within the padded box."""
    xp = array_module(volume_rfft)
    pts = xp.asarray(points, dtype=xp.float64)
    idx, w, mirrored = _half_space_corners(pts[:, 0], pts[:, 1], pts[:, 2], volume_rfft.shape[0])
    vals = (volume_rfft.ravel()[idx] * w).sum(axis=-1)
    if xp.iscomplexobj(vals):
        vals = xp.where(mirrored, vals.conj(), vals)
    return vals.astype(volume_rfft.dtype)


def _batches(n: int, batch: int):
    for start in range(0, n, batch):
        yield slice(start, min(start + batch, n))


def extract_central_slices_rfft(volume_rfft, rotations, box_size: int,
                                r_max: float | None = None, batch_size: int = 64,
                                kernel: str = "auto"):
    """Central slices of a padded centred rfft volume: the projections' image rffts.

    ``volume_rfft``: ``(P, P, P//2+1)`` complex from :func:`prepare_reference_rfft`;
    ``rotations``: ``(N, 3, 3)``. Returns ``(N, D, D//2+1)`` complex of the volume's dtype, zero
    outside ``|k| < r_max``. Matches RELION ``Projector::project`` (TRILINEAR).
    ``kernel``: ``"auto"`` uses the compiled kernel of the array's backend (Numba on CPU, CUDA
    on CuPy; :func:`.backend.kernels`), ``"numpy"`` the array-module reference (gathers and
    scatter-adds that run on either backend), ``"numba"``/``"cuda"`` require one kernel.
    """
    xp = array_module(volume_rfft)
    padded = volume_rfft.shape[0]
    pad = padded // box_size
    real_dtype = xp.float32 if volume_rfft.dtype == xp.complex64 else xp.float64
    flat_pix, kx, ky = image_pixels(box_size, r_max, xp)
    n = rotations.shape[0]
    out = xp.zeros((n, box_size * (box_size // 2 + 1)), dtype=volume_rfft.dtype)
    fast = kernels(xp, kernel)
    if fast is not None:
        fast.extract_slices(xp.ascontiguousarray(volume_rfft),
                            xp.ascontiguousarray(xp.asarray(rotations), dtype=xp.float64),
                            kx.astype(xp.float64), ky.astype(xp.float64), flat_pix, float(pad), out)
        return out.reshape(n, box_size, box_size // 2 + 1)
    vol_flat = volume_rfft.ravel()
    for sl in _batches(n, batch_size):
        idx, w, mirrored = _corners(rotations[sl], kx, ky, pad, padded, real_dtype)
        vals = (vol_flat[idx] * w).sum(axis=-1)
        out[sl, flat_pix] = xp.where(mirrored, vals.conj(), vals)
    return out.reshape(n, box_size, box_size // 2 + 1)


def insert_central_slices_rfft(data_rfft, weights_rfft, rotations, data_sum, weight_sum,
                               r_max: float | None = None, batch_size: int = 64,
                               kernel: str = "auto") -> None:
    """Backproject image rffts and their weights into padded half-space sums (in place).

    ``data_rfft``: ``(N, D, D//2+1)`` complex (e.g. ``s · CTF · X̂`` after un-shifting);
    ``weights_rfft``: ``(N, D, D//2+1)`` real (e.g. ``s² · CTF²``) or ``None``;
    ``data_sum`` ``(P, P, P//2+1)`` complex and ``weight_sum`` (same shape, real, or ``None``)
    are accumulated into. Call :func:`symmetrize_hermitian_planes` once on the final sums.
    Matches RELION ``BackProjector::set2DFourierTransform`` (TRILINEAR) up to that completion.
    ``kernel`` as in :func:`extract_central_slices_rfft`.
    """
    xp = array_module(data_rfft)
    box = data_rfft.shape[-2]
    padded = data_sum.shape[0]
    pad = padded // box
    real_dtype = xp.float32 if data_sum.dtype == xp.complex64 else xp.float64
    flat_pix, kx, ky = image_pixels(box, r_max, xp)
    fast = kernels(xp, kernel)
    if fast is not None and data_sum.flags.c_contiguous:
        n = data_rfft.shape[0]
        use_w = weights_rfft is not None and weight_sum is not None
        fast.insert_slices(xp.ascontiguousarray(data_rfft).reshape(n, -1),
                           (xp.ascontiguousarray(weights_rfft).reshape(n, -1) if use_w
                            else xp.zeros((1, 1), xp.float32)),
                           xp.ascontiguousarray(xp.asarray(rotations), dtype=xp.float64),
                           kx.astype(xp.float64), ky.astype(xp.float64), flat_pix, float(pad),
                           data_sum, weight_sum if use_w else xp.zeros((1, 1, 1), xp.float32),
                           use_w)
        return
    half_column = xp.where(kx == 0, 0.5, 1.0).astype(real_dtype)
    n = data_rfft.shape[0]
    data_flat = data_rfft.reshape(n, -1)
    weight_flat = None if weights_rfft is None else weights_rfft.reshape(n, -1)
    sum_re = data_sum.view(real_dtype).reshape(-1)  # interleaved (re, im)
    for sl in _batches(n, batch_size):
        idx, w, mirrored = _corners(rotations[sl], kx, ky, pad, padded, real_dtype)
        w = w * half_column[None, :, None]
        d = data_flat[sl][:, flat_pix]
        d = xp.where(mirrored, d.conj(), d)
        scatter_add(sum_re, 2 * idx, w * d.real[..., None].astype(real_dtype))
        scatter_add(sum_re, 2 * idx + 1, w * d.imag[..., None].astype(real_dtype))
        if weight_sum is not None:
            c = weight_flat[sl][:, flat_pix].astype(real_dtype)
            scatter_add(weight_sum.reshape(-1), idx, w * c[..., None])


def symmetrize_hermitian_planes(volume_rfft):
    """Complete the self-mirrored planes x = 0 and x = P/2 of a half-space sum (returns a copy).

    On those planes ``v[z, y] ← v[z, y] + conj(v[-z, -y])`` (indices mod P), which adds the
    contributions of the mirrored points that :func:`insert_central_slices_rfft` does not write
    (RELION ``BackProjector::enforceHermitianSymmetry``). Works for complex and real (weight) sums.
    """
    xp = array_module(volume_rfft)
    out = volume_rfft.copy()
    padded = volume_rfft.shape[0]
    mirror = (padded - xp.arange(padded)) % padded
    for col in (0, volume_rfft.shape[-1] - 1):
        plane = volume_rfft[:, :, col]
        out[:, :, col] = plane + plane[mirror][:, mirror].conj()
    return out


def project(volume, rotations, pad: int = DEFAULT_PAD, r_max: float | None = None):
    """Real-space projections of a real volume ``(D, D, D)`` at ``rotations`` ``(N, 3, 3)``.

    Returns ``(N, D, D)`` real images ``≈ ∫ V(Aᵀ r) dz`` (Fourier slice theorem), band-limited
    to ``|k| < r_max``.
    """
    box = volume.shape[-1]
    slices = extract_central_slices_rfft(prepare_reference_rfft(volume, pad), rotations, box, r_max)
    return centred_irfftn(slices, 2, box)


def backproject(images, rotations, pad: int = DEFAULT_PAD, r_max: float | None = None):
    """Exact adjoint of :func:`project`: real images ``(N, D, D)`` → real volume ``(D, D, D)``.

    ``⟨project(V), X⟩ = ⟨V, backproject(X)⟩`` to floating-point precision. This is the plain
    (unweighted) backprojection, i.e. the smeared sum of the images along their directions.
    """
    xp = array_module(images)
    box = images.shape[-1]
    padded = pad * box
    complex_dtype = xp.complex64 if images.dtype == xp.float32 else xp.complex128
    data_sum = xp.zeros((padded, padded, padded // 2 + 1), dtype=complex_dtype)
    insert_central_slices_rfft(centred_rfftn(images, 2).astype(complex_dtype), None, rotations,
                               data_sum, None, r_max)
    volume = centred_irfftn(symmetrize_hermitian_planes(data_sum), 3, padded)
    volume = crop_centred(volume, box, 3) * (padded ** 3 / box ** 2)
    return volume / gridding_correction(box, pad, xp).astype(volume.dtype)
