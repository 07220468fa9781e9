"""Fuzzing the readers: mutated MRC, STAR and cryoSPARC .cs files give our clean InputError or a
valid result, never a raw traceback or a hang (issue: reliability, bad input)."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib.recfunctions import rename_fields

from dask_refine.io.cryosparc import import_cs
from dask_refine.io.errors import InputError
from dask_refine.io.mrc import StackReader, read_map, write_map, write_stack
from dask_refine.io.star import import_star

FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _mutate(data: bytes, edits, cut) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        if b:
            b[pos % len(b)] = value
    return bytes(b[:cut]) if cut is not None else bytes(b)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_seeds")
    rng = np.random.default_rng(0)
    write_map(root / "map.mrc", rng.standard_normal((8, 8, 8)).astype(np.float32), 1.5)
    write_stack(root / "parts.mrcs", rng.standard_normal((3, 8, 8)).astype(np.float32), 1.5)
    star = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
1 opticsGroup1 300.0 2.7 0.1 1.5 8 2

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnOpticsGroup #5
_rlnAngleRot #6
_rlnAngleTilt #7
_rlnAnglePsi #8
_rlnOriginXAngst #9
_rlnOriginYAngst #10
000001@parts.mrcs 15000.0 14000.0 10.0 1 10.0 20.0 30.0 1.0 -1.0
000002@parts.mrcs 16000.0 15500.0 20.0 1 40.0 50.0 60.0 0.0 0.5
000003@parts.mrcs 17000.0 16000.0 30.0 1 70.0 80.0 90.0 -1.5 0.0
"""
    (root / "particles.star").write_text(star.lstrip())
    import_star(root / "particles.star", root / "ok.zarr")  # the seed itself is valid
    cs = np.zeros(3, dtype=CS_SEED_DTYPE)
    cs["uid"] = [11, 12, 13]
    cs["blob/path"] = [b"parts.mrcs", b">parts.mrcs", b"parts.mrcs"]
    cs["blob/idx"] = [2, 0, 1]
    cs["blob/shape"], cs["blob/psize_A"], cs["ctf/type"] = 8, 1.5, b"imported"
    cs["ctf/accel_kv"], cs["ctf/cs_mm"], cs["ctf/amp_contrast"] = 300.0, 2.7, 0.1
    cs["ctf/df1_A"], cs["ctf/df2_A"] = [15000, 16000, 17000], [14000, 15500, 16000]
    cs["ctf/df_angle_rad"], cs["ctf/exp_group_id"] = [0.2, 0.4, 0.6], [1, 1, 2]
    cs["ctf/tilt_A"] = [[0.1, -0.2], [0.0, 0.3], [0.2, 0.2]]
    cs["alignments3D/split"], cs["alignments3D/alpha"] = [0, 1, 0], [0.9, 1.0, 1.1]
    cs["alignments3D/pose"] = [[0.1, 0.2, 0.3], [1.0, -0.5, 2.0], [0.0, 3.0, 0.1]]
    cs["alignments3D/shift"] = [[1.0, -1.0], [0.0, 0.5], [-1.5, 0.0]]
    cs["alignments3D/psize_A"], cs["location/micrograph_path"] = 1.5, b"J2/mic.mrc"
    with open(root / "particles.cs", "wb") as fh:
        np.save(fh, cs, allow_pickle=False)
    import_cs(root / "particles.cs", root / "ok_cs.zarr")  # valid too
    return root


CS_SEED_DTYPE = [
    ("uid", "<u8"), ("blob/path", "S12"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"), ("ctf/type", "S9"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
    ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"), ("ctf/exp_group_id", "<u4"), ("ctf/tilt_A", "<f4", (2,)),
    ("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)),
    ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4"),
    ("alignments3D/alpha", "<f4"), ("location/micrograph_path", "S12")]


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)
cuts = st.none() | st.integers(0, 2_000)


def _read_map(path):
    volume, px = read_map(path)
    assert volume.ndim == 3 and np.isfinite(volume).all() and px > 0


def _read_stack(path):
    with StackReader(path) as reader:
        reader.read(np.arange(min(reader.n_images, 2)))


@pytest.mark.parametrize("seed_name, read", [("map.mrc", _read_map), ("parts.mrcs", _read_stack)])
@FUZZ
@given(edits=edits, cut=cuts)
def test_fuzzed_mrc(seeds, seed_name, read, edits, cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / seed_name
        path.write_bytes(_mutate((seeds / seed_name).read_bytes(), edits, cut))
        try:
            read(path)
        except InputError:
            return


star_edit = st.tuples(st.integers(0, 60), st.sampled_from(
    ["delete", "dup", "abc", "nan", "-1", "", "0@parts.mrcs", "9@parts.mrcs", "x@none.mrcs",
     "loop_", "data_", "_rlnImageName #1", "1e400", "\x00\xff", "inf", "999999999999"]))


@FUZZ
@given(edits=st.lists(star_edit, max_size=5), token=st.integers(0, 12), cut=cuts)
def test_fuzzed_star_import(seeds, edits, token, cut):
    lines = (seeds / "particles.star").read_text().splitlines()
    for pos, what in edits:
        i = pos % len(lines)
        if what == "delete":
            del lines[i]
        elif what == "dup":
            lines.insert(i, lines[i])
        else:  # replace one whitespace-separated token of the line
            words = lines[i].split() or [""]
            words[token % len(words)] = what
            lines[i] = " ".join(words)
    text = "\n".join(lines) + "\n"
    if cut is not None:
        text = text[:cut]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(seeds / "parts.mrcs", Path(tmp) / "parts.mrcs")
        star = Path(tmp) / "p.star"
        star.write_text(text, errors="surrogateescape")
        before = star.read_bytes()
        try:
            store = import_star(star, Path(tmp) / "p.zarr")
        except InputError:
            pass
        else:
            assert store.info.n_particles >= 1
            assert np.isfinite(store.images[:]).all()
        assert star.read_bytes() == before  # the input is never modified


CS_FUZZ = settings(FUZZ, max_examples=400)


def _import_cs_checked(folder: Path, cs: Path) -> None:
    """Import ``cs``: an InputError or a valid store, and the file is left as it was."""
    before = cs.read_bytes()
    try:
        store = import_cs(cs, folder / "p.zarr")
    except InputError:
        assert not (folder / "p.zarr").exists()  # no half-made store
    else:
        assert store.info.n_particles >= 1 and store.info.box_size == 8
        assert np.isfinite(store.images[:]).all()
        assert np.isfinite(store.read_column("defocus_u_A")).all()
    assert cs.read_bytes() == before  # the input is never modified


@CS_FUZZ
@given(edits=edits, cut=cuts)
def test_fuzzed_cs_bytes(seeds, edits, cut):
    """Random bytes of the NumPy header and rows changed, and truncation."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(seeds / "parts.mrcs", Path(tmp) / "parts.mrcs")
        cs = Path(tmp) / "p.cs"
        cs.write_bytes(_mutate((seeds / "particles.cs").read_bytes(), edits, cut))
        _import_cs_checked(Path(tmp), cs)


CS_TYPES = ["<f8", "<i4", "<u1", "|S3", ">f4", "<U4", "|b1", ("<f4", (2,)), ("<f4", (3,)),
            "<i8", "<c8", "<M8[s]"]
CS_VALUES = [np.nan, np.inf, -1, 0, 1e30, 2, 99, 2**32 - 1, b"", b"x@none.mrcs", b">parts.mrcs",
             b"../parts.mrcs", b"\xff\x00", -1e-30, 8, 3]
CS_NAMES = ["", "ctf/df1 A", "__x", "ctf", "blob/path/x", "uid", "a/b", "ctf/df1_A",
            "alignments3D/pose", "blob/idx", "\u00e9t\u00e9/x"]
cs_edit = st.tuples(st.sampled_from(["drop", "retype", "value", "rename", "rows"]),
                    st.integers(0, 40), st.integers(0, 20), st.integers(0, 20))


def _edit_table(t: np.ndarray, op: str, k: int, a: int, b: int) -> np.ndarray:
    names = list(t.dtype.names)
    name = names[k % len(names)]
    if op == "drop":
        return t[[n for n in names if n != name]].copy()
    if op == "rows":
        return t[np.arange(a % 6) % len(t)] if len(t) else t
    if op == "rename":
        return rename_fields(t, {name: CS_NAMES[a % len(CS_NAMES)]})
    if op == "retype":
        new = CS_TYPES[a % len(CS_TYPES)]
        dtype = [(n, new) if n == name else (n,) + tuple(t.dtype.fields[n][0].subdtype or
                                                         (t.dtype.fields[n][0],))
                 for n in names]
        out = np.zeros(len(t), dtype)
        for n in names:
            try:
                out[n] = t[n]
            except (TypeError, ValueError):
                pass
        return out
    t = t.copy()
    if len(t):
        t[name][a % len(t)] = CS_VALUES[b % len(CS_VALUES)]
    return t


@settings(FUZZ, max_examples=100)
@given(ops=st.lists(cs_edit, max_size=5))
def test_fuzzed_cs_fields(seeds, ops):
    """Fields dropped, retyped, renamed or set to bad values (NaN, huge, negative, bad paths),
    rows removed or repeated; saved again as a valid NumPy file."""
    t = np.load(seeds / "particles.cs", allow_pickle=False)
    for op in ops:
        try:
            t = _edit_table(t, *op)
        except (TypeError, ValueError, OverflowError, UnicodeError):
            continue  # an edit NumPy itself refuses (duplicate name, value of the wrong kind)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(seeds / "parts.mrcs", Path(tmp) / "parts.mrcs")
        cs = Path(tmp) / "p.cs"
        with open(cs, "wb") as fh:
            np.save(fh, t, allow_pickle=False)
        _import_cs_checked(Path(tmp), cs)
