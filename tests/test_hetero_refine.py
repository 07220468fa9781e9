"""Heterogeneous Refinement: a two-class mixture is separated and each class map is its truth."""

import numpy as np
import pytest
import starfile

from dask_refine.core.fourier import centred_fftn, centred_ifftn, crop_centred
from dask_refine.core.fsc import fsc
from dask_refine.core.projection import prepare_reference_rfft
from dask_refine.io.mrc import read_map, write_map
from dask_refine.io.simulate import SimulationConfig, render_particles, simulate_store
from dask_refine.io.store import GROUND_TRUTH, ParticleStore
from dask_refine.jobs.refine import RefineConfig, run_refine

N = 240


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, demo_map):
    """Box 32: class 1 = the structure, class 2 = the same with a third of it removed; the
    second half of the store holds class-2 particles (same noise level)."""
    volume, px = demo_map
    f = crop_centred(centred_fftn(volume.astype(np.float64), 3), 32, 3)
    map_a = (centred_ifftn(f, 3).real / 8).astype(np.float32)
    map_b = map_a.copy()
    map_b[:, :, 19:] = 0.0  # x > centre + 3 px removed
    px = 2 * px
    root = tmp_path_factory.mktemp("hetero_refine")
    cfg = SimulationConfig(n_particles=N, snr=0.5, chunk_size=60, seed=21)
    store = simulate_store(map_a, px, root / "p.zarr", cfg)
    store = ParticleStore.open(root / "p.zarr", mode="r+")
    sigma = store.attrs["provenance"]["noise_sigma"]
    meta = store.metadata(["defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg",
                           "bfactor_A2", "voltage_kV", "cs_mm", "amplitude_contrast"])
    truth = {k: store.read_column(k, group=GROUND_TRUTH) for k in ("rotation", "shift_A", "scale")}
    second = slice(N // 2, N)
    images = render_particles(prepare_reference_rfft(map_b), meta, truth, second, 32, px)
    rng = np.random.default_rng(5)
    store.write_images(N // 2, (images + sigma * rng.standard_normal(images.shape)) / sigma)
    for name, m in (("a.mrc", map_a), ("b.mrc", map_b)):
        write_map(root / name, m, px)
    return root, map_a, map_b


def test_two_class_mixture_is_separated(mixture):
    root, map_a, map_b = mixture
    summary = run_refine(RefineConfig(store=str(root / "p.zarr"),
                                      initial_map=(str(root / "a.mrc"), str(root / "b.mrc")),
                                      out_dir=str(root / "out"), max_iterations=3),
                         log=lambda m: None)
    truth = np.r_[np.zeros(N // 2, int), np.ones(N // 2, int)]
    star = starfile.read(root / "out" / "particles.star", always_dict=True)["particles"]
    assigned = star["rlnClassNumber"].to_numpy() - 1
    assert np.mean(assigned == truth) >= 0.95
    assert {1, 2} <= set(summary["classes"])
    for k, m in ((1, map_a), (2, map_b)):
        got = read_map(root / "out" / f"class_{k:03d}" / "map.mrc")[0]
        other = map_b if k == 1 else map_a
        assert fsc(got, m)[1:8].mean() > fsc(got, other)[1:8].mean()  # closer to its own truth
        assert fsc(got, m)[1:6].min() > 0.8
        subset = starfile.read(root / "out" / f"particles_class_{k:03d}.star",
                               always_dict=True)["particles"]
        assert len(subset) == int((assigned == k - 1).sum())
