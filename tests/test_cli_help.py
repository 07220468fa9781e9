"""The command line is consistent across jobs: every command has --help, every argument is
explained, every option with a default states it (with units in the help or the name)."""

import argparse
import subprocess
import sys

import pytest

from dask_refine.ui.cli import build_parser


def _subcommands():
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_argument_is_explained_with_its_default(name):
    parser = _subcommands()[name]
    assert parser.description or parser.format_usage()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"{name} {label}: no help text"
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.option_strings and not flag and action.default not in (None, argparse.SUPPRESS):
            assert "default" in action.help, f"{name} {label}: default {action.default!r} unstated"


def test_help_and_exit_codes(capsys):
    from dask_refine.ui.cli import main

    for argv in [["--help"]] + [[name, "--help"] for name in _subcommands()]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith("usage: dask-refine")
        assert "exit status:" in out and "2    bad input" in out
    run = [sys.executable, "-m", "dask_refine.ui.cli"]
    bad = subprocess.run(run + ["reconstruct", "/nonexistent/store.zarr", "--out", "/tmp/x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    usage = subprocess.run(run + ["refine"], capture_output=True, text=True)
    assert usage.returncode == 2  # argparse: missing arguments


def test_first_level_candidates_below_one_is_refused(capsys, tmp_path):
    from dask_refine.ui.cli import main

    code = main(["refine", str(tmp_path / "p.zarr"), "--initial", str(tmp_path / "m.mrc"),
                 "--out", str(tmp_path / "out"), "--first-level-candidates", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "first_level_candidates" in err and "at least 1" in err
    assert not (tmp_path / "out").exists()


def test_help_imports_no_numerical_code():
    """``dask-refine … --help`` reads the jobs' settings only (``jobs/config.py``,
    ``io/simulation_config.py``): no job module, Dask, Zarr or Matplotlib is imported, so
    that it answers at once (docs/benchmarks.md, "Cold start")."""
    heavy = ("dask_refine.jobs.refine", "dask_refine.jobs.reconstruct", "dask_refine.io.store",
             "distributed", "zarr", "matplotlib", "numba")
    code = ("import sys; from dask_refine.ui.cli import build_parser; build_parser(); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
