"""Symmetry expansion (io/expand.py): |G| rows per particle with the images shared, and the
reconstruction of the expansion equals the symmetrised one (the theorem); the poses match
``relion_particle_symmetry_expand``'s where RELION is installed."""

import shutil
import subprocess

import numpy as np
import pytest

from dask_refine.core.rotations import angular_distance_deg
from dask_refine.io.errors import InputError
from dask_refine.io.expand import expand_symmetry
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.store import ParticleStore


@pytest.fixture(scope="module")
def posed(tmp_path_factory, demo_map):
    volume, px = demo_map
    root = tmp_path_factory.mktemp("expand")
    store = simulate_store(volume, px, root / "p.zarr",
                           SimulationConfig(n_particles=120, snr=np.inf, chunk_size=60, seed=4),
                           write_poses=True)
    return root, store, px


@pytest.fixture(scope="module")
def c4(posed):
    """The posed store's C4 expansion, and the source's file listing before it."""
    root, store, _ = posed
    before = sorted(p.name for p in (root / "p.zarr").rglob("*"))
    return expand_symmetry(store, root / "c4.zarr", "C4"), before


def test_expansion_repeats_every_column_and_shares_the_images(posed, c4):
    root, store, _ = posed
    expanded, before = c4
    assert sorted(p.name for p in (root / "p.zarr").rglob("*")) == before  # source untouched
    assert expanded.info.n_particles == 480
    assert not (root / "c4.zarr" / "images").exists()  # shared, not copied
    np.testing.assert_array_equal(expanded.images[4 * 7 + 2], store.images[7])
    np.testing.assert_array_equal(expanded.images[8:12], np.repeat(store.images[2:3], 4, axis=0))
    np.testing.assert_array_equal(expanded.read_column("half_set"),
                                  np.repeat(store.read_column("half_set"), 4))
    rotation = expanded.read_column("rotation").reshape(120, 4, 3, 3)
    angles = angular_distance_deg(rotation[:, 1:], rotation[:, :1])
    np.testing.assert_allclose(angles, np.tile([90.0, 180.0, 90.0], (120, 1)), atol=1e-6)
    again = ParticleStore.open(root / "c4.zarr")  # reopens with its images
    assert again.images.shape == (480, 64, 64)
    with pytest.raises(InputError, match="itself an expansion"):
        expand_symmetry(again, root / "twice.zarr", "C2")
    with pytest.raises(InputError, match="--symmetry"):
        expand_symmetry(store, root / "bad.zarr", "Q7")


def test_reconstruction_of_the_expansion_is_the_symmetrised_one(posed, c4):
    """Reconstructing the C4-expanded particles in C1 inserts each image at its four
    symmetry-related poses: the map equals the original particles' reconstruction with the
    sums symmetrised (RELION's --sym C4)."""
    from dask_refine.core.backprojection import FourierSums, backproject_particles
    from dask_refine.jobs.reconstruct import load_pose_metadata, reconstruct_halves_and_full

    _, store, px = posed
    expanded = c4[0]
    maps = []
    for s, symmetry in ((store, "C4"), (expanded, "C1")):
        meta = load_pose_metadata(s, use_ctf=True)
        sums = backproject_particles(FourierSums.zeros(2, 64), s.images[:], meta,
                                     meta["half_set"], px)
        maps.append(reconstruct_halves_and_full(sums, 64, px, symmetry=symmetry)[2])
    # equal but for the interpolation of the symmetrised sums (CC 0.9989 measured)
    assert np.corrcoef(maps[0].ravel(), maps[1].ravel())[0, 1] > 0.995


@pytest.mark.skipif(shutil.which("relion_particle_symmetry_expand") is None,
                    reason="RELION not installed")
def test_expanded_poses_are_relions(posed, tmp_path):
    """The expanded STAR's poses, per particle as a set, are those of
    ``relion_particle_symmetry_expand --sym D2`` on the same STAR (to 0.01°)."""
    import starfile

    from dask_refine.core.rotations import euler_to_matrix
    from dask_refine.io.star import export_star

    _, store, _ = posed
    star = export_star(store, tmp_path / "in.star")
    subprocess.run(["relion_particle_symmetry_expand", "--i", str(star), "--o",
                    str(tmp_path / "relion.star"), "--sym", "D2"], check=True,
                   capture_output=True, timeout=300)
    ours = expand_symmetry(store, tmp_path / "d2.zarr", "D2").read_column("rotation")
    part = starfile.read(tmp_path / "relion.star")["particles"]
    relion = euler_to_matrix(*(part[f"rlnAngle{a}"].to_numpy(float) for a in ("Rot", "Tilt",
                                                                                 "Psi")))
    assert len(relion) == len(ours) == 480
    ours, relion = ours.reshape(120, 4, 3, 3), relion.reshape(-1, 3, 3)
    # each particle's copies (found by its image), compared as sets
    names = part["rlnImageName"].to_numpy()
    source = starfile.read(star)["particles"]["rlnImageName"].to_numpy()
    for i in range(0, 120, 23):
        theirs = relion[names == source[i]]
        assert len(theirs) == 4
        distance = angular_distance_deg(ours[i][:, None], theirs[None, :])
        assert distance.min(axis=1).max() < 0.01
