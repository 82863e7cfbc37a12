"""The run's report: what each stage learned and what each model says, side by side.

<run>/report.md and <run>/plots/training_curves.png, rendered from the metrics files and the
evaluation across stages (eval/stages.json, rlhf_ray.stage_eval); nothing is generated here, so
the report and the evaluation always show the same replies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlhf_ray.config import RunConfig
from rlhf_ray.run import STAGES, RunFolder, read_metrics
from rlhf_ray.stage_eval import DPO, RLHF, SFT, shots
from rlhf_ray.storage import write_text_atomic

CURVES = ("loss", "eval_loss", "eval_accuracy", "margin", "eval_margin", "reward_mean",
          "eval_reward_greedy", "kl")
SIDE_BY_SIDE = {shots(0): "base continues", SFT: "SFT", RLHF: "RLHF"}  # variant -> column


def metric_stages(cfg: RunConfig) -> list[str]:
    """The training stages of this config (an optional one, dpo, only when configured)."""
    return [s.name for s in STAGES if s.metrics and getattr(cfg, s.name, None) is not None]


def plot_curves(run: RunFolder, names: list[str]) -> Path:
    """One PNG, a panel per training stage with whichever of CURVES it logs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = read_metrics(run.metrics(name))
        for key in CURVES:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval_") else None,
                        markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    out = run.plots / "training_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    os.replace(tmp, out)
    return out


def ppo_before_after(metrics: Path) -> dict[str, dict[str, float]]:
    """The first and the last held-out evaluation of an RL run (step 0 is the SFT model)."""
    evals = [m for m in read_metrics(metrics) if "eval_reward_greedy" in m]
    if not evals:
        return {}
    keys = [k for k in evals[0] if k.startswith("eval_")]
    return {k.removeprefix("eval_"): {"before": evals[0][k], "after": evals[-1][k]} for k in keys
            } | {"steps": {"before": evals[0]["step"], "after": evals[-1]["step"]}}


def cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "∅"


def stage_table(run: RunFolder, names: list[str]) -> list[str]:
    lines = ["| stage | steps | train loss (first → last) | held-out loss (last) | also |",
             "|---|---:|---|---:|---|"]
    for name in names:
        rows = read_metrics(run.metrics(name))
        losses = [r["loss"] for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        if (change := ppo_before_after(run.metrics(name))) and change["steps"]["after"] > 0:
            lines.append(
                f"| {name} | {rows[-1]['step']} | reward (greedy, held-out) "
                f"{change['reward_greedy']['before']:.3f} → {change['reward_greedy']['after']:.3f} | – "
                f"| sampled reward {change['reward_sampled']['before']:.3f} → "
                f"{change['reward_sampled']['after']:.3f}, KL {change['kl']['after']:.3f}, exact match "
                f"{change['exact_match']['before']:.0%} → {change['exact_match']['after']:.0%} |")
        elif losses:
            also = (f"held-out pairwise accuracy {evals[-1]['eval_accuracy']:.3f}"
                    if evals and "eval_accuracy" in evals[-1] else "")
            if evals and "eval_margin" in evals[-1]:  # DPO's implicit reward beta * log pi/ref
                also += f", implicit reward margin {evals[-1]['eval_margin']:.3f}"
            held_out = f"{evals[-1]['eval_loss']:.3f}" if evals else "–"
            lines.append(f"| {name} | {rows[-1]['step']} | {losses[0]:.3f} → {losses[-1]:.3f} | "
                         f"{held_out} | {also} |")
    return lines


def side_by_side(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation's sample questions, each model's reply in a column, and the reference."""
    variants = {v["name"]: v for v in evaluation["variants"]}
    columns = SIDE_BY_SIDE | ({DPO: "DPO"} if DPO in variants else {})
    questions: dict[str, dict[str, str]] = {}
    for name in columns:
        for sample in variants.get(name, {}).get("samples", []):
            row = questions.setdefault(sample["question"], {"reference": sample["reference"] or ""})
            row[name] = sample["reply"]
    lines = ["| question | " + " | ".join(columns.values()) + " | reference |",
             "|---" * (len(columns) + 2) + "|"]
    for question, row in questions.items():
        cells = [question, *(row.get(name, "–") for name in columns), row["reference"]]
        lines.append("| " + " | ".join(map(cell, cells)) + " |")
    scored = [f"{name} {variants[name]['exact_match']:.0%} of {variants[name]['count']}"
              for name in (SFT, RLHF, DPO) if name in variants]
    if scored:
        lines += ["", "Exact match on all held-out questions: " + ", ".join(scored) + "."]
    return lines


def ppo_and_dpo(run: RunFolder, evaluation: dict[str, Any]) -> list[str]:
    """PPO and DPO side by side: both start from SFT and learn from the same comparisons, PPO
    through the reward model trained on them, DPO directly (empty unless the run has both)."""
    variants = {v["name"]: v for v in evaluation["variants"]}
    if RLHF not in variants or DPO not in variants:
        return []

    def held_out_accuracy(name: str) -> str:
        rows = [r for r in read_metrics(run.metrics(name)) if "eval_accuracy" in r]
        return f"{rows[-1]['eval_accuracy']:.3f}" if rows else "–"

    def number(name: str, key: str) -> str:
        value = variants[name].get(key)
        return "–" if value is None else f"{value:.3f}"

    lines = ["", "## PPO and DPO from the same comparisons", "",
             "Both start from SFT and learn from the same ranked responses: PPO through the reward "
             "model trained on them, DPO from the rankings directly, with SFT as its reference. "
             "Held-out preference accuracy: the reward model's, and DPO's implicit reward's.", "",
             "| model | held-out preference accuracy | exact match | RM score | KL to SFT | answers |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, trained_by in ((RLHF, "reward"), (DPO, "dpo")):
        lines.append(f"| {name} | {held_out_accuracy(trained_by)} | {number(name, 'exact_match')} | "
                     f"{number(name, 'reward')} | {number(name, 'kl_to_sft')} | {number(name, 'answers')} |")
    return lines


def stages_section(run: RunFolder) -> list[str]:
    """The evaluation across stages: its table, the talk's claims and the chart, taken from
    eval/stages.md so the two never disagree."""
    body = (run.eval / "stages.md").read_text(encoding="utf-8").splitlines()[1:]  # without its title
    link = run.eval.relative_to(run.root)
    return ["", "## Evaluation across stages",
            *(line.replace("](stages.png)", f"]({link}/stages.png)") for line in body)]


def render(cfg: RunConfig) -> str:
    run = RunFolder(cfg.run_dir)
    names = metric_stages(cfg)
    plot = plot_curves(run, names)
    lines = [f"# Run `{cfg.name}`", "", "## What each stage learned", "", *stage_table(run, names), "",
             f"![training curves]({plot.relative_to(run.root)})", ""]
    evaluation = run.eval / "stages.json"
    if not evaluation.exists():
        return "\n".join(lines + [f"No evaluation yet: `rlhf-ray eval --run {run.root}` writes it."])
    result = json.loads(evaluation.read_text(encoding="utf-8"))
    dpo = " DPO is SFT tuned on the comparisons directly." if DPO in {v["name"] for v in result["variants"]} else ""
    lines += ["## The same held-out questions to each model (greedy)", "",
              "The base model only continues the question as a document; SFT answers; RLHF is SFT "
              f"tuned against the reward model.{dpo}", "",
              *side_by_side(result), *ppo_and_dpo(run, result), *stages_section(run)]
    return "\n".join(lines)


def write_report(cfg: RunConfig) -> Path:
    """report.md (and the plot it shows) for the run; returns its path."""
    out = RunFolder(cfg.run_dir).report
    write_text_atomic(out, render(cfg) + "\n")
    return out
