"""The training loop shared by pretraining, SFT, reward modelling and DPO, in plain torch.

It knows nothing of Ray: a `Worker` says who this process is and how to report and checkpoint,
and a `Task` says what the model, the batches, the loss and the evaluation are. `ray_stage.py`
runs it inside Ray Train; a benchmark or a test can run it alone.

Batches are a pure function of (seed, step, rank), so the "data position" in a checkpoint is the
step itself: a resumed run sees exactly the batches the lost steps would have seen.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from rlhf_ray.config import TrainStage
from rlhf_ray.run import append_metrics, keep_metrics_before
from rlhf_ray.train.flops import peak_flops
from rlhf_ray.train.optim import lr_at, make_optimizer

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    """One training stage: what to train, on what, against which objective."""

    name: str  # "pretrain", "sft", "reward" or "dpo": names the metrics file and the checkpoints
    stage: TrainStage

    def build_model(self) -> torch.nn.Module: ...

    def micro_batches(self, step: int, rank: int, world: int) -> list[Batch]:
        """This worker's share of the global batch of `step`, split into micro-batches."""
        ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of units it sums over); units are tokens, or comparisons."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...

    def units(self, batch: Batch) -> int:
        """How many loss units (tokens, comparisons) `batch` holds."""
        ...

    def flops_per_token(self, model: torch.nn.Module) -> float: ...

    def export(self, model: torch.nn.Module) -> None:
        """Write the final model as its Hugging Face folder."""
        ...

    # Optional, found with getattr (DPO has both):
    #   prepare(device, start_step, rank, world_size): once before the first step of this attempt
    #   take_sums() -> {metric: tensor}: the task's own metrics, summed over the loss units of
    #     this worker's micro-batches since the last call; the loop logs each as a per-unit mean


@dataclass
class Worker:
    """Who this process is, and how it reports. The defaults run a single process alone."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metrics_path: Path | None = None
    # report(metrics, checkpoint_dir or None): every worker calls it at the same steps.
    report: Callable[[dict[str, Any], Path | None], None] = lambda metrics, checkpoint: None
    # The folder of the checkpoint to resume from, if any.
    resume_from: Callable[[], Any] = lambda: nullcontext(None)


def train(task: Task, worker: Worker) -> dict[str, float]:
    """Train `task.stage.steps` optimizer steps (resuming if a checkpoint exists); export on rank 0."""
    stage = task.stage
    model = task.build_model().to(worker.device)
    distributed = dist.is_available() and dist.is_initialized() and worker.world_size > 1
    sharded = distributed and stage.strategy == "fsdp"
    if sharded:
        shard(model)  # in place: parameters become shards, so the optimizer is made after
    trained = DistributedDataParallel(model) if distributed and not sharded else model
    optimizer = make_optimizer(model, stage.optim)
    start_step = 0
    with worker.resume_from() as checkpoint_dir:
        if checkpoint_dir is not None:
            start_step = load_checkpoint(Path(checkpoint_dir), model, optimizer)
    if worker.rank == 0 and worker.metrics_path is not None:
        keep_metrics_before(worker.metrics_path, start_step)
        if start_step:
            print(f"[{task.name}] resumed from the checkpoint of step {start_step}", flush=True)
    if (prepare := getattr(task, "prepare", None)) is not None:
        prepare(worker.device, start_step, worker.rank, worker.world_size)

    use_bf16 = uses_bf16(stage.precision, worker.device)
    peak = peak_flops(worker.device, torch.bfloat16 if use_bf16 else torch.float32) * worker.world_size
    flops_per_token = task.flops_per_token(model)
    last: dict[str, float] = {}

    for step in range(start_step, stage.steps):
        started = time.perf_counter()
        lr = lr_at(step, stage.steps, stage.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = task.micro_batches(step, worker.rank, worker.world_size)
        units, tokens = global_units(task, batches, worker)
        loss_sum = torch.zeros((), device=worker.device)
        trained.train()
        for i, batch in enumerate(batches):
            batch = {k: v.to(worker.device) for k, v in batch.items()}
            with gradient_sync(trained, i == len(batches) - 1), torch.autocast(worker.device.type, torch.bfloat16, enabled=use_bf16):
                loss, _ = task.loss(trained, batch)
                # DDP averages gradients over workers; scale so the result is the global mean.
                (loss * worker.world_size / units).backward()
            loss_sum += loss.detach()
        own = task_sums(task, worker.device)
        sums = torch.stack([loss_sum, *own.values()])
        if distributed:
            dist.all_reduce(sums)
        loss_sum = sums[0]
        if not math.isfinite(loss_sum.item()):  # stop before a bad step reaches the weights
            raise FloatingPointError(f"[{task.name}] step {step + 1}: the loss is {loss_sum.item()}")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)  # time the GPU's work, not its queueing
        seconds = time.perf_counter() - started
        metrics = {
            "step": step + 1,
            "loss": loss_sum.item() / units,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens / seconds,
            "mfu": flops_per_token * tokens / seconds / peak,
            "step_s": seconds,
            "workers": worker.world_size,
            "resumed_from": start_step,  # the checkpoint this attempt started from (0: none)
        } | {name: value.item() / units for name, value in zip(own, sums[1:])}
        last_step = step + 1 == stage.steps
        # A sharded model's forward needs every worker; a replicated one only rank 0.
        if (sharded or worker.rank == 0) and (metrics["step"] % stage.eval_every == 0 or last_step):
            metrics.update(task.evaluate(model))
        if worker.rank == 0:
            append_metrics(worker.metrics_path, metrics)
        if metrics["step"] % stage.checkpoint_every == 0 or last_step:
            state = gather_state(model, optimizer)  # every worker takes part
            with checkpoint_dir_for(worker) as ckpt:
                if ckpt is not None:
                    write_checkpoint(ckpt, *state, step + 1)
                worker.report(metrics, ckpt)
        last = metrics
    export(task, model, sharded, worker)
    return last


def task_sums(task: Task, device: torch.device) -> dict[str, torch.Tensor]:
    """The task's own metric sums for this step ({} for a task without take_sums)."""
    take = getattr(task, "take_sums", None)
    return {} if take is None else {k: v.detach().to(device, torch.float32) for k, v in take().items()}


def shard(model: torch.nn.Module, root: torch.nn.Module | None = None,
          mixed_precision: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2: each decoder layer is one unit of all-gather/reduce-scatter, the rest the root's
    (`root`: a module wrapping `model`, e.g. PPO's value head; by default the model itself)."""
    policy = mixed_precision or MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(root if root is not None else model, mp_policy=policy)


@contextmanager
def gradient_sync(trained: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(trained, DistributedDataParallel) and not sync:
        with trained.no_sync():
            yield
    elif hasattr(trained, "set_requires_gradient_sync"):  # FSDP2
        trained.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def export(task: Task, model: torch.nn.Module, sharded: bool, worker: Worker) -> None:
    """Rank 0 writes the Hugging Face folder; a sharded model is gathered into a plain one first."""
    if not sharded:
        if worker.rank == 0:
            task.export(model)
        return
    state, _ = gather_state(model, None)
    if worker.rank == 0:
        plain = task.build_model()
        plain.load_state_dict(state)
        task.export(plain)


def uses_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def global_units(task: Task, batches: list[Batch], worker: Worker) -> tuple[float, int]:
    """Loss units and tokens of this step over every worker (to normalise the summed loss)."""
    counts = torch.tensor([sum(task.units(b) for b in batches),
                           sum(real_tokens(b) for b in batches)], dtype=torch.float64)
    if worker.world_size > 1 and dist.is_initialized():
        counts = counts.to(worker.device)
        dist.all_reduce(counts)
    units, tokens = counts.tolist()
    return max(units, 1.0), int(tokens)


def real_tokens(batch: Batch) -> int:
    """Tokens the model reads, padding excluded."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@contextmanager
def checkpoint_dir_for(worker: Worker) -> Iterator[Path | None]:
    """A scratch folder for rank 0's checkpoint (None on other ranks); gone once reported."""
    if worker.rank != 0:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="rlhf-ray-ckpt-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on rank 0's CPU; empty on other ranks."""
    model_state = get_model_state_dict(model, options=FULL_ON_RANK0)
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0) if optimizer else {}
    return model_state, optim_state


def write_checkpoint(folder: Path, model_state: dict, optim_state: dict, step: int) -> None:
    save_file(_unshared(model_state), folder / "model.safetensors")
    torch.save(optim_state, folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"step": step}))


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    write_checkpoint(folder, *gather_state(model, optimizer), step)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore model and optimizer (sharded or not) from `folder`; return the step it was taken after."""
    try:
        step = json.loads((folder / "state.json").read_text())["step"]
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_file(folder / "model.safetensors"), options=full)
        optim_state = torch.load(folder / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state, options=full)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError,  # missing, malformed, mismatched
            EOFError, SafetensorError, pickle.UnpicklingError) as e:  # empty or corrupt files
        raise RuntimeError(f"{folder}: cannot resume from this checkpoint: {e}") from e
    return int(step)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        out[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out
