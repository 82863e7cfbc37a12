"""`rlhf-ray <command> --config run.yaml [--set key=value ...]`: a stage (rlhf_ray/run.py's
STAGES), the pipeline up to one, the demo, serving, planning."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_ray.config import ConfigError, RunConfig, load_config
from rlhf_ray.console import capture, say
from rlhf_ray.run import CHAT_MODELS, STAGES, RunFolder
from rlhf_ray.run import stage as stage_named


def add_overrides(parser: argparse.ArgumentParser, example: str = "pretrain.steps=10") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one setting, e.g. --set {example} (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="show everything Ray and vLLM print, live (it always goes to "
                        "<run>/logs/driver.log)")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    add_overrides(parser)


def _add_run_args(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--run", required=True, help="the run folder, e.g. runs/demo (its config.yaml)")
    add_overrides(parser, example)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pipeline = commands.add_parser("pipeline", help="run every stage in order (up to --until), "
                                   "skipping finished ones")
    _add_config_args(pipeline)
    pipeline.add_argument("--until", choices=[s.name for s in STAGES], default=STAGES[-1].name,
                          help="the last stage to run (default: %(default)s)")
    for stage in STAGES:
        command = commands.add_parser(stage.name, help=stage.help)
        if stage.on_run:
            _add_run_args(command, "evaluation.resources.num_gpus=1")
        else:
            _add_config_args(command)
    _add_config_args(commands.add_parser("config", help="print the resolved config"))
    serve = commands.add_parser("serve", help="serve a run's stage models over OpenAI-compatible HTTP")
    _add_run_args(serve, "serve.max_replicas=2")
    serve.add_argument("--address", help="Ray cluster to join (default: an embedded local Ray)")
    serve.add_argument("--host", help="HTTP address (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default: serve.port, 8000)")
    demo = commands.add_parser("demo", help="every stage on the demo config, the report (report.md, "
                               "plots), then serve all stages until Ctrl-C")
    demo.add_argument("--config", default="configs/demo.yaml", help="run config (default: %(default)s)")
    add_overrides(demo)
    demo.add_argument("--no-serve", dest="serve", action="store_false",
                      help="stop after the report instead of serving the models")
    plan = commands.add_parser("plan", help="print each role's memory, placement and the GPU count "
                               "for a config, without running anything")
    _add_config_args(plan)
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (default 80)")
    plan.add_argument("--prompt-tokens", type=int,
                      help="longest RL prompt (default: whatever the context leaves)")
    talk = commands.add_parser("chat", help="chat in the terminal with a running server's model")
    talk.add_argument("--url", default="http://127.0.0.1:8000", help="the server (rlhf-ray serve)")
    talk.add_argument("--model", default=stage_named("ppo").folder, help=", ".join(CHAT_MODELS))
    talk.add_argument("--api-key", default=os.environ.get("RLHF_RAY_API_KEY"),
                      help="the server's key (default: $RLHF_RAY_API_KEY)")
    talk.add_argument("--temperature", type=float, default=0.7)
    talk.add_argument("--max-tokens", type=int, default=128)
    return parser


def load_run(run: str, overrides: list[str]) -> RunConfig:
    """A finished run's config (its config.yaml), pointed at the folder it is in now."""
    run_dir = Path(run)
    return load_config(RunFolder(run_dir).config,
                       [*overrides, f"runs_dir={run_dir.resolve().parent}", f"name={run_dir.name}"])


def serve_run(args: argparse.Namespace) -> None:
    """Deploy and print the URLs; on an embedded Ray, serve until Ctrl-C (or SIGTERM)."""
    from rlhf_ray.cluster import joins_cluster
    from serve.run import served_models, start

    run_dir = Path(args.run)
    overrides = list(args.overrides)
    for key, value in (("cluster.address", args.address), ("serve.host", args.host),
                       ("serve.port", args.port)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_run(args.run, overrides)
    url = start(run_dir, cfg)
    print_urls(url, served_models(run_dir, cfg), run_dir)
    if joins_cluster(cfg.cluster):  # the app lives on in the cluster, like `serve deploy`
        say("rlhf-ray: deployed; it serves until `serve shutdown`. Run this command again to "
            "roll out changed stage folders.")
        return
    wait_for_ctrl_c()


def wait_for_ctrl_c(until: Callable[[], bool] | None = None) -> None:
    """Serve until Ctrl-C (or until `until()` is true); a `kill` (SIGTERM) stops it the same way,
    so replicas shut their vLLM engines down rather than leaving engine processes behind."""
    import signal

    from ray import serve as ray_serve

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ray Train's fit() replaced it
    try:
        while until is None or not until():
            time.sleep(3600 if until is None else 2)
        say("rlhf-ray: done; stopping the server")
    except KeyboardInterrupt:
        say("rlhf-ray: stopping the server")
    ray_serve.shutdown()


def print_urls(url: str, models: list[str], run_dir: object) -> None:
    from serve.direct import current_stage_urls

    own = ", ".join(f"{url}/{m}/v1" for m in models if m in CHAT_MODELS)
    direct = current_stage_urls()
    at_ports = ", ".join(u for m in models for u in direct.get(m, []))
    say(f"rlhf-ray: serving {', '.join(models)} from {run_dir}\n"
        f"  API: {url}/v1  (models: GET {url}/v1/models; OpenAI clients: base_url={url}/v1)\n"
        f"  each stage alone, one hop fewer: {own}\n"
        + (f"  each stage at its replicas' own ports, no proxy (while these replicas live; "
           f"GET {url}/v1/models lists the current ones): {at_ports}\n" if at_ports else "")
        + f"  chat page: {url}/")


def run_demo(cfg: RunConfig, serve: bool) -> None:
    """The newcomer's command: every stage, the report, then every stage's model served."""
    from rlhf_ray import pipeline

    run_dir, seconds = pipeline.run_pipeline(cfg)
    run = RunFolder(run_dir)
    say("\n" + run.report.read_text(encoding="utf-8"))
    say(f"rlhf-ray: demo done in {pipeline.stage_times(seconds)}")
    say(f"rlhf-ray: report {run.report}, training curves {run.plots / 'training_curves.png'}, "
        f"full log {run.logs / 'driver.log'}")
    if serve:
        from serve.run import served_models, start

        print_urls(start(run_dir, cfg), served_models(run_dir, cfg), run_dir)
        wait_for_ctrl_c()


def run_command(command: str, cfg: RunConfig, until: str | None = None) -> None:
    """`config`, `pipeline` (up to `until`), or one stage by name (rlhf_ray.run.STAGES)."""
    if command == "config":  # no torch, Ray or transformers to import for this one: it is instant
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return
    from rlhf_ray import pipeline

    if command == "pipeline":
        pipeline.run_pipeline(cfg, until or STAGES[-1].name)
    else:
        pipeline.run_stage(cfg, command)


def collect_and_rank(cfg: RunConfig) -> None:
    """Sample and rank; with labeler 'human', serve the ranking page until every prompt is
    ranked (or Ctrl-C: what was ranked is kept, and running the command again resumes)."""
    from rlhf_ray.cluster import joins_cluster
    from rlhf_ray.compare.collect import collect_comparisons, compare_settings
    from rlhf_ray.pipeline import log

    store = collect_comparisons(cfg, lambda message: log("compare", message))
    if compare_settings(cfg).labeler != "human" or not store.progress()["remaining"]:
        return
    from serve.run import start

    url = start(cfg.run_dir, cfg, chat=False)
    say(f"rlhf-ray: rank the samples at {url}/rank/ ({store.progress()['remaining']} prompts "
        f"left); records go to {store.rankings_path}")
    if joins_cluster(cfg.cluster):
        return
    said = [store.progress()["ranked"]]

    def all_ranked() -> bool:
        progress = store.progress()
        if progress["ranked"] != said[-1]:
            said.append(progress["ranked"])
            log("compare", f"{progress['ranked']} of {progress['total']} prompts ranked")
        return not progress["remaining"]

    wait_for_ctrl_c(until=all_ranked)


@contextmanager
def exit_on_failure(prefix: str, command: str) -> Iterator[None]:
    """Bad input or a refused request: one line, exit 2. A run that failed on Ray: one line (its
    workers' errors are in it), exit 1. RLHF_RAY_DEBUG=1 shows the traceback instead."""
    try:
        yield
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        if os.environ.get("RLHF_RAY_DEBUG"):
            raise
        print(f"{prefix}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as e:
        if os.environ.get("RLHF_RAY_DEBUG") or not type(e).__module__.startswith("ray"):
            raise
        print(f"{prefix}: {command} failed: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_failure("rlhf-ray", args.command):
        if args.command == "chat":
            from serve.chat import chat

            chat(args.url, args.model, args.api_key, args.temperature, args.max_tokens)
        elif args.command == "plan":
            from rlhf_ray.plan import format_plan, plan_run

            cfg = load_config(args.config, args.overrides)
            print(format_plan(plan_run(cfg, args.gpu_memory_gb, args.prompt_tokens)))
        elif args.command == "config":
            run_command(args.command, load_config(args.config, args.overrides))
        elif args.command == "serve":
            with capture(RunFolder(Path(args.run)).logs, args.verbose):
                serve_run(args)
        elif getattr(args, "run", None) is not None:  # a stage of a finished run: eval, report
            cfg = load_run(args.run, args.overrides)
            with capture(RunFolder(cfg.run_dir).logs, args.verbose):
                run_command(args.command, cfg)
        else:
            cfg = load_config(args.config, args.overrides)
            with capture(RunFolder(cfg.run_dir).logs, args.verbose):
                if args.command == "demo":
                    run_demo(cfg, args.serve)
                else:
                    run_command(args.command, cfg, getattr(args, "until", None))


if __name__ == "__main__":
    main()
