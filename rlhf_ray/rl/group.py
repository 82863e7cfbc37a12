"""A PPO role run by N Ray actors, driven by the controller as one object.

The workers are actors of the same role class (rl/roles.py), rank 0..N-1; with N > 1 the trained
roles (and FSDP-sharded frozen ones) join one torch.distributed group whose store rank 0 serves.
Every call goes to every worker with the same arguments; each worker knows its rank and takes
its share. `rows` concatenates the workers' results (a forward pass over a batch's rows),
`each` keeps rank 0's (an update whose statistics every rank has all-reduced, a save).

Calls return a `Pending` right away, so the controller can start several roles' work before
waiting for any of it; the controller never asks how many workers a role has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ray
import torch


def get_all(refs: list[Any], timeout: float | None = None) -> list[Any]:
    """ray.get of every ref, raising as soon as one fails: when a rank dies the others wait for
    it inside a collective, and a plain ray.get would wait with them."""
    waiting = list(refs)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1, timeout=timeout)
        if not done:
            raise TimeoutError(f"{len(waiting)} calls still running after {timeout:g} s")
        ray.get(done)  # raises the worker's error, if any
    return ray.get(list(refs))


@dataclass
class Pending:
    """Calls in flight on a group's workers; `get` waits for them and combines the results."""

    refs: list[Any]
    combine: Callable[[list[Any]], Any]

    def get(self, timeout: float | None = None) -> Any:
        return self.combine(get_all(self.refs, timeout))


def _concatenate(results: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(results)


def _first(results: list[Any]) -> Any:
    return results[0]


class RoleGroup:
    """N workers of one role, started together and joined in their group."""

    def __init__(self, name: str, workers: list[Any]) -> None:
        self.name, self.workers = name, workers

    @classmethod
    def launch(cls, name: str, actor_class: Any, options: list[dict[str, Any]], **kwargs: Any
               ) -> RoleGroup:
        """One actor per `options` (its placement and resources), as rank i of len(options).
        They are constructed in the background, so the controller can launch every role before it
        `join`s any: each imports torch and loads its model at the same time as the others."""
        world = len(options)
        workers = [actor_class.options(**o).remote(**kwargs, rank=rank, world_size=world)
                   for rank, o in enumerate(options)]
        return cls(name, workers)

    def join(self) -> RoleGroup:
        """Wait until every worker is constructed and has joined the group (killing them all if
        one fails)."""
        try:
            if len(self.workers) > 1:
                host, port = ray.get(self.workers[0].open_group_store.remote())
                self.each("join", host, port).get()
            else:
                self.each("ready").get()  # construction errors surface here
        except BaseException:
            self.kill()
            raise
        return self

    def rows(self, method: str, *args: Any) -> Pending:
        """Every worker runs `method` on its share of the batch; their rows, concatenated."""
        return Pending(self._call(method, *args), _concatenate)

    def each(self, method: str, *args: Any) -> Pending:
        """Every worker runs `method` (they take part in its collectives); rank 0's result."""
        return Pending(self._call(method, *args), _first)

    def first(self, method: str, *args: Any) -> Pending:
        """Only rank 0 runs `method` (e.g. joining the weight-sync group)."""
        return Pending([getattr(self.workers[0], method).remote(*args)], _first)

    def _call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(w, method).remote(*args) for w in self.workers]

    def kill(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
