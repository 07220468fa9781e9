"""Simulate a particle dataset with known ground truth from a 3D map.

Image model (DESIGN §1): ``X = T_{−shift}[ irfft( s · CTF · slice(V, R) ) ] + noise`` where
``T_{−shift}`` translates by −shift (RELION's origin convention: the particle is centred by
translating by +shift), slices come from the engine's Fourier-slice projector, and the noise is
white Gaussian. ``snr`` is the ratio of the mean per-image variance of the noise-free images to
the noise variance; images are divided by the noise σ, so the noise has unit variance as in
RELION-normalised particles.

The truth (rotation, shift_A, scale) is written under ``ground_truth/`` where no job reads it;
``write_poses=True`` also copies it to the top-level pose columns, as if a previous refinement had
produced it (for Reconstruction Only from known poses).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..core.ctf import ctf_rfft
from ..core.fourier import centred_irfftn, translate_rfft
from ..core.projection import DEFAULT_PAD, extract_central_slices_rfft, prepare_reference_rfft
from ..core.rotations import random_rotations
from .store import CTF_COLUMNS, GROUND_TRUTH, ParticleStore, assign_half_sets


@dataclass(frozen=True)
class SimulationConfig:
    """How to simulate particles. Units are in the names; ``snr=inf`` gives noise-free images."""

    n_particles: int = 2000
    snr: float = 0.1
    defocus_min_A: float = 10_000.0
    defocus_max_A: float = 25_000.0
    astigmatism_max_A: float = 500.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_A2: float = 0.0
    ctf: bool = True
    shift_sigma_A: float = 3.0
    scale_min: float = 0.8
    scale_max: float = 1.2
    chunk_size: int = 500
    pad: int = DEFAULT_PAD
    seed: int = 0


def simulate_metadata(config: SimulationConfig, box_size: int, pixel_size_A: float) -> dict:
    """Per-particle CTF parameters, half sets and the ground-truth poses/scales (all ``(N, …)``)."""
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
    truth = {
        "rotation": random_rotations(n, rng),
        "shift_A": shift,
        "scale": rng.uniform(config.scale_min, config.scale_max, n),
    }
    return {"meta": meta, "truth": truth}


def render_particles(reference_rfft, meta: dict, truth: dict, rows: slice, box_size: int,
                     pixel_size_A: float, use_ctf: bool = True) -> np.ndarray:
    """Noise-free images ``(n, D, D)`` float32 for particles ``rows`` (see the module's model)."""
    rot = truth["rotation"][rows]
    slices = extract_central_slices_rfft(reference_rfft, rot, box_size)
    weight = truth["scale"][rows].reshape(-1, 1, 1)
    if use_ctf:
        weight = weight * ctf_rfft(box_size, pixel_size_A,
                                   **{k: meta[k][rows] for k in CTF_COLUMNS})
    f = translate_rfft(slices * weight.astype(np.float32), -truth["shift_A"][rows] / pixel_size_A)
    return centred_irfftn(f, 2, box_size).astype(np.float32)


def simulate_store(volume: np.ndarray, pixel_size_A: float, store_path,
                   config: SimulationConfig = SimulationConfig(), write_poses: bool = False,
                   source: str = "", progress=None,
                   storage_options: dict | None = None) -> ParticleStore:
    """Simulate ``config.n_particles`` images of ``volume`` into a new particle store.

    ``store_path``: a folder or an fsspec URL (``storage_options`` for the URL, see
    :class:`ParticleStore`). ``progress``: optional callable ``(done, total)`` called after each
    chunk.
    """
    box = volume.shape[-1]
    sim = simulate_metadata(config, box, pixel_size_A)
    meta, truth = sim["meta"], sim["truth"]
    reference = prepare_reference_rfft(np.asarray(volume, dtype=np.float32), config.pad)
    n = config.n_particles
    noise_sigma = 1.0
    if math.isfinite(config.snr):
        pilot = render_particles(reference, meta, truth, slice(0, min(n, 200)), box,
                                 pixel_size_A, config.ctf)
        noise_sigma = math.sqrt(float(pilot.var(axis=(1, 2)).mean()) / config.snr)
    store = ParticleStore.create(
        store_path, n, box, pixel_size_A, config.chunk_size,
        optics=[{"optics_group": 1, "voltage_kV": config.voltage_kV, "cs_mm": config.cs_mm,
                 "amplitude_contrast": config.amplitude_contrast}],
        provenance={"created_by": "dask_refine.simulate", "source_map": str(source),
                    "simulation": asdict(config), "noise_sigma": noise_sigma},
        storage_options=storage_options,
    )
    for name, values in meta.items():
        store.write_column(name, values)
    for name, values in truth.items():
        store.write_column(name, values, group=GROUND_TRUTH)
        if write_poses:
            store.write_column(name, values)
    noise_seeds = np.random.SeedSequence([config.seed, 2]).spawn(math.ceil(n / config.chunk_size))
    for i, start in enumerate(range(0, n, config.chunk_size)):
        rows = slice(start, min(start + config.chunk_size, n))
        images = render_particles(reference, meta, truth, rows, box, pixel_size_A, config.ctf)
        if math.isfinite(config.snr):
            rng = np.random.default_rng(noise_seeds[i])
            images = (images + noise_sigma * rng.standard_normal(images.shape,
                                                                 dtype=np.float32)) / noise_sigma
        store.write_images(start, images)
        if progress is not None:
            progress(rows.stop, n)
    return store


def resimulate_rows(store_path, volume: np.ndarray, rows: slice, seed: int = 0,
                    storage_options: dict | None = None) -> ParticleStore:
    """Re-render particles ``rows`` of a simulated store from another map, with the same truth,
    CTFs and noise level (heterogeneous data: e.g. a second conformation or class). The store's
    provenance records which rows came from which map. Returns the store."""
    store = ParticleStore.open(store_path, mode="r+", storage_options=storage_options)
    attrs = store.attrs
    provenance = dict(attrs.get("provenance", {}))
    if "noise_sigma" not in provenance:
        raise ValueError(f"{store_path}: not a simulated store (no noise level recorded)")
    info = store.info
    sim = provenance.get("simulation", {})
    use_ctf = bool(sim.get("ctf", True))
    sigma = float(provenance["noise_sigma"])
    meta = store.metadata(list(CTF_COLUMNS))
    truth = {k: store.read_column(k, group=GROUND_TRUTH) for k in ("rotation", "shift_A", "scale")}
    reference = prepare_reference_rfft(np.asarray(volume, np.float32),
                                       int(sim.get("pad", DEFAULT_PAD)))
    start, stop, _ = rows.indices(info.n_particles)
    rng = np.random.default_rng([seed, 3])
    step = max(1, int(store.images.chunks[0]))
    for first in range(start, stop, step):
        block = slice(first, min(first + step, stop))
        images = render_particles(reference, meta, truth, block, info.box_size,
                                  info.pixel_size_A, use_ctf)
        if math.isfinite(sim.get("snr", math.inf)):
            images = (images + sigma * rng.standard_normal(images.shape, dtype=np.float32)) / sigma
        store.write_images(first, images)
    provenance.setdefault("resimulated_rows", []).append([start, stop])
    store.group.attrs["provenance"] = provenance
    return store
