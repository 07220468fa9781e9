#!/usr/bin/env python
"""Run a dask-refine job on Dask workers that dask-jobqueue submits to SLURM.

    python deploy/slurm/refine_on_slurm.py --profile gpu --jobs 4 -- \\
        refine /shared/particles.zarr --initial /shared/initial.mrc --out /shared/refine --dashboard

Everything after ``--`` is a ``dask-refine`` command (``refine``, ``hetero-refine`` or
``reconstruct``) and runs here, against a Dask scheduler that this process starts with the
settings in ``cluster.yaml`` (its ``scheduler_options``: the ``dask_refine.ui.dashboard`` preload
serves the live page, ``/dask-refine``). ``--jobs`` worker jobs of the chosen profile are
submitted with ``sbatch``; they are cancelled when the command ends, and quit by themselves
(``death_timeout``) if this process dies. ``--job-script`` prints the job script that would be
submitted and exits without submitting anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("cluster.yaml")


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    with open(path) as fh:
        config = yaml.safe_load(fh)
    if not isinstance(config, dict) or not isinstance(config.get("profiles"), dict):
        raise ValueError(f"{path}: expected a mapping with 'profiles' (and 'scheduler_options')")
    return config


def cluster_kwargs(config: dict, profile: str, scheduler_options: dict | None = None) -> dict:
    """``SLURMCluster`` keyword arguments of ``profile``; ``scheduler_options`` are merged over the
    configuration's."""
    profiles = config["profiles"]
    if profile not in profiles:
        raise ValueError(f"no profile {profile!r}; the configuration has {sorted(profiles)}")
    kwargs = dict(profiles[profile])
    kwargs["scheduler_options"] = {**(config.get("scheduler_options") or {}),
                                   **(scheduler_options or {})}
    return kwargs


def gpu_profile(config: dict, profile: str) -> bool:
    """Whether ``profile``'s workers are dask-cuda GPU workers (the job then runs with
    ``--gpu``, its map tasks on CuPy)."""
    return "dask_cuda" in str(config["profiles"][profile].get("worker_command", ""))


def make_cluster(config: dict, profile: str, scheduler_options: dict | None = None, **overrides):
    """A ``dask_jobqueue.SLURMCluster`` (its scheduler starts here; no job is submitted until
    ``scale``)."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**{**cluster_kwargs(config, profile, scheduler_options), **overrides})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refine_on_slurm.py", usage="%(prog)s [options] -- DASK_REFINE_COMMAND ...",
        description="Run a dask-refine job on Dask workers submitted to SLURM by dask-jobqueue.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="YAML settings (default: cluster.yaml next to this script)")
    p.add_argument("--profile", default="cpu", help="worker profile in the configuration "
                   "(default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker jobs to submit (default: %(default)s)")
    p.add_argument("--job-script", action="store_true",
                   help="print the worker job script and exit; submits nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[:argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(options)
    if not args.job_script and not command:
        parser.error("give the dask-refine command after '--'")
    if "--scheduler" in command:
        parser.error("the command gets --scheduler from this launcher; leave it out")
    try:
        config = load_config(args.config)
        cluster_kwargs(config, args.profile)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        parser.error(str(exc))

    with make_cluster(config, args.profile) as cluster:
        if args.job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}; {args.jobs} {args.profile} worker job(s) "
              f"submitted; Dask dashboard {cluster.dashboard_link}", file=sys.stderr, flush=True)
        from dask_refine.ui.cli import main as dask_refine

        gpu = ["--gpu"] if gpu_profile(config, args.profile) and "--gpu" not in command else []
        return dask_refine([*command, "--scheduler", cluster.scheduler_address, *gpu])


if __name__ == "__main__":
    sys.exit(main())
