"""Centred Fourier transforms, frequency grids and phase shifts.

Layouts (origin of real space at index ``D // 2`` on every axis, as RELION):

* **centred FT**: ``fftshift(fftn(ifftshift(a)))``; frequency 0 at index ``D // 2``.
* **centred rfft** (the half-space we use for images and volumes): ``rfftn(ifftshift(a))`` with
  ``fftshift`` over every axis but the last; on those axes index ``i`` is frequency ``i - D // 2``,
  on the last axis index ``j`` is frequency ``j`` (0 … D/2).

Transforms act on the last ``ndim`` axes, so batches ``(N, D, D)`` work as they are.
Forward transforms are unnormalised, inverse transforms carry ``1 / D**ndim`` (NumPy's default).
"""

from __future__ import annotations

from .backend import array_module, fft_module


def _axes(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def centred_fftn(a, ndim: int):
    """Centred full FT of the last ``ndim`` axes (complex, same shape)."""
    xp = array_module(a)
    ax = _axes(ndim)
    return xp.fft.fftshift(fft_module(xp).fftn(xp.fft.ifftshift(a, axes=ax), axes=ax), axes=ax)


def centred_ifftn(f, ndim: int):
    """Inverse of :func:`centred_fftn` (complex result)."""
    xp = array_module(f)
    ax = _axes(ndim)
    return xp.fft.fftshift(fft_module(xp).ifftn(xp.fft.ifftshift(f, axes=ax), axes=ax), axes=ax)


def centred_rfftn(a, ndim: int):
    """Centred rfft of the last ``ndim`` axes: ``(..., D, …, D)`` real → ``(..., D, …, D//2+1)`` complex."""
    xp = array_module(a)
    ax = _axes(ndim)
    f = fft_module(xp).rfftn(xp.fft.ifftshift(a, axes=ax), axes=ax)
    return xp.fft.fftshift(f, axes=ax[:-1]) if ndim > 1 else f


def centred_irfftn(f, ndim: int, box_size: int):
    """Inverse of :func:`centred_rfftn`; ``box_size`` is the real-space edge length (even)."""
    xp = array_module(f)
    ax = _axes(ndim)
    if ndim > 1:
        f = xp.fft.ifftshift(f, axes=ax[:-1])
    a = fft_module(xp).irfftn(f, s=(box_size,) * ndim, axes=ax)
    return xp.fft.fftshift(a, axes=ax)


def rfft_frequencies(box_size: int, ndim: int, xp=None):
    """Integer frequency coordinates of the centred rfft grid, as broadcastable arrays.

    Returns ``ndim`` arrays ordered like the array axes (``(ky, kx)`` or ``(kz, ky, kx)``), in
    Fourier pixels (cycles per box); divide by ``box_size * pixel_size_A`` for 1/Å.
    """
    import numpy as np

    xp = xp or np
    full = xp.arange(box_size) - box_size // 2
    half = xp.arange(box_size // 2 + 1)
    out = []
    for i in range(ndim):
        shape = [1] * ndim
        shape[i] = -1
        out.append((half if i == ndim - 1 else full).reshape(shape))
    return tuple(out)


def rfft_radius(box_size: int, ndim: int, xp=None):
    """Radius ``|k|`` in Fourier pixels on the centred rfft grid, shape ``(D,)*(ndim-1) + (D//2+1,)``."""
    ks = rfft_frequencies(box_size, ndim, xp)
    r2 = sum(k.astype(float) ** 2 for k in ks)
    return r2 ** 0.5


def rfft_multiplicity(box_size: int, ndim: int, xp=None):
    """How many full-FT coefficients each centred-rfft coefficient stands for (1 or 2).

    Columns 0 and D/2 of the last axis are their own mirror (1); all others stand for a
    Hermitian pair (2). Sums over the full FT equal sums over the half-space weighted by this.
    """
    import numpy as np

    xp = xp or np
    m = xp.full(box_size // 2 + 1, 2.0)
    m[0] = 1.0
    m[-1] = 1.0
    return m


def translate_rfft(images_rfft, shifts_px):
    """Translate images by ``shifts_px`` through a phase ramp on the centred rfft.

    ``images_rfft``: ``(N, D, D//2+1)`` complex; ``shifts_px``: ``(N, 2)`` as (x, y) in pixels.
    The result is the transform of ``image(r - shift)`` (content moves by +shift), i.e. it
    multiplies by ``exp(-2πi k·shift / D)``, as RELION ``shiftImageInFourierTransform``.
    """
    xp = array_module(images_rfft)
    box = images_rfft.shape[-2]
    ky, kx = rfft_frequencies(box, 2, xp)
    sx = xp.asarray(shifts_px[:, 0], dtype=xp.float64)[:, None, None]
    sy = xp.asarray(shifts_px[:, 1], dtype=xp.float64)[:, None, None]
    # the ramp is separable: exp(-2πi kx sx / D) · exp(-2πi ky sy / D)
    ramp_x = xp.exp((-2j * xp.pi / box) * (kx * sx)).astype(images_rfft.dtype)
    ramp_y = xp.exp((-2j * xp.pi / box) * (ky * sy)).astype(images_rfft.dtype)
    return images_rfft * ramp_x * ramp_y


def translate_volume(volume, shift_px):
    """A real volume ``(D, D, D)`` with its content moved by ``shift_px`` = (x, y, z) pixels
    (the transform of ``volume(r − shift)``, periodic), by a phase ramp as :func:`translate_rfft`."""
    xp = array_module(volume)
    box = volume.shape[-1]
    kz, ky, kx = rfft_frequencies(box, 3, xp)
    sx, sy, sz = (float(v) for v in shift_px)
    ramp = xp.exp((-2j * xp.pi / box) * (kx * sx + ky * sy + kz * sz))
    out = centred_irfftn(centred_rfftn(xp.asarray(volume, xp.float64), 3) * ramp, 3, box)
    return out.astype(volume.dtype)


def pad_centred(a, new_size: int, ndim: int):
    """Zero-pad the last ``ndim`` axes from ``D`` to ``new_size`` keeping index D//2 at new_size//2."""
    xp = array_module(a)
    d = a.shape[-1]
    lo = new_size // 2 - d // 2
    pad = [(0, 0)] * (a.ndim - ndim) + [(lo, new_size - d - lo)] * ndim
    return xp.pad(a, pad)


def crop_centred(a, new_size: int, ndim: int):
    """Crop the last ``ndim`` axes to ``new_size`` around index D//2 (inverse of :func:`pad_centred`)."""
    d = a.shape[-1]
    lo = d // 2 - new_size // 2
    sl = (Ellipsis,) + (slice(lo, lo + new_size),) * ndim
    return a[sl]


def fourier_downsample(volume, box_size: int):
    """A cubic map Fourier-cropped from box ``D`` to ``box_size`` (pixel size × D/box_size): the
    same density sampled more coarsely (voxel values kept, the band beyond the new Nyquist
    removed, no aliasing)."""
    xp = array_module(volume)
    d = volume.shape[-1]
    f = crop_centred(centred_fftn(xp.asarray(volume, dtype=xp.float64), 3), box_size, 3)
    return (centred_ifftn(f, 3).real * (box_size / d) ** 3).astype(xp.float32)
