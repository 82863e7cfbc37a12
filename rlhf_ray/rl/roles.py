"""The model-holding roles of PPO: policy, value, reference and reward, as plain classes.

Every role works on an `Experience`: rollouts packed into right-padded (B, T) sequences. Per-token
quantities (logprobs, values, advantages, ...) are (B, T-1) and aligned with next-token positions,
like labels: column t belongs to the token at t + 1, predicted from the tokens up to t.
`response_mask` is 1 on the columns whose next token is a response token.

No Ray in here: `rl/actors.py` wraps these classes with `ray.remote`. `threads` sets torch's
thread count in the process that hosts a role (a Ray actor's own process).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from rlhf_ray.config import Optim, PPOConfig
from rlhf_ray.modeling import load_policy, load_scalar_model, save_model, sequence_scores
from rlhf_ray.rl.algorithms import (
    entropy_from_logits,
    kl_loss,
    masked_mean,
    ppo_policy_loss,
    value_loss,
)
from rlhf_ray.tokenizer import load_tokenizer
from rlhf_ray.train.loop import uses_bf16
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

    def mini_batches(self, size: int, shuffle: bool = True) -> Iterator[Experience]:
        """Mini-batches of `size` rows (the last may be smaller), in a random order by default."""
        if size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {size}")
        order = torch.randperm(len(self)) if shuffle else torch.arange(len(self))
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


def token_logprobs(logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Logprob (B, T-1) of each next token under `logits` (from next_token_logits)."""
    return torch.log_softmax(logits, -1).gather(-1, sequences[:, 1:, None]).squeeze(-1)


def sequence_logprobs(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Logprob (B, T-1) of each next token at the sampling temperature; one forward pass."""
    return token_logprobs(next_token_logits(model, sequences, attention_mask, temperature), sequences)


def token_values(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor
                 ) -> torch.Tensor:
    """A scalar-head model's value (B, T-1) of every state: column t after reading tokens 0..t."""
    hidden = model.model(input_ids=sequences, attention_mask=attention_mask).last_hidden_state
    return model.score(hidden).squeeze(-1)[:, :-1].float()


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


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
          grad_clip: float) -> float | None:
    """One optimizer step; its gradient norm before clipping, or None (and no step) when the
    loss or the gradient is not finite."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return norm.item()


def _need(exp: Experience, *names: str) -> None:
    missing = [n for n in names if getattr(exp, n) is None]
    if missing:
        raise ValueError(f"the experience has no {', '.join(missing)} yet: fill it before updating")


# --------------------------------------------------------------------------- roles


class _Trainable:
    """What the policy and value roles share: a model loaded from a folder, an AdamW optimizer,
    and resumable state. Subclasses name the loader (`load_model`)."""

    load_model: staticmethod

    def __init__(self, model_dir: Path, lr: float, device: str | torch.device | None = None,
                 precision: str = "float32", threads: int | None = None) -> None:
        self.device, self.bf16 = _setup(device, precision, threads)
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model = self.load_model(self.model_dir).to(self.device)
        self.optimizer = _optimizer(self.model, lr)
        self.nonfinite_streak = 0  # mini-batches skipped in a row (a non-finite loss or gradient)

    def _apply(self, loss: torch.Tensor, grad_clip: float, norms: list[float]) -> bool:
        """Step on `loss` unless it or its gradient is not finite; whether it stepped."""
        norm = _step(self.model, self.optimizer, loss, grad_clip)
        if norm is None:
            self.nonfinite_streak += 1
            return False
        self.nonfinite_streak = 0
        norms.append(norm)
        return True

    def _update_stats(self, role: str, norms: list[float], steps: int) -> dict[str, float]:
        """The gradient norm's mean over the steps taken, and the mini-batches skipped."""
        return {f"{role}_grad_norm": sum(norms) / max(len(norms), 1),
                f"{role}_skipped_updates": float(steps - len(norms)),
                f"{role}_nonfinite_streak": float(self.nonfinite_streak)}

    def save(self, dest: Path) -> None:
        """The model as a Hugging Face folder (with the tokenizer), written atomically."""
        save_model(self.model, self.tokenizer, Path(dest))

    def save_optimizer(self, path: Path) -> None:
        torch.save(self.optimizer.state_dict(), Path(path))

    def load_optimizer(self, path: Path) -> None:
        self.optimizer.load_state_dict(torch.load(Path(path), map_location=self.device))

    def ready(self) -> bool:
        """True once constructed (lets a controller wait for an actor to start)."""
        return True


class PolicyRole(_Trainable):
    """The trained policy: logprobs, PPO updates, and its weights for the rollout engines."""

    load_model = staticmethod(load_policy)

    @torch.no_grad()
    def logprobs(self, exp: Experience) -> torch.Tensor:
        """The current policy's logprob (B, T-1) of every next token, at exp's temperature."""
        self.model.eval()
        exp = exp.to(self.device)
        with _autocast(self.device, self.bf16):
            return sequence_logprobs(self.model, exp.sequences, exp.attention_mask, exp.temperature).cpu()

    def update(self, exp: Experience, ppo: PPOConfig, kl_coef: float) -> dict[str, float]:
        """PPO epochs over mini-batches; the means of the losses and diagnostics over all steps.
        With ppo.kl_mode 'loss', kl_coef weighs the KL-to-reference loss term."""
        _need(exp, "old_logprobs", "advantages")
        kl_in_loss = ppo.kl_mode == "loss" and kl_coef > 0
        if kl_in_loss:
            _need(exp, "ref_logprobs")
        self.model.train()
        exp = exp.to(self.device)
        totals = {"policy_loss": 0.0, "clip_fraction": 0.0, "dual_clip_fraction": 0.0,
                  "approx_kl": 0.0, "entropy": 0.0, "kl_loss": 0.0}
        norms: list[float] = []
        steps = 0
        for _ in range(ppo.ppo_epochs):
            for mb in exp.mini_batches(ppo.mini_batch_size):
                with _autocast(self.device, self.bf16):
                    logits = next_token_logits(self.model, mb.sequences, mb.attention_mask,
                                               exp.temperature)
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
                if self._apply(total, ppo.grad_clip, norms):  # a skipped one's stats are nan
                    for key, value in stats.items():
                        totals[key] += value.item()
                steps += 1
        out = {key: value / max(len(norms), 1) for key, value in totals.items()}
        return out | self._update_stats("policy", norms, steps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names (tied lm_head included), on the CPU."""
        return {name: t.detach().cpu() for name, t in self.model.state_dict().items()}


class ValueRole(_Trainable):
    """The critic: a scalar-head model (started from the reward model) read at every token."""

    load_model = staticmethod(load_scalar_model)

    @torch.no_grad()
    def values(self, exp: Experience) -> torch.Tensor:
        """Values (B, T-1): column t is the value of the state before predicting token t + 1."""
        self.model.eval()
        exp = exp.to(self.device)
        with _autocast(self.device, self.bf16):
            return token_values(self.model, exp.sequences, exp.attention_mask).cpu()

    def update(self, exp: Experience, ppo: PPOConfig) -> dict[str, float]:
        """Clipped value regression toward `exp.returns`; the mean loss over all steps."""
        _need(exp, "values", "returns")
        self.model.train()
        exp = exp.to(self.device)
        total, steps, norms = 0.0, 0, []
        for _ in range(ppo.ppo_epochs):
            for mb in exp.mini_batches(ppo.mini_batch_size):
                with _autocast(self.device, self.bf16):
                    values = token_values(self.model, mb.sequences, mb.attention_mask)
                loss = value_loss(values, mb.values, mb.returns, mb.response_mask, ppo.value_clip)
                if self._apply(loss, ppo.grad_clip, norms):
                    total += loss.item()
                steps += 1
        return {"value_loss": total / max(len(norms), 1)} | self._update_stats("value", norms, steps)


class ReferenceRole:
    """The frozen starting policy, for the KL penalty."""

    def __init__(self, model_dir: Path, device: str | torch.device | None = None,
                 precision: str = "float32", threads: int | None = None) -> None:
        self.device, self.bf16 = _setup(device, precision, threads)
        self.model = load_policy(Path(model_dir)).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, exp: Experience) -> torch.Tensor:
        """The reference's logprobs of the same tempered distribution as the policy's."""
        exp = exp.to(self.device)
        with _autocast(self.device, self.bf16):
            return sequence_logprobs(self.model, exp.sequences, exp.attention_mask, exp.temperature).cpu()

    def ready(self) -> bool:
        return True


class RewardModelRole:
    """The frozen reward model: one scalar per whole sequence (prompt + response)."""

    def __init__(self, model_dir: Path, device: str | torch.device | None = None,
                 precision: str = "float32", threads: int | None = None) -> None:
        self.device, self.bf16 = _setup(device, precision, threads)
        self.model = load_scalar_model(Path(model_dir)).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def score(self, exp: Experience) -> torch.Tensor:
        """The score (B,) read at each sequence's last real token (from the attention mask)."""
        exp = exp.to(self.device)
        with _autocast(self.device, self.bf16):
            return sequence_scores(self.model, exp.sequences, exp.attention_mask).float().cpu()

    def ready(self) -> bool:
        return True
