import numpy as np
import pandas as pd
import pytest
import starfile

from dask_refine.core.rotations import euler_to_matrix
from dask_refine.io.errors import InputError
from dask_refine.io.mrc import write_stack
from dask_refine.io.star import export_star, import_star, read_star
from dask_refine.io.store import ParticleStore


def _relion31(tmp_path, rng, n=7, box=16):
    (tmp_path / "Extract" / "job007").mkdir(parents=True)
    stack = rng.standard_normal((n, box, box)).astype(np.float32)
    write_stack(tmp_path / "Extract" / "job007" / "mic1.mrcs", stack, 1.25)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"], "rlnOpticsGroup": [1, 2],
        "rlnMicrographOriginalPixelSize": [0.625, 0.625], "rlnVoltage": [300.0, 200.0],
        "rlnSphericalAberration": [2.7, 1.4], "rlnAmplitudeContrast": [0.1, 0.07],
        "rlnImagePixelSize": [1.25, 1.25], "rlnImageSize": [box, box],
        "rlnImageDimensionality": [2, 2]})
    particles = pd.DataFrame({
        "rlnCoordinateX": rng.uniform(0, 4000, n), "rlnCoordinateY": rng.uniform(0, 4000, n),
        "rlnImageName": [f"{i + 1:06d}@Extract/job007/mic1.mrcs" for i in range(n)],
        "rlnMicrographName": ["MotionCorr/job002/mic1.mrc"] * n,
        "rlnOpticsGroup": [1 + (i % 2) for i in range(n)],
        "rlnDefocusU": rng.uniform(10000, 20000, n), "rlnDefocusV": rng.uniform(9000, 10000, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnPhaseShift": np.zeros(n),
        "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n),
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(1, 179, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.uniform(-5, 5, n),
        "rlnOriginYAngst": rng.uniform(-5, 5, n), "rlnClassNumber": np.ones(n, int),
        "rlnRandomSubset": [1 + (i % 2) for i in range(n)],
        "rlnGroupNumber": np.ones(n, int)})
    star = tmp_path / "Refine3D" / "job010" / "run_data.star"
    star.parent.mkdir(parents=True)
    starfile.write({"optics": optics, "particles": particles}, star)
    return star, stack, optics, particles


def test_import_relion31(tmp_path, rng):
    star, stack, optics, particles = _relion31(tmp_path, rng)
    before = star.read_bytes()
    s = import_star(star, tmp_path / "p.zarr", chunk_size=3)
    assert star.read_bytes() == before  # input untouched
    assert s.info.n_particles == 7 and s.info.box_size == 16 and s.info.pixel_size_A == 1.25
    np.testing.assert_array_equal(s.images[:], stack)
    np.testing.assert_allclose(s.read_column("voltage_kV"), [300, 200, 300, 200, 300, 200, 300])
    np.testing.assert_allclose(s.read_column("cs_mm")[1], 1.4)
    np.testing.assert_allclose(s.read_column("defocus_u_A"), particles["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(s.read_column("rotation"), euler_to_matrix(
        particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"]), atol=1e-5)
    np.testing.assert_allclose(s.read_column("shift_A")[:, 1], particles["rlnOriginYAngst"],
                               rtol=1e-5)
    np.testing.assert_array_equal(s.read_column("half_set"), np.arange(7) % 2)


def test_star_round_trip_keeps_every_field(tmp_path, rng):
    star, _, optics, particles = _relion31(tmp_path, rng)
    s = import_star(star, tmp_path / "p.zarr")
    out = tmp_path / "Refine3D" / "job010" / "exported.star"
    export_star(s, out)
    optics2, particles2 = read_star(out)
    assert list(particles2.columns)[: len(particles.columns)] == list(particles.columns)
    for label in particles.columns:
        a, b = particles[label], particles2[label]
        if a.dtype.kind in "if":
            if label.startswith("rlnAngle"):  # same rotation, maybe other equivalent angles
                continue
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=label)
        else:
            assert list(a.astype(str)) == list(b.astype(str)), label
    np.testing.assert_allclose(
        euler_to_matrix(particles2["rlnAngleRot"], particles2["rlnAngleTilt"],
                        particles2["rlnAnglePsi"]),
        euler_to_matrix(particles["rlnAngleRot"], particles["rlnAngleTilt"],
                        particles["rlnAnglePsi"]), atol=1e-5)
    pd.testing.assert_frame_equal(optics2, optics, check_dtype=False)
    # and the exported file imports again to the same store content
    s2 = import_star(out, tmp_path / "p2.zarr")
    np.testing.assert_array_equal(s2.images[:], s.images[:])
    np.testing.assert_allclose(s2.read_column("rotation"), s.read_column("rotation"), atol=1e-5)


def test_import_relion30(tmp_path, rng):
    n, box = 4, 12
    write_stack(tmp_path / "parts.mrcs", rng.standard_normal((n, box, box)), 2.0)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1}@parts.mrcs" for i in range(n)],
        "rlnDefocusU": [15000.0] * n, "rlnDefocusV": [14000.0] * n, "rlnDefocusAngle": [5.0] * n,
        "rlnVoltage": [300.0] * n, "rlnSphericalAberration": [2.7] * n,
        "rlnAmplitudeContrast": [0.1] * n, "rlnMagnification": [50000.0] * n,
        "rlnDetectorPixelSize": [10.0] * n,
        "rlnAngleRot": [0.0, 10, 20, 30], "rlnAngleTilt": [90.0] * n, "rlnAnglePsi": [0.0] * n,
        "rlnOriginX": [1.0, -2.0, 0.5, 0.0], "rlnOriginY": [0.0] * n})
    star = tmp_path / "old.star"
    starfile.write({"": particles}, star)
    s = import_star(star, tmp_path / "p.zarr")
    assert s.info.pixel_size_A == 2.0  # 1e4 · 10 µm / 50000
    np.testing.assert_allclose(s.read_column("shift_A")[:, 0], [2.0, -4.0, 1.0, 0.0])  # px → Å
    assert s.attrs["provenance"]["star_version"] == "3.0"
    export_star(s, tmp_path / "new.star")
    optics2, particles2 = read_star(tmp_path / "new.star")
    assert optics2["rlnImagePixelSize"][0] == 2.0
    np.testing.assert_allclose(particles2["rlnOriginXAngst"], [2.0, -4.0, 1.0, 0.0])
    assert "rlnOriginX" not in particles2.columns


@pytest.mark.parametrize("problem, match", [
    ("missing_column", "rlnDefocusU"),
    ("non_numeric", "row 2 has 'abc'"),
    ("missing_stack", "not found"),
    ("bad_name", "expected 'N@stack.mrcs'"),
    ("index_range", "image number 99"),
    ("mixed_box", "mixed box"),
    ("nan_pixels", "NaN"),
    ("not_star", "not a readable STAR|no particle table"),
])
def test_bad_star_input(tmp_path, rng, problem, match):
    star, stack, optics, particles = _relion31(tmp_path, rng, n=4)
    p = particles.copy()
    if problem == "missing_column":
        p = p.drop(columns=["rlnDefocusU"])
    elif problem == "non_numeric":
        p["rlnDefocusV"] = p["rlnDefocusV"].astype(object)
        p.loc[1, "rlnDefocusV"] = "abc"
    elif problem == "missing_stack":
        p.loc[2, "rlnImageName"] = "000001@Extract/job007/gone.mrcs"
    elif problem == "bad_name":
        p.loc[0, "rlnImageName"] = "Extract/job007/mic1.mrcs"
    elif problem == "index_range":
        p.loc[3, "rlnImageName"] = "000099@Extract/job007/mic1.mrcs"
    elif problem == "mixed_box":
        write_stack(tmp_path / "Extract" / "job007" / "big.mrcs", np.zeros((2, 20, 20)), 1.25)
        p.loc[3, "rlnImageName"] = "000001@Extract/job007/big.mrcs"
    elif problem == "nan_pixels":
        bad = stack.copy()
        bad[2, 0, 0] = np.inf
        write_stack(tmp_path / "Extract" / "job007" / "mic1.mrcs", bad, 1.25)
    if problem == "not_star":
        star.write_text("this is not a star file\n")
    else:
        starfile.write({"optics": optics, "particles": p}, star)
    before = star.read_bytes()
    with pytest.raises(InputError, match=match):
        import_star(star, tmp_path / "p.zarr")
    assert star.read_bytes() == before
    assert not (tmp_path / "p.zarr").exists()  # no half-made store left behind


def test_export_simulated_store_writes_stack(tmp_path, demo_map):
    from dask_refine.io.simulate import SimulationConfig, simulate_store

    volume, px = demo_map
    s = simulate_store(volume, px, tmp_path / "sim.zarr",
                       SimulationConfig(n_particles=6, snr=1.0), write_poses=True)
    export_star(s, tmp_path / "out" / "sim.star")
    assert (tmp_path / "out" / "sim.mrcs").exists()
    s2 = import_star(tmp_path / "out" / "sim.star", tmp_path / "again.zarr")
    np.testing.assert_array_equal(s2.images[:], s.images[:])
    np.testing.assert_allclose(s2.read_column("scale"), s.read_column("scale"), rtol=1e-5)
    np.testing.assert_allclose(s2.read_column("shift_A"), s.read_column("shift_A"), atol=1e-5)
    assert isinstance(ParticleStore.open(tmp_path / "again.zarr"), ParticleStore)


def _star_rows_equal(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Every column of ``want`` is in ``got`` with the same values (angles: the same rotation)."""
    want = want.reset_index(drop=True)
    assert list(got.columns)[: len(want.columns)] == list(want.columns)
    for label in want.columns:
        a, b = want[label], got[label]
        if label.startswith("rlnAngle"):
            continue
        if a.dtype.kind in "if":
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=label)
        else:
            assert list(a.astype(str)) == list(b.astype(str)), label
    np.testing.assert_allclose(
        euler_to_matrix(got["rlnAngleRot"], got["rlnAngleTilt"], got["rlnAnglePsi"]),
        euler_to_matrix(want["rlnAngleRot"], want["rlnAngleTilt"], want["rlnAnglePsi"]),
        atol=1e-5)


def test_skip_bad_leaves_out_and_lists_nan_inf_particles(tmp_path, rng, capsys):
    import warnings

    from dask_refine.ui.cli import main

    star, stack, optics, particles = _relion31(tmp_path, rng, n=20)
    bad_stack = stack.copy()
    bad_stack[2, 3, 4] = np.nan
    bad_stack[10, :, :] = np.nan
    bad_stack[16, 0, 0] = -np.inf
    mrcs = tmp_path / "Extract" / "job007" / "mic1.mrcs"
    write_stack(mrcs, bad_stack, 1.25)
    before, before_mrcs = star.read_bytes(), mrcs.read_bytes()
    store = tmp_path / "p.zarr"

    # without --skip-bad: one error naming the particle, suggesting the flag; no store
    assert main(["import-star", str(star), str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "row 3 of" in err and "NaN or Inf" in err and "--skip-bad" in err
    assert not store.exists()

    # with it: the 17 good particles, the 3 bad ones listed
    assert main(["import-star", str(star), str(store), "--skip-bad", "--chunk-size", "4"]) == 0
    captured = capsys.readouterr()
    listed = store / "skipped" / "particles.csv"
    assert f"skipped 3 of 20 particles with NaN/Inf pixels; listed in {listed}" in captured.err
    assert "imported 17 particles" in captured.out
    keep = np.ones(20, bool)
    keep[[2, 10, 16]] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the list is no stray file to Zarr
        s = ParticleStore.open(store)
    assert s.info.n_particles == 17 and s.images.shape == (17, 16, 16)
    np.testing.assert_array_equal(s.images[:], stack[keep])
    np.testing.assert_array_equal(s.read_column("half_set"),
                                  particles["rlnRandomSubset"].to_numpy()[keep] - 1)
    np.testing.assert_allclose(s.read_column("defocus_u_A"), particles["rlnDefocusU"][keep])
    np.testing.assert_allclose(s.read_column("voltage_kV"),
                               np.where(np.arange(20) % 2, 200.0, 300.0)[keep])
    table = pd.read_csv(listed)
    assert list(table.columns) == ["input_row_1based", "rlnImageName", "reason"]
    assert list(table["input_row_1based"]) == [3, 11, 17]
    assert list(table["rlnImageName"]) == list(particles["rlnImageName"][~keep])
    assert list(table["reason"]) == ["NaN pixels", "NaN pixels", "Inf pixels"]
    assert s.attrs["skipped_particles"]["count"] == 3

    # export gives back exactly the kept rows; the inputs are untouched
    out = tmp_path / "kept.star"
    assert main(["export-star", str(store), str(out)]) == 0
    optics2, particles2 = read_star(out)
    assert len(particles2) == 17
    _star_rows_equal(particles2, particles[keep])
    pd.testing.assert_frame_equal(optics2, optics, check_dtype=False)
    assert star.read_bytes() == before and mrcs.read_bytes() == before_mrcs

    # every particle bad: a clear error, no store
    write_stack(mrcs, np.full_like(stack, np.nan), 1.25)
    with pytest.raises(InputError, match="all 20 particles have NaN or Inf pixels"):
        import_star(star, tmp_path / "q.zarr", skip_bad=True)
    assert not (tmp_path / "q.zarr").exists()
