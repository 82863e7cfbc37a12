"""Stage 3b: PPO against the reward, driven by one controller over Ray actors.

One step:  rollout (vLLM engines, current weights)  ->  experience (old policy logprobs,
reference logprobs, values and rewards, computed by their actors in parallel)  ->  advantages
(GAE, or a GRPO/RLOO group baseline) on the controller  ->  PPO epochs of the policy and value
actors in parallel  ->  weight sync into every engine, under a new version number.

Each model role is a `RoleGroup` (rl/group.py) of one or more workers: the policy and value
train as DDP or FSDP groups, the reference and reward model split each batch over replicas.
The weights reach the engines streamed in buckets over a torch.distributed group of the
policy's rank 0 and every engine worker (rl/weight_sync.py); where that group cannot be formed,
as one blob through Ray's object store (the log says which).

The controller holds no model; it moves `Experience` batches between actors through Ray's object
store. The prompts of a step are a pure function of (seed, step), so a checkpoint's step is also
its data position:

    runs/<name>/checkpoints/ppo/step_000010/   policy/ value/ *_optim.pt state.json
    runs/<name>/metrics/ppo.jsonl              one line per step (step 0: the SFT model's eval)
    runs/<name>/rlhf/                          the final policy, a Hugging Face folder
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from rlhf_ray.cluster import joins_cluster
from rlhf_ray.config import PPOConfig, RunConfig
from rlhf_ray.data.readers import read_many
from rlhf_ray.data.records import PromptRecord
from rlhf_ray.modeling import check_model_folder, model_max_len, saved_likelihood_weight
from rlhf_ray.plan import check_fits_here
from rlhf_ray.rl import actors, weight_sync
from rlhf_ray.rl.group import Pending, RoleGroup, get_all
from rlhf_ray.rl.algorithms import (
    KLController,
    clip_rewards,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    returns_to_go,
    token_rewards,
    truncated_is_weights,
    unfinished_penalty,
)
from rlhf_ray.prompting import exact_match
from rlhf_ray.rl.rewards import FunctionReward, HTTPReward
from rlhf_ray.rl.roles import Experience, pack_rollouts
from rlhf_ray.rl.rollout import Rollout
from rlhf_ray.storage import atomic_folder, write_json_atomic
from rlhf_ray.tokenizer import ChatTokenizer, load_tokenizer, render_prompts
from rlhf_ray.run import RunFolder, append_metrics, keep_metrics_before

Log = Callable[[str], None]


# --------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    ids: list[int]  # the rendered chat, ending where the assistant's reply begins
    text: str  # the last user message
    ground_truth: str | None


def load_prompts(paths: list[Path], tokenizer: ChatTokenizer, max_new_tokens: int,
                 max_seq_len: int, kind: str) -> list[Prompt]:
    """Render every prompt; a prompt that leaves no room for max_new_tokens is an error (file:line)."""
    if not paths:
        raise ValueError(f"no {kind} prompt files: set data.{kind} (or data.demo)")
    records = read_many(paths, PromptRecord)  # an empty file is already an error there
    rendered = render_prompts(records, tokenizer, max_new_tokens, max_seq_len, "ppo.max_new_tokens")
    return [Prompt(ids, r.prompt[-1].content, r.ground_truth) for r, ids in zip(records, rendered)]


def step_prompts(num_prompts: int, per_step: int, seed: int, step: int) -> list[int]:
    """Indices of the prompts of `step`: epochs of seeded permutations, read in order."""
    indices: list[int] = []
    position = step * per_step
    while len(indices) < per_step:
        epoch, offset = divmod(position, num_prompts)
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(per_step - len(indices), num_prompts - offset)
        indices += order[offset : offset + take].tolist()
        position += take
    return indices


# --------------------------------------------------------------------------- advantages


def needs_policy_pass(ppo: PPOConfig) -> bool:
    """Whether a step computes the policy's own logprobs of the rollouts: for the ratio (old
    logprobs 'policy'), or for a KL that steers training (in the reward, or adaptive). The KL is
    never taken from the engine's logprobs, which differ from the trainer's numerically."""
    kl_in_reward = ppo.kl_mode == "reward" and ppo.kl_coef > 0
    return ppo.old_logprobs == "policy" or kl_in_reward or ppo.kl_target is not None


def compute_advantages(exp: Experience, scores: torch.Tensor, ppo: PPOConfig, kl_coef: float,
                       center: bool = False) -> dict[str, float]:
    """Fill exp.advantages (and exp.returns for GAE) from the sequence scores; return statistics.

    The KL is of the trainer's policy logprobs to the reference's (k1 summed per response is
    the reported `kl`). With kl_mode 'reward' it enters as a per-token penalty: for GAE as
    per-token rewards (the score added at the last token; advantages whitened over the batch);
    for GRPO/RLOO after the group baseline, so the scores alone are normalised and each token's
    advantage is the response's minus kl_coef x the penalty still to come (its return-to-go).
    With kl_mode 'loss' the advantages carry no KL (the policy's loss does). `center` subtracts
    the batch's mean score first (ppo.center_scores).
    """
    mask = exp.response_mask.float()
    trainer = exp.policy_logprobs if exp.policy_logprobs is not None else exp.sample_logprobs
    penalty = (kl_penalty(trainer, exp.ref_logprobs, ppo.kl_estimator) * mask
               if ppo.kl_mode == "reward" else torch.zeros_like(mask))
    scores = unfinished_penalty(scores, exp.finished, ppo.unfinished_penalty)
    shaped = clip_rewards(scores - scores.mean() if center else scores, ppo.reward_clip)
    if ppo.estimator == "gae":
        rewards = token_rewards(shaped, penalty, kl_coef, mask)
        advantages, returns = gae(rewards, exp.values, mask, ppo.gamma, ppo.lam)
        exp.advantages, exp.returns = masked_whiten(advantages, mask), returns
    else:
        per_sequence = group_advantages(shaped, ppo.samples_per_prompt, ppo.estimator)
        exp.advantages = per_sequence[:, None] * mask - kl_coef * returns_to_go(penalty, mask)
    kl = (kl_penalty(trainer, exp.ref_logprobs, "k1") * mask).sum(1)
    return {"kl": kl.mean().item(), "shaped_reward_mean": shaped.mean().item()}


def check_finite_updates(losses: dict[str, float], limit: int, step: int) -> None:
    """Stop the run once a role has skipped `limit` mini-batches in a row for a non-finite loss
    or gradient (each skip is in the metrics); the newest checkpoint is from before them."""
    for role in ("policy", "value"):
        streak = int(losses.get(f"{role}_nonfinite_streak", 0))
        if streak >= limit:
            raise FloatingPointError(
                f"step {step}: the {role}'s last {streak} updates had a non-finite loss or "
                f"gradient and were skipped (ppo.max_nonfinite_updates={limit}); stopped before "
                "saving, so the newest checkpoint is from before them. Lower the learning rate or "
                "check the rewards")


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (hidden temporary folders are not complete)."""
    done = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


# --------------------------------------------------------------------------- the controller


def value_start(reward_dir: Path, sft_dir: Path) -> Path:
    """Where the value model starts: the reward model, whose head already scores a response at
    every token, when its score is that head alone; else sft/ with a new head. A reward model
    with a likelihood weight has a head that is only part of its score (it learns to offset the
    likelihood term), and a value model started there steers GAE's per-token advantages by what
    that head alone likes (measured on the demo: the policy learned the pleasantry the reward
    model ranks down, docs/demo.md)."""
    if reward_dir.exists() and not saved_likelihood_weight(reward_dir):
        return reward_dir
    return sft_dir


def centers_scores(ppo: PPOConfig, first_value_dir: Path, sft_dir: Path) -> bool:
    """ppo.center_scores, or by default whether GAE's value model starts with a new head (from
    sft/), which predicts about 0 whatever the scores' offset."""
    if ppo.center_scores is not None:
        return ppo.center_scores
    return ppo.estimator == "gae" and first_value_dir == sft_dir


class PPOTrainer:
    """Starts the actors (resuming from the newest checkpoint) and runs steps, evals and saves."""

    def __init__(self, cfg: RunConfig, train_files: list[Path], eval_files: list[Path],
                 log: Log = print) -> None:
        self.cfg, self.ppo, self.log = cfg, cfg.ppo, log
        run = RunFolder(cfg.run_dir)
        self.sft_dir, self.reward_dir = run.output("sft"), run.output("reward")
        self.checkpoints = run.checkpoints("ppo")
        check_model_folder(self.sft_dir)
        ppo = self.ppo
        if ppo.reward_source == "model":
            check_model_folder(self.reward_dir)

        self.tokenizer = load_tokenizer(self.sft_dir)
        self.max_len = model_max_len(self.sft_dir)
        self.prompts = load_prompts(train_files, self.tokenizer, ppo.max_new_tokens, self.max_len, "rl")
        self.eval_prompts = (load_prompts(eval_files, self.tokenizer, ppo.max_new_tokens,
                                          self.max_len, "rl_eval")[: ppo.eval_max_prompts]
                             if eval_files else [])
        # The engines never see more than this: their KV cache is sized for it, not the context.
        self.engine_len = max(len(p.ids) for p in self.prompts + self.eval_prompts) + ppo.max_new_tokens
        self.reward_fn: FunctionReward | HTTPReward | None = None
        if ppo.reward_source == "function":
            self.reward_fn = FunctionReward.from_spec(ppo.reward_function or "")
        elif ppo.reward_source == "http":
            self.reward_fn = HTTPReward(ppo.reward_url or "")

        checkpoint = latest_checkpoint(self.checkpoints)
        state = json.loads((checkpoint / "state.json").read_text()) if checkpoint else {}
        self.start_step = int(state.get("step", 0))
        self.version = self.start_step  # weight version = the number of updates in the weights
        self.kl = KLController(state.get("kl_coef", ppo.kl_coef), ppo.kl_target)
        self.restarts_left = ppo.engine_restarts
        policy_dir = checkpoint / "policy" if checkpoint else self.sft_dir
        first_value_dir = value_start(self.reward_dir, self.sft_dir)
        value_dir = checkpoint / "value" if checkpoint else first_value_dir
        self.center_scores = centers_scores(ppo, first_value_dir, self.sft_dir)

        self.uses_value = ppo.estimator == "gae"
        roles = ["rollout", "policy", "reference"]
        roles += ["value"] * self.uses_value + ["reward"] * (ppo.reward_source == "model")
        if not ray.is_initialized():
            raise RuntimeError("PPOTrainer needs a connected Ray (rlhf_ray.cluster.connect)")
        if not joins_cluster(cfg.cluster):  # every role on this machine: refuse what cannot fit
            check_fits_here(cfg, "ppo", self.sft_dir, self.engine_len - ppo.max_new_tokens)
        self.placement = actors.reserve(ppo, roles)
        self.engines: list[Any] = []
        self.policy: RoleGroup | None = None
        self.reference = self.value = self.reward_model = None
        self.streamed = False  # whether the weight sync streams over a torch.distributed group
        self.sync_bytes = 0  # bytes the last streamed sync broadcast
        try:
            self.engines = [self._start_engine(i, policy_dir, self.version)
                            for i in range(ppo.num_rollout_engines)]
            self.policy = actors.launch_role(self.placement, "policy", ppo, policy_dir, ppo.policy_lr)
            self.reference = actors.launch_role(self.placement, "reference", ppo, self.sft_dir)
            if self.uses_value:
                self.value = actors.launch_role(self.placement, "value", ppo, value_dir, ppo.value_lr)
            if ppo.reward_source == "model":
                self.reward_model = actors.launch_role(self.placement, "reward", ppo, self.reward_dir)
            # The roles construct side by side: each imports torch and loads its model at once (on 2
            # cores that is CPU-bound, 21 s -> 20 s; with a core or a GPU each, the slowest role's time).
            for group in self._groups():
                group.join()
            get_all([e.ready.remote() for e in self.engines])  # construction errors surface here
            if checkpoint:
                for role in self._trained():
                    role.each("load_optimizer", checkpoint / f"{role.name}_optim.pt").get()
            self.engine_dtype = ray.get(self.engines[0].weights_dtype.remote())
            self.join_weight_sync()
        except BaseException:
            self.close()
            raise
        if checkpoint:
            log(f"resumed from {checkpoint} (step {self.start_step}, kl_coef {self.kl.value:.4g})")

    def _groups(self) -> list[RoleGroup]:
        return [g for g in (self.policy, self.reference, self.value, self.reward_model) if g]

    def dead_workers(self, timeout_s: float = 30.0) -> list[str]:
        """The engines and role workers that no longer answer because they died (a worker
        still busy within the timeout is not counted)."""
        named = {f"rollout engine {i}": e for i, e in enumerate(self.engines)}
        named |= {f"{g.name} worker {rank}": w for g in self._groups() for rank, w in enumerate(g.workers)}
        pings = {name: worker.ready.remote() for name, worker in named.items()}
        done, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=timeout_s)
        dead = []
        for name, ref in pings.items():
            if ref in done:
                try:
                    ray.get(ref)
                except RayActorError:
                    dead.append(name)
        return dead

    def _trained(self) -> list[RoleGroup]:
        return [g for g in (self.policy, self.value) if g]

    def _start_engine(self, index: int, model_dir: Path, version: int) -> Any:
        return actors.start_rollout(self.placement, f"rollout{index}", self.ppo, model_dir,
                                    self.engine_len, seed=self.cfg.seed + index, version=version)

    # ----------------------------------------------------------------------- rollouts

    def generate(self, prompts: list[list[int]], temperature: float, seed: int) -> list[Rollout]:
        """Spread the prompts over the engines; a dead engine is restarted and re-synced once."""
        for attempt in range(2):
            share = -(-len(prompts) // len(self.engines))
            calls = [engine.generate.remote(prompts[i * share : (i + 1) * share],
                                            self.ppo.max_new_tokens, temperature, self.ppo.top_p,
                                            self.version, seed + i * share)
                     for i, engine in enumerate(self.engines) if prompts[i * share : (i + 1) * share]]
            try:
                results = ray.get(calls, timeout=self.ppo.rollout_timeout_s)
                return [r for chunk in results for r in chunk]
            except GetTimeoutError:
                raise RuntimeError(f"rollouts took longer than ppo.rollout_timeout_s="
                                   f"{self.ppo.rollout_timeout_s:g}") from None
            except RayActorError as e:
                if attempt or self.restarts_left == 0:
                    raise RuntimeError(f"a rollout engine died and ppo.engine_restarts="
                                       f"{self.ppo.engine_restarts} are used up: {e}") from None
                self.restart_dead_engines()
        raise AssertionError("unreachable")

    def restart_dead_engines(self) -> None:
        """Replace every engine that no longer answers, and give it the current weights."""
        for i, engine in enumerate(self.engines):
            try:
                ray.get(engine.ready.remote(), timeout=60)
                continue
            except (RayActorError, GetTimeoutError):
                pass
            self.restarts_left -= 1
            self.log(f"rollout engine {i} died; restarting it with weight version {self.version}")
            ray.kill(engine)
            self.engines[i] = self._start_engine(i, self.sft_dir, 0)
            ray.get(self.engines[i].ready.remote())
        self.join_weight_sync()  # a group with a dead member is of no use: all join a new one
        self.send_weights(self.version)

    # ----------------------------------------------------------------------- weight sync

    def join_weight_sync(self) -> None:
        """Form the weight-sync group of the policy's rank 0 and every engine worker; where it
        cannot be formed, the weights go through Ray's object store. The log says which."""
        res = self.ppo.resources
        tp = res.tensor_parallel_size
        world = 1 + len(self.engines) * tp
        backend = "nccl" if res.policy.num_gpus > 0 and res.rollout.num_gpus > 0 else "gloo"
        assert self.policy is not None
        if self.ppo.weight_sync == "object_store":
            self.streamed = False
            self.log("weight sync: through Ray's object store (ppo.weight_sync: object_store)")
            return
        try:
            host, port = self.policy.first("open_weight_sync", world).get()
            joins = [self.policy.first("join_weight_sync", world, backend).refs[0]]
            joins += [e.join_weight_sync.remote(host, port, 1 + i * tp, world, backend)
                      for i, e in enumerate(self.engines)]
            get_all(joins, timeout=weight_sync.JOIN_TIMEOUT.total_seconds() + 60)
        except Exception as e:  # noqa: BLE001 - any failure leaves the object-store path
            self.streamed = False
            self.log(f"weight sync: no torch.distributed group could be formed ({e}); the "
                     "weights go to the engines through Ray's object store")
            return
        self.streamed = True
        self.log(f"weight sync: streamed over {backend} from the policy's rank 0 to {world - 1} "
                 f"engine workers in buckets of {self.ppo.sync_bucket_mb:g} MB")

    def send_weights(self, version: int) -> None:
        """Put the policy's current weights into every engine as `version`."""
        assert self.policy is not None
        if self.streamed:
            bucket = int(self.ppo.sync_bucket_mb * 1e6)  # MB as rlhf-ray plan counts it
            sent = self.policy.each("send_weights", bucket, self.engine_dtype)
            done = get_all(sent.refs + [e.receive_weights.remote(version) for e in self.engines])
            self.sync_bytes = int(done[0])  # what rank 0 broadcast
        else:
            state = self.policy.each("state_dict")  # gathered on rank 0 once, shared by all
            get_all([e.load_weights.remote(state.refs[0], version) for e in self.engines]
                    + state.refs)
            self.sync_bytes = 0  # nothing streamed

    def sync_weights(self) -> None:
        """Send the policy's weights to every engine as the next version."""
        self.version += 1
        self.send_weights(self.version)

    # ----------------------------------------------------------------------- scoring

    def score(self, exp_ref: Any, rollouts: list[Rollout], prompts: list[Prompt]
              ) -> torch.Tensor | Pending:
        """The sequence scores (B,), or their Pending when the reward model computes them."""
        if self.reward_model is not None:
            return self.reward_model.rows("score", exp_ref)
        assert self.reward_fn is not None
        texts = [self.response_text(r) for r in rollouts]
        return self.reward_fn.score(texts, [p.ground_truth for p in prompts],
                                    [p.text for p in prompts])

    def response_text(self, rollout: Rollout) -> str:
        ids = rollout.response_ids
        if rollout.finish_reason == "stop" and ids and ids[-1] in self.tokenizer.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    # ----------------------------------------------------------------------- one step

    def step(self, step: int) -> dict[str, Any]:
        """Rollout, experience, update and sync for `step` (0-based); its metrics."""
        ppo = self.ppo
        t0 = time.perf_counter()
        chosen = [self.prompts[i] for i in step_prompts(len(self.prompts), ppo.prompts_per_step,
                                                        self.cfg.seed, step)]
        batch = [p for p in chosen for _ in range(ppo.samples_per_prompt)]  # group after group
        rollouts = self.generate([p.ids for p in batch], ppo.temperature,
                                 seed=(self.cfg.seed * 1_000_003 + step) * 65_536)
        t1 = time.perf_counter()

        exp = pack_rollouts(rollouts, self.tokenizer.pad_id, ppo.temperature)
        exp_ref = ray.put(exp)
        recompute = needs_policy_pass(ppo)
        calls = {"ref_logprobs": self.reference.rows("logprobs", exp_ref)}
        if recompute:
            calls["policy_logprobs"] = self.policy.rows("logprobs", exp_ref)
        if self.value is not None:
            calls["values"] = self.value.rows("values", exp_ref)
        scores = self.score(exp_ref, rollouts, batch)
        if isinstance(scores, Pending):
            calls["scores"] = scores
        results = {name: pending.get() for name, pending in calls.items()}  # all in flight
        exp.ref_logprobs = results["ref_logprobs"]
        exp.policy_logprobs = results.get("policy_logprobs")
        exp.values = results.get("values")
        correction: dict[str, float] = {}
        if ppo.old_logprobs == "policy":
            exp.old_logprobs = exp.policy_logprobs
            if ppo.tis_cap is not None:  # the samples came from the engine's numerics
                exp.is_weights, correction = truncated_is_weights(
                    exp.policy_logprobs, exp.sample_logprobs, exp.response_mask, ppo.tis_cap)
        else:
            exp.old_logprobs = exp.sample_logprobs
        scores = results.get("scores", scores)
        if not torch.isfinite(scores).all():
            raise ValueError(f"the reward model returned non-finite scores at step {step}: "
                             f"{scores.tolist()}")
        stats = compute_advantages(exp, scores, ppo, self.kl.value, self.center_scores)
        t2 = time.perf_counter()

        exp_ref = ray.put(exp)
        seed = self.cfg.seed * 1_000_003 + step  # the mini-batches' order, the same on every rank
        updates = [self.policy.each("update", exp_ref, ppo, self.kl.value, seed)]
        if self.value is not None:
            updates.append(self.value.each("update", exp_ref, ppo, seed))
        losses: dict[str, float] = {}
        for update in updates:
            losses.update(update.get())
        check_finite_updates(losses, ppo.max_nonfinite_updates, step + 1)
        t3 = time.perf_counter()
        self.sync_weights()
        t4 = time.perf_counter()

        kl_coef = self.kl.value
        self.kl.update(stats["kl"], len(batch))
        mask = exp.response_mask.float()
        lengths = mask.sum(1)
        generated = int(lengths.sum().item())
        metrics = {
            "step": step + 1,
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            **stats,
            "kl_coef": kl_coef,
            **losses,
            **correction,
            "response_length": lengths.mean().item(),
            "truncated_fraction": 1.0 - exp.finished.float().mean().item(),
            "time_generate": t1 - t0,
            "time_experience": t2 - t1,
            "time_train": t3 - t2,
            "time_sync": t4 - t3,
            "sync_gb_per_s": self.sync_bytes / 1e9 / max(t4 - t3, 1e-9),  # 0: object-store path
            "rollout_tokens_per_s": generated / max(t1 - t0, 1e-9),
            "weight_version": self.version,
        }
        if exp.policy_logprobs is not None:  # how far vLLM's logprobs are from the trainer's
            metrics["logprob_mismatch"] = masked_mean(
                (exp.sample_logprobs - exp.policy_logprobs).abs(), mask).item()
        return metrics

    # ----------------------------------------------------------------------- eval and saving

    def evaluate(self) -> dict[str, float]:
        """On held-out prompts: greedy replies (reward, exact match) and one sample each (reward, KL)."""
        if not self.eval_prompts:
            return {}
        prompts = self.eval_prompts
        result: dict[str, float] = {}
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            rollouts = self.generate([p.ids for p in prompts], temperature, seed=self.cfg.seed)
            exp = pack_rollouts(rollouts, self.tokenizer.pad_id, temperature)
            exp_ref = ray.put(exp)
            scores = self.score(exp_ref, rollouts, prompts)
            if isinstance(scores, Pending):
                scores = scores.get()
            mask = exp.response_mask.float()
            result[f"eval_reward_{name}"] = scores.mean().item()
            result[f"eval_length_{name}"] = mask.sum(1).mean().item()
            if name == "greedy":
                texts = [self.response_text(r) for r in rollouts]
                scored = [exact_match(t, p.ground_truth) for t, p in zip(texts, prompts) if p.ground_truth]
                if scored:
                    result["eval_exact_match"] = sum(scored) / len(scored)
            else:  # the k1 estimate is unbiased only on the policy's own samples
                policy_lp, ref_lp = (self.policy.rows("logprobs", exp_ref),
                                     self.reference.rows("logprobs", exp_ref))
                policy_lp, ref_lp = policy_lp.get(), ref_lp.get()
                result["eval_kl"] = ((policy_lp - ref_lp) * mask).sum(1).mean().item()
        return result

    def save_checkpoint(self, step: int) -> Path:
        """Everything a resume needs, written atomically; older checkpoints beyond the limit go."""
        dest = self.checkpoints / f"step_{step:06d}"
        with atomic_folder(dest, replace=True) as tmp:
            saves = [role.each("save", tmp / role.name) for role in self._trained()]
            saves += [role.each("save_optimizer", tmp / f"{role.name}_optim.pt")
                      for role in self._trained()]
            for save in saves:
                save.get()
            write_json_atomic(tmp / "state.json", {"step": step, "kl_coef": self.kl.value,
                                                   "weight_version": self.version})
        for old in sorted(self.checkpoints.glob("step_*"))[: -self.ppo.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return dest

    def export(self, dest: Path) -> None:
        assert self.policy is not None
        self.policy.each("save", Path(dest)).get()

    def close(self) -> None:
        """Stop the engines (vLLM's engine process too), the actors and the placement group."""
        try:
            ray.get([e.shutdown.remote() for e in self.engines], timeout=60)
        except (RayActorError, GetTimeoutError):
            pass
        for engine in self.engines:
            ray.kill(engine)
        for group in self._groups():
            group.kill()
        self.placement.remove()


# --------------------------------------------------------------------------- the stage


def progress(step: int, steps: int, m: dict[str, Any], width: int = 20) -> str:
    done = round(width * step / steps)
    line = (f"step {step}/{steps} [{'#' * done}{'.' * (width - done)}] "
            f"reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} kl {m['kl']:.3f} "
            f"len {m['response_length']:.1f} clip {m['clip_fraction']:.2f} | "
            f"gen {m['time_generate']:.1f}s exp {m['time_experience']:.1f}s "
            f"train {m['time_train']:.1f}s sync {m['time_sync']:.2f}s "
            f"({m['rollout_tokens_per_s']:.0f} tok/s)")
    if "eval_reward_greedy" in m:
        line += (f" | eval reward {m['eval_reward_greedy']:.3f} kl {m['eval_kl']:.3f}"
                 + (f" exact {m['eval_exact_match']:.0%}" if "eval_exact_match" in m else ""))
    return line


def run_ppo(cfg: RunConfig, train_files: list[Path], eval_files: list[Path],
            log: Log = print, log_step: Log | None = None) -> Path:
    """Run (or resume) PPO to cfg.ppo.steps and export the policy to <run>/rlhf/.

    A role worker that dies stops the step; the roles are then recreated from the newest
    checkpoint (up to ppo.role_restarts times), and the steps after it are run again, their
    earlier metric lines dropped, so each step is in metrics/ppo.jsonl once. Each step's line
    goes to `log_step` (by default `log`)."""
    ppo = cfg.ppo
    metrics_path = RunFolder(cfg.run_dir).metrics("ppo")
    restarts_left = ppo.role_restarts
    trainer = PPOTrainer(cfg, train_files, eval_files, log)
    try:
        while True:
            try:
                run_steps(trainer, metrics_path, log_step or log)
                break
            except Exception as e:
                # A dead worker surfaces as its own death or as its peers' broken collective.
                dead = trainer.dead_workers()
                if not dead:
                    raise
                if restarts_left == 0:
                    raise RuntimeError(f"{', '.join(dead)} died and ppo.role_restarts="
                                       f"{ppo.role_restarts} are used up: {e}") from None
                restarts_left -= 1
                trainer.close()
                checkpoint = latest_checkpoint(trainer.checkpoints)
                log(f"a PPO role worker died ({', '.join(dead)}); recreating the roles from "
                    f"{checkpoint or 'the start'} (ppo.role_restarts: {restarts_left} left)")
                trainer = PPOTrainer(cfg, train_files, eval_files, log)
        out = RunFolder(cfg.run_dir).output("ppo")
        trainer.export(out)
        return out
    finally:
        trainer.close()


def run_steps(trainer: PPOTrainer, metrics_path: Path, log: Log) -> None:
    """The steps from the trainer's start to ppo.steps: eval, checkpoint and metrics as due."""
    ppo = trainer.ppo
    start = trainer.start_step
    keep_metrics_before(metrics_path, start if start else -1)  # a fresh start keeps nothing
    if start == 0 and trainer.eval_prompts:
        append_metrics(metrics_path, {"step": 0, **trainer.evaluate()})  # the SFT model
    for step in range(start, ppo.steps):
        metrics = trainer.step(step)
        done = step + 1
        if trainer.eval_prompts and (done % ppo.eval_every == 0 or done == ppo.steps):
            metrics.update(trainer.evaluate())
        if done % ppo.checkpoint_every == 0 or done == ppo.steps:
            trainer.save_checkpoint(done)
        append_metrics(metrics_path, {**metrics, "resumed_from": start})
        log(progress(done, ppo.steps, metrics))
