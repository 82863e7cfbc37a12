"""The model-holding roles of PPO: policy, value, reference and reward, as plain classes.

Every role works on an `Experience`: rollouts packed into right-padded (B, T) sequences. Per-token
quantities (logprobs, values, advantages, ...) are (B, T-1) and aligned with next-token positions,
like labels: column t belongs to the token at t + 1, predicted from the tokens up to t.
`response_mask` is 1 on the columns whose next token is a response token.

A role may be run by several workers (`rl/group.py` starts them as Ray actors): worker `rank` of
`world_size` computes its share of each batch's rows, and the trained roles join one
torch.distributed group (DDP or FSDP2) in which every rank takes the same optimizer steps, each on
its share of every mini-batch, so the result is the one-worker update whatever the split. With one
worker there is no group and the same code runs alone (tests and benchmarks use it so).

No Ray in here (but for asking it the node's address). `threads` sets torch's thread count in
the process that hosts a role (a Ray actor's own process).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from rlhf_ray.cluster import require_cuda
from rlhf_ray.config import Optim, PPOConfig
from rlhf_ray.modeling import load_policy, load_scalar_model, save_model, sequence_scores, token_logprobs
from rlhf_ray.rl.algorithms import (
    entropy_from_logits,
    kl_loss,
    masked_mean,
    ppo_policy_loss,
    value_loss,
)
from rlhf_ray.rl import weight_sync
from rlhf_ray.tokenizer import load_tokenizer
from rlhf_ray.train.loop import gather_state, shard, uses_bf16
from rlhf_ray.train.optim import make_optimizer

if TYPE_CHECKING:  # rollout.py imports vLLM, which the trainer side does not need
    from rlhf_ray.rl.rollout import Rollout

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """A batch of rollouts as tensors; the controller fills the optional per-token fields."""

    sequences: torch.Tensor  # (B, T) prompt + response, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T-1) 1 where column t predicts a response token
    finished: torch.Tensor  # (B,) bool: the response ended with a stop token
    sample_logprobs: torch.Tensor  # (B, T-1) the sampler's (vLLM's) logprobs, 0 off the response
    temperature: float = 1.0  # the rollouts were sampled from softmax(logits / temperature)
    policy_logprobs: torch.Tensor | None = None  # (B, T-1) the trainer's policy before the update
    old_logprobs: torch.Tensor | None = None  # (B, T-1) the ratio's denominator
    ref_logprobs: torch.Tensor | None = None  # (B, T-1)
    is_weights: torch.Tensor | None = None  # (B, T-1) truncated importance weights, or None
    values: torch.Tensor | None = None  # (B, T-1) the value model's before the update
    advantages: torch.Tensor | None = None  # (B, T-1)
    returns: torch.Tensor | None = None  # (B, T-1)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: t for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)}

    def select(self, index: torch.Tensor | slice) -> Experience:
        """The rows `index` of every tensor."""
        return replace(self, **{name: t[index] for name, t in self._tensors().items()})

    def to(self, device: torch.device | str) -> Experience:
        return replace(self, **{name: t.to(device) for name, t in self._tensors().items()})

    def mini_batches(self, size: int, shuffle: bool = True, seed: int | None = None
                     ) -> Iterator[Experience]:
        """Mini-batches of `size` rows (the last may be smaller), in a random order by default
        (the same order on every worker when they pass the same seed)."""
        if size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {size}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), size):
            yield self.select(order[start : start + size].to(self.sequences.device))


def pack_rollouts(rollouts: Sequence[Rollout], pad_id: int, temperature: float) -> Experience:
    """Right-pad prompt + response of each rollout into one batch, and mark the response columns.
    `temperature`: what they were sampled at (0: greedy, whose logprobs are not defined)."""
    if not rollouts:
        raise ValueError("pack_rollouts needs at least one rollout")
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    T = max(lengths)
    if T < 2:
        raise ValueError("every batch needs a sequence of at least 2 tokens")
    B = len(rollouts)
    sequences = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    response_mask = torch.zeros(B, T - 1, dtype=torch.long)
    sample_logprobs = torch.zeros(B, T - 1)
    for i, r in enumerate(rollouts):
        if not r.prompt_ids:
            raise ValueError(f"rollout {i} has an empty prompt")
        if len(r.logprobs) != len(r.response_ids):
            raise ValueError(f"rollout {i}: {len(r.logprobs)} logprobs for "
                             f"{len(r.response_ids)} response tokens")
        P, R = len(r.prompt_ids), len(r.response_ids)
        sequences[i, : P + R] = torch.tensor(list(r.prompt_ids) + list(r.response_ids))
        attention_mask[i, : P + R] = 1
        # the response token at position P + k is predicted at column P - 1 + k
        response_mask[i, P - 1 : P - 1 + R] = 1
        sample_logprobs[i, P - 1 : P - 1 + R] = torch.tensor(r.logprobs, dtype=torch.float)
    finished = torch.tensor([r.finish_reason == "stop" for r in rollouts])
    return Experience(sequences, attention_mask, response_mask, finished, sample_logprobs, temperature)


# --------------------------------------------------------------------------- forward passes


def next_token_logits(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Logits (B, T-1, V) of the distribution each next token was sampled from: the model's,
    divided by the sampling temperature, in float32 whatever the model's dtype."""
    if temperature <= 0:
        raise ValueError("logprobs of greedy (temperature 0) rollouts are not defined")
    logits = model(input_ids=sequences, attention_mask=attention_mask).logits[:, :-1].float()
    return logits / temperature if temperature != 1 else logits


def sequence_logprobs(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Logprob (B, T-1) of each next token at the sampling temperature; one forward pass."""
    return token_logprobs(next_token_logits(model, sequences, attention_mask, temperature), sequences)


def token_values(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor
                 ) -> torch.Tensor:
    """A scalar-head model's value (B, T-1) of every state: column t after reading tokens 0..t."""
    hidden = model.model(input_ids=sequences, attention_mask=attention_mask).last_hidden_state
    return model.score(hidden).squeeze(-1)[:, :-1].float()


class TokenValues(torch.nn.Module):
    """token_values as a module, so that DDP and FSDP see the whole computation as one forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_values(self.model, sequences, attention_mask)


class SequenceScores(torch.nn.Module):
    """sequence_scores as a module (the reward model's forward, sharded or not)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> torch.Tensor:
        return sequence_scores(self.model, sequences, attention_mask, response_mask).float()


def _setup(device: str | torch.device | None, precision: str, threads: int | None
           ) -> tuple[torch.device, bool]:
    """The role's device and whether its forward passes run under bf16 autocast."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device) if device is not None else default_device()
    return device, uses_bf16(precision, device)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    return make_optimizer(model, Optim(lr=lr, weight_decay=0.0, warmup_steps=0))


def _need(exp: Experience, *names: str) -> None:
    missing = [n for n in names if getattr(exp, n) is None]
    if missing:
        raise ValueError(f"the experience has no {', '.join(missing)} yet: fill it before updating")


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous share of n rows; shares differ by at most one row."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def node_address() -> str:
    """This node's address, as Ray knows it (the only use of Ray in the roles)."""
    import ray

    return ray.util.get_node_ip_address()


Strategy = Literal["ddp", "fsdp", "replicate"]
GROUP_TIMEOUT = timedelta(minutes=10)  # a collective that waits longer fails (a peer died)


# --------------------------------------------------------------------------- one worker of a role


class _Worker:
    """Worker `rank` of a role's `world_size`: its device, its share of the rows, its group.

    `net` is what forward passes call: the model itself, or the module that computes the role's
    output (TokenValues, SequenceScores), wrapped for the strategy once the group is joined.
    """

    trains = False  # trained roles always join their group; frozen ones only to shard

    def __init__(self, device: str | torch.device | None, precision: str, threads: int | None,
                 rank: int, world_size: int, strategy: Strategy) -> None:
        require_cuda(f"PPO {type(self).__name__} rank {rank}")
        self.device, self.bf16 = _setup(device, precision, threads)
        self.rank, self.world_size, self.strategy = rank, world_size, strategy
        self.model: Any = None  # the Hugging Face model (sharded in place under fsdp)
        self.net: torch.nn.Module = None  # type: ignore[assignment]

    def ready(self) -> bool:
        """True once constructed (lets a controller wait for an actor to start)."""
        return True

    def open_group_store(self) -> tuple[str, int]:
        """Rank 0 opens its group's store; where the other workers connect to it."""
        host = node_address()
        self.store = weight_sync.open_store(host, self.world_size, GROUP_TIMEOUT)
        return host, self.store.port

    @property
    def sharded(self) -> bool:
        """FSDP over the role's group: formed by `join` with more than one worker, or made by
        the caller for a single worker (bench/gpu_ppo_update.py runs FSDP2 at world size 1)."""
        return self.strategy == "fsdp" and dist.is_initialized()

    def join(self, host: str | None = None, port: int | None = None) -> None:
        """Join the role's torch.distributed group through rank 0's store at host:port (with
        more than one worker) and wrap `net` for the strategy. Every worker calls it at once;
        alone it only wraps."""
        if self.world_size > 1 and (self.strategy == "fsdp" or self.trains):
            if self.device.type == "cuda":  # NCCL binds the group to the current device
                torch.cuda.set_device(self.device)
            assert host is not None and port is not None
            store = (self.store if self.rank == 0
                     else weight_sync.connect_store(host, port, self.world_size, GROUP_TIMEOUT))
            dist.init_process_group(weight_sync.backend_for(self.device), store=store,
                                    rank=self.rank, world_size=self.world_size,
                                    timeout=GROUP_TIMEOUT)
        if self.sharded:
            # Under bf16, FSDP gathers each unit's parameters as bf16 and frees them after use;
            # autocast instead would cast every gathered weight and keep all the casts for the
            # backward: a whole bf16 copy of the model on every worker, however many.
            mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            shard(self.model, root=self.net, mixed_precision=mixed if self.bf16 else None)
            self.bf16 = False  # no autocast on top
        elif self.trains and self.world_size > 1:
            self.net = DistributedDataParallel(self.net)

    def _my_rows(self, exp: Experience) -> tuple[Experience, int]:
        """This rank's rows and how many they are. A rank with no rows runs the first row with
        weight 0 and drops its result: a collective (FSDP's gathers, DDP's gradient average)
        needs every rank, and no rank may skip a step."""
        rows = shard_rows(len(exp), self.rank, self.world_size)
        count = rows.stop - rows.start
        return exp.select(rows if count else slice(0, 1)), count

    def _forward_rows(self, exp: Experience, forward: Any) -> torch.Tensor:
        """forward(share) on this rank's rows, in eval mode without gradients, on the CPU."""
        self.net.eval()
        share, count = self._my_rows(exp.to(self.device))
        with torch.no_grad(), _autocast(self.device, self.bf16):
            return forward(share)[:count].cpu()

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state under its Hugging Face names, on rank 0's CPU (empty on the
        others). Every rank takes part."""
        if self.sharded:
            return gather_state(self.model, None)[0]
        if self.rank != 0:
            return {}
        return {name: t.detach().cpu() for name, t in self.model.state_dict().items()}

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sums over the role's ranks (the values themselves alone)."""
        if self.world_size == 1:
            return values
        stacked = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return stacked.tolist()


class _Trainable(_Worker):
    """What the policy and value roles share: a model loaded from a folder, an AdamW optimizer
    over it, one optimizer step per global mini-batch on every rank, and resumable state.
    Subclasses name the loader (`load_model`) and the module forward passes call (`make_net`)."""

    load_model: staticmethod
    trains = True

    def __init__(self, model_dir: Path, lr: float, device: str | torch.device | None = None,
                 precision: str = "float32", threads: int | None = None, rank: int = 0,
                 world_size: int = 1, strategy: Strategy = "ddp",
                 activation_checkpointing: bool = False) -> None:
        super().__init__(device, precision, threads, rank, world_size, strategy)
        self.model_dir, self.lr = Path(model_dir), lr
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = self.load_model(self.model_dir).to(self.device)
        if activation_checkpointing:  # keep each decoder layer's input, recompute the rest
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        self.net = self.make_net(self.model)
        self.optimizer: torch.optim.Optimizer | None = None
        self.nonfinite_streak = 0  # mini-batches skipped in a row (a non-finite loss or gradient)
        if world_size == 1:
            self.join()

    @staticmethod
    def make_net(model: torch.nn.Module) -> torch.nn.Module:
        return model

    def join(self, host: str | None = None, port: int | None = None) -> None:
        super().join(host, port)
        # Made after sharding: FSDP replaces the parameters by their shards.
        self.optimizer = _optimizer(self.model, self.lr)

    def _shares(self, exp: Experience, ppo: PPOConfig, seed: int
                ) -> Iterator[tuple[Experience, float]]:
        """This rank's share of every global mini-batch of every epoch (the same mini-batches on
        every rank), and the share's weight in the mini-batch's token mean, x world size (DDP
        and FSDP average gradients over ranks)."""
        for epoch in range(ppo.ppo_epochs):
            for mb in exp.mini_batches(ppo.mini_batch_size, seed=seed * 1_000 + epoch):
                share, count = self._my_rows(mb)
                tokens = float(share.response_mask[:count].sum())
                total = self._sum_over_ranks([tokens])[0]
                yield share, tokens * self.world_size / max(total, 1.0)

    def _apply(self, loss: torch.Tensor, weight: float, grad_clip: float, norms: list[float]
               ) -> bool:
        """Step on this share's loss x weight unless a rank's loss, or the gradient, is not
        finite (then no rank steps); whether it stepped. Every rank calls it as often."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        finite = self._sum_over_ranks([float(not torch.isfinite(loss).item())])[0] == 0
        if finite:
            (loss * weight).backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            finite = bool(torch.isfinite(norm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_streak += 1
            return False
        self.optimizer.step()
        self.nonfinite_streak = 0
        norms.append(norm.item())
        return True

    def _mean_stats(self, stats: dict[str, torch.Tensor], weight: float) -> dict[str, float]:
        """The share's statistics (token means over the share) as the mini-batch's token means."""
        keys = list(stats)
        sums = self._sum_over_ranks([stats[k].item() * weight / self.world_size for k in keys])
        return dict(zip(keys, sums))

    def _update_stats(self, role: str, norms: list[float], steps: int) -> dict[str, float]:
        """The gradient norm's mean over the steps taken, and the mini-batches skipped."""
        return {f"{role}_grad_norm": sum(norms) / max(len(norms), 1),
                f"{role}_skipped_updates": float(steps - len(norms)),
                f"{role}_nonfinite_streak": float(self.nonfinite_streak)}

    def save(self, dest: Path) -> None:
        """The model as a Hugging Face folder (with the tokenizer), written atomically by rank 0.
        Every rank takes part (a sharded model is gathered first)."""
        state = self._full_state()
        if self.rank != 0:
            return
        model = self.model
        if self.sharded:
            model = self.load_model(self.model_dir)
            model.load_state_dict(state)
        save_model(model, self.tokenizer, Path(dest))

    def save_optimizer(self, path: Path) -> None:
        """AdamW's whole state keyed by parameter name, so any number of workers can load it."""
        assert self.optimizer is not None
        state = gather_state(self.model, self.optimizer)[1]
        if self.rank == 0:
            torch.save(state, Path(path))

    def load_optimizer(self, path: Path) -> None:
        assert self.optimizer is not None
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state.get("state") and isinstance(next(iter(state["state"])), int):
            if self.world_size > 1:  # written by torch's own state_dict: ids, not names
                raise ValueError(f"{path}: an optimizer state of an older version (by parameter "
                                 "index) can only be resumed with num_workers 1")
            self.optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(self.model, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))


class PolicyRole(_Trainable):
    """The trained policy: logprobs, PPO updates, and its weights for the rollout engines."""

    load_model = staticmethod(load_policy)
    sync_group: Any = None  # the weight-sync group, on rank 0 once joined
    sync_backend = "gloo"

    def logprobs(self, exp: Experience) -> torch.Tensor:
        """The current policy's logprob of every next token of this rank's rows, at exp's
        temperature ((rows, T-1); the group concatenates the ranks' rows)."""
        return self._forward_rows(exp, lambda share: sequence_logprobs(
            self.net, share.sequences, share.attention_mask, exp.temperature))

    def update(self, exp: Experience, ppo: PPOConfig, kl_coef: float, seed: int = 0
               ) -> dict[str, float]:
        """PPO epochs over mini-batches (their order from `seed`); the means of the losses and
        diagnostics over all steps. With ppo.kl_mode 'loss', kl_coef weighs the KL-to-reference
        loss term."""
        _need(exp, "old_logprobs", "advantages")
        kl_in_loss = ppo.kl_mode == "loss" and kl_coef > 0
        if kl_in_loss:
            _need(exp, "ref_logprobs")
        self.net.train()
        exp = exp.to(self.device)
        totals = {"policy_loss": 0.0, "clip_fraction": 0.0, "dual_clip_fraction": 0.0,
                  "approx_kl": 0.0, "entropy": 0.0, "kl_loss": 0.0}
        norms: list[float] = []
        steps = 0
        for mb, weight in self._shares(exp, ppo, seed):
            with _autocast(self.device, self.bf16):
                logits = next_token_logits(self.net, mb.sequences, mb.attention_mask, exp.temperature)
            logprobs = token_logprobs(logits, mb.sequences)
            loss, stats = ppo_policy_loss(logprobs, mb.old_logprobs, mb.advantages,
                                          mb.response_mask, ppo.clip_ratio, ppo.clip_ratio_c,
                                          mb.is_weights)
            stats["policy_loss"] = loss.detach()
            total = loss
            if ppo.entropy_coef > 0:  # the entropy's graph costs a (B, T, V) tensor: only if used
                entropy = masked_mean(entropy_from_logits(logits), mb.response_mask)
                total = total - ppo.entropy_coef * entropy
            else:
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits.detach()), mb.response_mask)
            stats["entropy"] = entropy.detach()
            if kl_in_loss:
                kl = kl_loss(logprobs, mb.ref_logprobs, mb.response_mask, ppo.kl_estimator)
                total = total + kl_coef * kl
                stats["kl_loss"] = kl.detach()
            if self._apply(total, weight, ppo.grad_clip, norms):  # a skipped one's stats are nan
                for key, value in self._mean_stats(stats, weight).items():
                    totals[key] += value
            steps += 1
        out = {key: value / max(len(norms), 1) for key, value in totals.items()}
        return out | self._update_stats("policy", norms, steps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names (tied lm_head included), on rank 0's CPU
        (empty on the others; every rank takes part)."""
        return self._full_state()

    def open_weight_sync(self, world_size: int) -> tuple[str, int]:
        """Rank 0 opens the weight-sync group's store; where the engines' workers connect."""
        host = node_address()
        self.sync_store = weight_sync.open_store(host, world_size)
        return host, self.sync_store.port

    def join_weight_sync(self, world_size: int, backend: str) -> None:
        """Rank 0 joins the weight-sync group with the engines' workers, as its rank 0."""
        self.sync_group = weight_sync.join_group(self.sync_store, 0, world_size, backend)
        self.sync_backend = backend

    def send_weights(self, bucket_bytes: int, dtype: str) -> int:
        """Stream the weights to the engines in buckets of `bucket_bytes`, cast to the engines'
        `dtype`; the bytes sent. Every rank takes part: a sharded model is gathered one tensor
        at a time, so rank 0 holds at most one bucket beyond its own shard."""
        cast = getattr(torch, dtype)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in self.model.state_dict().items():
                if isinstance(tensor, DTensor):
                    tensor = tensor.full_tensor()  # a collective: every rank, in the same order
                if self.rank == 0:
                    yield name, tensor.detach().to(cast) if tensor.is_floating_point() else tensor

        if self.rank != 0:
            for _ in tensors():
                pass
            return 0
        if self.sync_group is None:
            raise RuntimeError("send_weights before join_weight_sync: no group to send over")
        device = self.device if self.sync_backend == "nccl" else torch.device("cpu")
        return weight_sync.send(self.sync_group, ((n, t.to(device)) for n, t in tensors()),
                                bucket_bytes, device)


class ValueRole(_Trainable):
    """The critic: a scalar-head model (started from the reward model) read at every token."""

    load_model = staticmethod(load_scalar_model)
    make_net = staticmethod(TokenValues)

    def values(self, exp: Experience) -> torch.Tensor:
        """Values (rows, T-1) of this rank's rows: column t is the value of the state before
        predicting token t + 1."""
        return self._forward_rows(exp, lambda share: self.net(share.sequences, share.attention_mask))

    def update(self, exp: Experience, ppo: PPOConfig, seed: int = 0) -> dict[str, float]:
        """Clipped value regression toward `exp.returns`; the mean loss over all steps."""
        _need(exp, "values", "returns")
        self.net.train()
        exp = exp.to(self.device)
        total, steps, norms = 0.0, 0, []
        for mb, weight in self._shares(exp, ppo, seed):
            with _autocast(self.device, self.bf16):
                values = self.net(mb.sequences, mb.attention_mask)
            loss = value_loss(values, mb.values, mb.returns, mb.response_mask, ppo.value_clip)
            if self._apply(loss, weight, ppo.grad_clip, norms):
                total += self._mean_stats({"value_loss": loss.detach()}, weight)["value_loss"]
            steps += 1
        return {"value_loss": total / max(len(norms), 1)} | self._update_stats("value", norms, steps)


class _Frozen(_Worker):
    """A frozen model on every replica (strategy 'replicate') or sharded over them ('fsdp')."""

    def __init__(self, model: torch.nn.Module, net: torch.nn.Module, device: str | torch.device | None,
                 precision: str, threads: int | None, rank: int, world_size: int,
                 strategy: Strategy) -> None:
        super().__init__(device, precision, threads, rank, world_size, strategy)
        model.requires_grad_(False)
        self.model = model.to(self.device).eval()
        self.net = net.to(self.device)
        if world_size == 1:
            self.join()


class ReferenceRole(_Frozen):
    """The frozen starting policy, for the KL penalty."""

    def __init__(self, model_dir: Path, device: str | torch.device | None = None,
                 precision: str = "float32", threads: int | None = None, rank: int = 0,
                 world_size: int = 1, strategy: Strategy = "replicate") -> None:
        model = load_policy(Path(model_dir))
        super().__init__(model, model, device, precision, threads, rank, world_size, strategy)

    def logprobs(self, exp: Experience) -> torch.Tensor:
        """The reference's logprobs of the same tempered distribution as the policy's."""
        return self._forward_rows(exp, lambda share: sequence_logprobs(
            self.net, share.sequences, share.attention_mask, exp.temperature))


class RewardModelRole(_Frozen):
    """The frozen reward model: one scalar per whole sequence (prompt + response)."""

    def __init__(self, model_dir: Path, device: str | torch.device | None = None,
                 precision: str = "float32", threads: int | None = None, rank: int = 0,
                 world_size: int = 1, strategy: Strategy = "replicate") -> None:
        model = load_scalar_model(Path(model_dir))
        super().__init__(model, SequenceScores(model), device, precision, threads, rank,
                         world_size, strategy)

    def score(self, exp: Experience) -> torch.Tensor:
        """The score (rows,) of this rank's rows, read at each sequence's last real token (and,
        for a reward model with a likelihood weight, from its response's tokens)."""
        return self._forward_rows(exp, lambda share: self.net(share.sequences, share.attention_mask,
                                                              share.response_mask))
