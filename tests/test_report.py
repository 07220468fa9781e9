"""``dask-refine report DIR``: one self-contained HTML page per job folder."""

import base64
import html
import json
from html.parser import HTMLParser

import numpy as np
from distributed import Client, LocalCluster
from PIL import Image

from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct
from dask_refine.ui.cli import main
from dask_refine.ui.report import write_report
from test_figures import check_png

FIGURES = ("fsc.png", "guinier.png", "orientations.png", "slices.png", "local_resolution.png")


class _Page(HTMLParser):
    """Collects the page's images and links, and fails on unbalanced markup we emit."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.text = " ".join(page.text)
    return page


def _embedded(page: _Page, png_path) -> bool:
    data = base64.b64encode(png_path.read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}" in page.images


def _png(path, colour):
    Image.new("RGB", (24, 16), colour).save(path)


def test_report_of_a_heterogeneous_refinement_folder(tmp_path):
    job = tmp_path / "run <1> & co"
    (job / "class_001").mkdir(parents=True)
    (job / "class_002").mkdir()
    summary = {"job": "hetero-refine", "resolution_A": 3.214, "bfactor_A2": -85.4,
               "iterations": 7, "converged": True, "n_particles": 12345, "box_size": 64,
               "pixel_size_A": 1.1, "time_s": 754.0,
               "classes": {"1": {"n_particles": 12000, "resolution_A": 3.214, "bfactor_A2": -85.4},
                           "2": {"n_particles": 345, "resolution_A": None}}}
    (job / "summary.json").write_text(json.dumps(summary))
    (job / "config.json").write_text(json.dumps({"store": "p<x>.zarr"}))
    (job / "iterations.csv").write_text("iteration,resolution_A,median_pose_change_deg\n"
                                        "1,8.5,180\n2,4.25,3.5\n")
    (job / "particles.star").write_text("data_\n")
    for i, name in enumerate(FIGURES):
        _png(job / "class_001" / name, (40 * i, 0, 0))
    _png(job / "fsc.png", (0, 0, 255))

    assert main(["report", str(job)]) == 0
    page = _parse(job / "report.html")
    assert _embedded(page, job / "fsc.png")
    assert all(_embedded(page, job / "class_001" / name) for name in FIGURES)
    assert len(page.images) == len(FIGURES) + 1
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    for text in ("hetero-refine", "run <1> & co", "3.21 Å", "-85 Å²", "7 (converged)", "12,345",
                 "12 min 34 s", "Class 1", "Class 2", "no maps (empty class)", "4.25", "p<x>.zarr"):
        assert text in page.text, text
    raw = (job / "report.html").read_text()
    assert "run <1> & co" not in raw and html.escape("run <1> & co") in raw  # escaped
    for href in ("particles.star", "iterations.csv", "class_001/guinier.png", "summary.json"):
        assert href in page.links, href


def test_report_refuses_a_folder_that_is_not_a_job(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no summary.json" in err and str(tmp_path) in err
    assert not (tmp_path / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_of_a_real_reconstruction(tmp_path, demo_map, capsys):
    volume, px = demo_map
    simulate_store(volume, px, tmp_path / "p.zarr",
                   SimulationConfig(n_particles=300, snr=0.5, chunk_size=150, seed=5),
                   write_poses=True)
    out = tmp_path / "job"
    config = ReconstructConfig(store=str(tmp_path / "p.zarr"), out_dir=str(out), n_chains=1)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        summary = run_reconstruct(config, client=client, log=lambda m: None)
    for name in FIGURES:
        check_png(out / name)
        assert summary["outputs"][name.replace(".png", "_plot")] == str(out / name)
    assert summary["bfactor_A2"] is not None and np.isfinite(summary["bfactor_A2"])
    assert json.loads((out / "summary.json").read_text())["bfactor_A2"] == summary["bfactor_A2"]

    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(write_report(out))
    page = _parse(out / "report.html")
    assert all(_embedded(page, out / name) for name in FIGURES)
    assert f"{summary['resolution_A']:.2f} Å" in page.text
    assert f"{summary['bfactor_A2']:.0f} Å²" in page.text
    assert "300" in page.text and "map.mrc" in page.links
    # the sharpened map (by the fitted B-factor) and the local resolution, linked and summarised
    assert summary["sharpening_bfactor_A2"] == summary["bfactor_A2"]
    assert "map_sharp.mrc" in page.links and "local_resolution.mrc" in page.links
    local = summary["local_resolution_A"]
    assert 2 * px <= local["p5"] <= local["median"] <= local["p95"] <= 50.0
    assert f"{local['median']:.2f} Å" in page.text
