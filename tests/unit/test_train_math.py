"""The pure functions of training: schedule, parameter groups, losses, data order, padding, FLOPs.

Expected values are worked out by hand in the tests (or with `math`), not with the code under test.
"""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_ray.config import Optim
from rlhf_ray.modeling import count_parameters, new_policy
from rlhf_ray.train.flops import flops_per_token
from rlhf_ray.train.losses import IGNORE, bradley_terry_loss, lm_loss, shifted_labels
from rlhf_ray.train.optim import lr_at, make_optimizer
from rlhf_ray.modeling import pad
from rlhf_ray.train.tasks import chunks, epoch_order, worker_slice
from tests.tiny import TINY_MODEL

# --------------------------------------------------------------------------- lr_at


def test_warmup_rises_linearly_from_lr_over_warmup_to_the_peak():
    cfg = Optim(lr=0.02, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, 9, cfg) for s in range(4)] == pytest.approx([0.005, 0.01, 0.015, 0.02])


def test_cosine_starts_at_the_peak_passes_the_midpoint_and_ends_at_the_floor():
    # warmup 4, 9 steps: steps 4..8 decay, step 6 is halfway, step 8 (the last one trained) is the floor.
    cfg = Optim(lr=0.02, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(4, 9, cfg) == pytest.approx(0.02)
    assert lr_at(6, 9, cfg) == pytest.approx((0.02 + 0.002) / 2)
    assert lr_at(8, 9, cfg) == pytest.approx(0.002)
    # a quarter of the way: floor + (peak - floor) * (1 + cos(pi/4)) / 2
    assert lr_at(5, 9, cfg) == pytest.approx(0.002 + 0.018 * (1 + math.sqrt(0.5)) / 2)


def test_without_warmup_the_first_step_uses_the_peak_and_the_last_the_floor():
    cfg = Optim(lr=1e-3, warmup_steps=0, min_lr_ratio=0.0)
    lrs = [lr_at(s, 5, cfg) for s in range(5)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[2] == pytest.approx(5e-4)
    assert lrs[4] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_a_one_step_run_trains_at_the_peak():
    assert lr_at(0, 1, Optim(lr=1e-3, warmup_steps=0)) == pytest.approx(1e-3)


# --------------------------------------------------------------------------- make_optimizer


@pytest.fixture
def tiny_llama(tiny_tokenizer) -> LlamaForCausalLM:
    return new_policy(TINY_MODEL, tiny_tokenizer, seed=0)


def test_matrices_are_decayed_and_norms_are_not(tiny_llama):
    optimizer = make_optimizer(tiny_llama, Optim(weight_decay=0.1))
    names = {id(p): name for name, p in tiny_llama.named_parameters()}
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert decayed["params"] and undecayed["params"]
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(names[id(p)].endswith("norm.weight") for p in undecayed["params"])
    assert "model.embed_tokens.weight" in {names[id(p)] for p in decayed["params"]}


def test_every_trainable_parameter_is_in_exactly_one_group(tiny_llama):
    frozen = tiny_llama.model.norm.weight
    frozen.requires_grad_(False)
    optimizer = make_optimizer(tiny_llama, Optim())
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in tiny_llama.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # no parameter twice (the tied head included)
    assert id(frozen) not in grouped


# --------------------------------------------------------------------------- losses


def test_shifted_labels_label_a_position_with_the_next_token_only_where_that_token_is_masked_in():
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    assert shifted_labels(ids, mask).tolist() == [
        [IGNORE, 12, 13, IGNORE, IGNORE],
        [21, 22, 23, 24, IGNORE],  # the last position has no next token
    ]


def test_lm_loss_with_uniform_logits_is_log_vocab_per_labelled_token():
    labels = torch.tensor([[IGNORE, 2, 3, IGNORE, IGNORE], [1, 6, 0, 4, IGNORE]])
    loss, count = lm_loss(torch.zeros(2, 5, 7), labels)
    assert int(count) == 6
    assert loss.item() == pytest.approx(6 * math.log(7))


def test_lm_loss_sums_each_labelled_tokens_cross_entropy_and_skips_ignored_ones():
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [100.0, -100.0]]])
    labels = torch.tensor([[1, 0, IGNORE]])
    loss, count = lm_loss(logits, labels)
    # softmax = (1/4, 3/4): -log(3/4) for label 1, -log(1/4) for label 0; the ignored one adds nothing.
    assert loss.item() == pytest.approx(math.log(4 / 3) + math.log(4))
    assert int(count) == 2


@pytest.mark.parametrize("difference, expected", [
    (0.0, math.log(2)),
    (math.log(3), math.log(4 / 3)),  # sigmoid(log 3) = 3/4
    (-math.log(3), math.log(4)),  # sigmoid(-log 3) = 1/4
])
def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_reward_difference(difference, expected):
    better, worse = torch.tensor([difference + 0.5]), torch.tensor([0.5])
    assert bradley_terry_loss(better, worse).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_loss_stays_finite_for_a_large_wrong_margin():
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)


# --------------------------------------------------------------------------- data order


def test_each_epoch_visits_every_item_exactly_once():
    batches = [epoch_order(12, 4, step, seed=0) for step in range(3)]
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(12))


def test_a_batch_that_crosses_the_epoch_boundary_continues_with_the_next_epochs_permutation():
    epoch0 = epoch_order(10, 10, 0, seed=3)
    epoch1 = epoch_order(10, 10, 1, seed=3)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # reshuffled each epoch
    # batch 4: steps 0, 1 and half of 2 walk epoch 0; the rest of step 2 starts epoch 1
    walked = [i for step in range(3) for i in epoch_order(10, 4, step, seed=3)]
    assert walked == epoch0 + epoch1[:2]


def test_the_order_is_a_pure_function_of_seed_and_step():
    assert epoch_order(50, 8, 7, seed=1) == epoch_order(50, 8, 7, seed=1)
    assert epoch_order(50, 8, 7, seed=1) != epoch_order(50, 8, 7, seed=2)


@pytest.mark.parametrize("size, world", [(8, 1), (8, 2), (8, 4), (8, 3), (10, 4)])
def test_workers_slices_are_disjoint_and_cover_the_global_batch(size, world):
    batch = epoch_order(20, size, 0, seed=0)
    slices = [worker_slice(batch, rank, world) for rank in range(world)]
    assert [i for s in slices for i in s] == batch
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_a_global_batch_smaller_than_the_worker_count_is_refused():
    with pytest.raises(ValueError, match="batch_size at least resources.num_workers"):
        worker_slice([0, 1], 0, 3)


def test_a_worker_slice_splits_into_micro_batches_in_order():
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]


def test_pad_right_pads_to_the_longest_and_masks_the_padding():
    ids, attention = pad([np.array([1, 2, 3], dtype=np.int32), np.array([4], dtype=np.int32)], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == attention.dtype == torch.long


# --------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_count_every_matmul_weight_and_the_attention_over_the_context(tied):
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    # per layer: q 64x64, k and v 64x32 (one kv head of 32), o 64x64, gate/up/down 3 x 64x128, 2 norms
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 64 * 128 + 2 * 64
    body = 2 * per_layer + 64  # + the final norm
    table = 100 * 64
    num_params = count_parameters(LlamaForCausalLM(config))
    assert num_params == body + table * (1 if tied else 2)
    # 6 FLOPs per weight a token is multiplied by: the body and the output head (the input embedding
    # is a lookup); plus 12 * layers * width * context for attention scores and mixing.
    expected = 6 * (body + table) + 12 * 2 * 64 * 16
    assert expected == 507_264
    assert flops_per_token(config, seq_len=16, num_params=num_params) == expected


def test_precision_auto_uses_bf16_on_gpus_and_on_cpus_with_native_bf16():
    from rlhf_ray.train.loop import uses_bf16

    cpu = torch.device("cpu")
    assert uses_bf16("bfloat16", cpu) and not uses_bf16("float32", cpu)
    assert uses_bf16("auto", torch.device("cuda"))
    assert uses_bf16("auto", cpu) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_a_cpus_peak_is_one_threads_measured_rate_times_the_threads(monkeypatch):
    """MFU's denominator on a CPU. Measured with all threads at once, one core busy elsewhere (a
    Ray process starting, the driver) slowed every thread to its pace: the demo's pretraining
    reported MFU 1.1 against a halved peak (252 against 406-433 GFLOP/s bf16 on a 2-core box; one
    thread measures 210-215 busy or not). One thread is measured, alone, and the threads restored."""
    from rlhf_ray.train import flops

    measured_with: list[int] = []

    def one_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
        measured_with.append(torch.get_num_threads())
        return 100e9

    monkeypatch.setattr(flops, "measured_matmul_flops", one_matmul_rate)
    suite_threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        peak = flops.peak_flops(torch.device("cpu"), torch.bfloat16)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(suite_threads)
    assert measured_with == [1]
    assert peak == 3 * 100e9
    assert threads_after == 3
