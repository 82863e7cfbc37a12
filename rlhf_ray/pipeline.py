"""Each stage's task, and running them in order; a finished stage is skipped on re-run.

The stages, their folders and what each needs are rlhf_ray/run.py's; this module does the work.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from rlhf_ray.cluster import connect
from rlhf_ray.config import RunConfig, save_config
from rlhf_ray.console import detail, say
from rlhf_ray.data.shards import write_shards
from rlhf_ray.data.demo import write_demo_data
from rlhf_ray.data.readers import RecordError, read_many
from rlhf_ray.data.records import TextRecord
from rlhf_ray.run import (DEMO_FILES, RECORD_KINDS, STAGES, RunFolder, data_files, read_metrics, stage,
                          stages_until)
from rlhf_ray.storage import atomic_folder
from rlhf_ray.train import stages
from rlhf_ray.tokenizer import BPETokenizer, ChatTokenizer, load_tokenizer, train_bpe
from rlhf_ray.watch import watch_stage


def log(stage: str, message: str) -> None:
    say(f"[{stage}] {message}")


def prepare_run(cfg: RunConfig) -> Path:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunFolder(run_dir).config)
    return run_dir


def reward_files(cfg: RunConfig) -> dict[str, list[Path]]:
    """data_files, with the rankings of compare/ added to the reward data when `compare` is set."""
    files = data_files(cfg)
    if cfg.compare is None:
        return files
    from rlhf_ray.compare.collect import store_of

    store = store_of(cfg)
    if not store.has_candidates():
        raise ValueError(f"compare is configured, but {store.folder} has no comparisons yet: "
                         "run `rlhf-ray compare-data` first, or set compare: null")
    if not store.rankings():  # e.g. a labeler that scored every prompt's answers equal
        log("reward", f"{store.rankings_path}: no rankings; training on data.reward alone")
        return files
    return files | {"reward": files["reward"] + [store.rankings_path]}


def make_comparisons(cfg: RunConfig) -> None:
    """K SFT samples per prompt, ranked (by the labeler function, or already by people)."""
    if cfg.compare is None:
        return
    from rlhf_ray.compare.collect import collect_comparisons

    if (reward := RunFolder(cfg.run_dir).output("reward")).exists():
        log("compare", f"{reward} exists, skipped")
        return
    store = collect_comparisons(cfg, lambda message: log("compare", message))
    progress = store.progress()
    if cfg.compare.labeler == "human" and progress["remaining"]:
        raise ValueError(f"{progress['remaining']} of {progress['total']} prompts are not ranked "
                         "yet: rank them on the ranking page (`rlhf-ray compare-data --config "
                         "...` serves it), then run the pipeline again")


def make_demo_data(cfg: RunConfig) -> None:
    if cfg.data.demo is None:
        return
    run = RunFolder(cfg.run_dir)
    out = run.data
    if out.exists():
        missing = [k for k in DEMO_FILES if not run.demo_file(k).exists()]
        if missing:  # a run begun by an older version: add the files it lacks (deterministic)
            with tempfile.TemporaryDirectory(dir=cfg.run_dir, prefix=".data-") as tmp:
                write_demo_data(Path(tmp), cfg.data.demo)
                for kind in missing:
                    os.replace(Path(tmp) / run.demo_file(kind).name, run.demo_file(kind))
            log("data", f"{out} exists; added {', '.join(missing)}")
        else:
            log("data", f"{out} exists, skipped")
        return
    start = time.perf_counter()
    with atomic_folder(out) as tmp:
        written = write_demo_data(tmp, cfg.data.demo)
    size = sum((out / p.name).stat().st_size for p in written.values())
    log("data", f"wrote {len(written)} demo files ({size / 1e3:.0f} KB) to {out} "
        f"in {time.perf_counter() - start:.2f}s")


def check_data(cfg: RunConfig, kinds: list[str] | None = None) -> dict[str, int]:
    """Read and validate every configured record file before any work starts."""
    counts: dict[str, int] = {}
    problems: list[str] = []
    for kind, paths in data_files(cfg).items():
        if kinds is not None and kind not in kinds or not paths:
            continue
        try:
            counts[kind] = len(read_many(paths, RECORD_KINDS[kind]))
        except RecordError as e:
            problems += e.problems
    if problems:
        raise RecordError(problems)
    log("data", "records valid: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return counts


def pretrain_files(cfg: RunConfig, needed_for: str) -> list[Path]:
    paths = data_files(cfg)["pretrain"]
    if not paths:
        raise ValueError(f"no pretraining text to {needed_for}: set data.pretrain or data.demo, "
                         "or start from model.pretrained")
    return paths


def corpus_texts(cfg: RunConfig) -> list[str]:
    return [r.text for r in read_many(pretrain_files(cfg, "train the tokenizer on"), TextRecord)]


def make_tokenizer(cfg: RunConfig) -> ChatTokenizer:
    out = RunFolder(cfg.run_dir).tokenizer
    if out.exists():
        log("tokenizer", f"{out} exists, skipped")
        return load_tokenizer(out)
    if cfg.tokenizer.pretrained is not None:
        tokenizer = load_tokenizer(cfg.tokenizer.pretrained)
        log("tokenizer", f"using the tokenizer of {cfg.tokenizer.pretrained}")
    else:
        texts = corpus_texts(cfg)
        start = time.perf_counter()
        tokenizer = train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.pattern,
                              cfg.tokenizer.max_train_chars)
        chars = sum(len(t) for t in texts)
        log("tokenizer", f"trained a {tokenizer.vocab_size}-id BPE on {chars / 1e3:.0f}K characters "
            f"in {time.perf_counter() - start:.2f}s")
        if tokenizer.vocab_size < cfg.tokenizer.vocab_size:
            log("tokenizer", f"the corpus ran out of merges before vocab_size "
                f"{cfg.tokenizer.vocab_size}; the vocabulary has {tokenizer.vocab_size} ids")
    with atomic_folder(out) as tmp:
        tokenizer.save(tmp)
    if isinstance(tokenizer, BPETokenizer):
        sample = "What is the capital of France?"
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(sample)]
        log("tokenizer", f"{sample!r} -> {pieces}")
    log("tokenizer", f"saved to {out}")
    return tokenizer


def make_shards(cfg: RunConfig) -> None:
    run = RunFolder(cfg.run_dir)
    out = run.tokens
    if out.exists():
        log("shards", f"{out} exists, skipped")
        return
    files = pretrain_files(cfg, "pretrain on")
    start = time.perf_counter()
    meta = write_shards(files, run.tokenizer, out)
    splits = meta["splits"]
    log("shards", f"{meta['documents']} documents -> {splits['train']['tokens']:,} train and "
        f"{splits['val']['tokens']:,} val tokens ({meta['dtype']}) in {time.perf_counter() - start:.1f}s")


def train_model(cfg: RunConfig, stage: str) -> None:
    """Pretraining, SFT, reward or DPO training on Ray Train; skipped when its folder is complete."""
    out = RunFolder(cfg.run_dir).output(stage)
    if out.exists():
        log(stage, f"{out} exists, skipped")
        return
    if stage == "pretrain" and cfg.model.pretrained is not None:
        log(stage, f"starting from {cfg.model.pretrained}, no pretraining")
        return
    connect(cfg.cluster)
    if stage == "pretrain":
        make_shards(cfg)
        task = stages.pretrain_task(cfg)
    elif stage == "sft":
        task = stages.sft_task(cfg, data_files(cfg))
    else:
        files = reward_files(cfg)
        task = stages.reward_task(cfg, files) if stage == "reward" else stages.dpo_task(cfg, files)
        log(stage, f"{len(task.groups)} comparisons from {', '.join(p.name for p in files['reward'])}")
    start = time.perf_counter()
    with watch_stage(cfg, stage):
        metrics = stages.train_stage(task, cfg)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("loss", "eval")))
    log(stage, f"done in {time.perf_counter() - start:.0f}s ({summary}) -> {out}")


def train_rlhf(cfg: RunConfig) -> None:
    """PPO from sft/ against the reward; skipped when rlhf/ is complete."""
    out = RunFolder(cfg.run_dir).output("ppo")
    if out.exists():
        log("ppo", f"{out} exists, skipped")
        return
    connect(cfg.cluster)
    from rlhf_ray.rl.ppo import run_ppo  # imports vLLM, which the other stages do not need

    files = data_files(cfg)
    start = time.perf_counter()
    with watch_stage(cfg, "ppo"):
        run_ppo(cfg, files["rl"], files["rl_eval"], log=lambda message: log("ppo", message),
                log_step=lambda message: detail(f"[ppo] {message}"))
    log("ppo", f"done in {time.perf_counter() - start:.0f}s ({ppo_summary(cfg)}) -> {out}")


def ppo_summary(cfg: RunConfig) -> str:
    """The held-out reward and KL before and after PPO, from its metrics."""
    rows = [r for r in read_metrics(RunFolder(cfg.run_dir).metrics("ppo")) if "eval_reward_greedy" in r]
    if not rows:
        return "no held-out evaluation"
    first, last = rows[0], rows[-1]
    return (f"held-out greedy reward {first['eval_reward_greedy']:.3f} -> "
            f"{last['eval_reward_greedy']:.3f}, KL {last['eval_kl']:.3f}")


def pretrain(cfg: RunConfig) -> None:
    train_model(cfg, "pretrain")


def sft(cfg: RunConfig) -> None:
    train_model(cfg, "sft")


def reward(cfg: RunConfig) -> None:
    train_model(cfg, "reward")


def ppo(cfg: RunConfig) -> None:
    train_rlhf(cfg)


def dpo(cfg: RunConfig) -> None:
    """DPO when the config has a dpo section; the pipeline passes over it otherwise."""
    if cfg.dpo is None:
        detail("[dpo] not configured (no dpo section), skipped")
        return
    train_model(cfg, "dpo")


def dpo_alone(cfg: RunConfig) -> None:
    """`rlhf-ray dpo`: a config without a dpo section is an error rather than nothing to do."""
    stages.require_dpo(cfg)
    train_model(cfg, "dpo")


def make_data(cfg: RunConfig) -> None:
    """The demo records (when data.demo is set), then every record file validated."""
    make_demo_data(cfg)
    check_data(cfg)


def evaluate(cfg: RunConfig) -> None:
    """The evaluation across stages; skipped while eval/ is newer than every model it read."""
    from rlhf_ray.stage_eval import is_current, run_evaluation

    if is_current(cfg):
        log("eval", f"{RunFolder(cfg.run_dir).eval} is newer than every model, skipped")
        return
    run_evaluation(cfg, log=lambda message: log("eval", message))


def evaluate_again(cfg: RunConfig) -> None:
    """`rlhf-ray eval`: evaluate whatever the run has now."""
    from rlhf_ray.stage_eval import run_evaluation

    run_evaluation(cfg, log=lambda message: log("eval", message))


def report(cfg: RunConfig) -> None:
    from rlhf_ray.report import write_report

    log("report", f"wrote {write_report(cfg)}")


def run_stage(cfg: RunConfig, name: str) -> None:
    """One stage on its own: the run folder and its data first (only the records it reads are
    validated), then the cheap stages it builds on, then its work. A stage of a finished run
    (eval, report) leaves its config.yaml as it is."""
    this = stage(name)
    if not this.on_run:
        prepare_run(cfg)
    make_demo_data(cfg)
    if this.records:
        check_data(cfg, kinds=list(this.records))
    if this is STAGES[0]:  # the data stage is this preparation itself (make_data)
        return
    for first in this.first:
        stage(first).work()(cfg)
    this.work(alone=True)(cfg)


def stage_times(seconds: dict[str, float]) -> str:
    return f"{sum(seconds.values()):.0f}s: " + ", ".join(f"{n} {s:.0f}s" for n, s in seconds.items())


def run_pipeline(cfg: RunConfig, until: str = STAGES[-1].name) -> tuple[Path, dict[str, float]]:
    """Every stage in order up to `until`; the finished ones are skipped. Returns the run folder
    and the seconds each stage took."""
    run_dir = prepare_run(cfg)
    log("run", f"{run_dir} (config saved to {RunFolder(run_dir).config})")
    seconds = {}
    for this in stages_until(until):
        start = time.perf_counter()
        this.work()(cfg)
        seconds[this.name] = time.perf_counter() - start
    log("run", stage_times(seconds))
    return run_dir, seconds
