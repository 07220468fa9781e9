"""Files and stores: the Zarr particle store, MRC maps/stacks, RELION STAR, dataset simulation."""

from .errors import InputError

__all__ = ["InputError"]
