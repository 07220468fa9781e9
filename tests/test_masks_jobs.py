"""Masks in the jobs: user mask, automatic solvent mask, mask-corrected FSC in the outputs."""

import csv

import numpy as np
import pytest

from dask_refine.core.masks import solvent_mask
from dask_refine.io.errors import InputError
from dask_refine.io.mrc import write_map
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.jobs.masking import MaskOptions
from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct


@pytest.fixture(scope="module")
def posed_store(tmp_path_factory, demo_map):
    volume, px = demo_map
    root = tmp_path_factory.mktemp("masks")
    simulate_store(volume, px, root / "p.zarr",
                   SimulationConfig(n_particles=600, snr=0.1, chunk_size=300, seed=2),
                   write_poses=True)
    return root


def _run(root, name, **masks):
    return run_reconstruct(ReconstructConfig(store=str(root / "p.zarr"), out_dir=str(root / name),
                                             masks=MaskOptions(**masks)), log=lambda m: None)


def _columns(path):
    rows = list(csv.DictReader(open(path)))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def test_auto_mask_reports_unmasked_masked_and_corrected_curves(posed_store):
    plain = _run(posed_store, "plain")
    auto = _run(posed_store, "auto", auto_mask=True)
    assert (posed_store / "auto" / "mask.mrc").exists()
    cols = _columns(posed_store / "auto" / "fsc.csv")
    for k in ("fsc", "fsc_unmasked", "fsc_masked", "fsc_phase_randomized_masked",
              "fsc_corrected"):
        assert k in cols, k
    np.testing.assert_array_equal(cols["fsc"], cols["fsc_corrected"])
    # the solvent mask removes solvent noise: better than unmasked, reported separately
    assert auto["resolution_A"] < plain["resolution_A"]
    assert auto["resolution_unmasked_A"] == pytest.approx(plain["resolution_A"])
    assert auto["mask"] == "auto"


def test_user_mask_is_used_and_checked(posed_store, demo_map):
    volume, px = demo_map
    write_map(posed_store / "mask.mrc", solvent_mask(volume, 0.1 * volume.max()), px)
    user = _run(posed_store, "user", mask_path=str(posed_store / "mask.mrc"))
    assert user["mask"] == "user"
    assert "fsc_corrected" in _columns(posed_store / "user" / "fsc.csv")
    write_map(posed_store / "small.mrc", np.ones((32,) * 3, np.float32), px)
    with pytest.raises(InputError, match="small.mrc.*box 32"):
        _run(posed_store, "bad", mask_path=str(posed_store / "small.mrc"))
    write_map(posed_store / "range.mrc", 3 * np.ones((64,) * 3, np.float32), px)
    with pytest.raises(InputError, match="expected values in \\[0, 1\\]"):
        _run(posed_store, "bad2", mask_path=str(posed_store / "range.mrc"))
    write_map(posed_store / "px.mrc", np.ones((64,) * 3, np.float32), 2 * px)
    with pytest.raises(InputError, match="voxel size"):
        _run(posed_store, "bad3", mask_path=str(posed_store / "px.mrc"))


def test_fsc_report_of_band_limited_halves_finds_no_correlation_beyond_the_band(tmp_path,
                                                                                 demo_map):
    """Half maps with no Fourier data beyond shell 6: a soft mask leaks their low-resolution
    power into the empty shells (a correlation that is not the data's); with ``max_shell`` the
    report's curves are 0 there and its resolution stays inside the band."""
    from dask_refine.core.filters import lowpass_filter
    from dask_refine.core.fourier import centred_irfftn, centred_rfftn, rfft_radius
    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.jobs.masking import write_fsc_report

    volume, px = demo_map
    box = volume.shape[0]
    rng = np.random.default_rng(0)
    signal = lowpass_filter(volume, 4 * px, px)
    halves = []
    for _ in range(2):
        noisy = centred_rfftn((signal + rng.normal(0, 0.3 * signal.std(), signal.shape))
                              .astype(np.float64), 3)
        noisy[rfft_radius(box, 3) >= 6] = 0
        halves.append(centred_irfftn(noisy, 3, box).astype(np.float32))
    mask = soft_sphere_mask(box, 0.3 * box, soft_edge_px=3.0)
    for name in ("leaky", "limited"):
        (tmp_path / name).mkdir()
    leaky = write_fsc_report(tmp_path / "leaky", halves, mask, px)
    limited = write_fsc_report(tmp_path / "limited", halves, mask, px, max_shell=6)
    assert leaky["curves"]["masked"][6:].max() > 0.143  # what the mask leaks
    for name in ("unmasked", "masked", "randomized_masked", "corrected"):
        assert np.all(limited["curves"][name][6:] == 0), name
    np.testing.assert_array_equal(limited["curves"]["corrected"][:6],
                                  leaky["curves"]["corrected"][:6])
    assert limited["resolution_A"] >= box * px / 6
    rows = list(csv.DictReader(open(tmp_path / "limited" / "fsc.csv")))
    assert all(float(r["fsc"]) == 0 for r in rows[6:])


def test_refinement_mask_is_the_users_else_the_dynamic_one_from_its_start(demo_map):
    """A user mask wins; the dynamic mask starts at its resolution, covers the map's density
    and falls to 0 within ``far_A`` of it; before its start the sphere stays (None)."""
    from dask_refine.jobs.masking import DynamicMask, refinement_mask

    volume, px = demo_map
    user = np.ones_like(volume)
    assert refinement_mask((volume, volume), 20.0, px, user, DynamicMask()) is user
    assert refinement_mask((volume, volume), 20.0, px, None, DynamicMask()) is None
    assert refinement_mask((volume, volume), 8.0, px, None, None) is None
    mask = refinement_mask((volume, volume), 8.0, px, None, DynamicMask())
    density = volume > 0.3 * volume.max()
    assert mask[density].min() == pytest.approx(1.0)
    assert 0.05 < float((mask > 0).mean()) < 0.6  # tighter than the box, wider than the map


def test_refinement_masks_its_references_with_the_dynamic_mask(tmp_path, demo_map):
    """With a dynamic mask from the first iteration, each iteration writes the mask it used,
    its references are zero where the mask is, and its FSC is the solvent-corrected one."""
    from helpers import small_refine_dataset

    from dask_refine.io.mrc import read_map
    from dask_refine.jobs.masking import DynamicMask
    from dask_refine.jobs.refine import RefineConfig, run_refine

    small_refine_dataset(tmp_path, demo_map, n_particles=120, chunk_size=60)
    summary = run_refine(RefineConfig(
        store=str(tmp_path / "p.zarr"), initial_map=str(tmp_path / "initial.mrc"),
        out_dir=str(tmp_path / "o"), max_iterations=1, first_level_candidates=128,
        dynamic_mask=DynamicMask(start_A=100.0)), log=lambda m: None)
    for it in (1,):
        folder = tmp_path / "o" / "iterations" / f"iter_{it:03d}"
        mask, _ = read_map(folder / "mask.mrc")
        reference, _ = read_map(folder / "reference_A.mrc")
        assert 0.02 < float((mask > 0).mean()) < 0.7
        assert np.abs(reference[mask == 0]).max() == 0.0
        assert np.abs(reference[mask > 0.99]).max() > 0.0
    # the final FSC and the masked sharpened map use the last iteration's mask
    assert "fsc_corrected" in _columns(tmp_path / "o" / "fsc.csv")
    assert "map_sharp_masked" in summary["outputs"]
