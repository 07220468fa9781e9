"""Jobs: the EM drivers a user runs (reconstruction, refinement, …)."""
