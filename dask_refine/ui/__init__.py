"""User interfaces: the ``dask-refine`` command line, plots, dashboard."""
