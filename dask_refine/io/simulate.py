"""Simulate a particle dataset with known ground truth from a 3D map.

Image model (docs/design.md §1):
``X = T_{−shift}[ irfft( s · CTF · E · slice(V, R) ) ] + noise`` where
``T_{−shift}`` translates by −shift (RELION's origin convention: the particle is centred by
translating by +shift), slices come from the engine's Fourier-slice projector, ``E`` is an
optional undeclared envelope and the noise is Gaussian, white by default. ``snr`` is the ratio of
the mean per-image variance of the noise-free particle images to the noise variance (per pixel);
images are divided by the noise σ, so the noise has unit variance as in RELION-normalised
particles.

Real-data nuisances, all off by default (with the defaults the images are those of the clean
model, bit for bit; docs/design-notes.md, "Realistic simulation"):

* ``junk_fraction``: ``round_half_up(junk_fraction · N)`` particles, chosen with the seed, are
  junk: the first ``n_junk // 2`` of them (in the chosen order) empty ice (noise only), the rest
  projections of a random blob volume (:func:`junk_volume`) scaled to the mean image variance of
  the particles; same poses, CTF and noise treatment as particles.
* ``preferred_view_fraction``: ``round_half_up(fraction · non-junk)`` non-junk particles, chosen
  with the seed, have their viewing direction (the rotation's third row, ``Aᵀ ẑ``) drawn from a
  von Mises–Fisher distribution around +z (the top view) with concentration ``κ = 1/σ²``,
  ``σ = preferred_view_spread_deg`` in radians, and uniform rot and psi.
* ``noise_color="ice"``: noise filtered in Fourier space to the power spectrum of
  :func:`noise_power_profile`, normalised to unit variance per pixel.
* ``envelope_bfactor_A2``: ``E = exp(−B |k|²/4)`` (k in 1/Å) on every image's signal, *not*
  written into the ``bfactor_A2`` CTF column.

Optics beyond the CTF fit (off by default; written into the store's ``beam_tilt_mrad`` and
``mag_matrix`` columns, as an import of a RELION STAR with those fields would): ``beam_tilt_mrad``
phases every prediction by ``e^{iφ}`` and ``mag_matrix`` magnifies it, exactly as RELION's
observation model predicts an image (:mod:`dask_refine.core.aberrations`).
``defocus_error_A``: the images are made with the true defocus, but the store's defocus columns
are off by a Gaussian error of that standard deviation per particle (U and V alike, seed stream
``[seed, 7]``), as a CTF fit on thick ice would be; the true values go to
``ground_truth/defocus_u_A`` and ``ground_truth/defocus_v_A``.

The truth (rotation, shift_A, scale, is_junk, junk_kind) is written under ``ground_truth/``
where no job reads it; ``write_poses=True`` also copies the poses to the top-level pose columns,
as if a previous refinement had produced them (for Reconstruction Only from known poses).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from ..core.aberrations import (
    image_pixel_sizes,
    magnified_rotations,
    model_aberrations,
    modulate,
)
from ..core.backprojection import particle_ctfs
from ..core.fourier import centred_irfftn, rfft_multiplicity, rfft_radius, translate_rfft
from ..core.projection import DEFAULT_PAD, extract_central_slices_rfft, prepare_reference_rfft
from ..core.rotations import euler_to_matrix, random_rotations
from .errors import InputError
from .simulation_config import NOISE_COLORS, SimulationConfig  # noqa: F401  (their home)
from .store import CTF_COLUMNS, GROUND_TRUTH, OPTICS_COLUMNS, ParticleStore, assign_half_sets

#: ``ground_truth/junk_kind`` values: a particle, empty ice (noise only), a junk blob projection.
PARTICLE, EMPTY_ICE, JUNK_BLOB = 0, 1, 2
#: The ice noise spectrum's low-frequency excess: ``σ²(k) ∝ 1 + 4 exp(−(k/k0)²)``, k0 in 1/Å.
ICE_K0_INV_A = 1.0 / 40.0
#: Junk blob radii (the 1/e radius of each Gaussian), in Å.
JUNK_BLOB_RADIUS_A = (10.0, 30.0)
#: Rows of the pilot that measures the particles' mean image variance (snr, junk blob scale).
PILOT_ROWS = 200


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def junk_kinds(config: SimulationConfig) -> np.ndarray:
    """Which particles are junk: ``(N,)`` int8 of :data:`PARTICLE`, :data:`EMPTY_ICE`,
    :data:`JUNK_BLOB`.

    ``round_half_up(junk_fraction · N)`` rows drawn without replacement (seed stream
    ``[seed, 4]``); the first ``n_junk // 2`` drawn are empty ice, the others blobs.
    """
    n = config.n_particles
    kinds = np.zeros(n, dtype=np.int8)
    n_junk = _round_half_up(config.junk_fraction * n)
    if n_junk:
        rows = np.random.default_rng([config.seed, 4]).choice(n, n_junk, replace=False)
        kinds[rows[:n_junk // 2]] = EMPTY_ICE
        kinds[rows[n_junk // 2:]] = JUNK_BLOB
    return kinds


def preferred_view_rotations(n: int, spread_deg: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations ``(n, 3, 3)`` whose viewing direction ``Aᵀ ẑ`` (the third row) is drawn
    from a von Mises–Fisher distribution around +z with ``κ = 1/σ²`` (σ = ``spread_deg`` in
    radians), with uniform rot (the direction's azimuth) and psi (the in-plane angle).

    The tilt θ (angle from +z) has ``cos θ = 1 + ln(u + (1 − u) e^{−2κ}) / κ``, u ~ U(0, 1]; for a
    small spread θ is Rayleigh-distributed with scale σ (98.9% of views within 3σ).
    """
    kappa = 1.0 / math.radians(spread_deg) ** 2
    u = 1.0 - rng.random(n)  # (0, 1]
    cos_tilt = 1.0 + np.log(u + (1.0 - u) * math.exp(-2.0 * kappa)) / kappa
    tilt = np.rad2deg(np.arccos(np.clip(cos_tilt, -1.0, 1.0)))
    rot, psi = rng.uniform(0.0, 360.0, (2, n))
    return euler_to_matrix(rot, tilt, psi)


def simulate_metadata(config: SimulationConfig, box_size: int, pixel_size_A: float) -> dict:
    """Per-particle CTF parameters, half sets and the ground-truth poses/scales (all ``(N, …)``).

    Returns ``{"meta", "truth", "junk_kind"}``; ``junk_kind`` ``(N,)`` int8 (see
    :func:`junk_kinds`). Junk rows keep their uniform (meaningless) truth rotation; preferred
    views replace the rotation of a share of the other rows (seed stream ``[seed, 5]``).
    """
    rng = np.random.default_rng([config.seed, 1])
    n = config.n_particles
    defocus = rng.uniform(config.defocus_min_A, config.defocus_max_A, n)
    astig = rng.uniform(0.0, config.astigmatism_max_A, n)
    shift = rng.normal(0.0, config.shift_sigma_A, (n, 2))
    # keep the particle well inside the box
    shift = np.clip(shift, -0.15 * box_size * pixel_size_A, 0.15 * box_size * pixel_size_A)
    meta = {
        "defocus_u_A": defocus + 0.5 * astig,
        "defocus_v_A": defocus - 0.5 * astig,
        "defocus_angle_deg": rng.uniform(0.0, 180.0, n),
        "phase_shift_deg": np.zeros(n),
        "bfactor_A2": np.full(n, config.bfactor_A2),
        "voltage_kV": np.full(n, config.voltage_kV),
        "cs_mm": np.full(n, config.cs_mm),
        "amplitude_contrast": np.full(n, config.amplitude_contrast),
        "optics_group": np.ones(n, dtype=np.int32),
        "half_set": assign_half_sets(n, config.seed),
    }
    if config.other_group_pixel_sizes_A:
        sizes = np.array([pixel_size_A, *config.other_group_pixel_sizes_A], np.float64)
        group = np.arange(n) % sizes.size
        meta["optics_group"] = (group + 1).astype(np.int32)
        meta["image_pixel_size_A"] = sizes[group]
    if any(config.beam_tilt_mrad):
        meta["beam_tilt_mrad"] = np.tile(np.asarray(config.beam_tilt_mrad, np.float64), (n, 1))
    if tuple(config.mag_matrix) != (1.0, 0.0, 0.0, 1.0):
        meta["mag_matrix"] = np.tile(np.reshape(config.mag_matrix, (1, 2, 2)), (n, 1, 1))
    truth = {
        "rotation": random_rotations(n, rng),
        "shift_A": shift,
        "scale": rng.uniform(config.scale_min, config.scale_max, n),
    }
    kinds = junk_kinds(config)
    if config.preferred_view_fraction > 0:
        view_rng = np.random.default_rng([config.seed, 5])
        candidates = np.flatnonzero(kinds == PARTICLE)
        n_preferred = _round_half_up(config.preferred_view_fraction * candidates.size)
        rows = np.sort(view_rng.choice(candidates, n_preferred, replace=False))
        truth["rotation"][rows] = preferred_view_rotations(
            n_preferred, config.preferred_view_spread_deg, view_rng)
    return {"meta": meta, "truth": truth, "junk_kind": kinds}


def junk_volume(box_size: int, pixel_size_A: float, seed: int = 0) -> np.ndarray:
    """A random smooth volume unrelated to any map: 3–6 Gaussian blobs ``a·exp(−|x − c|²/r²)``
    with radius r uniform in :data:`JUNK_BLOB_RADIUS_A`, amplitude a in [0.5, 1] and centres
    uniform in the ball of radius ``0.25 · D · pixel_size_A`` about the box centre (seed stream
    ``[seed, 6]``). Returns ``(D, D, D)`` float32 (arbitrary scale; the simulator rescales its
    projections)."""
    rng = np.random.default_rng([seed, 6])
    n_blobs = int(rng.integers(3, 7))
    radius_A = rng.uniform(*JUNK_BLOB_RADIUS_A, n_blobs)
    amplitude = rng.uniform(0.5, 1.0, n_blobs)
    direction = rng.standard_normal((n_blobs, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    centre_A = direction * (0.25 * box_size * pixel_size_A * rng.random((n_blobs, 1)) ** (1 / 3))
    x = (np.arange(box_size) - box_size // 2) * pixel_size_A
    volume = np.zeros((box_size,) * 3)
    for a, r, (cz, cy, cx) in zip(amplitude, radius_A, centre_A):
        gz, gy, gx = (np.exp(-((x - c) / r) ** 2) for c in (cz, cy, cx))  # separable
        volume += a * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return volume.astype(np.float32)


def envelope_rfft(box_size: int, pixel_size_A: float, bfactor_A2: float) -> np.ndarray:
    """The amplitude envelope ``exp(−B |k|²/4)`` (k in 1/Å) on the centred rfft grid,
    ``(D, D//2+1)`` float64."""
    k = rfft_radius(box_size, 2) / (box_size * pixel_size_A)
    return np.exp(-bfactor_A2 * k * k / 4.0)


def noise_power_profile(k_invA, pixel_size_A: float, noise_color: str = "white"):
    """Relative noise power σ²(k) (unnormalised) at spatial frequencies ``k_invA`` (1/Å, any
    shape): 1 for ``"white"``; for ``"ice"``
    ``(1 + 4 exp(−(k/k0)²)) · max(0, 1 − ½ (k/k_nyq)²)``, k0 = :data:`ICE_K0_INV_A`,
    k_nyq = 1/(2·pixel_size_A). Returns float64 of the shape of ``k_invA``."""
    k = np.asarray(k_invA, dtype=np.float64)
    if noise_color == "white":
        return np.ones_like(k)
    if noise_color == "ice":
        k_nyq = 0.5 / pixel_size_A
        return ((1.0 + 4.0 * np.exp(-(k / ICE_K0_INV_A) ** 2))
                * np.maximum(0.0, 1.0 - 0.5 * (k / k_nyq) ** 2))
    raise InputError("noise_color", f"must be one of {', '.join(NOISE_COLORS)}, not "
                     f"{noise_color!r}")


def noise_power_rfft(box_size: int, pixel_size_A: float, noise_color: str = "white") -> np.ndarray:
    """The noise power spectrum on the centred rfft grid ``(D, D//2+1)`` float64, normalised so
    that the noise has unit variance per pixel (its mean over the full D×D transform is 1):
    ``E|rfft(noise)|² = D² · noise_power_rfft``."""
    power = noise_power_profile(rfft_radius(box_size, 2) / (box_size * pixel_size_A),
                                pixel_size_A, noise_color)
    return power * (box_size ** 2 / float((power * rfft_multiplicity(box_size, 2)).sum()))


def simulate_noise(rng: np.random.Generator, shape: tuple[int, int, int], pixel_size_A: float,
                   noise_color: str = "white") -> np.ndarray:
    """Gaussian noise images ``shape = (n, D, D)`` float32 with unit variance per pixel and the
    power spectrum :func:`noise_power_rfft`: white noise, filtered in Fourier space by
    ``√power`` unless ``noise_color`` is ``"white"`` (then ``rng.standard_normal`` as it is)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    if noise_color == "white":
        return white
    box = shape[-1]
    # the filter is radial, so it is the same on NumPy's uncentred rfft grid after ifftshift
    amplitude = np.fft.ifftshift(np.sqrt(noise_power_rfft(box, pixel_size_A, noise_color)),
                                 axes=0)
    return np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=shape[-2:]).astype(np.float32)


def render_particles(reference_rfft, meta: dict, truth: dict, rows, box_size: int,
                     pixel_size_A: float, use_ctf: bool = True,
                     envelope_bfactor_A2: float = 0.0) -> np.ndarray:
    """Noise-free images ``(n, D, D)`` float32 for particles ``rows`` (a slice or index array;
    see the module's model). ``envelope_bfactor_A2 > 0`` multiplies the signal by
    :func:`envelope_rfft`."""
    optics = {k: v[rows] for k, v in meta.items() if k in CTF_COLUMNS + OPTICS_COLUMNS}
    optics.update(model_aberrations(optics, pixel_size_A))
    rot = magnified_rotations(truth["rotation"][rows], optics)
    slices = extract_central_slices_rfft(reference_rfft, rot, box_size)
    weight = truth["scale"][rows].reshape(-1, 1, 1)
    if use_ctf:
        weight = weight * particle_ctfs(optics, box_size, pixel_size_A)
    if envelope_bfactor_A2 > 0:
        weight = weight * envelope_rfft(box_size, pixel_size_A, envelope_bfactor_A2)
    f = modulate(slices * weight.astype(np.float32), optics, pixel_size_A)
    shift_A = truth["shift_A"][rows]
    f = translate_rfft(f, -shift_A / image_pixel_sizes(optics, pixel_size_A,
                                                       shift_A.shape[0])[:, None])
    return centred_irfftn(f, 2, box_size).astype(np.float32)


def _mean_image_variance(reference, meta, truth, rows, box, pixel_size_A, use_ctf,
                         envelope_bfactor_A2) -> float:
    """Mean per-image variance of the noise-free images of ``reference`` at rows ``rows``."""
    images = render_particles(reference, meta, truth, rows, box, pixel_size_A, use_ctf,
                              envelope_bfactor_A2)
    return float(images.var(axis=(1, 2)).mean())


def render_with_junk(reference, junk_reference, meta: dict, truth: dict, kinds: np.ndarray,
                     rows: slice, box_size: int, pixel_size_A: float, use_ctf: bool = True,
                     envelope_bfactor_A2: float = 0.0) -> np.ndarray:
    """Noise-free images ``(n, D, D)`` float32 of rows ``rows``: particles from ``reference``,
    empty ice as zeros and junk blobs from ``junk_reference`` (already scaled; may be None when
    ``kinds`` holds no blob)."""
    images = render_particles(reference, meta, truth, rows, box_size, pixel_size_A, use_ctf,
                              envelope_bfactor_A2)
    block = kinds[rows]
    images[block == EMPTY_ICE] = 0.0
    blob = np.flatnonzero(block == JUNK_BLOB)
    if blob.size:
        images[blob] = render_particles(junk_reference, meta, truth, rows.start + blob, box_size,
                                        pixel_size_A, use_ctf, envelope_bfactor_A2)
    return images


def simulate_store(volume: np.ndarray, pixel_size_A: float, store_path,
                   config: SimulationConfig = SimulationConfig(), write_poses: bool = False,
                   source: str = "", progress=None,
                   storage_options: dict | None = None) -> ParticleStore:
    """Simulate ``config.n_particles`` images of ``volume`` into a new particle store.

    ``store_path``: a folder or an fsspec URL (``storage_options`` for the URL, see
    :class:`ParticleStore`). ``progress``: optional callable ``(done, total)`` called after each
    chunk. Provenance records the config, the noise σ and (with junk blobs) their scale.
    """
    box = volume.shape[-1]
    sim = simulate_metadata(config, box, pixel_size_A)
    meta, truth, kinds = sim["meta"], sim["truth"], sim["junk_kind"]
    reference = prepare_reference_rfft(np.asarray(volume, dtype=np.float32), config.pad)
    n = config.n_particles
    envelope = config.envelope_bfactor_A2
    # the pilot: up to PILOT_ROWS true particles (junk rows left out), for the noise level
    # (snr) and the junk blobs' scale
    pilot_rows = np.flatnonzero(kinds == PARTICLE)[:PILOT_ROWS]
    if pilot_rows.size == 0:  # a tiny store that is all junk: its rows as if particles
        pilot_rows = np.arange(min(n, PILOT_ROWS))
    pilot = (reference, meta, truth, pilot_rows, box, pixel_size_A, config.ctf, envelope)
    has_blobs = bool(np.any(kinds == JUNK_BLOB))
    particle_variance = (_mean_image_variance(*pilot)
                         if math.isfinite(config.snr) or has_blobs else None)
    noise_sigma = 1.0
    if math.isfinite(config.snr):
        noise_sigma = math.sqrt(particle_variance / config.snr)
    provenance = {"created_by": "dask_refine.simulate", "source_map": str(source),
                  "simulation": asdict(config), "noise_sigma": noise_sigma}
    junk_reference = None
    if has_blobs:  # blobs with the particles' mean image variance
        blob_reference = prepare_reference_rfft(junk_volume(box, pixel_size_A, config.seed),
                                                config.pad)
        blob_scale = math.sqrt(particle_variance / _mean_image_variance(blob_reference,
                                                                        *pilot[1:]))
        junk_reference = blob_reference * np.float32(blob_scale)
        provenance["junk_blob_scale"] = blob_scale
    store = ParticleStore.create(
        store_path, n, box, pixel_size_A, config.chunk_size,
        optics=[{"optics_group": g + 1, "voltage_kV": config.voltage_kV, "cs_mm": config.cs_mm,
                 "amplitude_contrast": config.amplitude_contrast}
                for g in range(1 + len(config.other_group_pixel_sizes_A))],
        provenance=provenance, storage_options=storage_options,
    )
    filed = dict(meta)
    if config.defocus_error_A > 0:
        error = np.random.default_rng([config.seed, 7]).normal(0.0, config.defocus_error_A, n)
        for name in ("defocus_u_A", "defocus_v_A"):
            filed[name] = meta[name] + error
            store.write_column(name, meta[name], group=GROUND_TRUTH)
    for name, values in filed.items():
        store.write_column(name, values)
    for name, values in truth.items():
        store.write_column(name, values, group=GROUND_TRUTH)
        if write_poses:
            store.write_column(name, values)
    store.write_column("is_junk", kinds != PARTICLE, group=GROUND_TRUTH)
    store.write_column("junk_kind", kinds, group=GROUND_TRUTH)
    noise_seeds = np.random.SeedSequence([config.seed, 2]).spawn(math.ceil(n / config.chunk_size))
    for i, start in enumerate(range(0, n, config.chunk_size)):
        rows = slice(start, min(start + config.chunk_size, n))
        images = render_with_junk(reference, junk_reference, meta, truth, kinds, rows, box,
                                  pixel_size_A, config.ctf, envelope)
        if math.isfinite(config.snr):
            rng = np.random.default_rng(noise_seeds[i])
            noise = simulate_noise(rng, images.shape, pixel_size_A, config.noise_color)
            images = (images + noise_sigma * noise) / noise_sigma
        store.write_images(start, images)
        if progress is not None:
            progress(rows.stop, n)
    return store


def resimulate_rows(store_path, volume: np.ndarray, rows: slice, seed: int = 0,
                    storage_options: dict | None = None) -> ParticleStore:
    """Re-render particles ``rows`` of a simulated store from another map, with the same truth,
    CTFs and noise level (heterogeneous data: e.g. a second conformation or class). The store's
    provenance records which rows came from which map. Returns the store.

    The simulation's nuisances are honoured from the provenance: the envelope and the noise
    colour apply to the new images, preferred views are in the truth already, and junk rows
    (``ground_truth/is_junk``) are left as they are: they are images of no map.
    """
    store = ParticleStore.open(store_path, mode="r+", storage_options=storage_options)
    attrs = store.attrs
    provenance = dict(attrs.get("provenance", {}))
    if "noise_sigma" not in provenance:
        raise ValueError(f"{store_path}: not a simulated store (no noise level recorded)")
    info = store.info
    sim = provenance.get("simulation", {})
    use_ctf = bool(sim.get("ctf", True))
    envelope = float(sim.get("envelope_bfactor_A2", 0.0))
    noise_color = sim.get("noise_color", "white")
    if noise_color not in NOISE_COLORS:
        raise InputError(f"{store_path} provenance simulation.noise_color",
                         f"{noise_color!r} is not one this version can simulate "
                         f"({', '.join(NOISE_COLORS)})")
    junk = (store.read_column("is_junk", group=GROUND_TRUTH)
            if store.has_column("is_junk", group=GROUND_TRUTH) else None)
    if junk is None and float(sim.get("junk_fraction", 0.0)) > 0:
        raise InputError(f"{store_path}/{GROUND_TRUTH}/is_junk",
                         "missing, but the simulation made junk; cannot tell junk rows apart")
    sigma = float(provenance["noise_sigma"])
    meta = store.metadata(list(CTF_COLUMNS + OPTICS_COLUMNS))
    for name in ("defocus_u_A", "defocus_v_A"):  # the true defocus, where the filed one errs
        if store.has_column(name, group=GROUND_TRUTH):
            meta[name] = store.read_column(name, group=GROUND_TRUTH)
    truth = {k: store.read_column(k, group=GROUND_TRUTH) for k in ("rotation", "shift_A", "scale")}
    reference = prepare_reference_rfft(np.asarray(volume, np.float32),
                                       int(sim.get("pad", DEFAULT_PAD)))
    start, stop, _ = rows.indices(info.n_particles)
    rng = np.random.default_rng([seed, 3])
    step = max(1, int(store.images.chunks[0]))
    for first in range(start, stop, step):
        block = slice(first, min(first + step, stop))
        images = render_particles(reference, meta, truth, block, info.box_size,
                                  info.pixel_size_A, use_ctf, envelope)
        if math.isfinite(sim.get("snr", math.inf)):
            noise = simulate_noise(rng, images.shape, info.pixel_size_A, noise_color)
            images = (images + sigma * noise) / sigma
        if junk is not None and junk[block].any():
            keep = junk[block]
            images[keep] = np.asarray(store.images[block])[keep]
        store.write_images(first, images)
    provenance.setdefault("resimulated_rows", []).append([start, stop])
    store.group.attrs["provenance"] = provenance
    return store
