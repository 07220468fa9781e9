"""The simulation's settings (:class:`SimulationConfig`), apart from :mod:`.simulate` so that
the command line reads their defaults without importing the numerical code."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.projection import DEFAULT_PAD
from .errors import InputError

#: Noise power spectra :func:`.simulate.simulate_noise` can make.
NOISE_COLORS = ("white", "ice")


@dataclass(frozen=True)
class SimulationConfig:
    """How to simulate particles. Units are in the names; ``snr=inf`` gives noise-free images.

    The last five fields add real-data nuisances (see the module docstring); all are off by
    default. Invalid values raise :class:`InputError` naming the field.
    """

    n_particles: int = 2000
    snr: float = 0.1
    defocus_min_A: float = 10_000.0
    defocus_max_A: float = 25_000.0
    astigmatism_max_A: float = 500.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_A2: float = 0.0
    ctf: bool = True
    shift_sigma_A: float = 3.0
    scale_min: float = 0.8
    scale_max: float = 1.2
    chunk_size: int = 500
    pad: int = DEFAULT_PAD
    seed: int = 0
    junk_fraction: float = 0.0
    preferred_view_fraction: float = 0.0
    preferred_view_spread_deg: float = 10.0
    noise_color: str = "white"
    envelope_bfactor_A2: float = 0.0
    beam_tilt_mrad: tuple[float, float] = (0.0, 0.0)
    mag_matrix: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 1.0)  # M00, M01, M10, M11
    defocus_error_A: float = 0.0
    # further optics groups (2, 3, …) imaged at these pixel sizes (Å), the particles dealt
    # to groups 1, 2, … in turn; group 1 is at the map's pixel size, the store's
    other_group_pixel_sizes_A: tuple[float, ...] = ()

    def __post_init__(self):
        if not all(math.isfinite(p) and p > 0 for p in self.other_group_pixel_sizes_A):
            raise InputError("other_group_pixel_sizes_A", "expected positive pixel sizes (Å), "
                             f"not {self.other_group_pixel_sizes_A!r}")
        if not self.defocus_error_A >= 0.0:
            raise InputError("defocus_error_A", f"must be ≥ 0 Å, not {self.defocus_error_A}")
        if len(self.beam_tilt_mrad) != 2 or not all(map(math.isfinite, self.beam_tilt_mrad)):
            raise InputError("beam_tilt_mrad", f"expected two finite numbers (τx, τy), not "
                             f"{self.beam_tilt_mrad!r}")
        if len(self.mag_matrix) != 4 or abs(np.linalg.det(np.reshape(self.mag_matrix,
                                                                     (2, 2)))) < 0.5:
            raise InputError("mag_matrix", "expected four numbers M00 M01 M10 M11 of an "
                             f"invertible matrix near the identity, not {self.mag_matrix!r}")
        for name in ("junk_fraction", "preferred_view_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InputError(name, f"must be in [0, 1), not {value}")
        if not self.preferred_view_spread_deg > 0.0:
            raise InputError("preferred_view_spread_deg",
                             f"must be > 0 degrees, not {self.preferred_view_spread_deg}")
        if not self.envelope_bfactor_A2 >= 0.0:
            raise InputError("envelope_bfactor_A2",
                             f"must be ≥ 0 Å², not {self.envelope_bfactor_A2}")
        if self.noise_color not in NOISE_COLORS:
            raise InputError("noise_color", f"must be one of {', '.join(NOISE_COLORS)}, not "
                             f"{self.noise_color!r}")
