"""Backprojection of particles into per-group Fourier sums (the map step of every job).

A group is a half set (0 = A, 1 = B), or ``class × 2 + half`` for heterogeneous jobs. For each
particle: ``X̂ = centred rfft(image)``, centred by translating by +shift (RELION's origin),
then ``num[g] += s · C · X̂`` and ``wgt[g] += s² · C²`` inserted at its pose
(docs/design.md §3).
Sums are padded centred rffts ``(G, P, P, P//2+1)``; the kx = 0 / x = P/2 planes are completed
only once, at reconstruction (:func:`.reconstruction.reconstruct`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .aberrations import (
    ABERRATION_PARAMETERS,
    demodulate,
    image_pixel_sizes,
    magnified_rotations,
    per_particle_zernike,
)
from .backend import array_module, to_numpy
from .ctf import ctf_rfft
from .fourier import centred_rfftn, translate_rfft
from .projection import DEFAULT_PAD, insert_central_slices_rfft, symmetrize_hermitian_planes
from .symmetry import symmetrize_sums, symmetry_operators

CTF_PARAMETERS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg",
                  "bfactor_A2", "voltage_kV", "cs_mm", "amplitude_contrast")
#: Every per-particle column of the image model: the CTF's and the optional aberrations'.
OPTICS_PARAMETERS = CTF_PARAMETERS + ABERRATION_PARAMETERS


def optics_meta(meta: dict) -> dict:
    """The image-model columns of ``meta`` (:data:`OPTICS_PARAMETERS` that are present)."""
    return {k: meta[k] for k in OPTICS_PARAMETERS if k in meta}


@dataclass
class FourierSums:
    """Backprojected numerator and weights per group: ``data (G, P, P, P//2+1)`` complex64 and
    ``weight`` of the same shape, float32. ``count`` is the number of particles per group."""

    data: np.ndarray
    weight: np.ndarray
    count: np.ndarray

    @classmethod
    def zeros(cls, n_groups: int, box_size: int, pad: int = DEFAULT_PAD, xp=np) -> "FourierSums":
        p = pad * box_size
        shape = (n_groups, p, p, p // 2 + 1)
        return cls(xp.zeros(shape, xp.complex64), xp.zeros(shape, xp.float32),
                   np.zeros(n_groups, np.int64))

    def __add__(self, other: "FourierSums") -> "FourierSums":
        return FourierSums(self.data + other.data, self.weight + other.weight,
                           self.count + other.count)

    def add_(self, other: "FourierSums") -> "FourierSums":
        """In-place sum (for reductions that own ``self``)."""
        self.data += other.data
        self.weight += other.weight
        self.count += other.count
        return self

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.weight.nbytes)

    def completed(self, box_size: int, symmetry: str = "C1") -> "FourierSums":
        """A copy with the Hermitian planes completed and, unless ``symmetry`` is C1, the point
        group applied (:func:`.symmetry.symmetrize_sums`). Reconstruct it with
        ``complete_planes=False``."""
        data, weight = [], []
        ops = symmetry_operators(symmetry)
        for g in range(self.data.shape[0]):
            d, w = symmetrize_sums(symmetrize_hermitian_planes(self.data[g]),
                                   symmetrize_hermitian_planes(self.weight[g]), ops, box_size)
            data.append(d)
            weight.append(w)
        xp = array_module(self.data)
        return FourierSums(xp.stack(data), xp.stack(weight), self.count.copy())


def particle_ctfs(meta: dict, box_size: int, pixel_size_A: float, xp=np):
    """CTFs ``(N, D, D//2+1)`` float32 from per-particle metadata columns (names:
    docs/design.md §2), with the even aberrations and magnification when ``meta`` has them
    (:mod:`.aberrations`), and |CTF| for phase-flipped particles."""
    even = per_particle_zernike(meta, "even_zernike", box_size, pixel_size_A, xp)
    ctf = ctf_rfft(box_size, pixel_size_A, xp=xp, gamma_offset=0.0 if even is None else even,
                   mag_matrix=meta.get("mag_matrix"), **{k: meta[k] for k in CTF_PARAMETERS})
    if "ctf_phase_flipped" in meta:  # images multiplied by sign(CTF): their CTF is |CTF|
        flipped = xp.asarray(np.asarray(meta["ctf_phase_flipped"], bool).reshape(-1, 1, 1))
        ctf = xp.where(flipped, xp.abs(ctf), ctf)
    return ctf


def observed_rfft(images, meta: dict, pixel_size_A: float):
    """Centred rffts of real images ``(N, D, D)``, the odd aberrations' phase removed when
    ``meta`` has them (RELION's ``demodulatePhase``; :func:`.aberrations.demodulate`)."""
    return demodulate(centred_rfftn(images, 2), meta, pixel_size_A)


def backproject_particles(sums: FourierSums, images, meta: dict, groups, pixel_size_A: float,
                          use_ctf: bool = True, r_max: float | None = None,
                          first_index: int = 0) -> FourierSums:
    """Accumulate particles into ``sums`` in place and return it.

    ``images``: ``(N, D, D)`` real; ``meta``: columns ``rotation (N, 3, 3)``, ``shift_A (N, 2)``,
    optional ``scale (N,)`` and the CTF columns; ``groups``: ``(N,)`` int group of each particle.
    Soft classes: with a ``class_weight (N, K)`` column (posterior probabilities), ``groups`` is
    the half set and particle ``i`` goes into every group ``k·2 + half`` with its data and
    weights multiplied by ``class_weight[i, k]`` (zero weights are skipped). Raises
    ``ValueError`` naming the first particle (0-based index ``first_index + i``) whose pixels
    are not finite. Runs on the sums' backend: with CuPy sums (a GPU worker) host images are
    copied to the device.
    """
    xp = array_module(sums.data, images)
    images = xp.asarray(images)
    n, box = images.shape[0], images.shape[-1]
    finite = xp.isfinite(images).reshape(n, -1).all(axis=1)
    if not bool(finite.all()):
        bad = int(np.flatnonzero(to_numpy(finite) == 0)[0])
        raise ValueError(f"particle {first_index + bad} has NaN or Inf pixels")
    f = observed_rfft(xp.asarray(images, dtype=xp.float32), meta, pixel_size_A)
    shift_A = np.asarray(meta["shift_A"], np.float64)
    f = translate_rfft(f, shift_A / image_pixel_sizes(meta, pixel_size_A, shift_A.shape[0])[:, None])
    scale = xp.asarray(meta["scale"] if "scale" in meta else np.ones(n), dtype=xp.float32)
    weight = xp.broadcast_to(scale.reshape(-1, 1, 1), (n, 1, 1))
    if use_ctf:
        weight = weight * particle_ctfs(meta, box, pixel_size_A, xp)
    data = (f * weight).astype(xp.complex64)
    weight2 = xp.broadcast_to((weight * weight).astype(xp.float32), data.shape)
    groups = np.asarray(groups)
    rotations = xp.asarray(magnified_rotations(meta["rotation"], meta))
    if "class_weight" in meta:
        member = np.asarray(meta["class_weight"], dtype=np.float32).reshape(n, -1)
        targets = [(k * 2 + h, np.flatnonzero((groups == h) & (member[:, k] > 0)), member[:, k])
                   for k in range(member.shape[1]) for h in np.unique(groups)]
    else:
        targets = [(g, np.flatnonzero(groups == g), None) for g in np.unique(groups)]
    for g, sel, w in targets:
        if sel.size == 0:
            continue
        sel_d = xp.asarray(sel)
        d, w2 = data[sel_d], weight2[sel_d]
        if w is not None:
            wk = xp.asarray(w[sel]).reshape(-1, 1, 1)
            d, w2 = d * wk, w2 * wk
        insert_central_slices_rfft(d, w2, rotations[sel_d], sums.data[g], sums.weight[g], r_max)
        sums.count[g] += sel.size
    return sums
