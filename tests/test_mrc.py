import mrcfile
import numpy as np
import pytest

from dask_refine.io.errors import InputError
from dask_refine.io.mrc import StackReader, read_map, write_map, write_stack


def test_write_read_map_keeps_voxel_size_and_origin(tmp_path, rng):
    v = rng.standard_normal((16, 16, 16)).astype(np.float32)
    write_map(tmp_path / "m.mrc", v, 1.37)
    back, px = read_map(tmp_path / "m.mrc")
    np.testing.assert_array_equal(back, v)
    assert abs(px - 1.37) < 1e-5
    with mrcfile.open(tmp_path / "m.mrc") as m:
        assert tuple(m.header.origin.tolist()) == (0.0, 0.0, 0.0)
        assert m.header.mode == 2
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_stack_round_trip(tmp_path, rng):
    imgs = rng.standard_normal((5, 8, 8)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", imgs, 2.0)
    with StackReader(tmp_path / "s.mrcs") as r:
        assert r.n_images == 5 and r.box_size == 8
        np.testing.assert_array_equal(r.read([4, 0]), imgs[[4, 0]])
        with pytest.raises(InputError, match="image number 6"):
            r.read([5])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_map(tmp_path / "nope.mrc")


def test_corrupt_and_truncated(tmp_path, rng):
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file at all" * 10)
    with pytest.raises(InputError, match="not a readable MRC"):
        read_map(tmp_path / "junk.mrc")
    write_map(tmp_path / "ok.mrc", rng.standard_normal((16,) * 3), 1.0)
    data = (tmp_path / "ok.mrc").read_bytes()
    (tmp_path / "cut.mrc").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.mrc"):
        read_map(tmp_path / "cut.mrc")
    assert (tmp_path / "ok.mrc").read_bytes() == data  # input untouched


def test_bad_maps(tmp_path, rng):
    with mrcfile.new(tmp_path / "rect.mrc") as m:
        m.set_data(np.zeros((8, 8, 10), np.float32))
        m.voxel_size = 1.0
    with pytest.raises(InputError, match="cubic"):
        read_map(tmp_path / "rect.mrc")
    v = np.zeros((8, 8, 8), np.float32)
    v[1, 1, 1] = np.nan
    with mrcfile.new(tmp_path / "nan.mrc") as m:
        m.set_data(v)
        m.voxel_size = 1.0
    with pytest.raises(InputError, match="NaN"):
        read_map(tmp_path / "nan.mrc")
    with mrcfile.new(tmp_path / "nopx.mrc") as m:
        m.set_data(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(InputError, match="voxel size"):
        read_map(tmp_path / "nopx.mrc")
