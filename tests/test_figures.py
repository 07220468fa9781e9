"""Figures written by the jobs: valid PNGs of sensible size, drawn from the right numbers."""

import numpy as np
import pytest
from distributed import Client, LocalCluster
from PIL import Image

from dask_refine.core.guinier import guinier_bfactor
from dask_refine.core.rotations import random_rotations
from dask_refine.io.figures import (_central_slices, write_fsc_png, write_guinier_png,
                                    write_job_figures, write_orientation_png, write_slices_png)
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.store import ParticleStore
from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct


def check_png(path, min_size=(500, 300)):
    """A PNG that opens, is at least ``min_size`` pixels and is not blank; returns it (RGB)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = Image.open(path)
    image.verify()
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1], image.shape
    assert image.std() > 10, "blank figure"
    assert not list(path.parent.glob(f".{path.name}.tmp*")), "temporary file left behind"
    return image


def test_each_figure_is_a_valid_png(tmp_path, demo_map, rng):
    volume, px = demo_map
    curve = np.clip(1.1 - np.arange(33) / 25, -0.05, 1.0)
    check_png(write_fsc_png(tmp_path / "fsc.png", {"half A vs half B": curve}, 64, px, 5.0))
    check_png(write_orientation_png(tmp_path / "o.png", random_rotations(500, rng)))
    check_png(write_orientation_png(tmp_path / "o4.png", random_rotations(50, rng), "C4"))
    check_png(write_slices_png(tmp_path / "s.png", volume, px), (800, 300))
    check_png(write_slices_png(tmp_path / "s3.png", {"map": volume, "half A": volume,
                                                     "half B": volume}, px), (800, 800))
    fit = guinier_bfactor(volume, px, curve)
    check_png(write_guinier_png(tmp_path / "g.png", fit, px, 5.0))
    none = guinier_bfactor(volume[::4, ::4, ::4], 4 * px)  # Nyquist 16 Å: no fit, still a plot
    assert none.bfactor_A2 is None
    check_png(write_guinier_png(tmp_path / "g0.png", none, 4 * px))


def test_central_slices_are_the_planes_through_the_box_centre():
    vol = np.zeros((8, 8, 8))
    vol[4, 1, 6] = 1.0  # z = 4 (centre), y = 1, x = 6
    vol[2, 4, 7] = 2.0  # y = 4 (centre): in the XZ slice at row z = 2, column x = 7
    vol[3, 5, 4] = 3.0  # x = 4 (centre): in the YZ slice at row z = 3, column y = 5
    (n_xy, xy, *_), (n_xz, xz, *_), (n_yz, yz, *_) = _central_slices(vol)
    assert xy[1, 6] == 1.0 and xz[2, 7] == 2.0 and yz[3, 5] == 3.0
    assert n_xy.startswith("XY") and n_xz.startswith("XZ") and n_yz.startswith("YZ")


def test_job_figures_report_the_bfactor_of_the_half_map_average(tmp_path, demo_map, rng):
    volume, px = demo_map
    halves = [volume + 0.01 * rng.standard_normal(volume.shape) for _ in range(2)]
    curve = np.ones(33)
    out = write_job_figures(tmp_path, halves, volume, curve, 4.0, px, random_rotations(100, rng))
    expected = guinier_bfactor(0.5 * (halves[0] + halves[1]), px, curve)
    assert out["bfactor_A2"] == pytest.approx(expected.bfactor_A2)
    assert out["bfactor_fit_range_A"] == pytest.approx(expected.fit_range_A)
    assert set(out["outputs"]) == {"orientations_plot", "slices_plot", "guinier_plot"}
    for path in out["outputs"].values():
        check_png(tmp_path / path.rsplit("/", 1)[-1])
    (tmp_path / "no_poses").mkdir()
    without = write_job_figures(tmp_path / "no_poses", halves, volume, curve, 4.0, px)
    assert "orientations_plot" not in without["outputs"]


def test_heterogeneous_reconstruction_writes_figures_per_class(tmp_path, demo_map):
    volume, px = demo_map
    simulate_store(volume, px, tmp_path / "p.zarr",
                   SimulationConfig(n_particles=240, snr=1.0, chunk_size=120, seed=8),
                   write_poses=True)
    labels = np.arange(240) % 2
    ParticleStore.open(tmp_path / "p.zarr", mode="r+").write_column("class_id",
                                                                   labels.astype(np.int32))
    config = ReconstructConfig(store=str(tmp_path / "p.zarr"), out_dir=str(tmp_path / "out"),
                               classes="labels", n_chains=1)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        summary = run_reconstruct(config, client=client, log=lambda m: None)
    for k in (1, 2):
        folder = tmp_path / "out" / f"class_{k:03d}"
        for name in ("fsc.png", "orientations.png", "slices.png", "guinier.png"):
            check_png(folder / name)
        assert summary["per_class"][k]["outputs"]["guinier_plot"] == str(folder / "guinier.png")
        assert np.isfinite(summary["per_class"][k]["bfactor_A2"])
