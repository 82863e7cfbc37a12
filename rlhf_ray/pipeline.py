"""The run folder and the stages that fill it, in order; a finished stage is skipped on re-run.

    runs/<name>/config.yaml   the resolved config
    runs/<name>/data/         generated demo records (when data.demo is set)
    runs/<name>/tokenizer/    stage 0
    runs/<name>/data/tokens/  the pretraining corpus as token shards
    runs/<name>/base/ sft/ reward/ rlhf/  stages 1, 2, 3a, 3b (Hugging Face folders)
    runs/<name>/checkpoints/<stage>/      resumable Ray Train state (ppo: see rl/ppo.py)
    runs/<name>/metrics/<stage>.jsonl     one JSON object per step
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from rlhf_ray.cluster import connect
from rlhf_ray.config import RunConfig, save_config
from rlhf_ray.data.shards import write_shards
from rlhf_ray.data.demo import write_demo_data
from rlhf_ray.data.readers import RecordError, read_many
from rlhf_ray.data.records import ChatRecord, ComparisonRecord, Message, PromptRecord, TextRecord
from rlhf_ray.storage import atomic_folder
from rlhf_ray.train import stages
from rlhf_ray.tokenizer import BPETokenizer, ChatTokenizer, load_tokenizer, train_bpe

DEMO_FILES = ("pretrain", "sft", "sft_eval", "reward", "reward_eval", "rl", "rl_eval", "compare")
RECORD_KINDS = {
    "pretrain": TextRecord,
    "sft": ChatRecord,
    "sft_eval": ChatRecord,
    "reward": ComparisonRecord,
    "reward_eval": ComparisonRecord,
    "rl": PromptRecord,
    "rl_eval": PromptRecord,
}


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", flush=True)


def prepare_run(cfg: RunConfig) -> Path:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def data_files(cfg: RunConfig) -> dict[str, list[Path]]:
    """Each stage's record files: the configured ones, else the generated demo files."""
    files = {kind: list(getattr(cfg.data, kind)) for kind in RECORD_KINDS}
    if cfg.data.demo is not None:
        demo_dir = cfg.run_dir / "data"
        for kind, paths in files.items():
            if not paths:
                paths.append(demo_dir / f"{kind}.jsonl")
    return files


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

    if (cfg.run_dir / "reward").exists():
        log("compare", "reward/ exists, skipped")
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
    out = cfg.run_dir / "data"
    if out.exists():
        missing = [k for k in DEMO_FILES if not (out / f"{k}.jsonl").exists()]
        if missing:  # a run begun by an older version: add the files it lacks (deterministic)
            with tempfile.TemporaryDirectory(dir=cfg.run_dir, prefix=".data-") as tmp:
                write_demo_data(Path(tmp), cfg.data.demo)
                for kind in missing:
                    os.replace(Path(tmp) / f"{kind}.jsonl", out / f"{kind}.jsonl")
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
    out = cfg.run_dir / "tokenizer"
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
    out = cfg.run_dir / "data" / "tokens"
    if out.exists():
        log("shards", f"{out} exists, skipped")
        return
    files = pretrain_files(cfg, "pretrain on")
    start = time.perf_counter()
    meta = write_shards(files, cfg.run_dir / "tokenizer", out)
    splits = meta["splits"]
    log("shards", f"{meta['documents']} documents -> {splits['train']['tokens']:,} train and "
        f"{splits['val']['tokens']:,} val tokens ({meta['dtype']}) in {time.perf_counter() - start:.1f}s")


def train_model(cfg: RunConfig, stage: str) -> None:
    """Pretraining, SFT or reward training on Ray Train; skipped when its folder is complete."""
    out = cfg.run_dir / {"pretrain": "base", "sft": "sft", "reward": "reward"}[stage]
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
        task = stages.reward_task(cfg, files)
        log(stage, f"{len(task.groups)} comparisons from {', '.join(p.name for p in files['reward'])}")
    start = time.perf_counter()
    metrics = stages.train_stage(task, cfg)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("loss", "eval")))
    log(stage, f"done in {time.perf_counter() - start:.0f}s ({summary}) -> {out}")


def train_rlhf(cfg: RunConfig) -> None:
    """PPO from sft/ against the reward; skipped when rlhf/ is complete."""
    out = cfg.run_dir / "rlhf"
    if out.exists():
        log("ppo", f"{out} exists, skipped")
        return
    connect(cfg.cluster)
    from rlhf_ray.rl.ppo import run_ppo  # imports vLLM, which the other stages do not need

    files = data_files(cfg)
    start = time.perf_counter()
    run_ppo(cfg, files["rl"], files["rl_eval"], log=lambda message: log("ppo", message))
    log("ppo", f"done in {time.perf_counter() - start:.0f}s -> {out}")


def ppo_before_after(metrics: Path) -> dict:
    """The first and the last held-out evaluation of a PPO run (step 0 is the SFT model)."""
    evals = [m for m in map(json.loads, metrics.read_text().splitlines()) if "eval_reward_greedy" in m]
    if not evals:
        return {}
    keys = [k for k in evals[0] if k.startswith("eval_")]
    return {k.removeprefix("eval_"): {"before": evals[0][k], "after": evals[-1][k]} for k in keys
            } | {"steps": {"before": evals[0]["step"], "after": evals[-1]["step"]}}


def report_models(cfg: RunConfig) -> dict:
    """What base/, sft/ and rlhf/ do with the demo question; held-out exact match and PPO's
    before/after on held-out prompts."""
    from rlhf_ray import evaluate

    report: dict = {}
    question = evaluate.DEMO_QUESTION
    base = stages.base_dir(cfg)
    if base.exists():
        # A document line ends with its newline ("?\n" is one token; a bare "?" rarely ends a line).
        text = evaluate.continue_document(base, question + "\n")
        report["base"] = {"question": question, "continuation": text}
        log("eval", f"base continues the document {question!r} with: {text!r}")
    held_out = data_files(cfg)["rl_eval"]
    for stage in ("sft", "rlhf"):
        folder = cfg.run_dir / stage
        if not folder.exists():
            continue
        reply = evaluate.chat_replies(folder, [[Message(role="user", content=question)]])[0]
        report[stage] = {"question": question, "reply": reply}
        log("eval", f"{stage} answers {question!r} with: {reply!r}")
        if held_out:
            result = evaluate.exact_match(folder, read_many(held_out, PromptRecord))
            report[stage]["held_out_exact_match"] = asdict(result)
            log("eval", f"{stage} exact match on {result.count} held-out prompts: {result.rate:.0%}")
    if "rlhf" in report:
        ppo_metrics = cfg.run_dir / "metrics" / "ppo.jsonl"
        if ppo_metrics.exists() and (comparison := ppo_before_after(ppo_metrics)):
            report["rlhf"]["held_out_before_after_ppo"] = comparison
            log("eval", "held-out, SFT -> RLHF: " + ", ".join(
                f"{k} {v['before']:.3g} -> {v['after']:.3g}" for k, v in comparison.items()
                if k in ("reward_greedy", "reward_sampled", "kl", "exact_match")))
    metrics = cfg.run_dir / "metrics" / "reward.jsonl"
    if metrics.exists():
        final = json.loads(metrics.read_text().splitlines()[-1])
        if "eval_accuracy" in final:
            report["reward"] = {"held_out_pairwise_accuracy": final["eval_accuracy"]}
            log("eval", f"reward model pairwise accuracy on held-out comparisons: {final['eval_accuracy']:.2f}")
    evaluate.save_report(cfg.run_dir / "metrics" / "eval.json", report)
    return report


def run_pipeline(cfg: RunConfig) -> Path:
    """Every stage that is built so far, in order."""
    run_dir = prepare_run(cfg)
    log("run", f"{run_dir} (config saved to {run_dir / 'config.yaml'})")
    make_demo_data(cfg)
    check_data(cfg)
    make_tokenizer(cfg)
    for stage in ("pretrain", "sft"):
        train_model(cfg, stage)
    make_comparisons(cfg)
    train_model(cfg, "reward")
    train_rlhf(cfg)
    report_models(cfg)
    return run_dir
