"""Map a backprojection over particle chunks and tree-reduce the Fourier sums (DESIGN §4).

Graph shape: the image stack is read lazily from Zarr (``dask.array.from_zarr``); chunks are
dealt to ``n_chains`` accumulation chains (a task adds one chunk to the sums it got from the
previous task of its chain, so each chain holds one set of sums, not one per chunk); the chains'
sums are then summed by a tree of fan-in ``split_every``. Data moved by the reduction is
O(n_chains × volume). The result does not depend on chunk size or worker count beyond float
rounding.
"""

from __future__ import annotations

import numpy as np

from ..core.backprojection import FourierSums, backproject_particles
from ..io.errors import InputError


def _accumulate(sums, images, meta, groups, n_groups, box_size, pad, pixel_size_A, use_ctf,
                r_max, first_index, source):
    if sums is None:
        sums = FourierSums.zeros(n_groups, box_size, pad)
    else:  # never mutate a task's input: a retried task must see it unchanged
        sums = FourierSums(sums.data.copy(), sums.weight.copy(), sums.count.copy())
    try:
        return backproject_particles(sums, np.asarray(images), meta, groups, pixel_size_A,
                                     use_ctf, r_max, first_index)
    except ValueError as exc:
        raise InputError(f"{source}/images", f"{exc}; expected finite pixel values") from None


def _sum(*parts):
    total = parts[0]
    total = FourierSums(total.data.copy(), total.weight.copy(), total.count.copy())
    for p in parts[1:]:
        total.add_(p)
    return total


def tree_reduce(items, combine, split_every: int):
    """Reduce a list of delayed values with ``combine(*group)`` in a tree of fan-in ``split_every``."""
    from dask import delayed

    level = list(items)
    while len(level) > 1:
        level = [delayed(combine)(*level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    return level[0]


def backproject_graph(images_dask, meta: dict, groups: np.ndarray, n_groups: int,
                      pixel_size_A: float, pad: int = 2, use_ctf: bool = True,
                      r_max: float | None = None, n_chains: int = 4, split_every: int = 4,
                      source: str = "store"):
    """Build the delayed graph whose result is the :class:`FourierSums` of all particles.

    ``images_dask``: ``(N, D, D)`` Dask array chunked along particles; ``meta``: in-memory
    per-particle columns (``rotation``, ``shift_A``, optional ``scale``, CTF columns) sliced per
    chunk into the graph; ``groups``: ``(N,)`` group index per particle.
    """
    from dask import delayed

    box = images_dask.shape[-1]
    blocks = images_dask.to_delayed().ravel()
    bounds = np.cumsum((0,) + images_dask.chunks[0])
    n_chains = max(1, min(n_chains, len(blocks)))
    chains = [None] * n_chains
    acc = delayed(_accumulate)
    for i, block in enumerate(blocks):
        rows = slice(int(bounds[i]), int(bounds[i + 1]))
        meta_rows = {k: v[rows] for k, v in meta.items()}
        c = i % n_chains
        chains[c] = acc(chains[c], block, meta_rows, groups[rows], n_groups, box, pad,
                        pixel_size_A, use_ctf, r_max, rows.start, source)
    return tree_reduce(chains, _sum, split_every)
