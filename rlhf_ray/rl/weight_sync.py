"""Streaming the policy's weights to the rollout engines over a torch.distributed group.

The group spans the policy's rank 0 (group rank 0, the sender) and every worker of every vLLM
engine (ranks 1..). It is a second, stand-alone process group: the policy workers keep their own
default group for training and vLLM keeps its own for tensor parallelism, so neither is touched
(vLLM's `examples/rl/` join an external group the same way). gloo on CPU, NCCL on GPU: the same
calls, the backend chosen by the device.

A sync is a stream of buckets. Each bucket is a header (names, shapes, dtypes; a pickled object)
and one flat uint8 tensor holding those tensors' bytes back to back, so one broadcast moves a
whole bucket whatever its dtypes. An empty header ends the stream. The sender never holds more
than one bucket beyond the model it already has; a receiver yields tensors bucket by bucket, a
thread receiving the next bucket while vLLM loads this one.

No Ray and no vLLM in here: `roles.py` sends, `vllm_extension.py` receives.
"""

from __future__ import annotations

import pickle
import queue
import threading
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

Header = list[tuple[str, tuple[int, ...], torch.dtype]]

JOIN_TIMEOUT = timedelta(minutes=2)  # members that have not all joined by then fail


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def open_store(host: str, world_size: int, timeout: timedelta = JOIN_TIMEOUT) -> dist.TCPStore:
    """Rank 0's store of a group: it listens on a port the OS picks as it binds (`store.port`),
    so no other process can take the port between choosing and binding it."""
    return dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=timeout)


def connect_store(host: str, port: int, world_size: int,
                  timeout: timedelta = JOIN_TIMEOUT) -> dist.TCPStore:
    """Another member's connection to rank 0's store."""
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)


def join_group(store: dist.Store, rank: int, world_size: int, backend: str,
               timeout: timedelta = JOIN_TIMEOUT) -> dist.ProcessGroup:
    """Join the stand-alone group over `store` (rank 0's `open_store`, or a `connect_store` to
    it); returns once all `world_size` members have joined."""
    prefixed = dist.PrefixStore("rlhf-ray-weight-sync", store)
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
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def send(group: dist.ProcessGroup, tensors: Iterable[tuple[str, torch.Tensor]],
         bucket_bytes: int, device: torch.device) -> int:
    """Broadcast `tensors` (lazily produced, e.g. gathered shard by shard) in buckets of about
    `bucket_bytes`, then the end of the stream; the number of bytes sent.

    The bucket is one buffer, filled and broadcast again and again: a fresh one per bucket would
    cost the page faults of new memory each time (half the transport time at 256 MB on a CPU)."""
    buffer = torch.empty(_aligned(bucket_bytes), dtype=torch.uint8, device=device)
    header: Header = []
    used = sent = 0

    def flush() -> None:
        _broadcast_object(group, header, device)
        _broadcast(group, buffer[:used])

    for name, tensor in tensors:
        data = _flat_bytes(tensor)
        if header and used + _aligned(data.numel()) > buffer.numel():
            flush()
            sent, header, used = sent + used, [], 0
        if _aligned(data.numel()) > buffer.numel():  # a tensor larger than a bucket goes alone
            buffer = torch.empty(_aligned(data.numel()), dtype=torch.uint8, device=device)
        buffer[used : used + data.numel()].copy_(data)
        header.append((name, tuple(tensor.shape), tensor.dtype))
        used += _aligned(data.numel())
    if header:
        flush()
        sent += used
    _broadcast_object(group, [], device)  # the end
    return sent


def _receive_buckets(group: dist.ProcessGroup, device: torch.device, ready: queue.Queue) -> None:
    """Receive bucket after bucket into `ready` (header, buffer), then None; an error instead
    if one is raised. Each bucket is a fresh buffer: vLLM may hold a layer's tensors until the
    layer is complete, or until the end of the reload, so a buffer is never reused."""
    try:
        while True:
            header = _broadcast_object(group, None, device)
            assert isinstance(header, list)
            if not header:
                ready.put(None)
                return
            size = sum(_aligned(torch.Size(shape).numel() * dtype.itemsize) for _, shape, dtype in header)
            buffer = torch.empty(size, dtype=torch.uint8, device=device)
            _broadcast(group, buffer)
            ready.put((header, buffer))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
        ready.put(e)


def receive(group: dist.ProcessGroup, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors rank 0 sends, until the end of the stream. A thread receives one bucket ahead,
    so the transport of bucket k + 1 overlaps the consumer's loading of bucket k."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    threading.Thread(target=_receive_buckets, args=(group, device, ready), daemon=True,
                     name="weight-sync-receive").start()
    while (bucket := ready.get()) is not None:
        if isinstance(bucket, BaseException):
            raise bucket
        header, buffer = bucket
        offset = 0
        for name, shape, dtype in header:
            size = torch.Size(shape).numel() * dtype.itemsize
            yield name, buffer[offset : offset + size].view(dtype).reshape(shape)
            offset += _aligned(size)
