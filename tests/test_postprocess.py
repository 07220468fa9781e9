"""Sharpening and local resolution (core/postprocess.py): from their definitions, and against
``relion_postprocess`` on the same half maps where RELION is installed."""

import shutil
import subprocess

import numpy as np
import pytest

from dask_refine.core.filters import lowpass_filter
from dask_refine.core.fourier import centred_rfftn, rfft_radius
from dask_refine.core.fsc import mask_corrected_fsc, resolution_at_threshold
from dask_refine.core.guinier import apply_bfactor
from dask_refine.core.masks import solvent_mask
from dask_refine.core.postprocess import Mtf, divide_by_mtf, local_resolution, sharpen
from dask_refine.io.mrc import read_map, write_map

HAS_RELION = shutil.which("relion_postprocess") is not None


@pytest.fixture(scope="module")
def halves(demo_map):
    """Two half maps of the demo map blurred by B = 150 Å² with independent noise, four times
    stronger where x > 0 than where x < 0, and a solvent mask of the map."""
    volume, px = demo_map
    volume = volume.astype(np.float64)
    blurred = apply_bfactor(volume, 150.0, px)
    rng = np.random.default_rng(0)
    x = np.indices(volume.shape)[2] - volume.shape[0] // 2
    amplitude = 0.6 * blurred.std() * np.where(x > 0, 2.0, 0.5)
    maps = [blurred + amplitude * lowpass_filter(rng.normal(0, 1, volume.shape), 2.5 * px, px)
            for _ in range(2)]
    mask = solvent_mask(lowpass_filter(volume, 15.0, px), 0.2 * volume.max(), 3.0, 6.0)
    return maps, mask, px, x


def test_sharpening_undoes_a_known_blur(demo_map):
    """A map blurred by exp(−B s²/4), B = 150 Å², with a perfect FSC: sharpening it by −150
    gives the map back (to Nyquist); the fitted B-factor is the map's own less 150."""
    volume, px = demo_map
    sharp = apply_bfactor(volume.astype(np.float64), 0.0, px)  # nothing beyond Nyquist
    blurred = apply_bfactor(sharp, 150.0, px)
    perfect = np.ones(volume.shape[0] // 2 + 1)
    back = sharpen(blurred, perfect, px, bfactor_A2=-150.0)
    np.testing.assert_allclose(back.map, sharp, atol=1e-5 * np.abs(sharp).max())
    assert back.bfactor_A2 == -150.0
    fitted = sharpen(blurred, perfect, px).bfactor_A2
    own = sharpen(sharp, perfect, px).bfactor_A2
    assert abs((fitted - own) - (-150.0)) < 0.03 * 150.0, (fitted, own)


def test_fsc_weighting_mtf_and_lowpass(demo_map):
    """Shells past the FSC's first fall below 1e-4 are removed; dividing by an MTF undoes
    multiplying by it; the low-pass leaves nothing beyond its edge."""
    volume, px = demo_map
    box = volume.shape[0]
    curve = np.ones(box // 2 + 1)
    curve[20:] = 0.0
    out = sharpen(volume, curve, px, bfactor_A2=0.0)
    assert np.abs(centred_rfftn(out.map.astype(np.float64), 3)[rfft_radius(box, 3) >= 20.5]).max() \
        < 1e-6 * np.abs(centred_rfftn(volume.astype(np.float64), 3)).max()
    mtf = Mtf(np.linspace(0.0, 0.5 / px, 50), np.linspace(1.0, 0.3, 50))
    f = centred_rfftn(volume.astype(np.float64), 3)
    s = rfft_radius(box, 3) / (box * px)
    inside = s < 0.5 / px
    damped = np.where(inside, f * mtf.at(s), f)
    np.testing.assert_allclose(divide_by_mtf(damped, box, px, mtf), f, rtol=1e-10, atol=1e-12)
    low = sharpen(volume, np.ones(box // 2 + 1), px, bfactor_A2=0.0, lowpass_A=8.0)
    edge = box * px / 8.0 + 1.0
    assert np.abs(centred_rfftn(low.map.astype(np.float64), 3)[rfft_radius(box, 3) > edge]).max() \
        < 1e-6 * np.abs(f).max()
    with pytest.raises(ValueError, match="zero or negative"):
        Mtf(np.array([0.0, 0.1]), np.array([1.0, 0.0]))


def test_local_resolution_of_identical_and_of_unevenly_noisy_halves(halves):
    """Identical halves agree everywhere: Nyquist at every voxel a window reached, and the
    filtered map is their (Nyquist-limited) average. Halves whose noise is four times stronger
    on one side are worse there."""
    (a, b), mask, px, x = halves
    same = local_resolution(a, a, px)
    reached = same.resolution_A > 0
    assert reached[mask > 0.5].all()
    np.testing.assert_allclose(same.resolution_A[reached], 2 * px, rtol=1e-5)
    uneven = local_resolution(a, b, px)
    inside = mask > 0.5
    noisy, clean = (np.median(uneven.resolution_A[inside & side]) for side in (x > 0, x < 0))
    assert noisy > clean + 0.2, (noisy, clean)
    assert len(uneven.points) == len(uneven.point_resolution_A) > 10


@pytest.mark.skipif(not HAS_RELION, reason="RELION not installed")
def test_sharpening_and_local_resolution_match_relion_postprocess(halves, tmp_path):
    """The same half maps and mask through ``relion_postprocess --auto_bfac`` and ``--locres``:
    the B-factor within 2% (−207 vs −209 Å² measured), the resolution equal, the sharpened maps
    alike (CC > 0.999); local resolutions alike voxel by voxel inside the mask (CC 0.997,
    0.02 Å apart on average measured) and the locally filtered maps (CC > 0.999)."""
    import starfile

    (a, b), mask, px, _ = halves
    for name, data in (("half_a", a), ("half_b", b), ("mask", mask)):
        write_map(tmp_path / f"{name}.mrc", np.asarray(data, np.float32), px)
    (tmp_path / "pp").mkdir()
    (tmp_path / "lr").mkdir()
    common = ["relion_postprocess", "--i", "half_a.mrc", "--i2", "half_b.mrc", "--mask",
              "mask.mrc", "--angpix", f"{px}"]
    for extra in (["--auto_bfac", "--autob_lowres", "10", "--o", "pp/pp"],
                  ["--locres", "--adhoc_bfac", "-200", "--o", "lr/pp"]):
        # (RELION's PDF summary needs ghostscript; the maps and STAR come before it)
        subprocess.run(common + extra, cwd=tmp_path, capture_output=True, timeout=600,
                       check=False)
    general = starfile.read(tmp_path / "pp" / "pp.star", always_dict=True)["general"]
    relion_b = float(general["rlnBfactorUsedForSharpening"])
    curves = mask_corrected_fsc(a, b, mask)
    assert resolution_at_threshold(curves["corrected"], a.shape[0], px, 0.143) == \
        pytest.approx(float(general["rlnFinalResolution"]))
    ours = sharpen(0.5 * (a + b), curves["corrected"], px)
    assert abs(ours.bfactor_A2 - relion_b) < 0.02 * abs(relion_b), (ours.bfactor_A2, relion_b)
    relion_map, _ = read_map(tmp_path / "pp" / "pp.mrc")
    assert np.corrcoef(relion_map.ravel(), ours.map.ravel())[0, 1] > 0.999
    local = local_resolution(a, b, px, bfactor_A2=-200.0)
    inside = mask > 0.5
    relion_locres, _ = read_map(tmp_path / "lr" / "pp_locres.mrc")
    assert np.corrcoef(relion_locres[inside], local.resolution_A[inside])[0, 1] > 0.95
    assert np.mean(np.abs(relion_locres[inside] - local.resolution_A[inside])) < 0.1
    relion_filtered, _ = read_map(tmp_path / "lr" / "pp_locres_filtered.mrc")
    assert np.corrcoef(relion_filtered[inside], local.filtered[inside])[0, 1] > 0.999


def test_mtf_star_is_read_and_divides_the_sharpened_map(halves, tmp_path):
    """An MTF in RELION's STAR format (1/pixel of the micrographs): read, converted to 1/Å by
    their pixel size, and divided out of map_sharp.mrc; a bad value is refused by field."""
    import pandas as pd
    import starfile

    from dask_refine.io.errors import InputError
    from dask_refine.io.star import read_mtf
    from dask_refine.jobs.postprocess import PostprocessOptions, load_mtf, write_postprocessed

    (a, b), mask, px, _ = halves
    table = pd.DataFrame({"rlnResolutionInversePixel": np.linspace(0.0, 0.5, 21),
                          "rlnMtfValue": np.linspace(1.0, 0.4, 21)})
    starfile.write({"mtf": table}, tmp_path / "mtf.star")
    frequency, value = read_mtf(tmp_path / "mtf.star")
    np.testing.assert_allclose(value, table["rlnMtfValue"])
    options = PostprocessOptions(mtf_path=str(tmp_path / "mtf.star"), mtf_pixel_size_A=px / 2,
                                 local_resolution=False)
    mtf = load_mtf(options, px)
    np.testing.assert_allclose(mtf.frequency_invA, frequency / (px / 2))
    curve = mask_corrected_fsc(a, b, mask)["corrected"]
    for name in ("plain", "mtf"):
        (tmp_path / name).mkdir()
    plain = write_postprocessed(tmp_path / "plain", (a, b), curve, None, px,
                                PostprocessOptions(local_resolution=False))
    corrected = write_postprocessed(tmp_path / "mtf", (a, b), curve, mask, px, options)
    # the MTF falls 1 → 0.7 over the map's band (its Nyquist is the micrographs' 0.25/pixel):
    # divided out, the map's high frequencies are stronger and need less sharpening
    assert corrected["sharpening_bfactor_A2"] > plain["sharpening_bfactor_A2"] + 5.0
    assert {"map_sharp", "map_sharp_masked"} <= set(corrected["outputs"])
    table["rlnMtfValue"] = table["rlnMtfValue"].where(table.index != 3, 0.0)
    starfile.write({"mtf": table}, tmp_path / "bad.star")
    with pytest.raises(InputError, match="rlnMtfValue.*row 4"):
        read_mtf(tmp_path / "bad.star")


def test_postprocess_in_its_thread_writes_what_it_writes_inline(halves, tmp_path):
    """``start_postprocess`` (the numerics in a thread beside the figures) hands
    ``write_postprocessed`` the same numbers it computes itself: identical files and summary."""
    from dask_refine.io.mrc import read_map
    from dask_refine.jobs.postprocess import (PostprocessOptions, start_postprocess,
                                              write_postprocessed)

    (a, b), mask, px, _ = halves
    curve = mask_corrected_fsc(a, b, mask)["corrected"]
    options = PostprocessOptions(local_resolution_sampling_A=40.0)
    for name in ("inline", "thread"):
        (tmp_path / name).mkdir()
    inline = write_postprocessed(tmp_path / "inline", (a, b), curve, mask, px, options)
    threaded = write_postprocessed(tmp_path / "thread", (a, b), curve, mask, px, options,
                                   computed=start_postprocess((a, b), curve, px, options))
    assert {k: v for k, v in inline.items() if k != "outputs"} == \
        {k: v for k, v in threaded.items() if k != "outputs"}
    for name in ("map_sharp", "map_sharp_masked", "local_resolution", "map_locres_filtered"):
        np.testing.assert_array_equal(read_map(tmp_path / "thread" / f"{name}.mrc")[0],
                                      read_map(tmp_path / "inline" / f"{name}.mrc")[0])
