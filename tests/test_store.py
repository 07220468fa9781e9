import numpy as np
import pytest
import zarr

from dask_refine.io.errors import InputError
from dask_refine.io.simulate import SimulationConfig, resimulate_rows, simulate_store
from dask_refine.io.store import GROUND_TRUTH, ParticleStore, assign_half_sets


def test_create_open_and_columns(tmp_path, rng):
    s = ParticleStore.create(tmp_path / "p.zarr", 10, 8, 1.5, chunk_size=4)
    s.write_images(0, rng.standard_normal((10, 8, 8)))
    s.write_column("defocus_u_A", np.arange(10.0))
    s.write_column("rotation", np.broadcast_to(np.eye(3), (10, 3, 3)))
    s.write_column("rlnImageName", np.array([f"{i}@a.mrcs" for i in range(10)]), group="star")
    t = ParticleStore.open(tmp_path / "p.zarr")
    assert t.info.n_particles == 10 and t.info.chunk_size == 4 and t.info.pixel_size_A == 1.5
    assert t.images_dask().chunks[0] == (4, 4, 2)
    assert t.read_column("rotation").shape == (10, 3, 3)
    assert t.read_column("rlnImageName", group="star")[3] == "3@a.mrcs"
    with pytest.raises(InputError, match="column not found"):
        t.read_column("scale")


def test_errors(tmp_path):
    with pytest.raises(InputError, match="no such particle store"):
        ParticleStore.open(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(InputError, match="expected 'dask_refine.particles'"):
        ParticleStore.open(tmp_path / "other.zarr")
    ParticleStore.create(tmp_path / "p.zarr", 4, 8, 1.0)
    with pytest.raises(InputError, match="already exists"):
        ParticleStore.create(tmp_path / "p.zarr", 4, 8, 1.0)
    with pytest.raises(InputError, match="no particles"):
        ParticleStore.create(tmp_path / "e.zarr", 0, 8, 1.0)
    with pytest.raises(InputError, match="odd"):
        ParticleStore.create(tmp_path / "o.zarr", 4, 9, 1.0)


def test_half_sets_balanced():
    h = assign_half_sets(1001, seed=3)
    assert set(np.unique(h)) == {0, 1} and abs(int(h.sum()) - 500) <= 1


def test_simulated_store_keeps_truth_apart(tmp_path, demo_map):
    volume, px = demo_map
    cfg = SimulationConfig(n_particles=60, snr=0.5, chunk_size=25, seed=2)
    s = simulate_store(volume, px, tmp_path / "sim.zarr", cfg)
    assert not s.has_column("rotation")  # jobs can't read the truth by accident
    truth = s.read_column("rotation", group=GROUND_TRUTH)
    assert truth.shape == (60, 3, 3)
    images = s.images[:]
    # normalised: noise has unit variance, so the image variance is 1 + SNR on average
    assert abs(images.var(axis=(1, 2)).mean() - 1.5) < 0.15
    s2 = simulate_store(volume, px, tmp_path / "sim2.zarr", cfg, write_poses=True)
    np.testing.assert_array_equal(s2.read_column("rotation"), truth)
    np.testing.assert_array_equal(s2.images[:], images)  # deterministic given the seed


def test_resimulate_rows_renders_another_map_with_the_same_truth(tmp_path, demo_map):
    volume, px = demo_map
    cfg = SimulationConfig(n_particles=30, snr=np.inf, chunk_size=8, seed=4)
    original = simulate_store(volume, px, tmp_path / "s.zarr", cfg).images[:]
    same = resimulate_rows(tmp_path / "s.zarr", volume, slice(10, 30)).images[:]
    np.testing.assert_allclose(same, original, atol=1e-4 * np.abs(original).max())
    other = resimulate_rows(tmp_path / "s.zarr", 0.5 * volume, slice(10, 30))
    np.testing.assert_array_equal(other.images[:10], original[:10])
    np.testing.assert_allclose(other.images[10:], 0.5 * original[10:],
                               atol=1e-4 * np.abs(original).max())
    assert other.attrs["provenance"]["resimulated_rows"] == [[10, 30], [10, 30]]
    with pytest.raises(ValueError, match="not a simulated store"):
        ParticleStore.create(tmp_path / "plain.zarr", 4, 8, 1.0)
        resimulate_rows(tmp_path / "plain.zarr", volume, slice(0, 2))
