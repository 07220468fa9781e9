"""Noise model σ²(|k|) per Fourier shell and the per-particle scale (docs/design.md §3).

Shells are ``round(|k|)`` on the image's centred rfft, 0 … D/2; sums count Hermitian pairs
(:func:`.fourier.rfft_multiplicity`), so a shell's power is that of the full 2-D transform.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy
from .fourier import centred_rfftn, rfft_multiplicity, rfft_radius
from .masks import soft_sphere_mask


def image_shells(box_size: int) -> np.ndarray:
    """Shell index of each pixel of a ``(D, D//2+1)`` centred rfft (int64)."""
    return np.rint(rfft_radius(box_size, 2)).astype(np.int64)


def shell_power_sums(residuals_rfft, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-shell ``Σ |r_k|²`` over a batch ``(N, D, D//2+1)`` and the number of terms, both
    ``(D//2 + 1,)`` float64, counting Hermitian pairs (sum these over batches, then divide).
    ``weights`` ``(N,)``: each residual's posterior weight (a marginalised E-step: the poses
    of one particle weigh 1 together); the counts are weighted alike. The residuals may live
    on a GPU; the shell sums are returned as host arrays."""
    xp = array_module(residuals_rfft)
    box = residuals_rfft.shape[-2]
    shells = image_shells(box)
    mult = np.broadcast_to(rfft_multiplicity(box, 2), shells.shape)
    n = box // 2 + 1
    keep = shells < n
    power2 = xp.abs(residuals_rfft) ** 2
    if weights is None:
        power, total = to_numpy(power2.sum(axis=0)), residuals_rfft.shape[0]
    else:
        w = xp.asarray(np.asarray(weights, np.float64))
        power = to_numpy(xp.tensordot(w, power2, axes=(0, 0)))
        total = float(np.sum(weights))
    sums = np.bincount(shells[keep], weights=(power * mult)[keep], minlength=n)
    counts = np.bincount(shells[keep], weights=mult[keep], minlength=n) * total
    return sums, counts


def sigma2_from_sums(sums, counts) -> np.ndarray:
    """σ² per shell from :func:`shell_power_sums` totals; empty or zero shells take the
    nearest valid value so that weights stay finite."""
    sigma2 = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    valid = sigma2 > 0
    if not valid.any():
        return np.ones_like(sigma2)
    idx = np.arange(sigma2.size)
    return np.interp(idx, idx[valid], sigma2[valid])


#: Per-class noise models are shrunk toward the pooled one with the weight of this many
#: particles' residuals (a conjugate prior): a class of a few particles keeps the pooled model.
CLASS_NOISE_PRIOR_PARTICLES = 10.0


def class_noise_models(sums, counts,
                       prior_particles: float = CLASS_NOISE_PRIOR_PARTICLES) -> np.ndarray:
    """σ² per class and shell ``(K, S)`` from per-class :func:`shell_power_sums` totals
    ``(K, S)`` (each particle's residuals weighed by its posterior over classes and poses).

    Each class's estimate is the posterior mean under a prior of ``prior_particles`` images
    of the pooled model: ``(Σ_k + n₀ P σ²_pooled) / (c_k + n₀ P)``, with ``P`` a shell's
    pixel count (what one image contributes to ``c``). A large class gets its own noise, an
    empty one the pooled noise; with one class this is :func:`sigma2_from_sums`."""
    sums, counts = np.atleast_2d(sums), np.atleast_2d(counts)
    pooled = sigma2_from_sums(sums.sum(axis=0), counts.sum(axis=0))
    if sums.shape[0] == 1:
        return pooled[None, :]
    box = 2 * (sums.shape[1] - 1)
    mult = np.broadcast_to(rfft_multiplicity(box, 2), (box, box // 2 + 1))
    pixels = np.bincount(image_shells(box).ravel(), weights=mult.ravel(),
                         minlength=sums.shape[1])[:sums.shape[1]]
    prior = prior_particles * pixels
    return (sums + prior * pooled) / (counts + prior)


def noise_weights(sigma2_shells, box_size: int) -> np.ndarray:
    """``1/σ²`` on the ``(D, D//2+1)`` grid from per-shell σ² (shells beyond D/2 get 0).

    ``sigma2_shells`` ``(..., S)``: leading axes (one noise model per class) are kept,
    giving ``(..., D, D//2+1)``."""
    shells = image_shells(box_size)
    inverse = 1.0 / np.asarray(sigma2_shells, np.float64)
    w = np.concatenate([inverse, np.zeros(inverse.shape[:-1] + (1,))], axis=-1)
    return w[..., np.minimum(shells, w.shape[-1] - 1)]


def log_noise_normaliser(noise_weight, pixels) -> float:
    """``Σ_p m_p log σ²_p`` over the rfft pixels ``pixels`` (``(flat indices, multiplicities)``)
    for weights ``1/σ²`` on the rfft grid: the part of −2 log-likelihood that a noise-whitened
    error ``Σ m |X − Y|²/σ²`` leaves out. Equal for every pose of one noise model; it matters
    where noise models differ (per class): −2 log p(X | class k) = E_k + this term of class k,
    up to a constant shared by all classes (docs/design-notes.md, "Per-class noise")."""
    sel, mult = pixels
    w = np.asarray(to_numpy(noise_weight), np.float64).ravel()[sel]
    return float(-np.sum(np.asarray(mult) * np.log(w)))


def scale_terms(images_centred_rfft, model_rfft, weights, max_shell: float):
    """``(Re⟨C Ŷ, X⟩_w, ‖C Ŷ‖²_w)`` per image ``(N,)`` over shells ``1 ≤ |k| < max_shell``
    (host arrays): the numerator and denominator of the least-squares scale, to be summed
    over a particle's poses with their posterior weights."""
    xp = array_module(images_centred_rfft)
    n, box = images_centred_rfft.shape[0], images_centred_rfft.shape[-2]
    radius = rfft_radius(box, 2)
    sel = np.flatnonzero(((radius < max_shell) & (radius >= 1)).ravel())
    mw = xp.asarray((np.broadcast_to(rfft_multiplicity(box, 2), radius.shape)
                     * to_numpy(weights)).ravel()[sel])
    sel = xp.asarray(sel)
    x = images_centred_rfft.reshape(n, -1)[:, sel]
    y = model_rfft.reshape(n, -1)[:, sel]
    num = to_numpy(xp.sum(mw * (y.conj() * x).real, axis=1))
    den = to_numpy(xp.sum(mw * xp.abs(y) ** 2, axis=1))
    return num, den


def estimate_scales(images_centred_rfft, model_rfft, weights, max_shell: float) -> np.ndarray:
    """Per-particle scale at the best pose: ``s = Re⟨C Ŷ, X⟩_w / ‖C Ŷ‖²_w``.

    ``images_centred_rfft`` ``(N, D, H)`` are centred images, ``model_rfft`` the matching CTF-ed
    projections ``C Ŷ`` computed with scale 1, ``weights`` ``(D, H)`` noise weights; only shells
    ``< max_shell`` enter (RELION uses those where the reference is reliable, SSNR > 3).
    Particles whose model has no power there get scale 1. Images and model may live on a GPU;
    the scales are returned as a host array.
    """
    num, den = scale_terms(images_centred_rfft, model_rfft, weights, max_shell)
    return scale_from_terms(num, den)


def scale_from_terms(num, den) -> np.ndarray:
    """``num / den``, and 1 where the model has no power (``den`` = 0)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def renormalise_scales(scales) -> np.ndarray:
    """Scales divided by their mean (mean 1), after clipping to a sane range [0.05, 20]·median."""
    s = np.asarray(scales, np.float64)
    med = np.median(s[s > 0]) if np.any(s > 0) else 1.0
    s = np.clip(s, 0.05 * med, 20.0 * med)
    return s / s.mean()


def shell_mean(values_rfft, box_size: int, ndim: int) -> np.ndarray:
    """Mean of a real quantity over each shell 0 … D/2 of a centred rfft (pairs counted)."""
    r = np.rint(rfft_radius(box_size, ndim)).astype(np.int64)
    mult = np.broadcast_to(rfft_multiplicity(box_size, ndim), r.shape)
    n = box_size // 2 + 1
    keep = r < n
    total = np.bincount(r[keep], weights=(np.broadcast_to(values_rfft, r.shape) * mult)[keep],
                        minlength=n)
    count = np.bincount(r[keep], weights=mult[keep], minlength=n)
    return total / np.maximum(count, 1)


#: the least share of the box the background must hold for :func:`background_noise_power`
MIN_BACKGROUND_FRACTION = 0.1


def background_noise_power(images, radius_px: float, soft_edge_px: float = 3.0):
    """Noise power per shell ``(D//2 + 1,)`` measured where there is no particle: the mean
    ``|FT(b · X)|²`` of images ``(N, D, D)`` outside a soft disc (``b = 1 −`` disc of
    ``radius_px`` with a cosine edge of ``soft_edge_px``), divided by ``mean(b²)``.

    Multiplying by ``b`` convolves the noise spectrum with ``|FT(b)|²``, which has unit integral
    after the division, so a noise spectrum that is smooth on the scale of ``FT(b)`` (a few
    Fourier pixels) is measured as it is — white or coloured (ice, a detector's MTF). RELION
    and cryoSPARC estimate their first noise spectra from the particles' background the same
    way. Returns None when the background holds less than :data:`MIN_BACKGROUND_FRACTION` of
    the box (a particle that fills it)."""
    images = np.asarray(images, np.float64)
    box = images.shape[-1]
    background = 1.0 - soft_sphere_mask(box, radius_px, soft_edge_px, ndim=2)
    fraction = float(np.mean(background ** 2))
    if fraction < MIN_BACKGROUND_FRACTION:
        return None
    power = (np.abs(centred_rfftn(images * background, 2)) ** 2).mean(axis=0)
    return shell_mean(power, box, 2) / fraction


def initial_noise_and_scale(image_power, ctf2_mean, reference_power, max_shell: float,
                            noise_power=None):
    """Greyscale of a reference relative to the images, and a first noise model.

    ``image_power``, ``ctf2_mean``: mean ``|X̂|²`` and ``C²`` per image shell (over a sample of
    particles); ``reference_power``: mean ``|V̂|²`` per 3-D shell of the reference (the expected
    power of its projections). ``noise_power``: the noise power per shell measured in the
    images' background (:func:`background_noise_power`); it is the first noise model. Without
    it the noise is taken to be white at the level of the outer shells (≥ 3/4 Nyquist) — wrong
    for coloured noise (ice, whose power rises several-fold at low resolution, is taken for
    signal: on the realistic benchmark case the greyscale came out 1.9× too high and σ² at
    shells 0–4 at 13–24% of the truth, and the first iteration aligned nothing). The signal
    power ``P_X − σ²`` is matched to ``g² C² P_V`` over shells 2 … ``max_shell``.
    Returns ``(g, sigma2 per shell)``.
    """
    p_x = np.asarray(image_power, np.float64)
    n = p_x.size
    if noise_power is not None:
        noise = np.asarray(noise_power, np.float64)
    else:
        outer = p_x[int(0.75 * (n - 1)):]
        noise = float(np.median(outer)) if outer.size else float(p_x.mean())
    shells = np.arange(n)
    band = (shells >= 2) & (shells < max(max_shell, 3))
    model = np.asarray(ctf2_mean) * np.asarray(reference_power)
    signal = np.clip(p_x - noise, 0.0, None)
    g2 = signal[band].sum() / model[band].sum() if model[band].sum() > 0 else 1.0
    g = float(np.sqrt(g2)) if g2 > 0 else 1.0
    if noise_power is not None:
        return g, np.maximum(noise, 0.1 * p_x)
    sigma2 = np.maximum(p_x - g * g * model, 0.1 * p_x)
    return g, np.where(sigma2 > 0, sigma2, noise)
