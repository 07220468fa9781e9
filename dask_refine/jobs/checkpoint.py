"""The output folder is the checkpoint: atomic per-iteration folders, a run lock, and resume.

Each finished iteration lives in ``iterations/iter_NNN/``; it is written under a temporary name
and renamed into place only when complete, so a crash never leaves a half-written iteration that
resume would trust. A lock file (``.lock``, holding the PID) refuses a second run on the same
folder while the first is alive.
"""

from __future__ import annotations

import json
import os
import socket
import shutil
from pathlib import Path

from ..io.errors import InputError
from ..io.store import is_url

ITERATIONS = "iterations"


def output_dir(out_dir) -> Path:
    """A job's output folder as a local path. Object-store URLs (``s3://…``) work for particle
    stores but not yet for outputs (docs/design-notes.md, "Object stores"): refuse one here
    rather than let ``Path`` turn ``s3://b/out`` into a local folder ``s3:/b/out``."""
    if is_url(str(out_dir)):
        raise InputError(out_dir, "outputs at object-store URLs are not supported yet; write "
                         "to a local or shared folder (particle stores may be URLs)")
    return Path(out_dir)


class RunLock:
    """Exclusive lock on an output folder: an ``O_EXCL`` lock file holding ``HOST PID`` of the
    run. A lock left by a dead process on this host is taken over; a lock from another host
    (another node or container, whose PIDs cannot be checked from here) is refused with the
    host named, so that a user can remove it once sure that run is gone."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                host, pid = self._owner()
                if host not in (None, socket.gethostname()):
                    raise InputError(self.path.parent, f"another run (host {host}, PID {pid}) "
                                     "holds this output folder; if that run is gone (e.g. a "
                                     f"killed node or pod), delete {self.path}") from None
                if pid and _alive(pid):
                    raise InputError(self.path.parent, f"another run (PID {pid}) is using this "
                                     "output folder; wait for it or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale lock of a dead run
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()} {os.getpid()}")
            return self
        raise InputError(self.path.parent, "could not take the output folder's lock")

    def _owner(self) -> tuple[str | None, int | None]:
        """``(host, pid)`` of the lock's holder (host None for a lock that names only a PID)."""
        try:
            fields = self.path.read_text().split()
            if len(fields) == 1:
                return None, int(fields[0])
            return fields[0], int(fields[1])
        except (OSError, ValueError, IndexError):
            return None, None

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


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


def check_resumable(out_dir, config: dict, resume: bool, keys) -> list[int]:
    """Iterations to resume from; refuse a non-empty folder without ``resume`` or with a different
    configuration (compared on ``keys``)."""
    out = Path(out_dir)
    done = completed_iterations(out)
    saved = out / "config.json"
    if not resume:
        if done or saved.exists():
            raise InputError(out, "already holds a run; pass --resume to continue it or choose "
                             "a new --out")
        return []
    if not saved.exists():
        return done
    old = json.loads(saved.read_text())
    changed = [k for k in keys if old.get(k) != config.get(k)]
    if changed:
        raise InputError(saved, f"the run there used different {', '.join(changed)}; resume "
                         "needs the same settings")
    return done
