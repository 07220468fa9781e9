"""cryoSPARC .cs particle files (io/cryosparc.py): import, export, exact round trips, the pose
convention checked against the peers' formulas (cryoDRGN, pyem), and bad input."""

import io
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from helpers import downsample_to_32
from numpy.lib.recfunctions import rename_fields, repack_fields

from dask_refine.core.rotations import angular_distance_deg, euler_to_matrix, random_rotations
from dask_refine.io.cryosparc import export_cs, import_cs, read_raw_cs
from dask_refine.io.errors import InputError
from dask_refine.io.mrc import write_stack
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.star import export_star, import_star, read_star
from dask_refine.io.store import GROUND_TRUTH, ParticleStore
from dask_refine.ui.cli import main

PEERS_PYTHON = Path(__file__).resolve().parents[1] / "benchmarks/.peers/cryodrgn-venv/bin/python"

#: The fields of a cryoSPARC v4 Homogeneous Refinement particle output (dtypes as cryoSPARC
#: writes them), plus pick statistics; most are not used by us and must survive a round trip.
CS_DTYPE = [
    ("uid", "<u8"), ("blob/path", "S48"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("blob/import_sig", "<u8"),
    ("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"),
    ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"),
    ("ctf/scale_const", "<f4"), ("ctf/shift_A", "<f4", (2,)), ("ctf/tilt_A", "<f4", (2,)),
    ("ctf/trefoil_A", "<f4", (2,)), ("ctf/tetra_A", "<f4", (4,)), ("ctf/anisomag", "<f4", (4,)),
    ("ctf/bfactor", "<f4"), ("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)),
    ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4"),
    ("alignments3D/error", "<f4"), ("alignments3D/cross_cor", "<f4"),
    ("alignments3D/alpha", "<f4"), ("alignments3D/class", "<u4"),
    ("alignments3D/class_posterior", "<f4"), ("location/micrograph_uid", "<u8"),
    ("location/micrograph_path", "S60"), ("location/micrograph_shape", "<u4", (2,)),
    ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4"),
    ("pick_stats/ncc_score", "<f4"), ("pick_stats/power", "<f4"),
]


def _save_cs(path, table, allow_pickle=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.save(fh, table, allow_pickle=allow_pickle)
    return path


def _cs_project(tmp_path, rng, n=8, box=16, dtype=CS_DTYPE):
    """A cryoSPARC project P7: two extracted stacks in J3/extract/, particles in J9/J9_particles.cs
    (blob/path relative to the project folder, images in a shuffled order, pixel size 1.3 Å,
    alignments at the 0.65 Å pixel size of the data before downsampling)."""
    project = tmp_path / "P7"
    (project / "J3" / "extract").mkdir(parents=True)
    stacks = {}
    for k, count in ((1, n // 2 + 1), (2, n - n // 2 + 1)):
        name = f"J3/extract/mic{k}_particles.mrcs"
        stacks[name] = rng.standard_normal((count, box, box)).astype(np.float32)
        write_stack(project / name, stacks[name], 1.3)
    t = np.zeros(n, dtype=dtype)
    names = t.dtype.names
    files = [("J3/extract/mic1_particles.mrcs", "J3/extract/mic2_particles.mrcs")[i % 2]
             for i in range(n)]
    index = np.array([i // 2 for i in range(n)])[::-1].copy()
    t["uid"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    t["blob/path"] = [(">" if i == 0 else "") + f for i, f in enumerate(files)]  # cryoSPARC's '>'
    t["blob/idx"] = index
    for name, value in [("blob/shape", box), ("blob/psize_A", 1.3), ("blob/sign", -1.0),
                        ("ctf/type", b"imported"), ("ctf/accel_kv", 300.0), ("ctf/cs_mm", 2.7),
                        ("ctf/amp_contrast", 0.07), ("ctf/scale", 1.0),
                        ("alignments3D/psize_A", 0.65), ("location/micrograph_shape", 4096),
                        ("location/micrograph_path", b"J2/motioncorrected/mic.mrc")]:
        if name in names:
            t[name] = value
    for name in names:
        kind, shape = t.dtype.fields[name][0].base.kind, t.dtype.fields[name][0].shape
        if kind == "f" and not t[name].any():
            t[name] = rng.uniform(0.1, 1.0, (n,) + shape)
    for name in ("ctf/tilt_A", "ctf/shift_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag"):
        if name in names:  # no higher-order optics, as cryoSPARC writes before CTF refinement
            t[name] = 0.0
    if "ctf/df1_A" in names:
        t["ctf/df1_A"] = rng.uniform(9000, 25000, n)
        t["ctf/df2_A"] = t["ctf/df1_A"] - rng.uniform(0, 500, n)
        t["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
        t["ctf/phase_shift_rad"] = rng.uniform(0, 0.5, n)
        t["ctf/bfactor"] = rng.uniform(0, 50, n)
    if "ctf/exp_group_id" in names:
        t["ctf/exp_group_id"] = np.where(np.arange(n) < n // 2, 4, 9)
    if "alignments3D/pose" in names:
        t["alignments3D/pose"] = rng.normal(0, 1.5, (n, 3))
        t["alignments3D/shift"] = rng.normal(0, 3, (n, 2))
        t["alignments3D/split"] = rng.permutation(np.arange(n) % 2)
        t["alignments3D/alpha"] = rng.uniform(0.8, 1.2, n)
        t["alignments3D/class"] = 0
        t["alignments3D/class_posterior"] = 1.0
    if "pick_stats/ncc_score" in names:
        t["pick_stats/ncc_score"][1] = np.nan  # kept bit for bit, even if not a number
    cs = _save_cs(project / "J9" / "J9_particles.cs", t)
    images = np.stack([stacks[f][k] for f, k in zip(files, index)])
    return cs, t, images


def _rodrigues(v):
    """exp([v]×) for rotation vectors ``(N, 3)``: I + sin θ K + (1 − cos θ) K², K = [v/θ]×, written
    out as in cryoDRGN ``lie_tools.expmap`` / ``map_to_lie_algebra`` (an implementation of our own,
    independent of the scipy call in io/cryosparc.py)."""
    v = np.asarray(v, np.float64)
    theta = np.linalg.norm(v, axis=1)[:, None, None]
    w = v / np.where(theta[:, :, 0] > 0, theta[:, :, 0], 1.0)
    K = np.zeros((len(v), 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    K[:, 1, 0], K[:, 2, 0], K[:, 2, 1] = w[:, 2], -w[:, 1], w[:, 0]
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * (K @ K)


def test_import_cs(tmp_path, rng):
    cs, t, images = _cs_project(tmp_path, rng)
    before = cs.read_bytes()
    s = import_cs(cs, tmp_path / "p.zarr", chunk_size=3)
    assert cs.read_bytes() == before  # the input is never modified
    assert s.info.n_particles == 8 and s.info.box_size == 16
    assert s.info.pixel_size_A == pytest.approx(1.3, rel=1e-7)
    np.testing.assert_array_equal(s.images[:], images)  # blob/path + 0-based blob/idx
    f8 = lambda name: t[name].astype(np.float64)  # noqa: E731
    np.testing.assert_array_equal(s.read_column("defocus_u_A"), f8("ctf/df1_A"))
    np.testing.assert_array_equal(s.read_column("defocus_v_A"), f8("ctf/df2_A"))
    np.testing.assert_allclose(s.read_column("defocus_angle_deg"),
                               f8("ctf/df_angle_rad") * 180 / np.pi, rtol=1e-12)
    np.testing.assert_allclose(s.read_column("phase_shift_deg"),
                               f8("ctf/phase_shift_rad") * 180 / np.pi, rtol=1e-12)
    np.testing.assert_array_equal(s.read_column("voltage_kV"), f8("ctf/accel_kv"))
    np.testing.assert_array_equal(s.read_column("bfactor_A2"), f8("ctf/bfactor"))
    np.testing.assert_array_equal(s.read_column("optics_group"), [1] * 4 + [2] * 4)
    # RELION matrix = transpose of the rotation vector's Rodrigues matrix
    np.testing.assert_allclose(s.read_column("rotation"),
                               _rodrigues(t["alignments3D/pose"]).transpose(0, 2, 1), atol=1e-12)
    # shifts are in pixels of alignments3D/psize_A (0.65 Å), not of the images (1.3 Å)
    np.testing.assert_allclose(s.read_column("shift_A"),
                               f8("alignments3D/shift") * np.float32(0.65), rtol=1e-12)
    np.testing.assert_array_equal(s.read_column("half_set"), t["alignments3D/split"])
    np.testing.assert_array_equal(s.read_column("scale"), f8("alignments3D/alpha"))
    np.testing.assert_array_equal(s.read_column("class_id"), t["alignments3D/class"])
    assert s.attrs["provenance"]["created_by"] == "dask_refine.import_cs"


def test_cs_store_exported_as_star_refers_to_the_original_stacks(tmp_path, rng):
    """A .cs-imported store's STAR names each image as cryoSPARC found it (blob/idx + 1 @
    blob/path, '>' dropped; pyem's csparc2star does the same) instead of copying the stack, and
    reading that STAR from the project folder gives the same images back."""
    cs, t, images = _cs_project(tmp_path, rng)
    s = import_cs(cs, tmp_path / "p.zarr", chunk_size=3)
    star = export_star(s, tmp_path / "P7" / "particles.star")
    assert not list((tmp_path / "P7").glob("*.mrcs"))  # nothing copied
    names = list(starfile.read(star)["particles"]["rlnImageName"])
    paths = [p.decode().removeprefix(">") for p in t["blob/path"]]
    assert names == [f"{i + 1:06d}@{p}" for i, p in zip(t["blob/idx"], paths)]
    again = import_star(star, tmp_path / "again.zarr")
    np.testing.assert_array_equal(again.images[:], images)
    np.testing.assert_allclose(again.read_column("defocus_u_A"), s.read_column("defocus_u_A"))


def _fields_identical(out, t):
    """Every field of ``t`` is in ``out`` with the same dtype and the same bytes."""
    for name in t.dtype.names:
        assert name in out.dtype.names, name
        assert out.dtype.fields[name][0] == t.dtype.fields[name][0], name
        assert np.ascontiguousarray(out[name]).tobytes() == \
            np.ascontiguousarray(t[name]).tobytes(), name


def test_cs_round_trip_keeps_every_field(tmp_path, rng):
    from cryosparc.dataset import Dataset

    cs, t, images = _cs_project(tmp_path, rng)
    s = import_cs(cs, tmp_path / "p.zarr")
    out = export_cs(s, tmp_path / "P7" / "J10" / "exported.cs")
    back = np.load(out, allow_pickle=False)
    assert back.dtype == t.dtype  # the same fields, order and dtypes: nothing added
    _fields_identical(back, t)
    d = Dataset.load(out)  # cryosparc-tools reads it
    assert len(d) == 8 and set(d.fields()) == set(t.dtype.names)
    np.testing.assert_array_equal(d["alignments3D/pose"], t["alignments3D/pose"])
    assert list(d["blob/path"]) == [p.decode() for p in t["blob/path"]]
    # and it imports again to the same particles
    s2 = import_cs(out, tmp_path / "p2.zarr")
    np.testing.assert_array_equal(s2.images[:], images)
    np.testing.assert_array_equal(s2.read_column("rotation"), s.read_column("rotation"))


def test_round_trip_of_unusual_dtypes(tmp_path, rng):
    """Big-endian, unicode, bool, date, complex and nested fields come back byte for byte."""
    extra = [("ext/big", ">f8"), ("ext/text", "<U7"), ("ext/flag", "|b1"),
             ("ext/when", "<M8[s]"), ("ext/z", "<c8", (2,)), ("ext/rec", [("a", "<i2"),
                                                                          ("b", "S3")])]
    cs, t, _ = _cs_project(tmp_path, rng, dtype=CS_DTYPE + extra)
    t2 = t.copy()
    t2["ext/big"] = rng.normal(size=8)
    t2["ext/text"] = ["héllo", "", "a\tb", "x", "y", "z", "é", "7"]
    t2["ext/flag"] = np.arange(8) % 3 == 0
    t2["ext/when"] = np.datetime64("2024-05-01T12:00:00") + np.arange(8)
    t2["ext/z"] = rng.normal(size=(8, 2)) + 1j
    t2["ext/rec"]["a"], t2["ext/rec"]["b"] = np.arange(8), b"ab\x00"
    _save_cs(cs, t2)
    s = import_cs(cs, tmp_path / "p.zarr")
    back = np.load(export_cs(s, tmp_path / "x.cs"), allow_pickle=False)
    assert back.dtype == t2.dtype
    _fields_identical(back, t2)


def test_export_with_new_poses_changes_only_what_changed(tmp_path, rng):
    cs, t, _ = _cs_project(tmp_path, rng)
    s = import_cs(cs, tmp_path / "p.zarr")
    rotation = s.read_column("rotation")
    shift = s.read_column("shift_A")
    moved = np.arange(8) < 3
    rotation[moved] = random_rotations(3, rng)
    shift[moved] += 1.0
    out = np.load(export_cs(s, tmp_path / "x.cs", poses={"rotation": rotation, "shift_A": shift}),
                  allow_pickle=False)
    assert out.dtype == t.dtype
    pose_fields = ("alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A")
    _fields_identical(out[[n for n in t.dtype.names if n not in pose_fields]],
                      t[[n for n in t.dtype.names if n not in pose_fields]])
    _fields_identical(out[~moved], t[~moved])  # rows whose pose is unchanged keep the raw values
    got = _rodrigues(out["alignments3D/pose"][moved]).transpose(0, 2, 1)
    assert angular_distance_deg(got, rotation[moved]).max() < 1e-4
    # new shifts are written in pixels of the store's pixel size, which alignments3D/psize_A says
    np.testing.assert_array_equal(out["alignments3D/psize_A"][moved], np.float32(1.3))
    np.testing.assert_allclose(out["alignments3D/shift"][moved] * np.float32(1.3), shift[moved],
                               atol=1e-5)


def _relion_store(tmp_path, rotations, shift_A, px=1.5, box=8):
    """A small store with given poses (images are zeros; only metadata matters here)."""
    n = len(rotations)
    s = ParticleStore.create(tmp_path / "poses.zarr", n, box, px, n)
    for name, value in [("defocus_u_A", 15000.0), ("defocus_v_A", 14000.0),
                        ("defocus_angle_deg", 30.0), ("phase_shift_deg", 0.0),
                        ("bfactor_A2", 0.0), ("voltage_kV", 300.0), ("cs_mm", 2.7),
                        ("amplitude_contrast", 0.1)]:
        s.write_column(name, np.full(n, value))
    s.write_column("optics_group", np.ones(n))
    s.write_column("half_set", np.arange(n) % 2)
    s.write_column("rotation", rotations)
    s.write_column("shift_A", shift_A)
    s.write_column("scale", np.ones(n))
    return s


def _known_poses(rng):
    """Random rotations plus the awkward ones: identity, half turns, RELION's poles."""
    special = [np.eye(3), np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1]),
               euler_to_matrix(30.0, 0.0, 40.0), euler_to_matrix(30.0, 180.0, 40.0),
               euler_to_matrix(10.0, 179.999, -170.0), euler_to_matrix(-120.0, 90.0, 179.9)]
    rotations = np.concatenate([np.stack(special), random_rotations(40, rng)])
    shift_A = rng.normal(0, 4, (len(rotations), 2))
    return rotations, shift_A


def _relion_matrix_cryodrgn(euler_deg):
    """cryoDRGN ``utils.R_from_relion`` (cryodrgn/utils.py), re-implemented: Rz(γ)ᵀ·Ry(β)·Rz(α)ᵀ
    built from its three matrices, then the signs of the (0,2), (2,0), (1,2), (2,1) entries
    flipped."""
    a, b, y = np.deg2rad(np.asarray(euler_deg, np.float64)).T
    z, o = np.zeros_like(a), np.ones_like(a)
    ra = np.array([[np.cos(a), -np.sin(a), z], [np.sin(a), np.cos(a), z], [z, z, o]])
    rb = np.array([[np.cos(b), z, -np.sin(b)], [z, o, z], [np.sin(b), z, np.cos(b)]])
    ry = np.array([[np.cos(y), -np.sin(y), z], [np.sin(y), np.cos(y), z], [z, z, o]])
    r = ry.T @ rb.T @ ra.T
    for i, j in ((0, 2), (2, 0), (1, 2), (2, 1)):
        r[:, i, j] *= -1
    return r


def _pyem_expmap(e):
    """pyem ``geom/convert.py::expmap`` re-implemented: Rodrigues with the *transposed* cross
    matrix k = [[0, w2, −w1], [−w2, 0, w0], [w1, −w0, 0]]; pyem's csparc2star then takes
    ``rot2euler`` (RELION's Euler_matrix2angles) of it, so this is RELION's matrix."""
    out = []
    for v in np.asarray(e, np.float64):
        theta = np.linalg.norm(v)
        if theta < 1e-16:
            out.append(np.eye(3))
            continue
        w = v / theta
        k = np.array([[0, w[2], -w[1]], [-w[2], 0, w[0]], [w[1], -w[0], 0]])
        out.append(np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k)
    return np.stack(out)


def test_pose_convention_matches_peers(tmp_path, rng):
    """Known poses written by export_cs and export_star give the same rotation matrices and
    translations when read back by the peers' own conversions: cryoDRGN parse_pose_csparc
    (expmap, then transpose; shift/D) vs parse_pose_star (R_from_relion; origin_A/apix/D), and
    pyem csparc2star (expmap with transposed cross matrix; alignments3D/shift → rlnOriginX/Y)."""
    rotations, shift_A = _known_poses(rng)
    px, box = 1.5, 8
    s = _relion_store(tmp_path, rotations, shift_A, px, box)
    cs = np.load(export_cs(s, tmp_path / "poses.cs"), allow_pickle=False)
    _, particles = read_star(export_star(s, tmp_path / "poses.star"))
    euler = particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()

    # cryoDRGN: both files → the same (rot, trans)
    rot_cs = _rodrigues(cs["alignments3D/pose"]).transpose(0, 2, 1)
    rot_star = _relion_matrix_cryodrgn(euler)
    np.testing.assert_allclose(rot_star, rotations, atol=1e-9)  # cryoDRGN's = RELION's matrix
    np.testing.assert_allclose(rot_cs, rot_star, atol=1e-6)
    trans_cs = cs["alignments3D/shift"] / cs["blob/shape"][0][0]
    trans_star = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / px / box
    np.testing.assert_allclose(trans_cs, trans_star, atol=1e-6)
    # pyem: the cs pose gives the STAR file's Euler matrix; the shift is the origin in pixels
    np.testing.assert_allclose(_pyem_expmap(cs["alignments3D/pose"]),
                               euler_to_matrix(*euler.T), atol=1e-6)
    np.testing.assert_allclose(cs["alignments3D/shift"] * cs["alignments3D/psize_A"][:, None],
                               particles[["rlnOriginXAngst", "rlnOriginYAngst"]], atol=1e-5)


_CRYODRGN_SCRIPT = """
import argparse, pickle, sys
import numpy as np
from cryodrgn.commands import parse_pose_csparc, parse_pose_star
cs, star, out = sys.argv[1:4]
results = {}
for name, module, args in (("cs", parse_pose_csparc, [cs, "-o", out + ".cs.pkl"]),
                           ("star", parse_pose_star, [star, "-o", out + ".star.pkl"])):
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    module.main(parser.parse_args(args))
    with open(args[-1], "rb") as fh:
        rot, trans = pickle.load(fh)  # cryoDRGN's own output, written just now
    results[name + "_rot"], results[name + "_trans"] = np.asarray(rot), np.asarray(trans)
np.savez(out, **results)
"""


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="cryoDRGN peer venv not installed "
                    "(bash benchmarks/install_peers.sh)")
def test_pose_convention_with_cryodrgn_itself(tmp_path, rng):
    """cryoDRGN's parse_pose_csparc on our .cs and parse_pose_star on our STAR agree (~3 s)."""
    rotations, shift_A = _known_poses(rng)
    s = _relion_store(tmp_path, rotations, shift_A)
    export_cs(s, tmp_path / "poses.cs")
    export_star(s, tmp_path / "poses.star")
    out = tmp_path / "drgn.npz"
    run = subprocess.run([str(PEERS_PYTHON), "-c", _CRYODRGN_SCRIPT, str(tmp_path / "poses.cs"),
                          str(tmp_path / "poses.star"), str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = np.load(out)
    # cryoDRGN's expmap divides by the angle: the identity (a zero vector) comes out as NaN
    ok = np.isfinite(r["cs_rot"]).all(axis=(1, 2))
    np.testing.assert_array_equal(~ok, angular_distance_deg(rotations, np.eye(3)) == 0)
    np.testing.assert_allclose(r["cs_rot"][ok], r["star_rot"][ok], atol=1e-6)
    np.testing.assert_allclose(r["star_rot"], rotations, atol=1e-6)
    np.testing.assert_allclose(r["cs_trans"], r["star_trans"], atol=1e-6)


def test_simulated_store_round_trip(tmp_path, demo_map):
    """Simulated particles (box 32) with known poses → .cs → store: the same rotations (< 1e-4°),
    shifts, scales, CTFs, half sets and images; cryosparc-tools loads the file."""
    from cryosparc.dataset import Dataset

    volume, px = demo_map
    s = simulate_store(downsample_to_32(volume), 2 * px, tmp_path / "sim.zarr",
                       SimulationConfig(n_particles=100, snr=1.0, chunk_size=40), write_poses=True)
    cs = export_cs(s, tmp_path / "out" / "sim.cs")
    assert (tmp_path / "out" / "sim.mrcs").exists()  # simulated images written beside the .cs
    # a stack that already holds the images (the STAR export's) is referred to, not rewritten
    star = export_star(s, tmp_path / "out" / "sim.star", write_images=True)
    shared = export_cs(s, tmp_path / "out" / "shared.cs", stack_path=star.with_suffix(".mrcs"))
    assert not (tmp_path / "out" / "shared.mrcs").exists()
    assert set(np.load(shared)["blob/path"]) == {b"sim.mrcs"}
    np.testing.assert_array_equal(import_cs(shared, tmp_path / "shared.zarr").images[:],
                                  s.images[:])
    assert len(Dataset.load(cs)) == 100
    s2 = import_cs(cs, tmp_path / "again.zarr")
    truth = s.read_column("rotation", group=GROUND_TRUTH)
    assert angular_distance_deg(s2.read_column("rotation"), truth).max() < 1e-4
    np.testing.assert_allclose(s2.read_column("shift_A"), s.read_column("shift_A"), atol=1e-5)
    np.testing.assert_allclose(s2.read_column("scale"), s.read_column("scale"), rtol=1e-6)
    np.testing.assert_array_equal(s2.read_column("half_set"), s.read_column("half_set"))
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
                 "amplitude_contrast"):
        np.testing.assert_allclose(s2.read_column(name), s.read_column(name), rtol=1e-6,
                                   atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(s2.images[:], s.images[:])
    assert s2.info.pixel_size_A == pytest.approx(2 * px)


def test_star_round_trips_and_star_to_cs(tmp_path, rng):
    """STAR → store → STAR keeps every value as written (also tiny and large ones), and
    STAR → store → .cs → store gives the same particles."""
    n, box = 5, 12
    (tmp_path / "Extract" / "job007").mkdir(parents=True)
    stack = rng.standard_normal((n, box, box)).astype(np.float32)
    write_stack(tmp_path / "Extract" / "job007" / "mic1.mrcs", stack, 1.25)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
        "rlnImagePixelSize": [1.25], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/job007/mic1.mrcs" for i in range(n)][::-1],
        "rlnMicrographName": ["MotionCorr/job002/mic1.mrc"] * n,
        "rlnCoordinateX": rng.uniform(0, 4000, n).round(3), "rlnOpticsGroup": [1] * n,
        "rlnDefocusU": [15234.567891, 14000.5, 16000.0, 15000.25, 17000.125],
        "rlnDefocusV": [15034.567891, 13900.5, 15900.0, 14900.25, 16900.125],
        "rlnDefocusAngle": [12.5, 30.0, 45.0, 60.0, 89.999999],
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(1, 179, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": [1.5, -2.25, 0.0, 3.125, -0.5], "rlnOriginYAngst": [0.0] * n,
        "rlnMaxValueProbDistribution": [3.2e-07, 0.5, 1e-12, 0.25, 1.0],
        "rlnLogLikeliContribution": [123456.789012, -2.5e6, 1.0e9, 0.1, 7.0],
        "rlnRandomSubset": [1, 2, 1, 2, 1], "rlnGroupNumber": [1] * n})
    star = tmp_path / "Refine3D" / "job010" / "run_data.star"
    star.parent.mkdir(parents=True)
    starfile.write({"optics": optics, "particles": particles}, star, float_format="%.12g")
    _, written = read_star(star)  # the values as a reader sees them in the file
    s = import_star(star, tmp_path / "p.zarr")
    _, again = read_star(export_star(s, tmp_path / "Refine3D" / "job010" / "exported.star"))
    for label in written.columns:
        if label.startswith("rlnAngle"):  # the same rotation, maybe other equivalent angles
            continue
        assert list(again[label]) == list(written[label]), label  # exactly, not to 6 decimals

    cs = export_cs(s, tmp_path / "Refine3D" / "job010" / "exported.cs")
    s2 = import_cs(cs, tmp_path / "p2.zarr")  # blob/path found from the .cs file's parents
    np.testing.assert_array_equal(s2.images[:], s.images[:])
    assert angular_distance_deg(s2.read_column("rotation"), s.read_column("rotation")).max() < 1e-4
    np.testing.assert_allclose(s2.read_column("shift_A"), s.read_column("shift_A"), atol=1e-5)
    np.testing.assert_allclose(s2.read_column("defocus_angle_deg"),
                               s.read_column("defocus_angle_deg"), atol=1e-4)
    np.testing.assert_array_equal(s2.read_column("half_set"), s.read_column("half_set"))


class _Payload:
    """Unpickling this creates ``marker``: proof that a reader executed pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_field_is_refused_without_unpickling(tmp_path, rng):
    cs, t, _ = _cs_project(tmp_path, rng, n=2)
    marker = tmp_path / "pwned"
    evil = np.zeros(2, dtype=[("blob/path", "O"), ("ctf/df1_A", "<f4")])
    evil["blob/path"] = [_Payload(marker), _Payload(marker)]
    _save_cs(cs, evil, allow_pickle=True)
    before = cs.read_bytes()
    with pytest.raises(InputError, match=r"field blob/path: holds Python objects.*allow_pickle"):
        import_cs(cs, tmp_path / "p.zarr")
    assert not marker.exists() and cs.read_bytes() == before
    assert not (tmp_path / "p.zarr").exists()
    np.load(cs, allow_pickle=True)  # the payload is live: loading it with pickles on runs it
    assert marker.exists()


def _csdat(table_like: dict, path):
    from cryosparc.dataset import CSDAT_FORMAT, Dataset

    d = Dataset(table_like)
    d.save(path, format=CSDAT_FORMAT)
    return path


def test_csdat_format_is_read(tmp_path, rng):
    """cryosparc-tools' compressed format imports (through a child process) like the NumPy one."""
    cs, t, images = _cs_project(tmp_path, rng)
    csdat = _csdat({name: t[name] for name in t.dtype.names}, cs.with_name("csdat.cs"))
    assert csdat.read_bytes()[:6] == b"\x95CSDAT"
    s = import_cs(csdat, tmp_path / "p.zarr")
    np.testing.assert_array_equal(s.images[:], images)
    np.testing.assert_array_equal(s.read_column("rotation"),
                                  import_cs(cs, tmp_path / "q.zarr").read_column("rotation"))
    raw = read_raw_cs(s)
    assert set(raw.dtype.names) == set(t.dtype.names)
    np.testing.assert_array_equal(raw["ctf/tetra_A"], t["ctf/tetra_A"])


def _corrupt_csdat(tmp_path):
    from cryosparc.dataset import CSDAT_FORMAT, Dataset

    d = Dataset.allocate(4, [("blob/path", "O"), ("blob/idx", "<u4"), ("ctf/df1_A", "<f4")])
    d["uid"] = np.arange(4, dtype=np.uint64) + 1
    d["blob/path"] = ["parts.mrcs"] * 4
    buf = io.BytesIO()
    d.save(buf, format=CSDAT_FORMAT)
    data = bytearray(buf.getvalue())
    data[237] = 0  # with cryosparc-tools 5.0.3 this crashes its compiled reader (SIGSEGV)
    path = tmp_path / "P7" / "J9" / "J9_particles.cs"
    path.write_bytes(bytes(data))
    return path


BAD = {
    "missing_field": "field ctf/df1_A: required field is missing",
    "nan_ctf": "field ctf/df2_A: row 3 has nan; expected a finite number",
    "pose_shape": "field alignments3D/pose: has dtype float32 \\(2,\\); expected a rot",
    "split_value": "field alignments3D/split: row 2 has 2; expected 0 or 1",
    "negative_idx": "field blob/idx: row 1 has -1",
    "missing_stack": "field blob/path: image stack 'J3/extract/gone.mrcs' not found",
    "index_range": "field blob/idx: row 4 asks for image index 99 of .*mic2_particles.mrcs; "
                   "the stack has 4 images",
    "blob_shape": "field blob/shape: row 4 is \\[20, 20\\]; expected \\[16, 16\\]",
    "pixel_size_sign": "field blob/psize_A: row 5 has -2.59.*; expected a positive finite pixel",
    "bad_name": "field 'ctf/df1 A': is not a cryoSPARC field name",
    "not_structured": "holds a plain float64 array; expected a structured array",
    "empty": "has no particles",
    "truncated": "is truncated",
    "not_cs": "not a cryoSPARC .cs file",
    "nan_pixels": "has NaN or Inf pixels",
    "csdat_corrupt": "not a readable CSDAT .cs file",
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_cs_input(tmp_path, rng, problem):
    cs, t, _ = _cs_project(tmp_path, rng, n=6)
    bad = t.copy()
    if problem == "missing_field":
        bad = repack_fields(bad[[n for n in t.dtype.names if n != "ctf/df1_A"]])
    elif problem == "nan_ctf":
        bad["ctf/df2_A"][2] = np.nan
    elif problem == "pose_shape":
        dtype = [(n, "<f4", (2,)) if n == "alignments3D/pose" else t.dtype.descr[i]
                 for i, n in enumerate(t.dtype.names)]
        bad = np.zeros(6, dtype)
        for n in t.dtype.names:
            if n != "alignments3D/pose":
                bad[n] = t[n]
    elif problem == "split_value":
        bad["alignments3D/split"][1] = 2
    elif problem == "negative_idx":
        dtype = [(n, "<i4") if n == "blob/idx" else t.dtype.descr[i]
                 for i, n in enumerate(t.dtype.names)]
        bad = np.zeros(6, dtype)
        for n in t.dtype.names:
            bad[n] = t[n]
        bad["blob/idx"][0] = -1
    elif problem == "missing_stack":
        bad["blob/path"][2] = b"J3/extract/gone.mrcs"
    elif problem == "index_range":
        bad["blob/idx"][3] = 99
    elif problem == "blob_shape":
        bad["blob/shape"][3] = 20
    elif problem == "pixel_size_sign":  # (different pixel sizes are optics groups: allowed)
        bad["blob/psize_A"][4] = -2.6
    elif problem == "bad_name":
        bad = rename_fields(bad, {"ctf/df1_A": "ctf/df1 A"})
    elif problem == "not_structured":
        bad = rng.normal(size=6)
    elif problem == "empty":
        bad = t[:0]
    elif problem == "nan_pixels":
        name = tmp_path / "P7" / "J3" / "extract" / "mic1_particles.mrcs"
        images = rng.standard_normal((4, 16, 16)).astype(np.float32)
        images[1, 3, 3] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile: "contains NaN values"
            write_stack(name, images, 1.3)
    if problem == "truncated":
        cs.write_bytes(cs.read_bytes()[:-100])
    elif problem == "not_cs":
        cs.write_text("data_particles\nloop_\n_rlnImageName #1\n")
    elif problem == "csdat_corrupt":
        cs = _corrupt_csdat(tmp_path)
    elif problem != "nan_pixels":
        _save_cs(cs, bad)
    before = cs.read_bytes()
    message = BAD[problem]
    with pytest.raises(InputError, match=message) as err:
        import_cs(cs, tmp_path / "p.zarr")
    assert str(cs) in str(err.value)  # names the file…
    assert cs.read_bytes() == before  # …which is not modified
    assert not (tmp_path / "p.zarr").exists()  # and no half-made store is left behind


def test_cli_import_export_cs(tmp_path, rng, capsys):
    cs, t, images = _cs_project(tmp_path, rng)
    store = tmp_path / "c.zarr"
    assert main(["import-cs", str(cs), str(store), "--chunk-size", "3"]) == 0
    assert "imported 8 particles" in capsys.readouterr().out
    assert main(["export-cs", str(store), str(tmp_path / "out.cs")]) == 0
    _fields_identical(np.load(tmp_path / "out.cs", allow_pickle=False), t)
    assert main(["import-cs", str(cs), str(tmp_path / "d.zarr"), "--pixel-size-A", "2.0",
                 "--images-root", str(tmp_path / "P7")]) == 0
    assert ParticleStore.open(tmp_path / "d.zarr").info.pixel_size_A == 2.0
    capsys.readouterr()
    assert main(["import-cs", str(tmp_path / "none.cs"), str(tmp_path / "e.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such file" in err and "\n" not in err


def test_cli_skip_bad_cs(tmp_path, rng, capsys):
    """--skip-bad: particles with NaN/Inf pixels are left out of the store and listed (uid,
    blob/path, blob/idx); export gives back exactly the other rows; the inputs are untouched."""
    import mrcfile

    cs, t, images = _cs_project(tmp_path, rng, n=20)
    bad_rows, values = [1, 8, 13], [np.nan, np.inf, np.nan]
    for row, value in zip(bad_rows, values):
        path = tmp_path / "P7" / t["blob/path"][row].decode().lstrip(">")
        with mrcfile.open(path, mode="r+") as m:
            m.data[t["blob/idx"][row], 5, 5] = value
    inputs = {p: p.read_bytes() for p in [cs, *(tmp_path / "P7" / "J3" / "extract").iterdir()]}
    store = tmp_path / "c.zarr"

    assert main(["import-cs", str(cs), str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "(row 2 of" in err and "--skip-bad" in err and not store.exists()

    assert main(["import-cs", str(cs), str(store), "--skip-bad", "--chunk-size", "3"]) == 0
    captured = capsys.readouterr()
    listed = store / "skipped" / "particles.csv"
    assert f"skipped 3 of 20 particles with NaN/Inf pixels; listed in {listed}" in captured.err
    assert "imported 17 particles" in captured.out
    keep = np.ones(20, bool)
    keep[bad_rows] = False
    s = ParticleStore.open(store)
    assert s.info.n_particles == 17
    np.testing.assert_array_equal(s.images[:], images[keep])
    np.testing.assert_array_equal(s.read_column("half_set"), t["alignments3D/split"][keep])
    table = pd.read_csv(listed)
    assert list(table.columns) == ["input_row_1based", "uid", "blob/path", "blob/idx", "reason"]
    assert list(table["input_row_1based"]) == [2, 9, 14]
    assert list(table["uid"].astype(np.uint64)) == list(t["uid"][bad_rows])
    assert list(table["blob/path"]) == [p.decode().lstrip(">") for p in t["blob/path"][bad_rows]]
    assert list(table["blob/idx"]) == list(t["blob/idx"][bad_rows])
    assert list(table["reason"]) == ["NaN pixels", "Inf pixels", "NaN pixels"]

    assert main(["export-cs", str(store), str(tmp_path / "out.cs")]) == 0
    back = np.load(tmp_path / "out.cs", allow_pickle=False)
    assert back.dtype == t.dtype and len(back) == 17
    _fields_identical(back, t[keep])
    assert main(["export-star", str(store), str(tmp_path / "out.star")]) == 0
    assert len(read_star(tmp_path / "out.star")[1]) == 17
    assert all(p.read_bytes() == b for p, b in inputs.items())

    for f in (tmp_path / "P7" / "J3" / "extract").iterdir():  # every particle bad
        with mrcfile.open(f, mode="r+") as m:
            m.data[:, 0, 0] = np.nan
    assert main(["import-cs", str(cs), str(tmp_path / "e.zarr"), "--skip-bad"]) == 2
    err = capsys.readouterr().err
    assert "all 20 particles have NaN or Inf pixels" in err and not (tmp_path / "e.zarr").exists()


def test_beam_tilt_survives_star_and_cs_round_trips(tmp_path, rng):
    """cryoSPARC's ctf/tilt_A (Cs·sin τ, Å; pyem's conversion) ↔ RELION's rlnBeamTiltX/Y
    (mrad): .cs → store → STAR and → .cs keep the tilt; higher-order optics that cannot be
    applied are refused, naming the field."""
    cs, table, _ = _cs_project(tmp_path, rng)
    table["ctf/tilt_A"] = [[2.7e7 * np.sin(1.5e-3), -2.7e7 * np.sin(0.5e-3)]] * len(table)
    _save_cs(cs, table)
    s = import_cs(cs, tmp_path / "p.zarr")
    np.testing.assert_allclose(s.read_column("beam_tilt_mrad"), [[1.5, -0.5]] * len(table),
                               rtol=1e-6)
    star = export_star(s, tmp_path / "P7" / "out.star")  # stacks relative to the project
    optics, _ = read_star(star)
    np.testing.assert_allclose(optics[["rlnBeamTiltX", "rlnBeamTiltY"]].to_numpy(dtype=float),
                               [[1.5, -0.5]] * len(optics), rtol=1e-6)
    again = np.load(export_cs(s, tmp_path / "again.cs"))
    np.testing.assert_array_equal(again["ctf/tilt_A"], table["ctf/tilt_A"])
    from_star = import_star(star, tmp_path / "s.zarr")
    converted = np.load(export_cs(from_star, tmp_path / "from_star.cs"))
    np.testing.assert_allclose(converted["ctf/tilt_A"], table["ctf/tilt_A"], rtol=1e-5)
    for field in ("ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag", "ctf/shift_A"):
        bad = table.copy()
        bad[field][0] = 0.1
        _save_cs(cs, bad)
        with pytest.raises(InputError, match=field):
            import_cs(cs, tmp_path / f"bad{field[4:8]}.zarr")
