"""Pure numerical kernels: arrays in, arrays out. No I/O, no Dask, no global state.

Conventions (RELION's, see docs/design.md §2): images ``[y, x]``, volumes ``[z, y, x]``, even
box ``D`` with the real-space origin at index ``D // 2``; rotation matrices ``(..., 3, 3)`` as
RELION's ``Euler_angles2matrix``, and a 2D Fourier pixel ``(x, y)`` samples the 3D transform at
``Aᵀ (x, y, 0)``.
Every kernel takes NumPy or CuPy arrays and uses the array's own module.
"""
