"""CTF refinement (core/ctf_refine.py and its place in the refinement job): the error it
minimises is the search's, and it gives back a defocus error and a beam tilt put into data."""

import numpy as np
import pandas as pd

from dask_refine.core.backprojection import observed_rfft, particle_ctfs
from dask_refine.core.ctf_refine import (
    band_rfft_mask,
    defocus_errors,
    fit_beam_tilt,
    phase_sums,
    refine_defocus,
)
from dask_refine.core.fourier import rfft_multiplicity, translate_rfft
from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.io.store import GROUND_TRUTH


def _particles(demo_map, tmp_path, n=8, **optics):
    """Noise-free particles, their observed rffts centred at the true origin, the true map's
    slices at the true poses, the filed optics, the truth."""
    volume, px = demo_map
    store = simulate_store(volume, px, tmp_path / "p.zarr", SimulationConfig(
        n_particles=n, snr=np.inf, chunk_size=n, seed=11, **optics))
    meta = store.optics_metadata()
    truth = {k: store.read_column(k, group=GROUND_TRUTH)
             for k in ("rotation", "shift_A", "scale")}
    x = translate_rfft(observed_rfft(store.images[:], meta, px), truth["shift_A"] / px)
    slices = extract_central_slices_rfft(prepare_reference_rfft(volume), truth["rotation"], 64)
    return store, meta, truth, x, slices, px


def test_defocus_error_is_the_search_error(demo_map, tmp_path):
    """At offset 0 the errors are Σ m w |X − s C P|² over 0 < |k| < r_max, by definition."""
    _, meta, truth, x, slices, px = _particles(demo_map, tmp_path, n=3)
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 2.0, (64, 33))
    x = x + rng.normal(0, 30, x.shape)  # not a perfect fit
    got = defocus_errors(x, slices, meta, truth["scale"], weight, px, 20.0, [0.0, 150.0])
    sel = band_rfft_mask(64, 20.0)
    c = particle_ctfs(meta, 64, px).astype(np.float64)
    resid = np.abs(x - truth["scale"][:, None, None] * c * slices).reshape(3, -1)[:, sel] ** 2
    mw = (np.broadcast_to(rfft_multiplicity(64, 2), (64, 33)) * weight).ravel()[sel]
    np.testing.assert_allclose(got[:, 0], resid @ mw, rtol=1e-6)
    assert np.all(got[:, 1] != got[:, 0])


def test_refine_defocus_recovers_a_filed_error(demo_map, tmp_path):
    """Particles imaged at their true defocus but filed ±300–600 Å off: the refined offsets
    give the error back (noise-free: to a few Å; parabolic refinement of a 20 Å grid)."""
    _, meta, truth, x, slices, px = _particles(demo_map, tmp_path)
    error = np.array([300.0, -450.0, 600.0, -320.0, 510.0, -600.0, 380.0, -410.0])
    filed = dict(meta, defocus_u_A=meta["defocus_u_A"] + error,
                 defocus_v_A=meta["defocus_v_A"] + error)
    found = refine_defocus(x, slices, filed, truth["scale"], np.ones((64, 33)), px, 28.0,
                           2000.0)
    np.testing.assert_allclose(found, np.c_[-error, -error], atol=8.0)
    # the range is respected
    near = refine_defocus(x, slices, filed, truth["scale"], np.ones((64, 33)), px, 28.0, 200.0)
    assert np.all(np.abs(near) <= 200.0)
    # U and V filed apart (astigmatism off by ±150 Å): found apart
    apart = dict(filed, defocus_u_A=filed["defocus_u_A"] + 150.0,
                 defocus_v_A=filed["defocus_v_A"] - 150.0)
    found = refine_defocus(x[:3], slices[:3], {k: v[:3] for k, v in apart.items()},
                           truth["scale"][:3], np.ones((64, 33)), px, 28.0, 2000.0,
                           astigmatism=True)
    np.testing.assert_allclose(found, np.c_[-error[:3] - 150.0, -error[:3] + 150.0], atol=12.0)


def test_fit_beam_tilt_recovers_the_tilt(demo_map, tmp_path):
    """Images with a (3, −2) mrad tilt, read as if untilted: the phases they leave against the
    true map's predictions fit that tilt; read with it, they leave none."""
    store, meta, truth, _, slices, px = _particles(demo_map, tmp_path, beam_tilt_mrad=(3.0, -2.0))
    plain = {k: v for k, v in meta.items() if k != "odd_zernike"}
    x = translate_rfft(observed_rfft(store.images[:], plain, px), truth["shift_A"] / px)
    prediction = truth["scale"][:, None, None] * particle_ctfs(plain, 64, px) * slices
    z = phase_sums(x, prediction, np.ones((64, 33)))
    tau = fit_beam_tilt(z, 64, px, 2.7, 300.0, 28.0)
    np.testing.assert_allclose(tau, [3.0, -2.0], atol=0.02)
    x_known = translate_rfft(observed_rfft(store.images[:], meta, px), truth["shift_A"] / px)
    rest = fit_beam_tilt(phase_sums(x_known, prediction, np.ones((64, 33))), 64, px, 2.7,
                         300.0, 28.0)
    np.testing.assert_allclose(rest, [0.0, 0.0], atol=0.02)


def test_refinement_refines_defocus_and_beam_tilt(demo_map, tmp_path):
    """Homogeneous Refinement with --per-particle-defocus --per-group-ctf on particles filed
    with 400 Å defocus errors, no beam tilt and no magnification (imaged with (3, −2) mrad and a
    2% anisotropic magnification): the refined defocus, tilt and magnification move toward the
    truth and go into particles.star, particles.cs and iterations.csv; the store keeps what
    was filed. The higher-order terms are fitted too
    (their threshold lifted) and, absent from the data, stay zero."""
    import starfile
    from helpers import downsample_to_32

    from dask_refine.io.mrc import write_map
    from dask_refine.jobs.refine import RefineConfig, run_refine
    from dask_refine.parallel.cluster import ClusterConfig

    volume, px = demo_map
    small, px = downsample_to_32(volume), 2 * px
    store = simulate_store(small, px, tmp_path / "p.zarr", SimulationConfig(
        n_particles=120, snr=10.0, chunk_size=60, seed=12, defocus_error_A=400.0,
        beam_tilt_mrad=(3.0, -2.0), shift_sigma_A=2.0, mag_matrix=(1.02, 0.0, 0.0, 0.98)))
    store.group.attrs["provenance"] = {}  # nothing below may read the truth
    store.write_column("beam_tilt_mrad", np.zeros((120, 2)))  # filed without the tilt
    store.write_column("mag_matrix", np.tile(np.eye(2), (120, 1, 1)))  # nor the magnification
    write_map(tmp_path / "initial.mrc", small, px)
    summary = run_refine(RefineConfig(
        store=str(store.path), initial_map=str(tmp_path / "initial.mrc"),
        out_dir=str(tmp_path / "out"), max_iterations=3, per_particle_defocus=True,
        per_group_ctf=True, ctf_refine_from_A=100.0, first_level_candidates=128,
        higher_order_aberrations_from_A=100.0,
        cluster=ClusterConfig(n_workers=2)), log=lambda m: None)
    true_u = store.read_column("defocus_u_A", group=GROUND_TRUTH)
    filed_u = store.read_column("defocus_u_A")
    optics, particles = starfile.read(tmp_path / "out" / "particles.star").values()
    refined_u = particles["rlnDefocusU"].to_numpy()
    before = np.sqrt(np.mean((filed_u - true_u) ** 2))
    after = np.sqrt(np.mean((refined_u - true_u) ** 2))
    assert after < 0.6 * before, (before, after)
    tilt = optics[["rlnBeamTiltX", "rlnBeamTiltY"]].to_numpy(dtype=float)[0]
    # 120 small particles: each iteration's estimate is good to ≈ ±0.5 mrad (0.1 mrad needs
    # the benchmark's 1,000–2,000 particles at box 64)
    assert np.abs(tilt - [3.0, -2.0]).max() < 1.0, tilt
    mag = optics[["rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"]].to_numpy(
        dtype=float)[0]
    # 2% anisotropy (1.02, 0.98): given back to a few parts in a thousand
    np.testing.assert_allclose(mag, [1.02, 0.0, 0.0, 0.98], atol=0.004)
    np.testing.assert_array_equal(store.read_column("beam_tilt_mrad"), 0.0)  # store untouched
    for label in ("rlnOddZernike", "rlnEvenZernike"):
        assert all(float(v) == 0.0 for v in optics[label][0].strip("[]").split(",")), label
    cs = np.load(tmp_path / "out" / "particles.cs")
    np.testing.assert_allclose(cs["ctf/df1_A"], refined_u, rtol=1e-6)
    table = pd.read_csv(tmp_path / "out" / "iterations.csv")
    assert table["mean_defocus_change_A"].notna().sum() >= 2
    assert np.isfinite(table["beam_tilt_x_mrad_group_1"].iloc[-1])
    assert abs(table["anisotropic_magnification_percent_group_1"].iloc[-1] - 4.0) < 0.5
    np.testing.assert_allclose(cs["rln/mag_matrix"].reshape(-1, 4), np.tile(mag, (120, 1)))
    assert np.all(store.read_column("mag_matrix") == np.eye(2))  # the store keeps the identity
    assert summary["iterations"] == 3


def test_trefoil_and_even_aberrations_are_recovered(demo_map, tmp_path):
    """Images made with trefoil (odd coefficients 2 and 5) and with a C_s change and tetrafoil
    in γ, read without them: the odd fit gives the trefoil back (and no tilt), the even fit
    the two even terms as RELION's coefficients (and nothing else)."""
    from dask_refine.core.aberrations import modulate
    from dask_refine.core.ctf_refine import even_sums, fit_even_aberrations
    from dask_refine.io.simulate import render_particles

    _, meta, truth, x, slices, px = _particles(demo_map, tmp_path, n=12)
    odd = np.zeros((12, 6))
    odd[:, 2], odd[:, 5] = -30.0, 40.0
    x_odd = modulate(x, {"odd_zernike": odd}, px)
    prediction = truth["scale"][:, None, None] * particle_ctfs(meta, 64, px) * slices
    found = fit_beam_tilt(phase_sums(x_odd, prediction, np.ones((64, 33))), 64, px, 2.7, 300.0,
                          30.0, trefoil=True)
    assert np.all(np.abs(found - [0.0, 0.0, -30.0, 40.0]) < [0.02, 0.02, 1.5, 1.5]), found

    # C_s changed by 1.5 mm (γ's K2 u⁴ term: a ρ⁴ coefficient of (π/2)·ΔC_s·λ³) and tetrafoil
    lam = 0.0196875  # Å at 300 kV
    dcs = 0.5 * np.pi * 1.5e7 * lam ** 3  # 1.5 mm: 0.7 rad at Nyquist
    even = np.zeros((12, 9))
    even[:, 6], even[:, 2], even[:, 0] = dcs / 6, dcs / 2, dcs / 3  # ρ⁴ (see EVEN_MONOMIALS)
    even[:, 8] = 200.0
    from dask_refine.core.projection import prepare_reference_rfft

    volume, _ = demo_map
    images = render_particles(prepare_reference_rfft(volume), {**meta, "even_zernike": even},
                              truth, slice(0, 12), 64, px)
    x_even = translate_rfft(observed_rfft(images, meta, px), truth["shift_A"] / px)
    sums = even_sums(x_even, slices, meta, truth["scale"], np.ones((64, 33)), px)
    got = fit_even_aberrations(sums, 64, px, 30.0)
    np.testing.assert_allclose(got, even[0], rtol=0.03, atol=0.5)


def test_slice_gradients_are_the_frequency_derivatives(demo_map):
    """∂P/∂k of a projection's rfft equals the derivative of its Fourier transform evaluated
    off the grid (a direct sum over the image's pixels), by central differences."""
    from dask_refine.core.ctf_refine import slice_gradients
    from dask_refine.core.fourier import centred_irfftn

    volume, _ = demo_map
    rot = np.eye(3)[None]
    p = extract_central_slices_rfft(prepare_reference_rfft(volume.astype(np.float64)), rot, 64)
    image = centred_irfftn(p, 2, 64)[0]
    grad = slice_gradients(p)[0]
    coord = np.arange(64) - 32
    y, x = np.meshgrid(coord, coord, indexing="ij")

    def ft(kx, ky):  # the image's transform at any frequency (Fourier pixels)
        return np.sum(image * np.exp(-2j * np.pi * (kx * x + ky * y) / 64))

    h = 1e-3
    for ky, kx in ((0, 3), (5, 7), (-9, 4), (12, 0)):
        row = ky + 32
        fd = [(ft(kx + h, ky) - ft(kx - h, ky)) / (2 * h), (ft(kx, ky + h) - ft(kx, ky - h)) / (2 * h)]
        np.testing.assert_allclose(grad[:, row, kx], fd, rtol=1e-5,
                                   atol=1e-6 * np.abs(fd).max())


def test_fit_magnification_recovers_an_anisotropic_magnification(demo_map, tmp_path):
    """Images made under a magnification matrix with 1% anisotropy, read as if it were the
    identity: the fit of their residuals against the true map's predictions gives the
    anisotropic part back; a second pass from that matrix refines it; read with the true
    matrix, the fit asks for nothing significant."""
    from dask_refine.core.aberrations import magnified_rotations
    from dask_refine.core.ctf_refine import fit_magnification, magnification_sums

    true = np.array([[1.01, 0.004], [0.004, 0.99]])
    store, meta, truth, _, _, px = _particles(demo_map, tmp_path, n=12,
                                              mag_matrix=tuple(true.ravel()))
    reference = prepare_reference_rfft(demo_map[0])
    x = translate_rfft(observed_rfft(store.images[:], meta, px), truth["shift_A"] / px)

    def fit(matrix):
        model = dict(meta, mag_matrix=np.tile(matrix, (12, 1, 1)))
        slices = extract_central_slices_rfft(
            reference, magnified_rotations(truth["rotation"], model), 64)
        c = truth["scale"][:, None, None] * particle_ctfs(model, 64, px)
        return fit_magnification(magnification_sums(x, slices, c, np.ones((64, 33))), 64, 28.0)

    d = fit(np.eye(2))
    np.testing.assert_allclose(d, [[0.01, 0.004], [0.004, -0.01]], atol=1.5e-3)
    second = np.eye(2) + d
    second = second @ (np.eye(2) + fit(second))
    np.testing.assert_allclose(second, true, atol=4e-4)
    np.testing.assert_array_equal(fit(true), 0.0)
