"""benchmarks/peers.py: the benchmarks run the RELION the user points them at (a RELION 5 build
from install_peers.sh --relion5-source) and name their rows after its own version line."""

import importlib.util
import stat
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _peers():
    spec = importlib.util.spec_from_file_location("peers", BENCHMARKS / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_relion(folder: Path, version_line: str) -> None:
    folder.mkdir()
    for name in ("relion_refine", "relion_refine_mpi"):
        script = folder / name
        script.write_text(f"#!/bin/sh\necho '{version_line}'\necho 'Precision: BASE=double'\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_relion_from_a_given_folder_and_its_version(tmp_path):
    peers = _peers()
    _fake_relion(tmp_path / "bin", "RELION version: 5.0.1-commit-6b1f2a ")
    found = peers.relion_program("relion_refine_mpi", str(tmp_path / "bin"))
    assert found == str((tmp_path / "bin" / "relion_refine_mpi").resolve())
    assert peers.relion_label(str(tmp_path / "bin")) == "RELION 5.0.1"
    # a folder without RELION finds nothing (no fallback to PATH behind the user's back)
    assert peers.relion_program("relion_refine", str(tmp_path)) is None
    assert peers.relion_label(str(tmp_path)) == "RELION"


def test_install_script_refuses_a_folder_that_is_not_a_relion_checkout(tmp_path):
    for args, message in ((["--relion5-source", str(tmp_path)], "not a RELION source checkout"),
                          (["--bogus"], "unknown argument")):
        done = subprocess.run(["bash", str(BENCHMARKS / "install_peers.sh"), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
