"""Figures that jobs write next to their outputs (Matplotlib, Agg backend, PNG files).

``fsc.png`` (FSC curves with the 0.143 line), ``orientations.png`` (viewing directions,
Mollweide), ``slices.png`` (central slices of a map) and ``guinier.png`` (ln|F| against 1/d² with
the B-factor fit, RELION postprocess's analysis: :mod:`..core.guinier`). Every file is written
atomically (a temporary file renamed into place). Volumes are ``[z, y, x]`` with the origin at
index D//2; rotations ``(N, 3, 3)`` follow RELION (:mod:`..core.viewing`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.guinier import GuinierFit, guinier_bfactor
from ..core.symmetry import symmetry_operators
from ..core.viewing import viewing_direction_histogram

RESOLUTION_TICKS_A = (50, 30, 20, 15, 10, 8, 6, 5, 4.5, 4, 3.5, 3, 2.5, 2.2, 2, 1.8, 1.5, 1.2, 1.0)


def _figure(width_in: float, height_in: float):
    """A Matplotlib figure on the Agg backend with the house style (no pyplot state)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=110, layout="constrained")
    return fig


def _save(fig, path) -> Path:
    """Write ``fig`` as PNG at ``path`` atomically; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, facecolor="white")
    os.replace(tmp, path)
    return path


def _resolution_ticks(lo_freq: float, hi_freq: float, to_axis=lambda f: f, min_gap=0.07):
    """Resolution ticks (Å) between two frequencies (1/Å), at least ``min_gap`` of the axis
    apart; ``to_axis`` maps a frequency to the axis coordinate (e.g. f² for a Guinier plot)."""
    span = to_axis(hi_freq) - to_axis(lo_freq)
    ticks, last = [], to_axis(lo_freq)
    for r in RESOLUTION_TICKS_A:
        x = to_axis(1.0 / r)
        if lo_freq < 1.0 / r <= hi_freq * 1.0001 and x - last >= min_gap * span:
            ticks.append(r)
            last = x
    return ticks


def write_fsc_png(path, fsc_curves: dict[str, np.ndarray], box_size: int, pixel_size_A: float,
                  resolution_A: float | None = None, title: str = "Fourier shell correlation"):
    """Plot FSC curves (label → curve over shells 0 … D/2) against 1/Å, with the 0.143 and 0.5
    lines, and write it atomically as PNG."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in fsc_curves.items():
        curve = np.asarray(curve)
        freq = np.arange(curve.size) / (box_size * pixel_size_A)
        ax.plot(freq, curve, label=label, lw=1.6)
    ax.axhline(0.143, color="0.4", ls="--", lw=0.8, label="0.143")
    ax.axhline(0.5, color="0.7", ls=":", lw=0.8, label="0.5")
    if resolution_A:
        ax.axvline(1.0 / resolution_A, color="C3", lw=0.8)
        title = f"{title}: {resolution_A:.2f} Å at 0.143"
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05), title=title)
    nyquist = 0.5 / pixel_size_A
    ax.set_xlim(0, nyquist)
    top = ax.secondary_xaxis("top")
    ticks = _resolution_ticks(0.0, nyquist)
    top.set_xticks([1.0 / r for r in ticks], labels=[f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _orientation_bins(n: float) -> tuple[int, int]:
    """(azimuth, elevation) bins for ``n`` particles: about 5 per cell, 6 to 36 elevation rows."""
    n_el = int(np.clip(np.sqrt(max(n, 1.0) / 10.0), 6, 36))
    return 2 * n_el, n_el


def _subdivide(edges, k: int) -> np.ndarray:
    """Bin edges with every bin split into ``k`` equal parts."""
    fine = np.linspace(edges[:-1], edges[1:], k, endpoint=False).T.ravel()
    return np.append(fine, edges[-1])


def write_orientation_png(path, rotation, symmetry: str = "C1", weights=None,
                          title: str = "Viewing directions"):
    """Mollweide map of the particles' viewing directions (azimuth = rot, elevation = 90° − tilt;
    :mod:`..core.viewing`): particles per equal-area cell, empty cells in grey."""
    rotation = np.asarray(rotation, dtype=np.float64).reshape(-1, 3, 3)
    n = float(rotation.shape[0] if weights is None else np.sum(weights))
    n_az, n_el = _orientation_bins(n)
    counts, az_edges, el_edges = viewing_direction_histogram(
        rotation, n_az, n_el, weights, symmetry_operators(symmetry))
    fig = _figure(7.2, 4.2)
    ax = fig.add_subplot(1, 1, 1, projection="mollweide")
    ax.set_facecolor("0.85")
    # each cell drawn as 4 × 4 quadrilaterals, so that its edges follow the projection's curves
    sub = 4
    mesh = ax.pcolormesh(np.deg2rad(_subdivide(az_edges, sub)),
                         np.deg2rad(_subdivide(el_edges, sub)),
                         np.ma.masked_less_equal(counts, 0).repeat(sub, 0).repeat(sub, 1),
                         cmap="viridis", shading="flat", vmin=0, rasterized=True)
    ax.grid(True, color="white", lw=0.4, alpha=0.6)
    ax.tick_params(axis="x", colors="white", labelsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("azimuth = rot (°)")
    ax.set_ylabel("elevation = 90° − tilt (°)")
    cell = 4 * np.pi * (180 / np.pi) ** 2 / (n_az * n_el)
    bar = fig.colorbar(mesh, ax=ax, orientation="horizontal", shrink=0.6, pad=0.02, aspect=40)
    bar.set_label(f"particles per cell ({cell:.0f} deg², equal area; grey: none)")
    sym = "" if symmetry.upper() == "C1" else f", {symmetry.upper()} equivalents"
    ax.set_title(f"{title}: {n:,.0f} particles{sym}", pad=14)
    return _save(fig, path)


def _central_slices(volume) -> list[tuple[str, np.ndarray, str, str]]:
    """(name, image [rows, cols], horizontal axis, vertical axis) of the three central slices."""
    c = volume.shape[0] // 2
    return [("XY (z = 0)", volume[c], "x", "y"), ("XZ (y = 0)", volume[:, c, :], "x", "z"),
            ("YZ (x = 0)", volume[:, :, c], "y", "z")]


def _scale_bar_A(box_A: float) -> float:
    """A round scale-bar length about a fifth of the box."""
    for length in (500, 200, 100, 50, 20, 10, 5, 2, 1):
        if length <= box_A / 4:
            return float(length)
    return box_A / 4


def write_slices_png(path, volumes, pixel_size_A: float, title: str = "Central slices"):
    """Central XY, XZ and YZ slices through the box centre (index D//2), one row per map
    (``volumes``: one ``(D, D, D)`` map or a dict label → map). Density white on black, one grey
    scale per row (0.5–99.5 percentiles), axes in Å from the box centre, a scale bar."""
    rows = volumes if isinstance(volumes, dict) else {"map": volumes}
    fig = _figure(9.0, 3.1 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row, (label, volume) in zip(axes, rows.items()):
        volume = np.asarray(volume, dtype=np.float32)
        box = volume.shape[0]
        lo, hi = (-box // 2 - 0.5) * pixel_size_A, (box - box // 2 - 0.5) * pixel_size_A
        slices = _central_slices(volume)
        vmin, vmax = np.percentile(np.stack([s[1] for s in slices]), [0.5, 99.5])
        for ax, (name, image, h, v) in zip(row, slices):
            ax.imshow(image, cmap="gray", origin="lower", extent=(lo, hi, lo, hi),
                      vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(name if len(rows) == 1 else f"{label}: {name}", fontsize=9)
            ax.set_xlabel(f"{h} (Å)", fontsize=8)
            ax.set_ylabel(f"{v} (Å)", fontsize=8)
            ax.tick_params(labelsize=7)
        bar = _scale_bar_A(box * pixel_size_A)
        x0, y0 = lo + 0.06 * (hi - lo), lo + 0.07 * (hi - lo)
        row[0].plot([x0, x0 + bar], [y0, y0], color="yellow", lw=2.5, solid_capstyle="butt")
        row[0].text(x0 + bar / 2, y0 + 0.025 * (hi - lo), f"{bar:g} Å", color="yellow",
                    ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{title} ({box}³ voxels, {pixel_size_A:.3g} Å/voxel)", fontsize=10)
    return _save(fig, path)


def write_local_resolution_png(path, volume, resolution_A, region, pixel_size_A: float,
                               title: str = "Local resolution"):
    """Central slices of ``volume`` (grey) with its local resolution in colour where
    ``region`` (a mask, or the map's own density) exceeds 0.5, and the histogram of the local
    resolutions inside ``region``."""
    volume = np.asarray(volume, np.float32)
    resolution = np.asarray(resolution_A, np.float32)
    inside = np.asarray(region) > 0.5
    box = volume.shape[0]
    values = resolution[inside & (resolution > 0)]
    lo_res, hi_res = ((float(np.percentile(values, 2)), float(np.percentile(values, 98)))
                      if values.size else (2 * pixel_size_A, 20.0))
    fig = _figure(12.0, 3.4)
    axes = fig.subplots(1, 4)
    lo, hi = (-box // 2 - 0.5) * pixel_size_A, (box - box // 2 - 0.5) * pixel_size_A
    vmin, vmax = np.percentile(volume, [0.5, 99.5])
    shown = None
    for ax, (name, image, h, v), (_, res, _, _), (_, keep, _, _) in zip(
            axes, _central_slices(volume), _central_slices(resolution),
            _central_slices(inside.astype(np.float32))):
        ax.imshow(image, cmap="gray", origin="lower", extent=(lo, hi, lo, hi), vmin=vmin,
                  vmax=vmax, interpolation="nearest")
        shown = ax.imshow(np.ma.masked_where(keep < 0.5, res), cmap="turbo", origin="lower",
                          extent=(lo, hi, lo, hi), vmin=lo_res, vmax=max(hi_res, lo_res + 0.1),
                          alpha=0.75, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"{h} (Å)", fontsize=8)
        ax.set_ylabel(f"{v} (Å)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(shown, ax=axes[2], label="local resolution (Å)", shrink=0.85)
    hist = axes[3]
    if values.size:
        hist.hist(values, bins=30, color="#3a6ea5")
        hist.axvline(float(np.median(values)), color="k", ls="--", lw=1,
                     label=f"median {np.median(values):.2f} Å")
        hist.legend(fontsize=8)
    hist.set_xlabel("local resolution (Å)", fontsize=8)
    hist.set_ylabel("voxels", fontsize=8)
    hist.tick_params(labelsize=7)
    hist.set_title("inside the mask", fontsize=9)
    fig.suptitle(f"{title} ({box}³ voxels, {pixel_size_A:.3g} Å/voxel)", fontsize=10)
    return _save(fig, path)


def write_guinier_png(path, fit: GuinierFit, pixel_size_A: float,
                      resolution_A: float | None = None, title: str = "Guinier plot"):
    """ln|F| against 1/d² (Å⁻²): the map's curve, the FSC-weighted one, the fitted line over
    its range and the B-factor (RELION's sign: negative = sharpening; :mod:`..core.guinier`)."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    s2 = fit.s2_invA2
    ax.plot(s2[1:], fit.ln_amplitude[1:], color="0.35", lw=1.4, label="map")
    weighted = np.isfinite(fit.ln_amplitude_weighted) & (
        fit.ln_amplitude_weighted != fit.ln_amplitude)
    if weighted.any():
        ax.plot(s2[1:], fit.ln_amplitude_weighted[1:], color="C0", lw=1.4, label="FSC-weighted")
    if fit.bfactor_A2 is not None:
        lo, hi = s2[fit.in_fit].min(), s2[fit.in_fit].max()
        ax.axvspan(lo, hi, color="C1", alpha=0.1, lw=0)
        x = np.linspace(lo, hi, 50)
        ax.plot(x, fit.slope * x + fit.intercept, color="C3", lw=2, ls="--",
                label=f"fit {fit.fit_range_A[0]:.1f}–{fit.fit_range_A[1]:.1f} Å, "
                      f"{int(fit.in_fit.sum())} shells (r² = {fit.corr_coeff:.2f})")
        text = f"B = {fit.bfactor_A2:.0f} Å²".replace("-", "−") + "\n(sharpening, RELION sign)"
    else:
        text = "B: no fit (too few shells beyond 10 Å)"
    if resolution_A:
        ax.axvline(1.0 / resolution_A ** 2, color="0.5", lw=0.8, ls=":",
                   label=f"FSC 0.143: {resolution_A:.2f} Å")
    ax.text(0.97, 0.95, text, transform=ax.transAxes, ha="right", va="top", fontsize=12,
            bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    nyquist = 0.5 / pixel_size_A
    ax.set_xlim(0, nyquist ** 2)
    ax.set(xlabel="1/d² (Å⁻²)", ylabel="ln |F| (mean amplitude per shell)", title=title)
    top = ax.secondary_xaxis("top")
    ticks = _resolution_ticks(0.0, nyquist, to_axis=lambda f: f * f, min_gap=0.06)
    top.set_xticks([1.0 / r ** 2 for r in ticks], labels=[f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.8), fontsize=8)
    return _save(fig, path)


def write_job_figures(out_dir, halves, full_map, fsc_curve, resolution_A: float,
                      pixel_size_A: float, rotation=None, weights=None, symmetry: str = "C1",
                      title: str = "") -> dict:
    """``orientations.png`` (when poses are given), ``slices.png`` and ``guinier.png`` in
    ``out_dir`` (``fsc.png`` comes from the FSC report). The Guinier analysis is RELION
    postprocess's: the mean of the two half maps, FSC-weighted with ``fsc_curve``, fitted from
    10 Å on. Returns ``bfactor_A2`` (None without a fit), the fit's range and r², and
    ``outputs`` (plot name → path)."""
    out = Path(out_dir)
    prefix = f"{title}: " if title else ""
    outputs = {}
    if rotation is not None and len(rotation):
        outputs["orientations_plot"] = str(write_orientation_png(
            out / "orientations.png", rotation, symmetry, weights, f"{prefix}Viewing directions"))
    outputs["slices_plot"] = str(write_slices_png(out / "slices.png", full_map, pixel_size_A,
                                                  f"{prefix}Central slices of map.mrc"))
    average = 0.5 * (np.asarray(halves[0], np.float64) + np.asarray(halves[1], np.float64))
    fit = guinier_bfactor(average, pixel_size_A, fsc_curve)
    outputs["guinier_plot"] = str(write_guinier_png(out / "guinier.png", fit, pixel_size_A,
                                                    resolution_A, f"{prefix}Guinier plot"))
    return {"bfactor_A2": fit.bfactor_A2, "bfactor_fit_range_A": fit.fit_range_A,
            "bfactor_fit_r2": fit.corr_coeff, "outputs": outputs}
