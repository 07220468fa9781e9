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


def test_stack_written_block_by_block_from_a_zarr_array(tmp_path, rng):
    """A stack written from a chunked (zarr) array, a few rows at a time, is the stack written
    from the whole array in memory: same data, same header (statistics to float rounding)."""
    import zarr

    imgs = (3 * rng.standard_normal((37, 8, 8)) + 1).astype(np.float32)
    chunked = zarr.open_array(tmp_path / "i.zarr", mode="w", shape=imgs.shape, chunks=(10, 8, 8),
                              dtype="f4")
    chunked[:] = imgs
    write_stack(tmp_path / "whole.mrcs", imgs, 1.3, rows_per_block=len(imgs))
    write_stack(tmp_path / "blocks.mrcs", chunked, 1.3)  # its chunks: 10 rows at a time
    with mrcfile.open(tmp_path / "whole.mrcs") as a, mrcfile.open(tmp_path / "blocks.mrcs") as b:
        np.testing.assert_array_equal(b.data, imgs)
        assert b.is_image_stack() and b.voxel_size.x == pytest.approx(1.3)
        for field in a.header.dtype.names:
            if field in ("dmin", "dmax", "dmean", "rms"):
                assert float(b.header[field]) == pytest.approx(float(a.header[field]), rel=1e-6)
            else:
                assert np.array_equal(b.header[field], a.header[field]), field
        assert float(b.header.rms) == pytest.approx(float(imgs.std()), rel=1e-5)
        assert float(b.header.dmin) == imgs.min() and float(b.header.dmax) == imgs.max()
    assert not list(tmp_path.glob(".*tmp*"))


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
