"""The PPO loop on a CPU against its baselines: rollout speed, weight sync, and step time vs TRL.

One ~4M-parameter random-init Llama (the model of bench/trl_grpo.py's self-test) and one set of
prompts (`make_model_and_prompts`) feed every contender. The PPO run is this project's GRPO
(configs/test.yaml with the overrides in `ppo_config`: group 8 x 8 prompts, 128 new tokens,
one PPO epoch of one 64-sequence mini-batch, kl_coef 0.02 as a k3 loss term as TRL's beta 0.02,
reward len(text)/100 as TRL's default, old logprobs from vLLM's sampling so no extra policy pass,
as TRL with num_iterations=1; the KL in the reward would need that pass) on a
local Ray of 2 CPUs started in this process. After one warm-up of each, every timed step runs
next to a bare vLLM generate and an engine-actor generate of the same 64 prompt ids (order rotated):

 (a) rollout tokens/s: the step's `rollout_tokens_per_s` (generated tokens / time_generate: the
     Ray call to the engine actor, vLLM, the rollouts coming back) vs a `RolloutEngine` in this
     process, tokens / wall time of `generate`. Medians. Target: in-loop >= 0.9x bare. A
     diagnostic row times the engine actor alone (`trainer.generate`, outside a step) the same way.
 (b) weight sync: the step's `time_sync` (the policy's weights streamed in buckets over the
     weight-sync group into vLLM's worker, reload, version check; the object-store path only
     where no group forms, the log says which) vs copying the same bytes in memory (`clone` of
     every tensor); in between: a safetensors save + load round trip, the Ray fetch of the state
     dict alone, and `load_weights` on the bare engine (no Ray). Medians of 9 repeats after the
     PPO steps. bench/weight_sync.py measures the sync itself at three model sizes.
 (c) step time: median wall time of `PPOTrainer.step` (rollout, reference logprobs, reward,
     advantages, update, sync) vs TRL's GRPOTrainer on the same model folder, prompts, group and
     max_new_tokens (bench/trl_grpo.py, median of its timed steps, every completion forced to
     max_new_tokens). Our completions can stop early, so tokens/s per step is compared too.
     Target: ours >= 1.5x faster.

Every contender is sensitive to other jobs on the machine (2-thread torch ops stall when a core is
taken), so the load average is printed before, between the halves and at the end.

`--policy-workers 1,2` measures something else instead: the PPO step and each of its phases with
1 vs 2 policy workers (a DDP group), one PPOTrainer per count alive at once on the same 2-CPU Ray
(their bundles shrunk to fit: rollout 0.25, policy 0.25 per worker, reference 0.125 CPUs), their
steps interleaved (order alternated) after one warm-up each. The torch threads are split over
the workers (`--threads` / workers each), so every count has the same cores: what differs is
the group (the row split, DDP's gradient all-reduce over gloo, rank 0 gathering for the sync).

    .venv/bin/python bench/ppo_loop.py [--steps 5] [--max-new-tokens 128] [--group 8]
                                       [--prompts 8] [--threads 2] [--skip-trl]
                                       [--policy-workers 1,2] [--set ppo.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `bench.ppo_loop:length_reward` and `bench.trl_grpo` import
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the bare engine's, as the actors' (ACTOR_ENV)

import ray  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load, save  # noqa: E402

from rlhf_ray.config import GPT4_SPLIT_PATTERN, RunConfig, load_config  # noqa: E402
from rlhf_ray.modeling import count_parameters, new_policy, save_model  # noqa: E402
from rlhf_ray.run import RunFolder  # noqa: E402
from rlhf_ray.tokenizer import train_bpe  # noqa: E402


def length_reward(text: str, ground_truth: str | None) -> float:
    """Characters / 100: bench/trl_grpo.py's default reward, cheap so the timing is the loop's."""
    return len(text) / 100


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_model_and_prompts(cfg: RunConfig, num_prompts: int) -> tuple[Path, list[str]]:
    """The random-init policy in <run>/sft (what PPOTrainer starts from; TRL loads it too) and the
    prompts as plain user messages, written to <run>/prompts.jsonl for the trainer."""
    text = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 20
    tokenizer = train_bpe([text] * 50, vocab_size=512, pattern=GPT4_SPLIT_PATTERN, max_chars=10**9)
    model_dir = RunFolder(cfg.run_dir).model("sft")
    save_model(new_policy(cfg.model, tokenizer, seed=cfg.seed), tokenizer, model_dir)
    prompts = [f"Tell me about fox number {i}." for i in range(num_prompts)]
    (cfg.run_dir / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "ground_truth": None}) + "\n" for p in prompts))
    return model_dir, prompts


def ppo_config(runs_dir: Path, args: argparse.Namespace, name: str = "bench",
               extra: list[str] | None = None) -> RunConfig:
    return load_config(REPO / "configs" / "test.yaml", [
        f"runs_dir={runs_dir}", f"name={name}",
        "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=4",
        "model.intermediate_size=768", "model.max_seq_len=512",
        "ppo.estimator=grpo", f"ppo.samples_per_prompt={args.group}",
        f"ppo.prompts_per_step={args.prompts}", f"ppo.max_new_tokens={args.max_new_tokens}",
        f"ppo.mini_batch_size={args.group * args.prompts}", "ppo.ppo_epochs=1", "ppo.kl_coef=0.02",
        "ppo.kl_mode=loss", "ppo.kl_estimator=k3",
        "ppo.reward_source=function", "ppo.reward_function=bench.ppo_loop:length_reward",
        "ppo.old_logprobs=rollout", "ppo.temperature=1.0", "ppo.top_p=1.0",
        f"ppo.resources.policy.threads={args.threads}", f"ppo.resources.reference.threads={args.threads}",
        *(extra or []), *args.set])


def median_seconds(fn: Callable[[], object], repeats: int = 9) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of our policy and "
                        "reference actors and of TRL (vLLM picks its own: 1 on a 2-core machine)")
    parser.add_argument("--skip-trl", action="store_true", help="leave out TRL (c)")
    parser.add_argument("--policy-workers", default="", help="e.g. 1,2: instead of (a)-(c), the "
                        "PPO step with each number of policy workers, side by side")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every trainer (repeatable)")
    args = parser.parse_args()
    if args.policy_workers:
        compare_policy_workers(args, [int(n) for n in args.policy_workers.split(",")])
        return

    from rlhf_ray.rl.ppo import PPOTrainer
    from rlhf_ray.memory import rollout_sequences
    from rlhf_ray.rl.rollout import RolloutEngine

    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ppo_config(Path(tmp), args)
        ppo = cfg.ppo
        model_dir, prompt_texts = make_model_and_prompts(cfg, args.prompts)
        ray.init(num_cpus=2, include_dashboard=False)
        trainer = PPOTrainer(cfg, [cfg.run_dir / "prompts.jsonl"], [], log=print)
        engine = RolloutEngine(model_dir, max_model_len=trainer.max_len,
                               sequences=rollout_sequences(ppo), kv_cache=ppo.kv_cache, seed=0,
                               dtype=ppo.rollout_dtype)
        batch = [p.ids for p in trainer.prompts for _ in range(ppo.samples_per_prompt)]

        generators: dict[str, Callable[[int], list]] = {  # same prompt ids, a new seed each call
            "bare": lambda seed: engine.generate(batch, ppo.max_new_tokens, ppo.temperature, ppo.top_p,
                                                 expected_version=0, seed=seed),
            "actor": lambda seed: trainer.generate(batch, ppo.temperature, seed=seed),
        }
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in generators}

        def generate(name: str, step: int) -> None:
            """Generated tokens/s and mean response length of one generate outside the PPO step."""
            start = time.perf_counter()
            rollouts = generators[name](step * 65_536 + 7)
            tokens = sum(len(r.response_ids) for r in rollouts)
            rates[name].append((tokens / (time.perf_counter() - start), tokens / len(rollouts)))

        steps: list[dict[str, float]] = []

        def ours(step: int) -> None:
            start = time.perf_counter()
            m = trainer.step(step)
            m["wall"] = time.perf_counter() - start
            steps.append(m)
            print(f"step {step}: {m['wall']:.2f}s (gen {m['time_generate']:.2f} exp "
                  f"{m['time_experience']:.2f} train {m['time_train']:.2f} sync {m['time_sync']:.3f}), "
                  f"{m['rollout_tokens_per_s']:.0f} tok/s, len {m['response_length']:.1f}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)

        calls = [lambda i: generate("bare", i), lambda i: generate("actor", i), ours]
        for call in calls:  # warm-up, not counted
            call(0)
        steps.clear()
        for runs in rates.values():
            runs.clear()
        for i in range(1, args.steps + 1):  # rotate the order, so no contender always goes first
            for call in calls[i % 3:] + calls[: i % 3]:
                call(i)
        loop_rate = statistics.median(m["rollout_tokens_per_s"] for m in steps)
        loop_len = statistics.mean(m["response_length"] for m in steps)
        (bare_rate, bare_len), (actor_rate, actor_len) = (
            (statistics.median(r for r, _ in runs), statistics.mean(n for _, n in runs))
            for runs in rates.values())
        load_middle = os.getloadavg()

        # (b) the bytes one sync moves: every entry of the policy's state dict (tied lm_head included)
        state = trainer.policy.each("state_dict").get()  # rank 0's gathered dict
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        next_version = iter(range(1, 1000))
        sync = {
            "in-loop sync (time_sync)": statistics.median(m["time_sync"] for m in steps),
            "bare engine load_weights": median_seconds(
                lambda: engine.load_weights(state, next(next_version))),
            "Ray fetch of the state dict": median_seconds(
                lambda: trainer.policy.each("state_dict").get()),
            "safetensors save + load": median_seconds(
                lambda: load(save({k: v.clone() for k, v in state.items()}))),
            "memcpy (clone every tensor)": median_seconds(lambda: {k: v.clone() for k, v in state.items()}),
        }
        ours_step = statistics.median(m["wall"] for m in steps)
        ours_tokens = loop_len * len(batch)
        params = count_parameters(new_policy(cfg.model, trainer.tokenizer))
        trainer.close()
        engine.shutdown()
        ray.shutdown()

        trl = None
        if not args.skip_trl:
            from bench.trl_grpo import trl_grpo_step_seconds
            trl = trl_grpo_step_seconds(model_dir, prompt_texts, args.group, args.max_new_tokens,
                                        args.steps, threads=args.threads)  # reward len / 100, as ours
    load_after, wall = os.getloadavg(), time.perf_counter() - started

    def load_str(avg: tuple[float, float, float]) -> str:
        return "/".join(f"{x:.2f}" for x in avg)

    def row(measure: str, ours: str, baseline: str, ratio: str = "", target: str = "") -> None:
        print(f"| {measure} | {ours} | {baseline} | {ratio} | {target} |")

    def verdict(ratio: float, goal: float) -> str:
        return f">= {goal}x: {'met' if ratio >= goal else 'NOT met'}"

    import vllm  # already loaded by rlhf_ray.rl.rollout

    versions = (f"torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, "
                f"transformers {transformers.__version__}, trl {version('trl') if trl else '-'}")
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores; {versions}")
    print(f"load average (1/5/15 min): before {load_str(load_before)}, after the PPO half "
          f"{load_str(load_middle)}, at the end {load_str(load_after)}")
    print(f"model {params / 1e6:.1f}M parameters, random init; {args.prompts} prompts x {args.group} "
          f"samples x {args.max_new_tokens} new tokens; medians of {args.steps} timed steps after 1 "
          f"warm-up; {args.threads} torch threads; ours: precision {ppo.precision}, rollout dtype "
          f"{ppo.rollout_dtype}; TRL: {trl['dtype'] if trl else 'skipped'}; wall {wall:.0f}s\n")
    row("measure", "ours", "baseline", "ratio", "target")
    row("---", "---:", "---:", "---:", "---")
    ratio = loop_rate / bare_rate
    row("(a) rollout tokens/s: in the PPO loop vs bare vLLM generate", f"{loop_rate:.0f}",
        f"{bare_rate:.0f}", f"{ratio:.2f}x", verdict(ratio, 0.9))
    row("(a) tokens/s: engine actor alone (`trainer.generate`) vs bare", f"{actor_rate:.0f}",
        f"{bare_rate:.0f}", f"{actor_rate / bare_rate:.2f}x", "diagnostic")
    row("(a) mean response length: in loop / actor alone vs bare", f"{loop_len:.1f} / {actor_len:.1f}",
        f"{bare_len:.1f}")
    memcpy = sync["memcpy (clone every tensor)"]
    for label, seconds in sync.items():
        row(f"(b) {label}: ms, GB/s", f"{seconds * 1e3:.1f} ms", f"{nbytes / seconds / 1e9:.2f} GB/s",
            f"{seconds / memcpy:.0f}x memcpy")
    row("(b) bytes per sync", f"{nbytes / 1e6:.1f} MB", f"{len(state)} tensors")
    if trl:
        trl_steps = trl["step_seconds"]
        trl_step, trl_tokens = statistics.median(trl_steps), trl["completion_tokens_per_step"]
        row("(c) seconds per GRPO step: ours vs TRL GRPOTrainer (ratio: TRL / ours)", f"{ours_step:.2f}",
            f"{trl_step:.2f}", f"{trl_step / ours_step:.2f}x", verdict(trl_step / ours_step, 1.5))
        row("(c) each timed step, min-max s", f"{min(m['wall'] for m in steps):.2f}-"
            f"{max(m['wall'] for m in steps):.2f}", f"{min(trl_steps):.2f}-{max(trl_steps):.2f}")
        row("(c) completion tokens per step", f"{ours_tokens:.0f}", f"{trl_tokens:.0f}",
            f"{ours_tokens / trl_tokens:.2f}x", "TRL forces max_new_tokens; ours may stop early")
        rate_ratio = (ours_tokens / ours_step) / (trl_tokens / trl_step)
        row("(c) completion tokens/s per step (fair when lengths differ)",
            f"{ours_tokens / ours_step:.0f}", f"{trl_tokens / trl_step:.0f}",
            f"{rate_ratio:.2f}x", verdict(rate_ratio, 1.5))
    parts = ("time_generate", "time_experience", "time_train", "time_sync")
    print("\nour step, medians: " + ", ".join(
        f"{p[5:]} {statistics.median(m[p] for m in steps):.2f}s" for p in parts))


PHASES = ("time_generate", "time_experience", "time_train", "time_sync")


def compare_policy_workers(args: argparse.Namespace, counts: list[int]) -> None:
    """The PPO step with each number of policy workers, the trainers alive together, their steps
    interleaved; a table of medians and their ratios to the first count."""
    from rlhf_ray.rl.ppo import PPOTrainer

    load_before, started = os.getloadavg(), time.perf_counter()
    trainers: dict[int, PPOTrainer] = {}
    steps: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            for n in counts:
                cfg = ppo_config(Path(tmp), args, name=f"bench-w{n}", extra=[
                    f"ppo.resources.policy.num_workers={n}",
                    f"ppo.resources.policy.threads={max(1, args.threads // n)}",
                    "ppo.resources.rollout.num_cpus=0.25", "ppo.resources.policy.num_cpus=0.25",
                    "ppo.resources.reference.num_cpus=0.125"])
                make_model_and_prompts(cfg, args.prompts)
                trainers[n] = PPOTrainer(cfg, [cfg.run_dir / "prompts.jsonl"], [],
                                         log=lambda m, n=n: print(f"[{n} workers] {m}", flush=True))
            for i in range(args.steps + 1):  # step 0: warm-up
                for n in counts[i % len(counts):] + counts[: i % len(counts)]:
                    start = time.perf_counter()
                    m = trainers[n].step(i)
                    m["wall"] = time.perf_counter() - start
                    print(f"[{n} workers] step {i}{' (warm-up)' if i == 0 else ''}: "
                          f"{m['wall']:.2f}s (" + ", ".join(f"{p[5:]} {m[p]:.2f}" for p in PHASES) +
                          f"), len {m['response_length']:.1f}, policy_loss {m['policy_loss']:.4f}; "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
                    if i:
                        steps[n].append(m)
        finally:
            for trainer in trainers.values():
                trainer.close()
            ray.shutdown()
    load_after, wall = os.getloadavg(), time.perf_counter() - started
    import vllm  # already loaded by rlhf_ray.rl.rollout

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, vllm "
          f"{vllm.__version__}, ray {ray.__version__}; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, at the end "
          f"{'/'.join(f'{x:.2f}' for x in load_after)}; {args.prompts} prompts x {args.group} "
          f"samples x {args.max_new_tokens} new tokens; medians of {args.steps} interleaved steps "
          f"after 1 warm-up; {args.threads} torch threads split over the policy workers; wall "
          f"{wall:.0f}s\n")
    base = counts[0]
    rows = {"step (wall)": "wall", **{p[5:]: p for p in PHASES},
            "response length (tokens)": "response_length"}
    print("| measure | " + " | ".join(f"{n} policy worker{'s' * (n > 1)}" for n in counts) + " | " +
          " | ".join(f"{n} / {base}" for n in counts[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(counts) - 1))
    for label, key in rows.items():
        med = {n: statistics.median(m[key] for m in steps[n]) for n in counts}
        unit = "" if key == "response_length" else " s"
        print(f"| {label} | " + " | ".join(f"{med[n]:.2f}{unit}" for n in counts) + " | " +
              " | ".join(f"{med[n] / med[base]:.2f}x" for n in counts[1:]) + " |")


if __name__ == "__main__":
    main()
