"""Fuzzing the readers: mutated MRC and STAR files give our clean InputError or a valid result,
never a raw traceback or a hang (issue: reliability, bad input)."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_refine.io.errors import InputError
from dask_refine.io.mrc import StackReader, read_map, write_map, write_stack
from dask_refine.io.star import import_star

FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
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
    return root


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
