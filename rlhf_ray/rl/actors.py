"""The PPO roles as Ray actors, placed together in one placement group.

Each actor is `ray.remote` of a plain class from `roles.py` or `rollout.py`; this module adds only
where they run. A role of N workers (or replicas) is N actors with a bundle each, started as one
`RoleGroup`; its bundles are named 'policy0', 'policy1', ... like the engines' 'rollout0', .... All bundles are reserved at once, so a job never holds half of its roles while
it waits for the rest, and an autoscaler sees the whole demand; if the cluster cannot provide
them within `placement_timeout_s`, the error says what was asked and what the cluster has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray import cluster
from rlhf_ray.cluster import ACTOR_ENV, bundle, torch_threads
from rlhf_ray.config import FrozenRoleResources, PPOConfig, RoleResources, TrainedRoleResources
from rlhf_ray.memory import rollout_sequences
from rlhf_ray.rl.group import RoleGroup
from rlhf_ray.rl.roles import PolicyRole, ReferenceRole, RewardModelRole, ValueRole
from rlhf_ray.rl.rollout import RolloutActor

PolicyActor = ray.remote(PolicyRole)
ValueActor = ray.remote(ValueRole)
ReferenceActor = ray.remote(ReferenceRole)
RewardActor = ray.remote(RewardModelRole)


@dataclass
class Placement:
    """One placement group; `options(role, ...)` schedules an actor into that role's bundle."""

    group: PlacementGroup
    index: dict[str, int] = field(default_factory=dict)

    def options(self, role: str, res: RoleResources) -> dict[str, Any]:
        return {
            "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus,
            "runtime_env": ACTOR_ENV,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=self.index[role]),
        }

    def remove(self) -> None:
        remove_placement_group(self.group)


def workers(res: RoleResources) -> int:
    """How many actors a role's resources ask for."""
    if isinstance(res, TrainedRoleResources):
        return res.num_workers
    if isinstance(res, FrozenRoleResources):
        return res.num_replicas
    return 1


def bundle_names(ppo: PPOConfig, roles: list[str]) -> list[str]:
    """One bundle per engine and per worker of each role: 'rollout0', ..., 'policy0', ...."""
    names = [f"rollout{i}" for i in range(ppo.num_rollout_engines)] if "rollout" in roles else []
    for role in roles:
        if role != "rollout":
            names += [f"{role}{i}" for i in range(workers(getattr(ppo.resources, role)))]
    return names


def reserve(ppo: PPOConfig, roles: list[str]) -> Placement:
    """Reserve the bundles of `roles` ('rollout', 'policy', ...) and wait for them."""
    res = ppo.resources
    bundles, index = [], {}
    names = bundle_names(ppo, roles)
    for name in names:
        index[name] = len(bundles)
        role = name.rstrip("0123456789")
        own: RoleResources = getattr(res, role)
        # an engine's GPUs are multiplied by its TP size
        bundles.append(bundle(own.num_cpus, own.num_gpus * (res.tensor_parallel_size if role == "rollout" else 1)))
    group = cluster.reserve(f"PPO roles ({', '.join(roles)}: {len(names)} bundles)", bundles,
                            res.placement_strategy, res.placement_timeout_s,
                            log=lambda m: print(f"[ppo] {m}", flush=True))
    return Placement(group, index)


def start_rollout(placement: Placement, role: str, ppo: PPOConfig, model_dir: Path,
                  max_model_len: int, seed: int, version: int) -> Any:
    res = ppo.resources.rollout
    options = placement.options(role, res)
    options["num_gpus"] = res.num_gpus * ppo.resources.tensor_parallel_size
    return RolloutActor.options(**options).remote(
        model_dir, max_model_len=max_model_len, sequences=rollout_sequences(ppo),
        kv_cache=ppo.kv_cache, role=f"PPO {role}", seed=seed, dtype=ppo.rollout_dtype, tensor_parallel_size=ppo.resources.tensor_parallel_size,
        weight_version=version)


def launch_role(placement: Placement, role: str, ppo: PPOConfig, model_dir: Path,
                lr: float | None = None) -> RoleGroup:
    """The role's workers in their bundles, launched (RoleGroup.join waits for them)."""
    res: TrainedRoleResources | FrozenRoleResources = getattr(ppo.resources, role)
    actor_class = {"policy": PolicyActor, "value": ValueActor, "reference": ReferenceActor,
                   "reward": RewardActor}[role]
    kwargs: dict[str, Any] = {"precision": ppo.precision, "threads": torch_threads(res),
                              "strategy": res.strategy}
    if lr is not None:
        kwargs |= {"lr": lr, "activation_checkpointing": ppo.activation_checkpointing}
    options = [placement.options(f"{role}{rank}", res) for rank in range(workers(res))]
    return RoleGroup.launch(role, actor_class, options, model_dir=model_dir, **kwargs)
