"""The output folder is the checkpoint: atomic per-iteration folders, a run lock, and resume.

Each finished iteration lives in ``iterations/iter_NNN/``; it is written under a temporary name
and renamed into place only when complete, so a crash never leaves a half-written iteration that
resume would trust. A lock file (``.lock``, holding host and PID) refuses a second run on the
same folder while the first is alive.

At an object-store URL the same layout is built in a staging folder and published iteration by
iteration with ``state.json`` uploaded last (:func:`publish_iteration`): the marker that
:func:`completed_iterations` looks for arrives only after the rest of its iteration, so resume
(:func:`fetch_checkpoint`) never trusts a half-uploaded one.
"""

from __future__ import annotations

import json
import os
import socket
import shutil
from pathlib import Path

from ..io.errors import InputError
from ..io.output_folder import OutputFolder

ITERATIONS = "iterations"


def output_dir(out_dir) -> OutputFolder:
    """A job's output folder: a local path, or an object-store URL staged on the driver's disk
    and published as the job goes (``io/output_folder.py``). Use it as a context manager."""
    return OutputFolder(out_dir)


class RunLock:
    """Exclusive lock on an output folder: a lock file ``.lock`` holding ``HOST PID`` of the run,
    created exclusively (``O_EXCL`` on disk; a conditional put at an object-store URL). A lock
    left by a dead process on this host is taken over; a lock from another host (another node or
    container, whose PIDs cannot be checked from here) is refused with the host named, so that a
    user can remove it once sure that run is gone.

    ``out``: an :class:`OutputFolder` or a local folder."""

    NAME = ".lock"

    def __init__(self, out):
        self.out = out if isinstance(out, OutputFolder) else OutputFolder(out)
        self.where = self.out.name(self.out.local / self.NAME)

    def __enter__(self):
        text = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            if self.out.create_exclusive(self.NAME, text):
                return self
            host, pid = self._owner()
            if host not in (None, socket.gethostname()):
                raise InputError(self.out.location, f"another run (host {host}, PID {pid}) "
                                 "holds this output folder; if that run is gone (e.g. a killed "
                                 f"node or pod), delete {self.where}")
            if pid and _alive(pid):
                raise InputError(self.out.location, f"another run (PID {pid}) is using this "
                                 "output folder; wait for it or choose another --out")
            self.out.remove(self.NAME)  # stale lock of a dead run
        raise InputError(self.out.location, "could not take the output folder's lock")

    def _owner(self) -> tuple[str | None, int | None]:
        """``(host, pid)`` of the lock's holder (host None for a lock that names only a PID)."""
        try:
            fields = (self.out.read_text(self.NAME) or "").split()
            if len(fields) == 1:
                return None, int(fields[0])
            return fields[0], int(fields[1])
        except (ValueError, IndexError):
            return None, None

    def __exit__(self, *exc):
        self.out.remove(self.NAME)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def iteration_dir(out_dir, iteration: int) -> Path:
    return Path(out_dir) / ITERATIONS / f"iter_{iteration:03d}"


def completed_iterations(out_dir) -> list[int]:
    """Numbers of the iterations whose folders are complete (renamed into place)."""
    root = Path(out_dir) / ITERATIONS
    if not root.is_dir():
        return []
    done = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("iter_") and p.name[5:].isdigit():
            if (p / "state.json").is_file():
                done.append(int(p.name[5:]))
    return sorted(done)


class IterationWriter:
    """Context manager: files go to a temporary folder, renamed to ``iter_NNN`` on success."""

    def __init__(self, out_dir, iteration: int):
        self.final = iteration_dir(out_dir, iteration)
        self.tmp = self.final.with_name(f".{self.final.name}.partial")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return False


def read_state(out_dir, iteration: int) -> dict:
    return json.loads((iteration_dir(out_dir, iteration) / "state.json").read_text())


def publish_iteration(out: OutputFolder, iteration: int) -> None:
    """Upload a finished iteration to an output URL, ``state.json`` (the completeness marker of
    :func:`completed_iterations`) last, then free the staging copy of the iteration before it
    (only the last iteration's maps are read again; its ``state.json`` stays for
    ``iterations.csv``). Nothing to do for a local folder."""
    if not out.is_remote:
        return
    out.publish(iteration_dir(out.local, iteration).relative_to(out.local).as_posix(),
                last="state.json")
    previous = iteration_dir(out.local, iteration - 1)
    if previous.is_dir():
        for p in previous.iterdir():
            if p.name != "state.json":
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def fetch_checkpoint(out: OutputFolder, resume: bool) -> None:
    """Bring what resume reads from an output URL into the staging folder: ``config.json``,
    every complete iteration's ``state.json`` and, when resuming, the last complete iteration
    whole (maps and poses). Nothing to do for a local folder."""
    if not out.is_remote:
        return
    out.fetch(out.remote_files("config.json")
              + out.remote_files(f"{ITERATIONS}/iter_*/state.json"))
    done = completed_iterations(out.local)
    if resume and done:
        out.fetch(out.published(iteration_dir(out.local, done[-1]).relative_to(out.local)
                                .as_posix()))


def check_resumable(out: OutputFolder, config: dict, resume: bool, keys,
                    legacy: dict | None = None) -> list[int]:
    """Iterations to resume from; refuse a non-empty folder without ``resume`` or with a different
    configuration (compared on ``keys``; ``legacy``: the value a key had in runs saved before
    it existed). ``out``'s checkpoint must be fetched first."""
    done = completed_iterations(out.local)
    saved = out.local / "config.json"
    if not resume:
        if done or saved.exists():
            raise InputError(out.location, "already holds a run; pass --resume to continue it "
                             "or choose a new --out")
        return []
    if not saved.exists():
        return done
    old = json.loads(saved.read_text())
    legacy = legacy or {}
    changed = [k for k in keys if old.get(k, legacy.get(k)) != config.get(k)]
    if changed:
        raise InputError(out.name(saved), f"the run there used different {', '.join(changed)}; "
                         "resume needs the same settings")
    return done
