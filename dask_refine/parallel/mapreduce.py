"""Map a backprojection over particle chunks and tree-reduce the Fourier sums
(docs/design.md §4).

Graph shape: the image stack is read from Zarr chunk by chunk by tasks on the workers, each
chain at most one chunk ahead of its backprojection; chunks are dealt to ``n_chains`` accumulation chains (a task adds one chunk to the sums it got from the
previous task of its chain, so each chain holds one set of sums, not one per chunk); the chains'
sums are then summed by a tree of fan-in ``split_every``. Data moved by the reduction is
O(n_chains × volume). The result does not depend on chunk size or worker count beyond float
rounding.

Backend: ``backend="cupy"`` runs every map task on the worker's GPU (dask-cuda workers, one per
device): images are copied to the device, sums stay there along a chain and through the tree
reduction, and one last task copies the result to host memory, so the driver needs no GPU.
References are copied to each worker's device once per iteration (:func:`device_copies`).
"""

from __future__ import annotations

import uuid
import weakref

import numpy as np
from dask.sizeof import sizeof

from ..core.backend import backend_module, to_numpy
from ..core.backprojection import FourierSums, backproject_particles
from ..core.refine_step import refine_particles
from ..io.errors import InputError


@sizeof.register(FourierSums)
def _sizeof_sums(sums: FourierSums) -> int:
    """Dask's size of the sums (its default, ~56 bytes for an unknown object, would hide the
    largest objects of a job from the scheduler's placement and memory accounting)."""
    return int(sums.data.nbytes + sums.weight.nbytes + np.asarray(sums.count).nbytes)


#: This worker's device copies of the current iteration's references: (weak reference to the
#: host array they were made from, device arrays). One entry: a new iteration replaces it.
_DEVICE_COPIES: dict = {}


def device_copies(arrays: list, xp) -> list:
    """``arrays`` (host) on the device of module ``xp``, copied once per worker and reused by
    every task that gets the same host arrays (a scattered Future deserialises to one object
    per worker); the host arrays themselves for NumPy."""
    if xp is np or not arrays:
        return arrays
    held = _DEVICE_COPIES.get("current")
    if held is not None and held[0]() is arrays[0]:
        return held[1]
    _DEVICE_COPIES.clear()  # free the previous iteration's copies before making new ones
    copies = [xp.asarray(a) for a in arrays]
    _DEVICE_COPIES["current"] = (weakref.ref(arrays[0]), copies)
    return copies


def _to_host(state):
    """The reduction's result in host memory (sums, or a refinement's (sums, results))."""
    if isinstance(state, FourierSums):
        return FourierSums(to_numpy(state.data), to_numpy(state.weight), state.count)
    return _to_host(state[0]), state[1]


def _accumulate(sums, images, meta, groups, n_groups, box_size, pad, pixel_size_A, use_ctf,
                r_max, backend, source, first_index):
    if sums is None:
        sums = FourierSums.zeros(n_groups, box_size, pad, backend_module(backend))
    else:  # never mutate a task's input: a retried task must see it unchanged
        sums = FourierSums(sums.data.copy(), sums.weight.copy(), sums.count.copy())
    try:
        return backproject_particles(sums, np.asarray(images), meta, groups, pixel_size_A,
                                     use_ctf, r_max, first_index)
    except ValueError as exc:
        raise InputError(f"{source}/images", f"{exc}; expected finite pixel values") from None


def _copy(sums: FourierSums) -> FourierSums:
    return FourierSums(sums.data.copy(), sums.weight.copy(), sums.count.copy())


def _sum(*parts):
    total = _copy(parts[0])
    for p in parts[1:]:
        total.add_(p)
    return total


def _refine_accumulate(state, images, meta, groups, n_groups, box_size, pad, settings, backend,
                       source, first_index):
    references, envelopes, noise_weight, params, pixel_size_A, scale_max_shell, options = settings
    xp = backend_module(backend)
    references = device_copies(list(references), xp)
    if state is None:
        sums, results = FourierSums.zeros(n_groups, box_size, pad, xp), []
    else:  # never mutate a task's input: a retried task must see it unchanged
        sums, results = _copy(state[0]), list(state[1])
    try:
        step = refine_particles(sums, np.asarray(images), meta, groups, references, envelopes,
                                noise_weight, params, pixel_size_A, scale_max_shell,
                                first_index, options)
    except ValueError as exc:
        raise InputError(f"{source}/images", f"{exc}; expected finite pixel values") from None
    results.append((first_index, step))
    return sums, results


def _refine_combine(*states):
    sums = _sum(*(s[0] for s in states))
    return sums, [r for s in states for r in s[1]]


def tree_reduce(items, combine, split_every: int):
    """Reduce a list of delayed values with ``combine(*group)`` in a tree of fan-in ``split_every``."""
    from dask import delayed

    level = list(items)
    while len(level) > 1:
        level = [delayed(combine)(*level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    return level[0]


def _read_rows(images, start: int, stop: int, *after):
    """Rows ``start:stop`` of ``images`` (a zarr array: read on the worker). ``after``: states the
    read waits for (see :func:`chained_map_reduce`), unused."""
    return np.asarray(images[start:stop])


def chunk_bounds(n: int, chunk_size: int) -> np.ndarray:
    """Row boundaries ``[0, c, 2c, …, n]`` of chunks of ``chunk_size`` rows."""
    return np.unique(np.append(np.arange(0, n, max(1, int(chunk_size))), n))


def balanced_bounds(n: int, chunk_size: int, n_chains: int) -> np.ndarray:
    """Row boundaries of blocks of at most ``chunk_size`` rows, as many as a multiple of
    ``n_chains`` (or ``n`` when fewer), their sizes differing by at most one row: a chain's
    tasks run one after another, so 3 blocks on 2 chains would leave one worker idle a third
    of the time."""
    chunk_size, n_chains = max(1, int(chunk_size)), max(1, int(n_chains))
    n_blocks = min(max(n, 1), n_chains * -(-n // (n_chains * chunk_size)))
    return np.unique(np.linspace(0, n, n_blocks + 1).round().astype(np.int64))


def chained_map_reduce(images, meta: dict, groups: np.ndarray, accumulate, extra_args: tuple,
                       combine, n_chains: int = 4, split_every: int = 4,
                       chunk_size: int | None = None, finish=None):
    """Deal image chunks to ``n_chains`` accumulation chains, then tree-reduce the chains.

    Each chain task calls ``accumulate(state, block, meta_rows, group_rows, *extra_args,
    first_index)`` with the previous task's state (None for the first) and returns the new state;
    the chains' final states are combined with ``combine(*states)``, and the result passed
    through ``finish`` when given (e.g. :func:`_to_host` after a GPU reduction).

    ``images``: the stack as a zarr array (or any array that slices lazily), read in blocks of
    ``chunk_size`` rows (default: its own chunks, evened out over the chains by
    :func:`balanced_bounds`) by tasks on the workers. The read of a chain's
    k-th chunk waits for the chain's state k − 2, so each chain reads one chunk ahead of its
    backprojection and no further: reads are quick and would otherwise all run first and pile
    up in worker memory (the stack must never be loaded whole).
    """
    from dask import delayed

    n = images.shape[0]
    bounds = (chunk_bounds(n, chunk_size) if chunk_size else balanced_bounds(
        n, images.chunks[0] if hasattr(images, "chunks") else n, n_chains))
    source = delayed(images, name=f"particle-images-{uuid.uuid4().hex}", traverse=False)
    n_blocks = len(bounds) - 1
    n_chains = max(1, min(n_chains, n_blocks))
    history: list[list] = [[] for _ in range(n_chains)]
    acc = delayed(accumulate)
    read = delayed(_read_rows, pure=True)
    for i in range(n_blocks):
        rows = slice(int(bounds[i]), int(bounds[i + 1]))
        c = i % n_chains
        states = history[c]
        block = read(source, rows.start, rows.stop, *states[-2:-1])
        states.append(acc(states[-1] if states else None, block,
                          {k: v[rows] for k, v in meta.items()}, groups[rows], *extra_args,
                          rows.start))
    result = tree_reduce([states[-1] for states in history], combine, split_every)
    return delayed(finish)(result) if finish is not None else result


def backproject_graph(images, meta: dict, groups: np.ndarray, n_groups: int,
                      pixel_size_A: float, pad: int = 2, use_ctf: bool = True,
                      r_max: float | None = None, n_chains: int = 4, split_every: int = 4,
                      source: str = "store", chunk_size: int | None = None,
                      backend: str = "numpy"):
    """Delayed graph whose result is the :class:`FourierSums` of all particles.

    ``images``: the ``(N, D, D)`` stack, a zarr array read in chunks of ``chunk_size`` (see
    :func:`chained_map_reduce`); ``meta``: in-memory
    per-particle columns (``rotation``, ``shift_A``, optional ``scale``, CTF columns) sliced per
    chunk into the graph; ``groups``: ``(N,)`` group index per particle. ``backend``:
    ``"numpy"`` or ``"cupy"`` (the map tasks run on the workers' GPUs; the result is on the host).
    """
    extra = (n_groups, images.shape[-1], pad, pixel_size_A, use_ctf, r_max, backend, source)
    return chained_map_reduce(images, meta, groups, _accumulate, extra, _sum, n_chains,
                              split_every, chunk_size, _finish(backend))


def _finish(backend: str):
    """The graph's last step for ``backend``: none on the host; on GPUs a copy to host memory
    (made on a worker, so the driver needs no GPU)."""
    if backend not in ("numpy", "cupy"):
        raise ValueError(f"backend must be 'numpy' or 'cupy', not {backend!r}")
    return None if backend == "numpy" else _to_host


def refine_graph(images, meta: dict, groups: np.ndarray, n_groups: int, settings,
                 pad: int = 2, n_chains: int = 4, split_every: int = 4, source: str = "store",
                 chunk_size: int | None = None, backend: str = "numpy"):
    """Delayed graph of one refinement E-step over all chunks.

    ``settings`` = ``(references, envelopes, noise_weight, params, pixel_size_A,
    scale_max_shell, options)`` (``options``: :class:`..core.refine_step.EStepOptions`), ideally a Future scattered once to every
    worker (the references are large).
    The result is ``(FourierSums, [(first_index, StepResult), …])``, on the host for either
    ``backend``.
    """
    extra = (n_groups, images.shape[-1], pad, settings, backend, source)
    return chained_map_reduce(images, meta, groups, _refine_accumulate, extra,
                              _refine_combine, n_chains, split_every, chunk_size,
                              _finish(backend))
