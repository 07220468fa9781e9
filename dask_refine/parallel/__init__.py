"""Dask graphs: map over particle chunks, tree reductions, cluster creation."""
