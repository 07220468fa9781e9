import json
import subprocess
import sys

import pytest

from dask_refine.io.mrc import read_map
from dask_refine.core.fsc import fsc
from dask_refine.ui.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dask_refine.ui.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_demo_end_to_end(tmp_path, demo_map):
    """The demo refines (the main job) and scores itself against the truth; small settings."""
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", out, "--n-particles", 60, "--max-iterations", 1)
    assert r.returncode == 0, r.stderr
    last = r.stdout.splitlines()[0]
    assert "resolution" in last and "median pose error" in last and "FSC 0.5" in last
    assert str(out / "refine" / "iterations.csv") in r.stdout
    summary = json.loads((out / "refine" / "summary.json").read_text())
    assert summary["job"] == "refine" and summary["n_particles"] == 60
    assert summary["iterations"] == 1
    refined, px = read_map(out / "refine" / "map.mrc")
    assert px == demo_map[1]
    assert fsc(refined, demo_map[0])[1:5].min() > 0.8  # the map is the structure
    # a second run replaces its own demo folder
    assert run_cli("demo", "--out", out, "--n-particles", 20,
                   "--max-iterations", 1).returncode == 0


def test_simulate_export_import_reconstruct(tmp_path, demo_map):
    from dask_refine.data import demo_map_path

    store = tmp_path / "s.zarr"
    assert main(["simulate", str(demo_map_path()), str(store), "--n-particles", "40",
                 "--write-poses", "--chunk-size", "16"]) == 0
    assert main(["export-star", str(store), str(tmp_path / "x" / "p.star")]) == 0
    assert main(["import-star", str(tmp_path / "x" / "p.star"), str(tmp_path / "t.zarr")]) == 0
    r = run_cli("reconstruct", tmp_path / "t.zarr", "--out", tmp_path / "rec", "--n-workers", 1)
    assert r.returncode == 0, r.stderr
    assert "resolution" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "{tmp}/missing.zarr", "--out", "{tmp}/o"], "no such particle store"),
    (["simulate", "{tmp}/none.mrc", "{tmp}/s.zarr"], "no such file"),
    (["import-star", "{tmp}/none.star", "{tmp}/s.zarr"], "no such file"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message, capsys):
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ")


def test_reconstruct_without_poses_is_refused(tmp_path, capsys):
    from dask_refine.data import demo_map_path

    store = tmp_path / "s.zarr"
    assert main(["simulate", str(demo_map_path()), str(store), "--n-particles", "8"]) == 0
    assert main(["reconstruct", str(store), "--out", str(tmp_path / "o")]) == 2
    assert "needs poses" in capsys.readouterr().err


def test_demo_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
