"""The run's report: what each stage learned and what each model says, side by side.

Written to <run>/report.md with the training curves in <run>/plots/training_curves.png, from the
metrics files and metrics/eval.json the pipeline leaves (nothing is retrained). The sample answers
are greedy, to held-out questions (rl_eval) that SFT and PPO never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray import evaluate
from rlhf_ray.config import RunConfig
from rlhf_ray.data.readers import read_many
from rlhf_ray.data.records import PromptRecord
from rlhf_ray.tokenizer import load_tokenizer


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_curves(run_dir: Path) -> Path:
    """One PNG, a panel per stage: losses (train and held-out), RM accuracy, PPO reward and KL."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [("pretrain", ["loss", "eval_loss"]), ("sft", ["loss", "eval_loss"]),
              ("reward", ["loss", "eval_loss", "eval_accuracy"]),
              ("ppo", ["reward_mean", "eval_reward_greedy", "kl"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (stage, keys) in zip(axes, panels):
        rows = read_metrics(run_dir / "metrics" / f"{stage}.jsonl")
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval_") else None,
                        markersize=3, label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    out = run_dir / "plots" / "training_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def side_by_side(cfg: RunConfig, prompt_files: list[Path], count: int = 6) -> list[dict[str, str]]:
    """`count` held-out questions spread over the file: base's continuation of the question as a
    document, SFT's and RLHF's replies, and the reference answer."""
    records = [r for r in read_many(prompt_files, PromptRecord) if len(r.prompt) == 1]
    records = records[:: max(1, len(records) // count)][:count]
    rows = [{"question": r.prompt[0].content, "answer": r.ground_truth or ""} for r in records]
    for stage in ("base", "sft", "rlhf"):
        folder = cfg.run_dir / stage
        if not (folder / "config.json").exists():
            continue
        if stage == "base":  # the question as a document line, continued; one batch
            tokenizer = load_tokenizer(folder)
            documents = [tokenizer.encode_document(row["question"] + "\n") for row in rows]
            replies = [tokenizer.decode(ids)
                       for ids in evaluate.generate_greedy(folder, documents, max_new_tokens=24)]
        else:
            replies = evaluate.chat_replies(folder, [r.prompt for r in records])
        for row, reply in zip(rows, replies):
            row[stage] = reply
    return rows


def cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "∅"


def stage_table(run_dir: Path) -> list[str]:
    lines = ["| stage | steps | train loss (first → last) | held-out loss (last) | also |",
             "|---|---:|---|---:|---|"]
    for stage in ("pretrain", "sft", "reward"):
        rows = read_metrics(run_dir / "metrics" / f"{stage}.jsonl")
        losses = [r["loss"] for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        if not losses:
            continue
        also = (f"held-out pairwise accuracy {evals[-1]['eval_accuracy']:.2f}"
                if evals and "eval_accuracy" in evals[-1] else "")
        held_out = f"{evals[-1]['eval_loss']:.3f}" if evals else "–"
        lines.append(f"| {stage} | {rows[-1]['step']} | {losses[0]:.3f} → {losses[-1]:.3f} | "
                     f"{held_out} | {also} |")
    ppo = read_metrics(run_dir / "metrics" / "ppo.jsonl")
    evals = [r for r in ppo if "eval_reward_greedy" in r]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        lines.append(
            f"| ppo | {last['step']} | reward (greedy, held-out) {first['eval_reward_greedy']:.3f} "
            f"→ {last['eval_reward_greedy']:.3f} | – | sampled reward "
            f"{first['eval_reward_sampled']:.3f} → {last['eval_reward_sampled']:.3f}, KL "
            f"{last['eval_kl']:.3f}, exact match {first['eval_exact_match']:.0%} → "
            f"{last['eval_exact_match']:.0%} |")
    return lines


def stages_section(run_dir: Path) -> list[str]:
    """The evaluation across stages (rlhf_ray.stage_eval), if it was run: its table, the talk's
    claims and the chart, taken from eval/stages.md so the two never disagree."""
    stages_md = run_dir / "eval" / "stages.md"
    if not stages_md.exists():
        return []
    body = stages_md.read_text(encoding="utf-8").splitlines()[1:]  # without its title
    return ["", "## Evaluation across stages",
            *(line.replace("](stages.png)", "](eval/stages.png)") for line in body)]


def write_report(cfg: RunConfig, prompt_files: list[Path]) -> Path:
    """report.md (and the plot it shows) for the run; returns its path."""
    run_dir = cfg.run_dir
    plot = plot_curves(run_dir)
    lines = [f"# Run `{cfg.name}`", "", "## What each stage learned", "", *stage_table(run_dir), "",
             f"![training curves]({plot.relative_to(run_dir)})", "",
             "## The same held-out questions to each model (greedy)", "",
             "The base model only continues the question as a document; SFT answers; RLHF is SFT "
             "tuned against the reward model.", "",
             "| question | base continues | SFT | RLHF | reference |", "|---|---|---|---|---|"]
    for row in side_by_side(cfg, prompt_files):
        lines.append(" | ".join(["", *(cell(row.get(k, "–")) for k in
                                      ("question", "base", "sft", "rlhf", "answer")), ""]).strip())
    eval_json = run_dir / "metrics" / "eval.json"
    if eval_json.exists():
        report = json.loads(eval_json.read_text())
        rates = {s: report[s]["held_out_exact_match"] for s in ("sft", "rlhf")
                 if "held_out_exact_match" in report.get(s, {})}
        if rates:
            lines += ["", "Exact match on all held-out questions: " + ", ".join(
                f"{s} {r['rate']:.0%} of {r['count']}" for s, r in rates.items()) + "."]
    lines += stages_section(run_dir)
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
