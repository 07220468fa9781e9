"""Optics beyond the CTF fit: Zernike terms, beam tilt, magnification (RELION 3.1's observation
model), from their definitions, through import, simulation and reconstruction, and against
``relion_reconstruct`` where RELION is installed."""

import dataclasses
import shutil
import subprocess

import numpy as np
import pytest
import starfile

from dask_refine.core.aberrations import (
    beam_tilt_odd_zernike,
    demodulate,
    even_zernike_nm,
    magnified_rotations,
    modulate,
    odd_zernike_nm,
    zernike_cartesian,
    zernike_sum_rfft,
)
from dask_refine.core.backprojection import FourierSums, backproject_particles, particle_ctfs
from dask_refine.core.ctf import ctf_rfft, electron_wavelength_A
from dask_refine.core.fourier import rfft_frequencies
from dask_refine.core.rotations import random_rotations
from dask_refine.io.cryosparc import export_cs, import_cs
from dask_refine.io.errors import InputError
from dask_refine.io.mrc import read_map
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.star import export_star, import_star
from dask_refine.io.store import GROUND_TRUTH
from dask_refine.jobs.reconstruct import load_pose_metadata, reconstruct_halves_and_full

CTF = dict(defocus_u_A=np.array([15000.0, 21000.0]), defocus_v_A=np.array([14000.0, 20500.0]),
           defocus_angle_deg=np.array([30.0, 110.0]), voltage_kV=np.array([300.0, 300.0]),
           cs_mm=np.array([2.7, 2.7]), amplitude_contrast=np.array([0.1, 0.1]),
           phase_shift_deg=np.zeros(2), bfactor_A2=np.zeros(2))


def test_zernike_indices_are_relions():
    # Zernike::oddIndexToMN / evenIndexToMN, written out
    assert [odd_zernike_nm(i) for i in range(6)] == [(1, -1), (1, 1), (3, -3), (3, -1), (3, 1),
                                                      (3, 3)]
    assert [even_zernike_nm(i) for i in range(9)] == [(0, 0), (2, -2), (2, 0), (2, 2), (4, -4),
                                                       (4, -2), (4, 0), (4, 2), (4, 4)]


def test_zernike_polynomials_closed_forms():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.3, 0.3, (2, 50))
    r2 = x * x + y * y
    np.testing.assert_allclose(zernike_cartesian(1, -1, x, y), y, atol=1e-15)
    np.testing.assert_allclose(zernike_cartesian(2, 0, x, y), 2 * r2 - 1, atol=1e-15)
    np.testing.assert_allclose(zernike_cartesian(2, 2, x, y), x * x - y * y, atol=1e-15)
    np.testing.assert_allclose(zernike_cartesian(3, 1, x, y), (3 * r2 - 2) * x, atol=1e-15)
    np.testing.assert_allclose(zernike_cartesian(3, -3, x, y), 3 * x * x * y - y ** 3,
                               atol=1e-15)
    np.testing.assert_allclose(zernike_cartesian(4, 0, x, y), 6 * r2 * r2 - 6 * r2 + 1,
                               atol=1e-14)


def test_beam_tilt_phase_is_relions_formula():
    """φ = −π·20000·Cs·λ²·(τx kx + τy ky)·|k|² (k in 1/Å, τ in mrad, Cs in mm): RELION's
    insertTilt, on the centred rfft grid."""
    box, px, cs, kv, tx, ty = 64, 2.2, 2.7, 300.0, 3.0, -2.0
    phase = zernike_sum_rfft(beam_tilt_odd_zernike(tx, ty, cs, kv), box, px, odd=True)
    ky, kx = rfft_frequencies(box, 2)
    kx, ky = np.broadcast_arrays(kx / (box * px), ky / (box * px))
    lam = float(electron_wavelength_A(kv))
    expected = -np.pi * 20000 * cs * lam ** 2 * (tx * kx + ty * ky) * (kx ** 2 + ky ** 2)
    np.testing.assert_allclose(phase, expected, atol=1e-9 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.5  # a phase that matters at Nyquist
    # coefficients given with the tilt: 0 and 1 add, 3 and 4 are replaced (as RELION does)
    both = beam_tilt_odd_zernike(tx, ty, cs, kv, [0.1, 0.2, 0.3, 9.0, 9.0, 0.4])
    alone = beam_tilt_odd_zernike(tx, ty, cs, kv)
    np.testing.assert_allclose(both, alone + [0.1, 0.2, 0.3, 0.0, 0.0, 0.4])


def test_even_defocus_term_equals_a_defocus_change():
    """Even coefficients c·(Z_0^0 + Z_2^0) = 2c|k|² add to γ what a defocus change of
    −2c/(πλ) does (γ = −πλΔf|k|² + …)."""
    box, px, c = 64, 1.5, 5.0
    even = np.tile([c, 0.0, c], (2, 1))
    with_even = particle_ctfs({**CTF, "even_zernike": even}, box, px)
    lam = float(electron_wavelength_A(300.0))
    shifted = dict(CTF, defocus_u_A=CTF["defocus_u_A"] - 2 * c / (np.pi * lam),
                   defocus_v_A=CTF["defocus_v_A"] - 2 * c / (np.pi * lam))
    np.testing.assert_allclose(with_even, ctf_rfft(box, px, **shifted), atol=2e-6)
    assert np.abs(with_even - ctf_rfft(box, px, **CTF)).max() > 0.5


def test_isotropic_magnification_is_a_pixel_size_change():
    """CTF and aberrations at M k with M = s·I are those of pixel size px/s; so are the
    slices: RELION's (M₃⁻¹ A)⁻¹ (k, 0) = Aᵀ (s k, 0)."""
    box, px, s = 64, 1.5, 1.03
    mag = np.tile(s * np.eye(2), (2, 1, 1))
    np.testing.assert_allclose(particle_ctfs({**CTF, "mag_matrix": mag}, box, px),
                               ctf_rfft(box, px / s, **CTF), atol=2e-6)
    coeffs = beam_tilt_odd_zernike(3.0, -2.0, 2.7, 300.0)
    np.testing.assert_allclose(zernike_sum_rfft(coeffs, box, px, True, s * np.eye(2)),
                               zernike_sum_rfft(coeffs, box, px / s, True), atol=1e-12)
    rot = random_rotations(3, np.random.default_rng(1))
    sliced = magnified_rotations(rot, {"mag_matrix": mag[:1].repeat(3, axis=0)})
    k = np.array([3.0, -5.0, 0.0])
    np.testing.assert_allclose(np.einsum("nji,j->ni", sliced, k),
                               np.einsum("nji,j->ni", rot, k * s), atol=1e-12)
    relion = np.linalg.inv(np.linalg.inv(np.diag([s, s, 1.0])) @ rot)  # applyAnisoMag, inverted
    np.testing.assert_allclose(np.einsum("nij,j->ni", relion, k),
                               np.einsum("nji,j->ni", sliced, k), atol=1e-12)


def test_demodulation_undoes_the_phase():
    rng = np.random.default_rng(2)
    f = (rng.standard_normal((2, 32, 17)) + 1j * rng.standard_normal((2, 32, 17))).astype(
        np.complex64)
    meta = {"odd_zernike": np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                     beam_tilt_odd_zernike(2.0, 1.0, 2.7, 300.0)])}
    back = demodulate(modulate(f, meta, 1.0), meta, 1.0)
    np.testing.assert_allclose(back, f, atol=1e-5)
    moved = modulate(f, meta, 1.0)
    np.testing.assert_array_equal(moved[0], f[0])  # no aberration: untouched
    np.testing.assert_allclose(np.abs(moved), np.abs(f), rtol=1e-5)  # a phase only
    assert np.abs(moved[1] - f[1]).max() > 0.1
    assert demodulate(f, {}, 1.0) is f


def _sphere(volume):
    z, y, x = np.indices(volume.shape) - volume.shape[0] // 2
    return (x * x + y * y + z * z) < (0.4 * volume.shape[0]) ** 2


def _cc(a, b, mask):
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def tilted(tmp_path_factory, demo_map):
    """Noise-free particles with a beam tilt of (3, −2) mrad (the issue's case, on the demo
    map): the store, the STAR a RELION user would have, and the known-pose map of the same
    particles imaged without the tilt."""
    volume, px = demo_map
    root = tmp_path_factory.mktemp("tilt")
    config = SimulationConfig(n_particles=400, snr=np.inf, chunk_size=400, seed=3,
                              beam_tilt_mrad=(3.0, -2.0), cs_mm=2.7)
    store = simulate_store(volume, px, root / "p.zarr", config, write_poses=True)
    star = export_star(store, root / "p.star")
    # the same particles without the tilt: what a correction can at best give back
    untilted = simulate_store(volume, px, root / "u.zarr",
                              dataclasses.replace(config, beam_tilt_mrad=(0.0, 0.0)),
                              write_poses=True)
    return volume, px, store, star, root, _known_pose_map(untilted, px)


def _known_pose_map(store, px, use_aberrations=True):
    meta = load_pose_metadata(store, use_ctf=True)
    if not use_aberrations:
        meta = {k: v for k, v in meta.items() if k not in ("odd_zernike", "even_zernike",
                                                           "mag_matrix")}
    sums = backproject_particles(FourierSums.zeros(2, store.info.box_size), store.images[:],
                                 meta, meta["half_set"], px)
    return reconstruct_halves_and_full(sums, store.info.box_size, px)[2]


def test_beam_tilt_round_trips_through_star_and_is_applied(tilted, tmp_path):
    volume, px, store, star, _, untilted = tilted
    optics, _ = starfile.read(star).values()
    assert float(optics["rlnBeamTiltX"][0]) == 3.0 and float(optics["rlnBeamTiltY"][0]) == -2.0
    imported = import_star(star, tmp_path / "imported.zarr", chunk_size=400)
    np.testing.assert_array_equal(imported.read_column("beam_tilt_mrad"),
                                  np.tile([3.0, -2.0], (store.info.n_particles, 1)))
    mask = _sphere(volume)
    corrected = _known_pose_map(imported, px)
    # applying the tilt gives back the map of the same particles imaged without it
    assert _cc(corrected, untilted, mask) > 0.9999
    ignored = _cc(_known_pose_map(imported, px, use_aberrations=False), volume, mask)
    assert _cc(corrected, volume, mask) > ignored + 0.05, ignored
    # the export of the import keeps the optics block's fields as they were
    again = export_star(imported, tmp_path / "again.star")
    optics2, _ = starfile.read(again).values()
    assert float(optics2["rlnBeamTiltX"][0]) == 3.0


def _set_optics(optics, odd: str, even: str, mag=(1.01, 0.002, 0.002, 0.99)):
    """Zernike coefficients (RELION's text) and a magnification matrix in an optics table."""
    optics["rlnOddZernike"], optics["rlnEvenZernike"] = odd, even
    for label, value in zip(("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"), mag):
        optics[label] = value


def test_zernike_and_magnification_fields_are_imported(tilted, tmp_path):
    star, root = tilted[3], tilted[4]
    optics, particles = starfile.read(star).values()
    _set_optics(optics, "[0.01,0.02,0.0,0.0,0.0,0.03]", "[0.0,0.1,0.0,0.2]")
    path = root / "zernike.star"
    starfile.write({"optics": optics, "particles": particles}, path)
    store = import_star(path, tmp_path / "z.zarr", chunk_size=400)
    meta = store.optics_metadata(slice(0, 2))
    np.testing.assert_allclose(meta["even_zernike"], [[0.0, 0.1, 0.0, 0.2]] * 2)
    np.testing.assert_allclose(meta["mag_matrix"], [[[1.01, 0.002], [0.002, 0.99]]] * 2)
    expected = beam_tilt_odd_zernike(3.0, -2.0, 2.7, 300.0, [0.01, 0.02, 0.0, 0.0, 0.0, 0.03])
    np.testing.assert_allclose(meta["odd_zernike"], [expected] * 2)
    optics["rlnEvenZernike"] = "[0.0,oops]"
    starfile.write({"optics": optics, "particles": particles}, path)
    with pytest.raises(InputError, match="rlnEvenZernike"):
        import_star(path, tmp_path / "bad.zarr")


def test_magnified_particles_reconstruct_with_their_matrix(demo_map, tmp_path):
    volume, px = demo_map
    store = simulate_store(volume, px, tmp_path / "m.zarr",
                           SimulationConfig(n_particles=300, snr=np.inf, chunk_size=300, seed=5,
                                            mag_matrix=(1.03, 0.01, 0.01, 0.98)),
                           write_poses=True)
    plain = simulate_store(volume, px, tmp_path / "plain.zarr",
                           SimulationConfig(n_particles=300, snr=np.inf, chunk_size=300, seed=5),
                           write_poses=True)
    mask = _sphere(volume)
    applied = _known_pose_map(store, px)
    assert _cc(applied, _known_pose_map(plain, px), mask) > 0.999
    ignored = _cc(_known_pose_map(store, px, use_aberrations=False), volume, mask)
    assert _cc(applied, volume, mask) > ignored + 0.05, ignored


@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION not installed")
@pytest.mark.parametrize("optics", [dict(beam_tilt_mrad=(3.0, -2.0)),
                                    dict(beam_tilt_mrad=(3.0, -2.0),
                                         mag_matrix=(1.02, 0.03, -0.01, 0.97))],
                         ids=["beam_tilt", "beam_tilt_and_magnification"])
def test_aberrated_star_reconstructs_like_relion(demo_map, tmp_path, optics):
    """The issue's measurement: ``relion_reconstruct --ctf`` applies the STAR's beam tilt and
    magnification; our known-pose map of the same STAR agrees with RELION's (CC > 0.99; 0.998
    measured) and beats the map that ignores them."""
    volume, px = demo_map
    store = simulate_store(volume, px, tmp_path / "p.zarr",
                           SimulationConfig(n_particles=800, snr=np.inf, chunk_size=400, seed=3,
                                            **optics), write_poses=True)
    star = export_star(store, tmp_path / "p.star")
    imported = import_star(star, tmp_path / "imported.zarr", chunk_size=400)
    run = subprocess.run(["relion_reconstruct", "--i", str(star), "--o", "relion.mrc", "--ctf"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    relion, _ = read_map(tmp_path / "relion.mrc")
    mask = _sphere(volume)
    ours = _known_pose_map(imported, px)
    ignored = _known_pose_map(imported, px, use_aberrations=False)
    assert _cc(ours, relion, mask) > 0.99
    assert _cc(ours, volume, mask) > _cc(ignored, volume, mask) + 0.05
    assert _cc(relion, volume, mask) > _cc(ignored, volume, mask) + 0.05


def test_optics_groups_at_different_pixel_sizes(demo_map, tmp_path):
    """Two optics groups imaged at 1× and 1.05× the map's pixel size (one box), filed as
    RELION 3.1 files them (rlnImagePixelSize per optics group): the import keeps each
    particle's pixel size and the first group's as the store's; the known-pose map applies the
    ratio as a magnification (RELION's applyScaleDifference) and equals the map of the same
    particles imaged at one pixel size; it agrees with ``relion_reconstruct``'s where RELION
    is installed; the round trips keep every pixel size; different boxes are refused."""
    volume, px = demo_map
    config = SimulationConfig(n_particles=600, snr=np.inf, chunk_size=300, seed=4,
                              other_group_pixel_sizes_A=(1.05 * px,))
    store = simulate_store(volume, px, tmp_path / "p.zarr", config, write_poses=True)
    plain = simulate_store(volume, px, tmp_path / "plain.zarr", dataclasses.replace(
        config, other_group_pixel_sizes_A=()), write_poses=True)
    star = export_star(store, tmp_path / "p.star")
    optics, particles = starfile.read(star).values()
    np.testing.assert_allclose(optics["rlnImagePixelSize"], [px, 1.05 * px])
    imported = import_star(star, tmp_path / "imported.zarr", chunk_size=300)
    assert imported.info.pixel_size_A == px
    np.testing.assert_allclose(imported.read_column("image_pixel_size_A"),
                               np.where(np.arange(600) % 2, 1.05 * px, px))
    np.testing.assert_allclose(imported.read_column("shift_A"), store.read_column("shift_A"))
    mask = _sphere(volume)
    applied = _known_pose_map(imported, px)
    assert _cc(applied, _known_pose_map(plain, px), mask) > 0.999
    meta = load_pose_metadata(imported, use_ctf=True)
    ignored = {k: v for k, v in meta.items() if k not in ("mag_matrix", "image_pixel_size_A")}
    sums = backproject_particles(FourierSums.zeros(2, 64), imported.images[:], ignored,
                                 meta["half_set"], px)
    ignored_map = reconstruct_halves_and_full(sums, 64, px)[2]
    assert _cc(applied, volume, mask) > _cc(ignored_map, volume, mask) + 0.05
    # .cs: blob/psize_A per particle, alignments3D shifts in each one's pixels
    cs = export_cs(imported, tmp_path / "p.cs")
    table = np.load(cs)
    np.testing.assert_allclose(table["blob/psize_A"], imported.read_column("image_pixel_size_A"),
                               rtol=1e-6)
    again = import_cs(cs, tmp_path / "again.zarr")
    np.testing.assert_allclose(again.read_column("image_pixel_size_A"),
                               imported.read_column("image_pixel_size_A"), rtol=1e-6)
    np.testing.assert_allclose(again.read_column("shift_A"), store.read_column("shift_A"),
                               atol=1e-4)
    if shutil.which("relion_reconstruct") is not None:
        run = subprocess.run(["relion_reconstruct", "--i", str(star), "--o", "relion.mrc",
                              "--ctf"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=600, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        relion, _ = read_map(tmp_path / "relion.mrc")
        assert _cc(applied, relion, mask) > 0.99
    optics["rlnImageSize"] = [64, 72]
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "boxes.star")
    with pytest.raises(InputError, match="rlnImageSize"):
        import_star(tmp_path / "boxes.star", tmp_path / "boxes.zarr")


def test_the_e_step_searches_and_scores_with_each_groups_optics(demo_map, tmp_path):
    """Two optics groups with different magnifications, and a beam tilt: a local search from
    the true poses keeps them and leaves (noise-free) residuals a fraction of those of the
    same E-step blind to the optics; each group is searched with its own matrix."""
    from helpers import downsample_to_32

    from dask_refine.core.noise import noise_weights
    from dask_refine.core.pose_search import SearchParams, amplitude_envelope
    from dask_refine.core.projection import prepare_reference_rfft
    from dask_refine.core.refine_step import refine_particles
    from dask_refine.core.rotations import angular_distance_deg

    volume, px = demo_map
    small, px = downsample_to_32(volume), 2 * px
    images, meta, truth = [], [], []
    for seed, mag in ((1, (1.03, 0.01, 0.01, 0.98)), (2, (0.97, -0.02, 0.0, 1.02))):
        store = simulate_store(small, px, tmp_path / f"{seed}.zarr", SimulationConfig(
            n_particles=6, snr=np.inf, chunk_size=6, seed=seed, shift_sigma_A=0.0,
            beam_tilt_mrad=(4.0, -3.0), mag_matrix=mag, cs_mm=2.7))
        images.append(store.images[:])
        meta.append(store.optics_metadata())
        truth.append([store.read_column(k, group=GROUND_TRUTH) for k in ("rotation", "scale")])
    images = np.concatenate(images)
    truth, scale = (np.concatenate(t) for t in zip(*truth))
    meta = {k: np.concatenate([m[k] for m in meta]) for k in meta[0]}
    meta.update(scale=scale, origin_px=np.zeros((12, 2)), rotation=truth)
    ref = prepare_reference_rfft(small)
    params = SearchParams(r_align=14, particle_radius_px=12, first_level=3, last_level=5,
                          max_shift_px=1.0, local=True, local_level=3)
    weight = noise_weights(np.full(17, 1.0), 32)

    def estep(m):
        sums = FourierSums.zeros(2, 32)
        return refine_particles(sums, images, m, np.zeros(12, int), [ref, ref],
                                [amplitude_envelope(ref, 32)] * 2, weight, params, px, 14.0)

    modelled = estep(meta)
    blind = estep({k: v for k, v in meta.items()
                   if k not in ("odd_zernike", "even_zernike", "mag_matrix")})
    swapped = estep({**meta, "mag_matrix": np.roll(meta["mag_matrix"], 6, axis=0)})
    assert np.median(angular_distance_deg(modelled.rotation, truth)) < 2.0
    assert modelled.noise_sums.sum() < 0.15 * blind.noise_sums.sum()
    assert modelled.noise_sums.sum() < 0.3 * swapped.noise_sums.sum()


def test_phase_flipped_particles_and_premultiplied_ones(tilted, tmp_path):
    """A STAR whose images were phase-flipped (rlnCtfDataArePhaseFlipped 1) reconstructs like
    the unflipped particles (the model's CTF is |CTF|); CTF-premultiplied images are refused,
    naming the field."""
    from dask_refine.core.fourier import centred_irfftn, centred_rfftn
    from dask_refine.io.mrc import write_stack

    volume, px, store, star, _, _ = tilted
    optics, particles = starfile.read(star).values()
    meta = store.optics_metadata()
    f = centred_rfftn(store.images[:], 2)
    flipped = centred_irfftn(f * np.sign(particle_ctfs(meta, 64, px)), 2, 64).astype(np.float32)
    write_stack(tmp_path / "flipped.mrcs", flipped, px)
    particles["rlnImageName"] = [f"{i + 1:06d}@flipped.mrcs" for i in range(len(particles))]
    optics["rlnCtfDataArePhaseFlipped"] = 1
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "flipped.star")
    imported = import_star(tmp_path / "flipped.star", tmp_path / "flipped.zarr", chunk_size=400)
    mask = _sphere(volume)
    plain = _known_pose_map(store, px)
    assert _cc(_known_pose_map(imported, px), plain, mask) > 0.999
    imported.write_column("ctf_phase_flipped", np.zeros(len(particles), np.int8))  # ignored
    assert _cc(_known_pose_map(imported, px), plain, mask) < 0.9
    optics["rlnCtfDataArePhaseFlipped"] = 0
    optics["rlnCtfDataAreCtfPremultiplied"] = 1
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "premultiplied.star")
    with pytest.raises(InputError, match="rlnCtfDataAreCtfPremultiplied"):
        import_star(tmp_path / "premultiplied.star", tmp_path / "premultiplied.zarr")


def test_every_optics_field_survives_star_cs_star(tilted, tmp_path):
    """A STAR with beam tilt, Zernike terms, magnification and phase flipping → store → .cs →
    store → STAR: every optics value comes back (cryoSPARC's ctf/tilt_A for the tilt, RELION's
    names under rln/ for the others)."""
    from dask_refine.io.cryosparc import export_cs, import_cs

    star = tilted[3]
    optics, particles = starfile.read(star).values()
    _set_optics(optics, "[0.01,0.02,0.5,0.0,0.0,0.03]", "[0.0,0.1,0.0,0.2,0.0,0.0,0.0,0.0,7.0]")
    optics["rlnCtfDataArePhaseFlipped"] = 1
    starfile.write({"optics": optics, "particles": particles}, star.parent / "all.star")
    first = import_star(star.parent / "all.star", tmp_path / "a.zarr", chunk_size=400)
    cs = export_cs(first, star.parent / "all.cs")
    second = import_cs(cs, tmp_path / "b.zarr")
    for name in ("beam_tilt_mrad", "odd_zernike", "even_zernike", "mag_matrix",
                 "ctf_phase_flipped"):
        np.testing.assert_allclose(second.read_column(name), first.read_column(name),
                                   rtol=1e-6, err_msg=name)
    optics2, _ = starfile.read(export_star(second, tmp_path / "back.star")).values()
    for label in ("rlnBeamTiltX", "rlnBeamTiltY", "rlnMagMat00", "rlnMagMat01",
                  "rlnCtfDataArePhaseFlipped"):
        np.testing.assert_allclose(float(optics2[label][0]), float(optics[label][0]),
                                   rtol=1e-6, err_msg=label)
    for label in ("rlnOddZernike", "rlnEvenZernike"):
        np.testing.assert_allclose(
            [float(v) for v in optics2[label][0].strip("[]").split(",")],
            [float(v) for v in optics[label][0].strip("[]").split(",")], err_msg=label)
