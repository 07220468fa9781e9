"""Where each particle's image lives, whatever its store was imported from: a RELION STAR's
``rlnImageName`` (``N@stack.mrcs``) or a cryoSPARC ``.cs`` file's ``blob/idx`` and
``blob/path`` (kept in the store's ``cs/`` group with the rest of the .cs table). The STAR and
.cs modules both read it here, neither from the other (docs/design.md §5).
"""

from __future__ import annotations

import ast
import os

import numpy as np

from .errors import InputError
from .store import ParticleStore

#: The store group holding an imported .cs table's fields, each under its own path.
CS_GROUP = "cs"
_NATIVE = set("?bBhHiIlLqQefdFD")  # stored as Zarr numbers; anything else as raw bytes


def parse_image_names(names, where) -> tuple[np.ndarray, list[str]]:
    """RELION's ``rlnImageName`` values ``N@stack.mrcs`` → (0-based indices, stack paths);
    ``where`` names the file in errors."""
    index = np.empty(len(names), dtype=np.int64)
    files = []
    for i, name in enumerate(names):
        text = str(name)
        number, sep, file = text.partition("@")
        if not sep or not number.strip().isdigit() or int(number) < 1 or not file:
            raise InputError(f"{where}: field rlnImageName", f"row {i + 1} is {text!r}; "
                             "expected 'N@stack.mrcs' with N ≥ 1")
        index[i] = int(number) - 1
        files.append(file.strip())
    return index, files


def raw_cs_key(field: str) -> tuple[str, str]:
    """Where a raw field lives in the store: ``blob/path`` → (``cs/blob``, ``path``)."""
    folder, _, leaf = field.rpartition("/")
    return (f"{CS_GROUP}/{folder}" if folder else CS_GROUP), leaf


def is_native(ft: np.dtype) -> bool:
    """Whether a .cs field is stored as a Zarr number (else as its raw bytes)."""
    return ft.base.fields is None and ft.base.char in _NATIVE


def raw_cs_dtype(store: ParticleStore) -> np.dtype | None:
    """The dtype (field names and types) of the .cs table a store was imported from, or None;
    nothing is read but the store's attributes."""
    text = store.attrs.get("cs_dtype")
    return np.lib.format.descr_to_dtype(ast.literal_eval(text)) if text else None


def read_raw_cs(store: ParticleStore) -> np.ndarray | None:
    """The .cs table a store was imported from (every field, original dtypes), or None."""
    dtype = raw_cs_dtype(store)
    if dtype is None:
        return None
    n = store.info.n_particles
    table = np.zeros(n, dtype=dtype)
    for name in dtype.names:
        ft = dtype.fields[name][0]
        if ft.itemsize == 0:
            continue
        group, leaf = raw_cs_key(name)
        stored = store.read_column(leaf, group=group)
        if is_native(ft):
            table[name] = stored.astype(ft.base)
        else:
            table[name] = (np.ascontiguousarray(stored, dtype=np.uint8).view(ft.base)
                           .reshape((n,) + ft.shape))
    return table


def has_cs_image_refs(store: ParticleStore) -> bool:
    """Whether the store was imported from a .cs file with ``blob/path`` and ``blob/idx``."""
    dtype = raw_cs_dtype(store)
    return dtype is not None and {"blob/path", "blob/idx"} <= set(dtype.names)


def cs_image_names(store: ParticleStore) -> np.ndarray | None:
    """``rlnImageName`` of a store imported from a .cs file (``blob/idx`` + 1 ``@`` ``blob/path``,
    cryoSPARC's leading ``>`` dropped), or None for other stores."""
    if not has_cs_image_refs(store):
        return None
    table = read_raw_cs(store)  # checked when it was imported (cryosparc.image_refs)
    files = [(os.fsdecode(p) if isinstance(p, bytes) else str(p)).strip().removeprefix(">")
             for p in table["blob/path"]]
    return np.array([f"{int(i) + 1:06d}@{f}" for i, f in zip(table["blob/idx"], files)])


def has_image_files(store: ParticleStore) -> bool:
    """Whether the store's images came from files the exports can refer to (an imported STAR or
    .cs), rather than having to be written out (a simulated store)."""
    return "rlnImageName" in store.attrs.get("star_columns", []) or has_cs_image_refs(store)
