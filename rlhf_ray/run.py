"""The run folder and the stages that fill it: the one module that knows where everything lives.

    runs/<name>/config.yaml            the resolved config
    runs/<name>/data/                  the generated demo records (data.demo); data/tokens/: shards
    runs/<name>/tokenizer/             stage 0
    runs/<name>/base/ sft/ reward/ rlhf/   stages 1, 2, 3a, 3b: Hugging Face folders
    runs/<name>/dpo/                   DPO from sft/ on the comparisons (when configured)
    runs/<name>/compare/               SFT samples and their rankings (reward-model data)
    runs/<name>/checkpoints/<stage>/   resumable state
    runs/<name>/metrics/<stage>.jsonl  one JSON object per step
    runs/<name>/tensorboard/<stage>/   the same metrics as TensorBoard event files
    runs/<name>/logs/                  everything Ray, vLLM and the stages printed (driver.log)
    runs/<name>/wandb/                 W&B's runs, when tracking.wandb is set
    runs/<name>/eval/                  the evaluation across stages: stages.json, .md, .png
    runs/<name>/report.md, plots/      the run's report

A stage is one entry of STAGES plus the function that does its work (`task`); the pipeline runs
them in order, the CLI's and the jobs' commands are their names, and every other module asks
here for a stage's folder or metrics file.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf_ray.data.records import ChatRecord, ComparisonRecord, PromptRecord, TextRecord

# What each record kind holds; its demo file is data/<kind>.jsonl, its config key data.<kind>.
RECORD_KINDS: dict[str, type] = {
    "pretrain": TextRecord,
    "sft": ChatRecord,
    "sft_eval": ChatRecord,
    "reward": ComparisonRecord,
    "reward_eval": ComparisonRecord,
    "rl": PromptRecord,
    "rl_eval": PromptRecord,
}
DEMO_FILES = (*RECORD_KINDS, "compare")  # the demo also writes the prompts compare-data samples


def record_file(folder: Path, kind: str) -> Path:
    """Where a folder of records (the demo's data/) keeps those of one kind."""
    return folder / f"{kind}.jsonl"


@dataclass(frozen=True)
class Stage:
    """One step of the chain from raw text to a served assistant."""

    name: str  # its command: `rlhf-ray <name>`, `jobs/stage.py <name>`, `pipeline --until <name>`
    help: str
    task: str  # "module:function(cfg)" that does the work, skipping it when `folder` is complete
    folder: str  # what it leaves in the run folder (a folder, or report.md)
    records: tuple[str, ...] = ()  # the record kinds it reads, validated before it starts
    first: tuple[str, ...] = ()  # cheap stages run first when it is run alone
    needs: tuple[str, ...] = ()  # stages whose output it starts from
    metrics: bool = False  # it writes metrics/<name>.jsonl, one row per step of cfg.<name>.steps
    # The metrics its progress line shows: what it optimises, and how fast it goes.
    shows: tuple[str, str] = ("loss", "tokens_per_s")
    alone: str | None = None  # "module:function(cfg)" instead of `task` when run on its own
    on_run: bool = False  # its command takes a finished run folder (--run) rather than a config
    serves: Literal["document", "chat", "score"] | None = None  # how Serve exposes its model

    def work(self, alone: bool = False) -> Callable[[Any], None]:
        """The function that runs it (given the RunConfig): `alone` when run on its own."""
        module, _, name = (self.alone if alone and self.alone else self.task).partition(":")
        return getattr(importlib.import_module(module), name)


STAGES: tuple[Stage, ...] = (
    Stage("data", "write the demo data (if configured) and validate every record file",
          "rlhf_ray.pipeline:make_data", "data", records=tuple(RECORD_KINDS)),
    Stage("tokenizer", "stage 0: train (or adopt) the tokenizer", "rlhf_ray.pipeline:make_tokenizer",
          "tokenizer", records=("pretrain",)),
    Stage("pretrain", "stage 1: pretrain base/ on Ray Train", "rlhf_ray.pipeline:pretrain", "base",
          records=("pretrain",), first=("tokenizer",), metrics=True, serves="document"),
    Stage("sft", "stage 2: supervised finetuning base/ -> sft/ on Ray Train", "rlhf_ray.pipeline:sft",
          "sft", records=("sft", "sft_eval"), needs=("pretrain",), metrics=True, serves="chat"),
    Stage("compare-data", "sample K responses per prompt from sft/ with vLLM on Ray and rank them "
          "(compare.labeler: a function, or people on the ranking page served until all are "
          "ranked)", "rlhf_ray.pipeline:make_comparisons", "compare", needs=("sft",),
          alone="rlhf_ray.cli:collect_and_rank"),
    Stage("reward", "stage 3a: reward model sft/ -> reward/ on Ray Train", "rlhf_ray.pipeline:reward",
          "reward", records=("reward", "reward_eval"), needs=("sft",), metrics=True, serves="score"),
    Stage("ppo", "stage 3b: PPO sft/ -> rlhf/ against the reward, on Ray actors with vLLM",
          "rlhf_ray.pipeline:ppo", "rlhf", records=("rl", "rl_eval"), needs=("sft", "reward"),
          metrics=True, serves="chat", shows=("reward_mean", "rollout_tokens_per_s")),
    Stage("dpo", "DPO sft/ -> dpo/ on the comparisons, on Ray Train (the alternative to 3a + 3b; "
          "runs when the config has a dpo section)", "rlhf_ray.pipeline:dpo", "dpo",
          records=("reward", "reward_eval"), needs=("sft",), metrics=True, serves="chat",
          alone="rlhf_ray.pipeline:dpo_alone"),
    Stage("eval", "evaluate base (0/1/3/5-shot), SFT, RLHF (and DPO) on held-out questions: "
          "<run>/eval/stages.{md,json,png}", "rlhf_ray.pipeline:evaluate", "eval",
          records=("rl_eval", "sft"), needs=("pretrain", "sft", "ppo", "dpo"), on_run=True,
          alone="rlhf_ray.pipeline:evaluate_again"),
    Stage("report", "write <run>/report.md: each stage's curves and numbers, and the evaluation "
          "across stages", "rlhf_ray.pipeline:report", "report.md", needs=("eval",), on_run=True),
)
_BY_NAME = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    if name not in _BY_NAME:
        raise ValueError(f"{name!r} is not a stage; the stages are {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def stages_until(name: str) -> tuple[Stage, ...]:
    """The stages in order, up to and including `name`."""
    return STAGES[: STAGES.index(stage(name)) + 1]


def model_stages(serves: str | None = None) -> tuple[str, ...]:
    """The served models' names (their folders), in the chain's order; e.g. ("base", "sft",
    "rlhf") for the chat deployments, ("reward",) for the scorer."""
    kinds = ("document", "chat") if serves is None else (serves,)
    return tuple(s.folder for s in STAGES if s.serves in kinds)


CHAT_MODELS = model_stages()  # what `/v1/chat/completions` serves
REWARD_MODEL = model_stages("score")[0]
MODELS = (*CHAT_MODELS, REWARD_MODEL)


def serves_as(model: str) -> str:
    """How a served model reads a conversation: "document" (continues text) or "chat"."""
    return next(s.serves for s in STAGES if s.folder == model and s.serves)


@dataclass(frozen=True)
class RunFolder:
    """Where a run keeps each thing; `RunFolder(cfg.run_dir)`."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def output(self, name: str) -> Path:
        """What stage `name` leaves, e.g. output("ppo") is rlhf/."""
        return self.root / stage(name).folder

    def model(self, name: str) -> Path:
        """The folder of served model `name` (base, sft, rlhf, reward)."""
        if name not in MODELS:
            raise ValueError(f"{name!r} is not a model of a run; they are {', '.join(MODELS)}")
        return self.root / name

    def metrics(self, name: str) -> Path:
        if not stage(name).metrics:
            raise ValueError(f"stage {name!r} writes no metrics")
        return self.root / "metrics" / f"{name}.jsonl"

    def tensorboard(self, name: str) -> Path:
        """The TensorBoard event files of stage `name` (the same rows as its metrics file)."""
        self.metrics(name)  # only a stage that writes metrics has them
        return self.root / "tensorboard" / name

    @property
    def wandb(self) -> Path:
        """W&B's runs (offline ones wait here for `wandb sync`)."""
        return self.root / "wandb"

    @property
    def logs(self) -> Path:
        """What Ray, vLLM and the stages printed, when the console shows only progress."""
        return self.root / "logs"

    def checkpoints(self, name: str | None = None) -> Path:
        """Ray Train's storage for all training stages (None), or PPO's own (`ppo`)."""
        return self.root / "checkpoints" / (name or "")

    @property
    def data(self) -> Path:
        return self.output("data")

    def demo_file(self, kind: str) -> Path:
        return record_file(self.data, kind)

    @property
    def tokens(self) -> Path:
        return self.data / "tokens"

    @property
    def tokenizer(self) -> Path:
        return self.output("tokenizer")

    @property
    def compare(self) -> Path:
        return self.output("compare-data")

    @property
    def eval(self) -> Path:
        return self.output("eval")

    @property
    def report(self) -> Path:
        return self.output("report")

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def data_files(cfg: Any) -> dict[str, list[Path]]:
    """Each stage's record files: the configured ones, else the generated demo files."""
    files = {kind: list(getattr(cfg.data, kind)) for kind in RECORD_KINDS}
    if cfg.data.demo is not None:
        for kind, paths in files.items():
            if not paths:
                paths.append(RunFolder(cfg.run_dir).demo_file(kind))
    return files


def base_model(cfg: Any) -> Path:
    """The model SFT starts from: model.pretrained when given, else this run's base/."""
    return cfg.model.pretrained or RunFolder(cfg.run_dir).output("pretrain")


def steps_of(cfg: Any, name: str) -> int:
    """How many steps (rows of its metrics file) stage `name` runs: its section's `steps`."""
    stage(name)
    section = getattr(cfg, name)
    if section is None:  # an optional stage (dpo) left out of the config never runs
        raise ValueError(f"stage {name!r} is not configured: add a `{name}:` section to the config")
    return section.steps


def append_metrics(path: Path | None, row: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """A metrics file's rows ([] when the stage has not written one)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics_before(path: Path, step: int) -> None:
    """Drop metric lines after `step`: a resumed run writes those steps again, once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
