"""The weight-sync stream between two real processes over gloo: every tensor arrives whole, in
order, in its dtype and shape, whatever the bucket size (a tensor larger than a bucket goes alone),
and the store's port is the one the OS bound (no race for a port chosen beforehand)."""

import io
import multiprocessing

import pytest
import torch

from rlhf_ray.rl import weight_sync

TENSORS = {
    "embed": torch.randn(50, 8),
    "odd_bf16": torch.randn(7).bfloat16(),  # 14 bytes: the next tensor must still be aligned
    "ids": torch.arange(5),
    "big": torch.randn(300, 100),  # 120 kB: larger than the small bucket
    "scalar": torch.tensor(3.5),
}


def _receive(port: int, results: multiprocessing.Queue) -> None:
    group = weight_sync.join_group(weight_sync.connect_store("127.0.0.1", port, 2), 1, 2, "gloo")
    for _ in range(2):  # two syncs over the same group
        received = [(name, tensor.clone()) for name, tensor in weight_sync.receive(group, torch.device("cpu"))]
        # As bytes: a tensor put on a queue travels as a file descriptor that the parent fetches from
        # this process later, and this process may have exited by then (connection reset).
        buffer = io.BytesIO()
        torch.save(received, buffer)
        results.put(buffer.getvalue())


@pytest.mark.parametrize("bucket_bytes", [64, 10_000, 10**7])
def test_every_tensor_arrives_whole_and_in_order(bucket_bytes):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store = weight_sync.open_store("127.0.0.1", 2)
    assert store.port > 0
    receiver = context.Process(target=_receive, args=(store.port, results))
    receiver.start()
    try:
        group = weight_sync.join_group(store, 0, 2, "gloo")
        for _ in range(2):
            sent = weight_sync.send(group, iter(TENSORS.items()), bucket_bytes, torch.device("cpu"))
            got = torch.load(io.BytesIO(results.get(timeout=60)))
            assert [name for name, _ in got] == list(TENSORS)
            for name, tensor in got:
                assert tensor.dtype == TENSORS[name].dtype and torch.equal(tensor, TENSORS[name]), name
            assert sent >= sum(t.numel() * t.element_size() for t in TENSORS.values())
    finally:
        receiver.join(timeout=60)
        if receiver.is_alive():
            receiver.kill()
