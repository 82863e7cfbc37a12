"""The three training stages as `Task`s for the shared loop: pretraining, SFT, reward modelling.

Each batch is a pure function of (seed, step, rank): pretraining samples random windows of the
token shards; SFT and reward training walk a seeded permutation of their examples, epoch after
epoch. Tasks are plain picklable objects: Ray Train ships them to its workers as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from rlhf_ray.config import RunConfig, TrainStage
from rlhf_ray.data.shards import open_split
from rlhf_ray.modeling import (
    count_parameters,
    load_policy,
    load_scalar_model,
    new_policy,
    pad,
    save_model,
    sequence_scores,
)
from rlhf_ray.tokenizer import load_tokenizer
from rlhf_ray.train.flops import flops_per_token
from rlhf_ray.train.loop import Batch
from rlhf_ray.train.losses import IGNORE, bradley_terry_loss, lm_loss, shifted_labels

Sequence = np.ndarray  # token ids of one example


def worker_slice(items: list, rank: int, world: int) -> list:
    """This worker's contiguous share of `items`; the shares differ by at most one and cover all."""
    if len(items) < world:
        raise ValueError(f"a global batch of {len(items)} cannot give each of {world} workers an "
                         "example: make batch_size at least resources.num_workers")
    return items[rank * len(items) // world : (rank + 1) * len(items) // world]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def epoch_order(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the global batch of `step`: consecutive slices of a new permutation each epoch."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    permutations: dict[int, np.ndarray] = {}
    order = []
    for position in positions:
        epoch, offset = divmod(position, num_items)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, epoch]).permutation(num_items)
        order.append(int(permutations[epoch][offset]))
    return order


class _LanguageModelTask:
    """What pretraining and SFT share: a causal LM trained on next-token loss."""

    name: str
    stage: TrainStage
    seq_len: int

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return lm_loss(logits, batch["labels"])

    def units(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return flops_per_token(model.config, self.seq_len, count_parameters(model))

    def mean_loss(self, model: torch.nn.Module, batches: list[Batch]) -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                device = next(model.parameters()).device
                loss, n = self.loss(model, {k: v.to(device) for k, v in batch.items()})
                total, count = total + loss.item(), count + int(n)
        return total / max(count, 1)


@dataclass
class PretrainTask(_LanguageModelTask):
    cfg: RunConfig
    tokens_dir: Path
    tokenizer_dir: Path
    out_dir: Path
    eval_windows: int = 64
    name: str = "pretrain"

    def __post_init__(self) -> None:
        self.stage = self.cfg.pretrain
        self.seq_len = self.cfg.pretrain.seq_len

    def build_model(self) -> torch.nn.Module:
        return new_policy(self.cfg.model, load_tokenizer(self.tokenizer_dir), seed=self.cfg.seed)

    def check_data(self) -> None:
        """Fail on the driver, before any worker starts, if a split cannot fill one sequence."""
        for split in ("train", "val"):
            self._windows(split, np.random.default_rng(0), 1)

    def _windows(self, split: str, rng: np.random.Generator, count: int,
                 rank: int = 0, world: int = 1) -> list[torch.Tensor]:
        """`count` random windows of seq_len + 1 tokens; this worker reads only its slice."""
        shards = open_split(self.tokens_dir, split)
        room = np.array([max(len(s) - self.seq_len - 1, 0) for s in shards], dtype=np.float64)
        if room.sum() == 0:
            raise ValueError(f"{self.tokens_dir}: the {split} split is shorter than one sequence "
                             f"of pretrain.seq_len + 1 = {self.seq_len + 1} tokens")
        picks = rng.choice(len(shards), size=count, p=room / room.sum())
        starts = [(int(i), int(rng.integers(0, room[i]))) for i in picks]
        return [torch.from_numpy(shards[i][start : start + self.seq_len + 1].astype(np.int64))
                for i, start in worker_slice(starts, rank, world)]

    def _lm_batches(self, windows: list[torch.Tensor]) -> list[Batch]:
        return [{"input_ids": torch.stack(c)[:, :-1], "labels": torch.stack(c)[:, 1:]}
                for c in chunks(windows, self.stage.micro_batch_size)]

    def micro_batches(self, step: int, rank: int, world: int) -> list[Batch]:
        rng = np.random.default_rng([self.cfg.seed, step])
        return self._lm_batches(self._windows("train", rng, self.stage.batch_size, rank, world))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        rng = np.random.default_rng([self.cfg.seed, 1 << 40])  # the same windows every time
        return {"eval_loss": self.mean_loss(model, self._lm_batches(self._windows("val", rng, self.eval_windows)))}

    def export(self, model: torch.nn.Module) -> None:
        save_model(model, load_tokenizer(self.tokenizer_dir), self.out_dir)


@dataclass
class ChatExample:
    ids: np.ndarray  # the rendered conversation
    mask: np.ndarray  # 1 on tokens the assistant says


@dataclass
class SFTTask(_LanguageModelTask):
    cfg: RunConfig
    examples: list[ChatExample]
    eval_examples: list[ChatExample]
    init_dir: Path  # base/
    out_dir: Path  # sft/
    name: str = "sft"

    def __post_init__(self) -> None:
        self.stage = self.cfg.sft
        self.pad_id = load_tokenizer(self.init_dir).pad_id
        self.seq_len = max(len(e.ids) for e in self.examples)

    def build_model(self) -> torch.nn.Module:
        return load_policy(self.init_dir)

    def _batch(self, examples: list[ChatExample]) -> Batch:
        ids, attention = pad([e.ids for e in examples], self.pad_id)
        mask, _ = pad([e.mask for e in examples], 0)
        return {"input_ids": ids, "attention_mask": attention, "labels": shifted_labels(ids, mask)}

    def micro_batches(self, step: int, rank: int, world: int) -> list[Batch]:
        order = epoch_order(len(self.examples), self.stage.batch_size, step, self.cfg.seed)
        mine = [self.examples[i] for i in worker_slice(order, rank, world)]
        return [self._batch(c) for c in chunks(mine, self.stage.micro_batch_size)]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        batches = [self._batch(c) for c in chunks(self.eval_examples, self.stage.micro_batch_size)]
        return {"eval_loss": self.mean_loss(model, batches)}

    def export(self, model: torch.nn.Module) -> None:
        save_model(model, load_tokenizer(self.init_dir), self.out_dir)


@dataclass
class RewardTask:
    """Bradley–Terry on ranked responses; a comparison's pairs share one batch and count as one."""

    cfg: RunConfig
    groups: list[list[Sequence]]  # per comparison: full conversations, best response first
    eval_groups: list[list[Sequence]]
    init_dir: Path  # sft/
    out_dir: Path  # reward/
    name: str = "reward"

    def __post_init__(self) -> None:
        self.stage = self.cfg.reward
        self.pad_id = load_tokenizer(self.init_dir).pad_id
        self.seq_len = max(len(s) for g in self.groups for s in g)

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)  # the new scalar head
        return load_scalar_model(self.init_dir)

    def _batch(self, groups: list[list[Sequence]]) -> Batch:
        ids, attention = pad([s for g in groups for s in g], self.pad_id)
        return {"input_ids": ids, "attention_mask": attention,
                "group_sizes": torch.tensor([len(g) for g in groups])}

    def micro_batches(self, step: int, rank: int, world: int) -> list[Batch]:
        order = epoch_order(len(self.groups), self.stage.batch_size, step, self.cfg.seed)
        mine = [self.groups[i] for i in worker_slice(order, rank, world)]
        return [self._batch(c) for c in chunks(mine, self.stage.micro_batch_size)]

    def scores(self, model: torch.nn.Module, batch: Batch) -> list[torch.Tensor]:
        """The scalar reward of every sequence, split back into comparisons."""
        rewards = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        return list(torch.split(rewards.float(), batch["group_sizes"].tolist()))

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        per_comparison = []
        for rewards in self.scores(model, batch):
            pairs = list(combinations(range(len(rewards)), 2))  # (better, worse): best is first
            better = rewards[[i for i, _ in pairs]]
            worse = rewards[[j for _, j in pairs]]
            per_comparison.append(bradley_terry_loss(better, worse).mean())
        return torch.stack(per_comparison).sum(), torch.tensor(len(per_comparison))

    def units(self, batch: Batch) -> int:
        return len(batch["group_sizes"])

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return flops_per_token(model.config, self.seq_len, count_parameters(model))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.eval_groups:
            return {}
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        device = next(model.parameters()).device
        with torch.no_grad():
            for chunk in chunks(self.eval_groups, self.stage.micro_batch_size):
                batch = {k: v.to(device) for k, v in self._batch(chunk).items()}
                loss, _ = self.loss(model, batch)
                loss_sum += loss.item()
                for rewards in self.scores(model, batch):
                    for better, worse in combinations(range(len(rewards)), 2):
                        correct += int(rewards[better] > rewards[worse])
                        total += 1
        return {"eval_loss": loss_sum / len(self.eval_groups), "eval_accuracy": correct / max(total, 1)}

    def export(self, model: torch.nn.Module) -> None:
        save_model(model, load_tokenizer(self.init_dir), self.out_dir)
