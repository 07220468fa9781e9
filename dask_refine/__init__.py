"""dask_refine: cryo-EM 3D refinement as a Dask array pipeline.

Layers (each imports only the ones listed before it):
``core`` (pure array math) → ``io`` (stores, files, simulation) → ``parallel`` (Dask graphs)
→ ``jobs`` (EM drivers) → ``ui`` (CLI, plots, dashboard).
"""

__version__ = "0.1.0"
