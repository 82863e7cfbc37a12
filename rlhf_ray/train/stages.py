"""Stages 1–3a and DPO on the driver: check and tokenize the inputs, then train on Ray Train.

Every input problem (a missing folder, a sequence longer than the context, too few workers) is
found here, before any worker starts; a stage's output folder appears only when it is complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf_ray.cluster import joins_cluster
from rlhf_ray.config import RunConfig
from rlhf_ray.data.readers import RecordError, read_many
from rlhf_ray.data.records import ChatRecord, ComparisonRecord
from rlhf_ray.modeling import check_model_folder
from rlhf_ray.run import RunFolder, base_model, stage
from rlhf_ray.tokenizer import ChatTokenizer, load_tokenizer, render_reply
from rlhf_ray.train.ray_stage import run_on_ray_train
from rlhf_ray.train.tasks import ChatExample, DPOTask, PretrainTask, RewardTask, SFTTask


def _too_long(where: str, what: str, length: int, limit: int) -> str:
    return (f"{where}: {what} is {length} tokens, longer than model.max_seq_len = {limit}; "
            "shorten or drop the record, or raise model.max_seq_len")


def chat_examples(records: list[ChatRecord], tokenizer: ChatTokenizer, max_len: int) -> list[ChatExample]:
    examples, problems = [], []
    for record in records:
        ids, mask = tokenizer.render_chat(record.messages)
        if len(ids) > max_len:
            problems.append(_too_long(record.where, "the conversation", len(ids), max_len))
        examples.append(ChatExample(np.array(ids, dtype=np.int32), np.array(mask, dtype=np.int8)))
    if problems:
        raise RecordError(problems)
    return examples


def preference_groups(records: list[ComparisonRecord], tokenizer: ChatTokenizer,
                      max_len: int) -> list[list[ChatExample]]:
    """Per comparison, the prompt followed by each response, best first, masked on what the
    response's assistant turns say (the tokens the reward model's likelihood and DPO read)."""
    groups, problems = [], []
    for record in records:
        group = []
        for rank, response in enumerate(record.responses):
            ids, mask = render_reply(tokenizer, record.prompt, response)
            if len(ids) > max_len:
                problems.append(_too_long(record.where, f"responses[{rank}] with its prompt", len(ids), max_len))
            group.append(ChatExample(np.array(ids, dtype=np.int32), np.array(mask, dtype=np.int8)))
        groups.append(group)
    if problems:
        raise RecordError(problems)
    return groups


def _require_model(folder: Path, name: str) -> None:
    """`folder` (what stage `name` starts from) is a complete model, or the error says which
    stage makes it."""
    try:
        check_model_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        made_by = stage(stage(name).needs[0])
        raise FileNotFoundError(f"{name} starts from {folder}, which is not usable ({e}); run "
                                f"`rlhf-ray {made_by.name}` ({made_by.help}) first") from None


def _records(files: dict[str, list[Path]], kind: str, record_type: type) -> list:
    if not files[kind]:
        raise ValueError(f"no {kind} records: set data.{kind} (or data.demo)")
    return read_many(files[kind], record_type)


def pretrain_task(cfg: RunConfig) -> PretrainTask:
    run = RunFolder(cfg.run_dir)
    task = PretrainTask(cfg, tokens_dir=run.tokens, tokenizer_dir=run.tokenizer,
                        out_dir=run.output("pretrain"))
    task.check_data()
    return task


def sft_task(cfg: RunConfig, files: dict[str, list[Path]]) -> SFTTask:
    init = base_model(cfg)
    _require_model(init, "sft")
    tokenizer = load_tokenizer(init)
    limit = cfg.model.max_seq_len
    return SFTTask(cfg, chat_examples(_records(files, "sft", ChatRecord), tokenizer, limit),
                   chat_examples(read_many(files["sft_eval"], ChatRecord), tokenizer, limit),
                   init_dir=init, out_dir=RunFolder(cfg.run_dir).output("sft"))


def reward_task(cfg: RunConfig, files: dict[str, list[Path]]) -> RewardTask:
    init = RunFolder(cfg.run_dir).output("sft")
    _require_model(init, "reward")
    tokenizer = load_tokenizer(init)
    limit = cfg.model.max_seq_len
    return RewardTask(cfg, preference_groups(_records(files, "reward", ComparisonRecord), tokenizer, limit),
                      preference_groups(read_many(files["reward_eval"], ComparisonRecord), tokenizer, limit),
                      init_dir=init, out_dir=RunFolder(cfg.run_dir).output("reward"))


def require_dpo(cfg: RunConfig) -> None:
    if cfg.dpo is None:
        raise ValueError("dpo is not configured: add a `dpo:` section to the config (e.g. "
                         "`dpo: {steps: 100, beta: 0.1}`, or --set dpo.steps=100)")


def dpo_task(cfg: RunConfig, files: dict[str, list[Path]]) -> DPOTask:
    require_dpo(cfg)
    init = RunFolder(cfg.run_dir).output("sft")
    _require_model(init, "dpo")
    tokenizer = load_tokenizer(init)
    limit = cfg.model.max_seq_len
    records = read_many(files["reward"], ComparisonRecord)
    if not records:
        where = ", ".join(map(str, files["reward"])) or "no files"
        raise ValueError(f"dpo trains on comparisons, but there are none (data.reward: {where}): "
                         "set data.reward (chosen/rejected or ranked responses), data.demo or compare")
    return DPOTask(cfg, preference_groups(records, tokenizer, limit),
                   preference_groups(read_many(files["reward_eval"], ComparisonRecord), tokenizer, limit),
                   init_dir=init, out_dir=RunFolder(cfg.run_dir).output("dpo"))


def train_stage(task: PretrainTask | SFTTask | RewardTask | DPOTask, cfg: RunConfig) -> dict:
    run = RunFolder(cfg.run_dir)
    return run_on_ray_train(task, storage=run.checkpoints(), metrics_path=run.metrics(task.name),
                            autoscaling=joins_cluster(cfg.cluster))
