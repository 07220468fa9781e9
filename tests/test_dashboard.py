"""The live refinement page: event payloads, the page's data, the route on a real dashboard
(embedded and preloaded remote schedulers), and the page in a real browser during a run."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dask_refine.core.rotations import euler_to_matrix
from dask_refine.jobs.progress import central_slices, iteration_event, orientation_histogram
from dask_refine.parallel.events import TOPIC, publish
from dask_refine.ui import dashboard
from helpers import small_refine_dataset


def _volume(box=32, centre=(16, 16, 24)):
    z, y, x = np.mgrid[:box, :box, :box]
    return np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / 8.0)


def _event(run, iteration, noise, rng):
    vol = _volume()
    halves = [vol + noise * rng.standard_normal(vol.shape) for _ in range(2)]
    curve = np.linspace(1, 0, 17) ** (1 + iteration)
    rot = euler_to_matrix(rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), np.zeros(50))
    return iteration_event(run=run, job="refine", out_dir="out", iteration=iteration,
                           max_iterations=5, box_size=32, pixel_size_A=2.0,
                           classes=[{"fsc": curve, "halves": halves, "resolution_A": 8.0 / iteration,
                                     "n_particles": 50}],
                           rotation=rot, stats={"median_pose_change_deg": 3.0 / iteration,
                                                "particles_per_s": 100.0, "mean_evaluations": 1e4,
                                                "exhaustive_evaluations": 1e6, "level": 4,
                                                "median_significant_poses": 12.0,
                                                "angular_accuracy_deg": 1.5,
                                                "outlier_fraction": 0.02,
                                                "mean_pruned_by_bound": 0.0,
                                                "mean_pruned_by_cap": 9e3,
                                                "arrays": {"error": np.zeros(3)}})


def test_central_slices_orientation_and_scaling():
    slices = central_slices(_volume(), max_px=16)  # blob at x = 24: right of centre
    xy, xz, yz = (np.asarray(s) for s in slices)
    assert xy.shape == xz.shape == yz.shape == (16, 16)
    assert xy.max() == 255 and xy.min() == 0
    for section in (xy, xz):  # rows y (or z), columns x, after 2× binning
        assert section[8, 12] == 255
        assert np.argmax(section.sum(axis=0)) == 12 and abs(np.argmax(section.sum(axis=1)) - 7.5) < 1
    assert yz.max() < 128  # the x = centre plane misses the blob


def test_orientation_histogram_puts_top_views_at_the_pole():
    rot = euler_to_matrix(np.array([10.0, 10.0, 100.0]), np.array([0.0, 0.0, 90.0]),
                          np.zeros(3))
    h = orientation_histogram(rot)
    counts = np.asarray(h["counts"])
    assert counts.sum() == 3 and counts.shape == (18, 36)
    assert counts[-1].sum() == 2  # tilt 0: elevation +90°, the top row
    assert counts[9, 28] == 1  # rot 100°, tilt 90°: equator, azimuth bin 100–110°


def test_event_is_plain_data_and_the_page_shows_the_latest_run(rng):
    events = [(0.0, _event("old", 1, 0.5, rng)), (1.0, _event("new", 1, 0.5, rng)),
              (2.0, _event("new", 2, 0.1, rng)), (3.0, "someone else's message")]
    json.dumps([e for _, e in events])  # numbers, strings and lists only
    assert "arrays" not in events[1][1]["stats"] and events[1][1]["stats"]["level"] == 4
    run = dashboard.latest_run(events)
    assert [p["iteration"] for p in run] == [1, 2] and run[0]["run"] == "new"
    data = dashboard.source_data(run)
    assert data["fsc"]["iteration"] == [1, 2]
    assert data["fsc"]["ys"][0] != data["fsc"]["ys"][1]
    assert data["resolution_points"]["y"] == [8.0, 4.0]
    assert data["speed"]["exhaustive"] == [1e6, 1e6]
    assert data["speed"]["pruned_by_cap"] == [9e3, 9e3]  # the beam apart from the bound
    assert data["speed"]["pruned_by_bound"] == [0.0, 0.0]
    assert data["posterior"]["significant_poses"] == [12.0, 12.0]
    assert data["posterior"]["accuracy_deg"] == [1.5, 1.5]
    assert data["slice_A_xy"]["image"][0].shape == (32, 32)
    assert data["orientations"]["image"][0].sum() == 50
    assert "iteration 2 of at most 5" in dashboard.header_html(run)
    empty = dashboard.source_data([])
    assert empty["fsc"]["xs"] == [] and "waiting" in dashboard.header_html([])
    # a finished job's results update its last iteration (its plots stay)
    final = {"sharpening_bfactor_A2": -80.0,
             "local_resolution_A": {"median": 4.2, "p5": 4.0, "p95": 5.0}}
    done = dashboard.latest_run(events + [(4.0, {"run": "new", "iteration": 2, "final": final})])
    assert [p["iteration"] for p in done] == [1, 2] and done[-1]["classes"] == run[-1]["classes"]
    header = dashboard.header_html(done)
    assert "sharpened by -80 Å²" in header and "local resolution 4.20 Å" in header


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def test_page_is_served_by_the_embedded_dashboard():
    from dask_refine.parallel.cluster import ClusterConfig, dask_client

    dashboard.register()
    with dask_client(ClusterConfig(n_workers=1)) as client:  # as the CLI's embedded cluster
        url = dashboard.page_url(client)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/dask-refine")
        html = _get(url)
        assert "dask-refine" in html and "Dask-Refine" in html  # page and navigation link
        base = url.rsplit("/", 1)[0]
        plots = json.loads(_get(base + "/individual-plots.json"))
        assert any("dask-refine" in v for v in plots.values())
        assert "Dask-Refine" in _get(base + "/status")  # reachable from Dask's own pages
        publish(client, {"run": "r", "iteration": 1})
        assert client.run_on_scheduler(
            lambda dask_scheduler: len(dask_scheduler.get_events(TOPIC))) == 1


def test_remote_scheduler_preloaded_with_the_pages(tmp_path):
    """``dask scheduler --preload dask_refine.ui.dashboard``: the route answers and the client
    finds its URL."""
    from distributed import Client

    dask = shutil.which("dask") or str(Path(sys.executable).parent / "dask")
    sched_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                             str(sched_file), "--preload", "dask_refine.ui.dashboard"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with Client(scheduler_file=str(sched_file), timeout=30) as client:
            url = dashboard.page_url(client)
            assert url is not None and url.endswith("/dask-refine")
            assert "dask-refine" in _get(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- a real browser

def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _page_state(browser) -> dict:
    return browser.execute_script("""
        const doc = Bokeh.documents[0];
        if (!doc) return null;
        const fsc = doc.get_model_by_name('fsc_source');
        const sl = doc.get_model_by_name('slice_A_xy_source');
        const find = (root, selector) => {  // Bokeh 3 renders inside shadow roots
            let found = Array.from(root.querySelectorAll(selector));
            root.querySelectorAll('*').forEach(e => {
                if (e.shadowRoot) found = found.concat(find(e.shadowRoot, selector)); });
            return found; };
        const drawn = find(document, 'canvas').filter(c => c.width > 50 && c.height > 50);
        const st = find(document, '#status-line')[0];
        return {iterations: fsc ? Array.from(fsc.data.iteration) : [],
                fsc: fsc ? fsc.data.ys.map(y => Array.from(y)) : [],
                slice: sl ? Array.from(sl.data.image[0]).slice(0, 200) : [],
                status: st ? st.textContent : '',
                canvases: drawn.length};""")


@pytest.fixture(scope="module")
def browser_dataset(tmp_path_factory, demo_map):
    root = tmp_path_factory.mktemp("dashboard")
    small_refine_dataset(root, demo_map, n_particles=120, chunk_size=40)
    return root


def test_live_page_in_a_real_browser_during_a_run(browser_dataset, tmp_path):
    """``refine --dashboard``: the URL is printed first; headless Chromium opens the page, sees
    the first iteration drawn, then sees the plots change with the next one."""
    browser = _browser()
    root = browser_dataset
    cmd = [sys.executable, "-m", "dask_refine.ui.cli", "refine", str(root / "p.zarr"),
           "--initial", str(root / "initial.mrc"), "--out", str(tmp_path / "out"),
           "--max-iterations", "3", "--n-workers", "2", "--dashboard",
           "--dashboard-address", "127.0.0.1:0",
           "--first-level-candidates", "256"]  # SNR 1; the page needs 2 iterations, seen live
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/dask-refine"), url
        browser.get(url)
        states = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                state = _page_state(browser)
            except Exception:  # the page is still loading
                state = None
            if state and state["iterations"] and (not states or state["iterations"]
                                                  != states[-1]["iterations"]):
                states.append(state)
                browser.save_screenshot(str(tmp_path / f"iteration_{len(states)}.png"))
                shots = os.environ.get("DASK_REFINE_SCREENSHOTS")
                if shots:
                    browser.save_screenshot(str(Path(shots) / f"dashboard_{len(states)}.png"))
            if len(states) >= 2:
                break
            time.sleep(0.5)
        assert len(states) >= 2, "the page did not show two iterations"
        first, second = states[0], states[-1]
        assert first["canvases"] > 0
        assert len(second["iterations"]) > len(first["iterations"])
        assert second["fsc"] != first["fsc"] and second["slice"] != first["slice"]
        assert f"iteration {second['iterations'][-1]}" in second["status"]
        assert max(first["slice"]) > 0  # the slices show a map, not a blank
    finally:
        browser.quit()
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resolution" in out.splitlines()[-1]



def test_reconstruction_publishes_its_result(demo_map, tmp_path):
    """A reconstruction on a given client tells the page its maps, FSC and resolution."""
    from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct
    from dask_refine.parallel.cluster import ClusterConfig, dask_client

    store = small_refine_dataset(tmp_path, demo_map, n_particles=100, chunk_size=50,
                                 write_poses=True)
    with dask_client(ClusterConfig(n_workers=1)) as client:
        summary = run_reconstruct(ReconstructConfig(store=str(store.path),
                                                    out_dir=str(tmp_path / "out")),
                                  client=client, log=lambda m: None)
        events = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.get_events(TOPIC))
    run = dashboard.latest_run(events)
    assert [p["job"] for p in run] == ["reconstruct"]
    entry = run[0]["classes"][0]
    assert entry["resolution_A"] == pytest.approx(summary["resolution_A"])
    assert np.asarray(entry["slices_half_A"][0]).shape == (32, 32)
    assert np.asarray(run[0]["orientations"]["counts"]).sum() == summary["n_particles"]
    assert run[0]["final"]["sharpening_bfactor_A2"] == summary["sharpening_bfactor_A2"]
    assert run[0]["final"]["local_resolution_A"] == summary["local_resolution_A"]
