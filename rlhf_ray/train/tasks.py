"""The training stages as `Task`s for the shared loop: pretraining, SFT, reward modelling, DPO.

Each batch is a pure function of (seed, step, rank): pretraining samples random windows of the
token shards; SFT, reward and DPO training walk a seeded permutation of their examples, epoch
after epoch, each step's examples cut into micro-batches by length. Tasks are plain picklable
objects: Ray Train ships them to its workers as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_ray.config import RunConfig, TrainStage
from rlhf_ray.data.shards import open_split
from rlhf_ray.modeling import (
    combined_score,
    count_parameters,
    load_policy,
    load_scalar_model,
    new_policy,
    pad,
    save_model,
    score_parts,
)
from rlhf_ray.tokenizer import load_tokenizer
from rlhf_ray.train.flops import flops_per_token
from rlhf_ray.train.loop import Batch, uses_bf16
from rlhf_ray.train.losses import (IGNORE, bradley_terry_loss, lm_loss, ranking_dpo_loss, ranking_pairs,
                                   sequence_logprobs, shifted_labels)


def worker_slice(items: list, rank: int, world: int) -> list:
    """This worker's contiguous share of `items`; the shares differ by at most one and cover all."""
    if len(items) < world:
        raise ValueError(f"a global batch of {len(items)} cannot give each of {world} workers an "
                         "example: make batch_size at least resources.num_workers")
    return items[rank * len(items) // world : (rank + 1) * len(items) // world]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def micro_chunks(units: list, size: int, length: Callable[[Any], int]) -> list[list]:
    """A step's units in micro-batches of `size`, shortest first: each micro-batch pads to a
    length near its own rather than to the step's longest (the step's gradient is the same sum)."""
    return chunks(sorted(units, key=length), size)


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
        by_length = micro_chunks(mine, self.stage.micro_batch_size, lambda e: len(e.ids))
        return [self._batch(c) for c in by_length]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        batches = [self._batch(c) for c in chunks(self.eval_examples, self.stage.micro_batch_size)]
        return {"eval_loss": self.mean_loss(model, batches)}

    def export(self, model: torch.nn.Module) -> None:
        save_model(model, load_tokenizer(self.init_dir), self.out_dir)


def longest_example(group: list[ChatExample]) -> int:
    return max(len(e.ids) for e in group)


def comparison_losses(scores: list[torch.Tensor]) -> torch.Tensor:
    """Each comparison's Bradley–Terry loss: the mean over its ranked pairs (best is first)."""
    losses = []
    for rewards in scores:
        better, worse = ranking_pairs(len(rewards))
        losses.append(bradley_terry_loss(rewards[better], rewards[worse]).mean())
    return torch.stack(losses)


class _ComparisonTask:
    """What reward modelling and DPO share: a batch of ranked comparisons, each one unit, the
    model started from and exported with sft/'s tokenizer."""

    seq_len: int
    init_dir: Path
    out_dir: Path

    def units(self, batch: Batch) -> int:
        return len(batch["group_sizes"])

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return flops_per_token(model.config, self.seq_len, count_parameters(model))

    def export(self, model: torch.nn.Module) -> None:
        save_model(model, load_tokenizer(self.init_dir), self.out_dir)


@dataclass
class RewardTask(_ComparisonTask):
    """Bradley–Terry on ranked responses; a comparison's pairs share one batch and count as one."""

    cfg: RunConfig
    groups: list[list[ChatExample]]  # per comparison: prompt + response, best first; mask: the response
    eval_groups: list[list[ChatExample]]
    init_dir: Path  # sft/
    out_dir: Path  # reward/
    name: str = "reward"

    def __post_init__(self) -> None:
        self.stage = self.cfg.reward
        self.pad_id = load_tokenizer(self.init_dir).pad_id
        self.seq_len = max(len(e.ids) for g in self.groups for e in g)

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)  # the new scalar head
        model = load_scalar_model(self.init_dir, likelihood_weight=self.stage.likelihood_weight,
                                  likelihood_gate=self.stage.likelihood_gate)
        if self.stage.freeze_embeddings:
            for table in (model.get_input_embeddings(), getattr(model, "lm_head", None)):
                if table is not None:
                    table.weight.requires_grad_(False)
        return model

    def _batch(self, groups: list[list[ChatExample]]) -> Batch:
        ids, attention = pad([e.ids for g in groups for e in g], self.pad_id)
        mask, _ = pad([e.mask for g in groups for e in g], 0)
        return {"input_ids": ids, "attention_mask": attention, "response_mask": mask[:, 1:],
                "group_sizes": torch.tensor([len(g) for g in groups])}

    def micro_batches(self, step: int, rank: int, world: int) -> list[Batch]:
        order = epoch_order(len(self.groups), self.stage.batch_size, step, self.cfg.seed)
        mine = [self.groups[i] for i in worker_slice(order, rank, world)]
        return [self._batch(c) for c in micro_chunks(mine, self.stage.micro_batch_size, longest_example)]

    def scores(self, model: torch.nn.Module, batch: Batch) -> list[torch.Tensor]:
        """The scalar reward of every sequence, split back into comparisons."""
        return self.scores_and_best_likelihoods(model, batch)[0]

    def scores_and_best_likelihoods(self, model: torch.nn.Module, batch: Batch
                                    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The scores split into comparisons, and each comparison's best response's mean token
        log-probability (None for a head-only reward model)."""
        head, likelihood = score_parts(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        sizes = batch["group_sizes"].tolist()
        scores = list(torch.split(combined_score(model, head, likelihood).float(), sizes))
        if likelihood is None:
            return scores, None
        firsts = torch.tensor([0, *sizes[:-1]], device=likelihood.device).cumsum(0)
        return scores, likelihood[firsts]

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per comparison, the Bradley-Terry loss plus lm_loss_weight times the best response's
        mean token cross-entropy; summed, with the count of comparisons."""
        scores, best_likelihoods = self.scores_and_best_likelihoods(model, batch)
        per_comparison = comparison_losses(scores)
        if self.stage.lm_loss_weight and best_likelihoods is not None:
            per_comparison = per_comparison - self.stage.lm_loss_weight * best_likelihoods
        return per_comparison.sum(), torch.tensor(len(per_comparison))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.eval_groups:
            return {}
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        device = next(model.parameters()).device
        with torch.no_grad():
            for chunk in micro_chunks(self.eval_groups, self.stage.micro_batch_size, longest_example):
                batch = {k: v.to(device) for k, v in self._batch(chunk).items()}
                scores = self.scores(model, batch)  # one pass gives both the loss and the accuracy
                loss_sum += comparison_losses(scores).sum().item()
                for rewards in scores:
                    better, worse = ranking_pairs(len(rewards))
                    correct += int((rewards[better] > rewards[worse]).sum())
                    total += len(better)
        return {"eval_loss": loss_sum / len(self.eval_groups), "eval_accuracy": correct / max(total, 1)}


@dataclass
class DPOTask(_ComparisonTask):
    """DPO on ranked responses: the policy (from sft/) against sft/ itself, frozen, as reference.

    The reference's log-probabilities are computed once per attempt, in `prepare`, on each worker
    for exactly the comparisons it will train on from its start step (the batches are a pure
    function of the step), after which the reference model is dropped: one forward pass per
    comparison instead of one per step, and no second model in memory while training. The
    held-out comparisons' are computed at the first evaluation, in float32 like the evaluation.
    """

    cfg: RunConfig
    groups: list[list[ChatExample]]  # per comparison: prompt + response, best first; mask: the response
    eval_groups: list[list[ChatExample]]
    init_dir: Path  # sft/: the starting policy and the reference
    out_dir: Path  # dpo/
    name: str = "dpo"

    def __post_init__(self) -> None:
        self.stage = self.cfg.dpo
        self.pad_id = load_tokenizer(self.init_dir).pad_id
        self.seq_len = max(len(e.ids) for g in self.groups for e in g)
        self.reference: dict[int, torch.Tensor] = {}  # comparison index -> (K,) log-probabilities
        self.eval_reference: list[torch.Tensor] | None = None
        self.sums: dict[str, torch.Tensor] = {}

    def build_model(self) -> torch.nn.Module:
        return load_policy(self.init_dir)

    def _mine(self, step: int, rank: int, world: int) -> list[int]:
        order = epoch_order(len(self.groups), self.stage.batch_size, step, self.cfg.seed)
        return worker_slice(order, rank, world)

    def _batch(self, groups: list[list[ChatExample]]) -> Batch:
        ids, attention = pad([e.ids for g in groups for e in g], self.pad_id)
        mask, _ = pad([e.mask for g in groups for e in g], 0)
        return {"input_ids": ids, "attention_mask": attention, "labels": shifted_labels(ids, mask),
                "group_sizes": torch.tensor([len(g) for g in groups])}

    def _logprobs(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logprobs(logits, batch["labels"])

    def reference_logprobs(self, groups: list[list[ChatExample]], device: torch.device,
                           bf16: bool) -> list[torch.Tensor]:
        """Each comparison's responses' log-probabilities (K,) under the frozen sft/ model."""
        reference = load_policy(self.init_dir).to(device).eval()
        out: dict[int, torch.Tensor] = {}
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for chunk in micro_chunks(list(range(len(groups))), self.stage.micro_batch_size,
                                      lambda i: longest_example(groups[i])):
                batch = {k: v.to(device) for k, v in self._batch([groups[i] for i in chunk]).items()}
                logprobs = self._logprobs(reference, batch).float().cpu()
                out.update(zip(chunk, torch.split(logprobs, batch["group_sizes"].tolist())))
        return [out[i] for i in range(len(groups))]

    def prepare(self, device: torch.device, start_step: int, rank: int, world: int) -> None:
        """The reference log-probabilities of every comparison this worker trains on from
        `start_step`, in the training steps' precision (so they match the policy's at step 0)."""
        needed = sorted({i for step in range(start_step, self.stage.steps)
                         for i in self._mine(step, rank, world)})
        bf16 = uses_bf16(self.stage.precision, device)
        logprobs = self.reference_logprobs([self.groups[i] for i in needed], device, bf16)
        self.reference = dict(zip(needed, logprobs))

    def micro_batches(self, step: int, rank: int, world: int) -> list[Batch]:
        mine = self._mine(step, rank, world)
        if any(i not in self.reference for i in mine):
            raise RuntimeError("DPOTask.prepare must compute the reference log-probabilities first")
        by_length = micro_chunks(mine, self.stage.micro_batch_size, lambda i: longest_example(self.groups[i]))
        return [self._batch([self.groups[i] for i in c]) | {"reference": torch.cat([self.reference[i] for i in c])}
                for c in by_length]

    def _comparisons(self, model: torch.nn.Module, batch: Batch, reference: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Each comparison's DPO loss and its metrics (ranking_dpo_loss)."""
        sizes = batch["group_sizes"].tolist()
        policy = torch.split(self._logprobs(model, batch), sizes)
        results = [ranking_dpo_loss(p, r, self.stage.beta, self.stage.loss)
                   for p, r in zip(policy, torch.split(reference.to(policy[0].device), sizes))]
        return [loss for loss, _ in results], [stats for _, stats in results]

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, stats = self._comparisons(model, batch, batch["reference"])
        for one in stats:
            for name, value in one.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
        return torch.stack(losses).sum(), torch.tensor(len(losses))

    def take_sums(self) -> dict[str, torch.Tensor]:
        """The implicit-reward metrics summed over the comparisons since the last call."""
        sums, self.sums = self.sums, {}
        return sums

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.eval_groups:
            return {}
        device = next(model.parameters()).device
        if self.eval_reference is None:
            self.eval_reference = self.reference_logprobs(self.eval_groups, device, bf16=False)
        model.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for indices in micro_chunks(list(range(len(self.eval_groups))), self.stage.micro_batch_size,
                                        lambda i: longest_example(self.eval_groups[i])):
                batch = {k: v.to(device) for k, v in self._batch([self.eval_groups[i] for i in indices]).items()}
                reference = torch.cat([self.eval_reference[i] for i in indices])
                for loss, one in zip(*self._comparisons(model, batch, reference)):
                    for name, value in {"loss": loss, **one}.items():
                        totals[name] = totals.get(name, 0.0) + value.item()
        return {f"eval_{name}": total / len(self.eval_groups) for name, total in totals.items()}
