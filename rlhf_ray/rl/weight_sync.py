"""Streaming the policy's weights to the rollout engines over a torch.distributed group.

The group spans the policy's rank 0 (group rank 0, the sender) and every worker of every vLLM
engine (ranks 1..). It is a second, stand-alone process group: the policy workers keep their own
default group for training and vLLM keeps its own for tensor parallelism, so neither is touched
(vLLM's `examples/rl/` join an external group the same way). gloo on CPU, NCCL on GPU: the same
calls, the backend chosen by the device.

A sync is a stream of buckets. Each bucket is a header (names, shapes, dtypes; a pickled object)
and one flat uint8 tensor holding those tensors' bytes back to back, so one broadcast moves a
whole bucket whatever its dtypes. An empty header ends the stream. The sender never holds more
than one bucket beyond the model it already has; a receiver yields tensors bucket by bucket, so
vLLM loads them while the next bucket is still on the wire (and holds no second copy either).

No Ray and no vLLM in here: `roles.py` sends, `vllm_extension.py` receives.
"""

from __future__ import annotations

import pickle
import socket
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

Header = list[tuple[str, tuple[int, ...], torch.dtype]]

JOIN_TIMEOUT = timedelta(minutes=5)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the group's store listens on it next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def join_group(host: str, port: int, rank: int, world_size: int, backend: str,
               timeout: timedelta = JOIN_TIMEOUT) -> dist.ProcessGroup:
    """Join the stand-alone group whose store rank 0 serves on host:port; returns once all
    `world_size` members have joined."""
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore(f"rlhf-ray-weight-sync-{port}", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size)
    raise ValueError(f"weight sync: unknown backend {backend!r} (gloo or nccl)")


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _broadcast_object(group: dist.ProcessGroup, obj: object | None, device: torch.device) -> object:
    """Rank 0's `obj` on every rank (others pass None): its length, then its pickled bytes."""
    data = pickle.dumps(obj) if obj is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    _broadcast(group, size)
    if obj is None:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    else:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    _broadcast(group, buffer)
    return pickle.loads(buffer.cpu().numpy().tobytes())


ALIGN = 16  # every tensor starts at a multiple of this in its bucket, so any dtype can view it


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, padded to a multiple of ALIGN."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = _aligned(flat.numel()) - flat.numel()
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def send(group: dist.ProcessGroup, tensors: Iterable[tuple[str, torch.Tensor]],
         bucket_bytes: int, device: torch.device) -> int:
    """Broadcast `tensors` (lazily produced, e.g. gathered shard by shard) in buckets of about
    `bucket_bytes`, then the end of the stream; the number of bytes sent."""
    header: Header = []
    parts: list[torch.Tensor] = []
    size = sent = 0

    def flush() -> None:
        _broadcast_object(group, header, device)
        _broadcast(group, torch.cat(parts).to(device))

    for name, tensor in tensors:
        header.append((name, tuple(tensor.shape), tensor.dtype))
        parts.append(_flat_bytes(tensor))
        size += parts[-1].numel()
        if size >= bucket_bytes:
            flush()
            sent += size
            header, parts, size = [], [], 0
    if header:
        flush()
        sent += size
    _broadcast_object(group, [], device)  # the end
    return sent


def receive(group: dist.ProcessGroup, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors rank 0 sends, bucket by bucket, until the end of the stream. Each bucket is a
    fresh buffer: a consumer may keep the tensors it was given."""
    while True:
        header = _broadcast_object(group, None, device)
        assert isinstance(header, list)
        if not header:
            return
        sizes = [torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in header]
        buffer = torch.empty(sum(map(_aligned, sizes)), dtype=torch.uint8, device=device)
        _broadcast(group, buffer)
        for (name, shape, dtype), size, part in zip(header, sizes, buffer.split(list(map(_aligned, sizes)))):
            yield name, part[:size].view(dtype).reshape(shape)
