"""What every job entry point shares: the run config, a run folder that outlives the job, errors.

Inside a job the current directory is its `working_dir`: a temporary copy of an uploaded one, or
a `local://` directory on each node. A relative `runs_dir` (config paths resolve against the
current directory) would put the run where other nodes or the next submission may not find it,
and is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_ray.cli import add_overrides, exit_on_failure, run_command
from rlhf_ray.cluster import in_ray_job
from rlhf_ray.config import ConfigError, RunConfig, load_config
from rlhf_ray.console import capture
from rlhf_ray.run import STAGES, RunFolder


def parse_config(argv: list[str], description: str, stage: bool = False
                 ) -> tuple[str, RunConfig, str | None, bool]:
    """(the stage, or "pipeline"; the config; the pipeline's last stage; --verbose)."""
    parser = argparse.ArgumentParser(description=description)
    names = [s.name for s in STAGES]
    if stage:
        parser.add_argument("stage", choices=names)
    else:
        parser.add_argument("--until", choices=names, default=names[-1],
                            help="the last stage to run (default: %(default)s)")
    parser.add_argument("--config", required=True, help="run config YAML (a path in the working_dir)")
    add_overrides(parser, "runs_dir=/mnt/shared/runs")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if in_ray_job() and cfg.runs_dir.is_relative_to(Path.cwd()):
        raise ConfigError(
            f"runs_dir resolves to {cfg.runs_dir}, inside this job's working directory {Path.cwd()} "
            "(an uploaded working_dir is a temporary copy; a local:// one is on this node only): "
            "the run could be lost when the job ends, invisible to other nodes, and out of a "
            "resubmission's reach. Give an absolute path on storage every node shares, e.g. "
            "--set runs_dir=/mnt/shared/runs")
    return (args.stage if stage else "pipeline"), cfg, getattr(args, "until", None), args.verbose


def run_job(argv: list[str], description: str, stage: bool = False) -> None:
    """Run the command; a failure prints one clear line and exits non-zero (the job FAILS)."""
    with exit_on_failure("rlhf-ray job", "the job"):
        command, cfg, until, verbose = parse_config(argv, description, stage)
        print(f"rlhf-ray job: {command} of run {cfg.name!r} -> {cfg.run_dir.resolve()}; Ray's "
              f"and vLLM's logs in {RunFolder(cfg.run_dir).logs}", flush=True)
        with capture(RunFolder(cfg.run_dir).logs, verbose):
            run_command(command, cfg, until)
    print("rlhf-ray job: done", flush=True)
