"""Heterogeneous Reconstruction Only: hard class labels and soft class weights."""

import numpy as np
import pytest

from dask_refine.core.fsc import fsc
from dask_refine.io.errors import InputError
from dask_refine.io.mrc import read_map
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.store import ParticleStore
from dask_refine.jobs.config import PostprocessOptions
from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct

N = 400


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, demo_map):
    volume, px = demo_map
    root = tmp_path_factory.mktemp("hetero")
    simulate_store(volume, px, root / "p.zarr",
                   SimulationConfig(n_particles=N, snr=1.0, chunk_size=200, seed=6),
                   write_poses=True)
    store = ParticleStore.open(root / "p.zarr", mode="r+")
    labels = np.random.default_rng(0).integers(0, 2, N).astype(np.int32)
    store.write_column("class_id", labels)
    return root, labels


def _run(root, name, classes, **kw):
    # the class maps are the subject: no local resolution (tests/test_postprocess.py)
    return run_reconstruct(ReconstructConfig(store=str(root / "p.zarr"), out_dir=str(root / name),
                                             classes=classes, n_chains=1,
                                             postprocess=PostprocessOptions(local_resolution=False),
                                             **kw),
                           log=lambda m: None)


def test_hard_labels_and_one_hot_weights_give_the_same_class_maps(labelled, demo_map):
    root, labels = labelled
    hard = _run(root, "hard", "labels")
    assert hard["n_classes"] == 2
    counts = [sum(hard["per_class"][k]["n_particles_per_half"]) for k in (1, 2)]
    assert counts == [int((labels == 0).sum()), int((labels == 1).sum())]
    np.save(root / "onehot.npy", np.eye(2)[labels])
    _run(root, "soft", str(root / "onehot.npy"))
    for k in (1, 2):
        a = read_map(root / "hard" / f"class_{k:03d}" / "map.mrc")[0]
        b = read_map(root / "soft" / f"class_{k:03d}" / "map.mrc")[0]
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(a).max())
        assert fsc(a, demo_map[0])[1:16].min() > 0.8  # each class map is the structure


def test_uniform_soft_weights_give_the_homogeneous_map(labelled):
    root, _ = labelled
    np.save(root / "half.npy", np.full((N, 2), 0.5))
    _run(root, "uniform", str(root / "half.npy"))
    homo = _run(root, "homo", None)
    ref = read_map(root / "homo" / "map.mrc")[0]
    for k in (1, 2):
        m = read_map(root / "uniform" / f"class_{k:03d}" / "map.mrc")[0]
        assert fsc(m, ref)[1:30].min() > 0.999
    assert homo["resolution_A"] == pytest.approx(
        _run(root, "uniform2", str(root / "half.npy"))["per_class"][1]["resolution_A"], rel=0.02)


def test_bad_class_weights_are_refused(labelled):
    root, _ = labelled
    np.save(root / "wrong.npy", np.ones((N + 1, 2)))
    with pytest.raises(InputError, match=r"wrong.npy.*expected \(400, K\)"):
        _run(root, "bad", str(root / "wrong.npy"))
    with pytest.raises(InputError, match="file not found"):
        _run(root, "bad", str(root / "missing.npy"))
    np.save(root / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy"):
        _run(root, "bad", str(root / "obj.npy"))
