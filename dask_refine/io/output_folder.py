"""A job's output folder on local disk or at an object-store URL (``s3://…``, ``gs://…``).

Jobs write every output (MRC, CSV, PNG, JSON, STAR, ``.cs``) to a local folder, ``local``. For a
local ``--out`` that folder is the destination. For a URL it is a staging folder on the driver's
disk (under ``TMPDIR``; outputs are small next to the particle stack) and the job *publishes* what
it wrote with :meth:`OutputFolder.publish`: files are uploaded with the one that marks them
complete (an iteration's ``state.json``, the job's ``summary.json``) **last**. Object stores have
no rename, so this ordering takes the place of write-then-rename: a reader that finds the marker
finds everything before it, and a half-uploaded iteration (no ``state.json``) is ignored on resume.

:meth:`fetch` brings files back from the URL into the staging folder (resume, ``report``), and
:meth:`create_exclusive` is the lock primitive: a conditional put (S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``, fsspec's ``mode="xb"``) that fails when the object exists.

Credentials and endpoint come from the environment, as for particle stores at URLs
(``AWS_*`` variables, ``~/.aws``, IAM roles, fsspec's config) or an explicit ``storage_options``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError
from .store import is_url, url_filesystem


class OutputFolder:
    """Where a job writes (``local``, a :class:`~pathlib.Path`) and where its outputs end up
    (``location``: the URL as given, or the local path). Use as a context manager: a staging
    folder is removed at exit (a local folder never is).

    ``out_dir``: a local path or an fsspec URL; ``storage_options``: fsspec options for a URL
    (by default from the environment).
    """

    def __init__(self, out_dir, storage_options: dict | None = None):
        self.url = str(out_dir).rstrip("/") if is_url(out_dir) else None
        if self.url is None:
            if storage_options:
                raise InputError(out_dir, "storage_options are only used with an object-store URL")
            self.local = Path(out_dir)
            self.fs = self.root = None
        else:
            self.fs, self.root = url_filesystem(self.url, storage_options)
            self.root = self.root.rstrip("/")
            self.local = Path(tempfile.mkdtemp(prefix="dask-refine-out-"))

    @property
    def is_remote(self) -> bool:
        return self.url is not None

    @property
    def location(self) -> str:
        """The folder as the user named it (the URL, or the local path)."""
        return self.url if self.url is not None else str(self.local)

    def __enter__(self) -> "OutputFolder":
        if self.url is not None:
            try:
                self._check_reachable()
            except BaseException:
                self.close()  # __exit__ is not called when __enter__ raises
                raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Remove the staging folder (nothing happens for a local output folder)."""
        if self.url is not None:
            shutil.rmtree(self.local, ignore_errors=True)

    def _check_reachable(self) -> None:
        try:
            self.fs.exists(self.root)
        except Exception as exc:  # credentials, endpoint, network: say which URL failed
            raise InputError(self.url, f"cannot reach the object store "
                             f"({type(exc).__name__}: {exc})") from None

    # names ------------------------------------------------------------------------------------

    def name(self, path) -> str:
        """What to record for a file written at ``path`` under ``local``: its URL for a staged
        file, the path itself otherwise."""
        if self.url is None:
            return str(path)
        rel = Path(path).relative_to(self.local)
        return self.url if str(rel) == "." else f"{self.url}/{rel.as_posix()}"

    def names(self, value):
        """``value`` (a summary: dicts, lists, strings) with every staged path replaced by its
        URL, so that ``summary.json`` names the outputs where they are published."""
        if self.url is None:
            return value
        prefix = str(self.local)
        if isinstance(value, dict):
            return {k: self.names(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.names(v) for v in value)
        if isinstance(value, str) and (value == prefix or value.startswith(prefix + os.sep)):
            return self.name(value)
        return value

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # publishing -------------------------------------------------------------------------------

    def publish(self, rel: str = "", last: str | None = None,
                exclude: tuple[str, ...] = ()) -> int:
        """Upload ``local/rel`` (a file, or a folder with everything under it) to the URL, the
        file named ``last`` (relative to ``rel``) after all others; top-level entries named in
        ``exclude`` are skipped. Returns the number of files uploaded (0 for a local folder).
        Hidden files (temporaries, the lock) are never uploaded."""
        if self.url is None:
            return 0
        source = self.local / rel
        if source.is_file():
            files = [source]
        else:
            files = sorted(p for p in source.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(source).parts)
                           and p.relative_to(source).parts[0] not in exclude)
        final = [p for p in files if last is not None and p == source / last]
        first = [p for p in files if p not in final]
        for batch in (first, final):
            if batch:
                targets = [self._remote(p.relative_to(self.local).as_posix()) for p in batch]
                self._call("upload to", lambda: self.fs.put([str(p) for p in batch], targets))
        return len(files)

    def _call(self, verb: str, action):
        try:
            return action()
        except (InputError, FileExistsError):
            raise
        except Exception as exc:
            raise InputError(self.url, f"could not {verb} the object store "
                             f"({type(exc).__name__}: {exc})") from None

    # reading back -----------------------------------------------------------------------------

    def remote_files(self, pattern: str) -> list[str]:
        """Paths relative to the URL of the published files matching the glob ``pattern``."""
        if self.url is None:
            return sorted(p.relative_to(self.local).as_posix() for p in self.local.glob(pattern)
                          if p.is_file())
        found = self._call("list", lambda: self.fs.glob(self._remote(pattern)))
        return sorted(p[len(self.root) + 1:] for p in found)

    def fetch(self, rels) -> int:
        """Download the published files ``rels`` (relative paths) into the staging folder;
        returns how many. Nothing to do for a local folder."""
        rels = list(rels)
        if self.url is None or not rels:
            return 0
        targets = [self.local / r for r in rels]
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
        self._call("download from", lambda: self.fs.get([self._remote(r) for r in rels],
                                                        [str(t) for t in targets]))
        return len(rels)

    def published(self, rel: str = "", exclude: tuple[str, ...] = ()) -> dict[str, int]:
        """Sizes in bytes of the published files under ``rel``, by path relative to the URL,
        leaving out top-level entries named in ``exclude`` and hidden files (the lock)."""
        if self.url is None:
            return {}
        prefix = f"{rel}/" if rel else ""
        found = self._call("list", lambda: self.fs.find(self._remote(rel), detail=True))
        sizes = {}
        for path, info in found.items():
            r = path[len(self.root) + 1:]
            if (path.startswith(self.root + "/") and r.startswith(prefix)
                    and r.split("/")[0] not in exclude
                    and not any(part.startswith(".") for part in r.split("/"))):
                sizes[r] = int(info.get("size") or 0)
        return dict(sorted(sizes.items()))

    # the lock primitives (local or remote) ----------------------------------------------------

    def create_exclusive(self, rel: str, text: str) -> bool:
        """Create the file ``rel`` holding ``text`` only if it does not exist, atomically
        (``O_EXCL`` on disk, a conditional put at a URL); False when it exists."""
        if self.url is None:
            path = self.local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            return True
        try:
            with self.fs.open(self._remote(rel), "xb") as fh:
                fh.write(text.encode())
        except FileExistsError:
            return False
        except NotImplementedError:  # e.g. a read-only filesystem (http://)
            raise InputError(self.url, "this filesystem cannot create a file exclusively, so a "
                             "run cannot lock it; write to a local or shared folder or an "
                             "object store (s3://, gs://)") from None
        except Exception as exc:
            raise InputError(self.url, f"could not write {rel} to the object store "
                             f"({type(exc).__name__}: {exc})") from None
        return True

    def read_text(self, rel: str) -> str | None:
        """The file ``rel`` (published, or local) as text, or None when it cannot be read."""
        try:
            if self.url is None:
                return (self.local / rel).read_text()
            return self.fs.cat_file(self._remote(rel)).decode()
        except (OSError, UnicodeDecodeError):  # FileNotFoundError included
            return None

    def remove(self, rel: str) -> None:
        """Delete the file ``rel`` (published, or local; no error when it is gone)."""
        if self.url is None:
            (self.local / rel).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self._remote(rel))
        except FileNotFoundError:
            pass
