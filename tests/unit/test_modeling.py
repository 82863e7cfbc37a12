"""The model format: Hugging Face folders with safetensors, policy and scalar-head models."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rlhf_ray.modeling import (
    check_model_folder,
    count_parameters,
    llama_config,
    load_policy,
    load_scalar_model,
    save_model,
)
from tests.tiny import FACTS, TINY_MODEL


def test_a_saved_policy_is_a_plain_transformers_folder(tiny_policy_dir):
    names = {p.name for p in tiny_policy_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not any(name.endswith(".bin") or name.startswith(".") for name in names)
    config = json.loads((tiny_policy_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_a_loaded_policy_computes_the_same_logits(tiny_policy_dir, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer.encode_document(FACTS)])
    first = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)(ids).logits
    second = load_policy(tiny_policy_dir)(ids).logits
    torch.testing.assert_close(first, second)


def test_the_tiny_policy_has_learned_its_text(tiny_policy_dir, tiny_tokenizer):
    model = load_policy(tiny_policy_dir)
    prompt = tiny_tokenizer.encode_document("The capital of")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert tiny_tokenizer.decode(out[0, len(prompt):].tolist()).startswith(" France is Paris.")


def test_generation_stops_at_end_of_turn_or_document(tiny_policy_dir, tiny_tokenizer):
    config = json.loads((tiny_policy_dir / "generation_config.json").read_text())
    assert config["eos_token_id"] == tiny_tokenizer.stop_ids


def test_scalar_model_scores_the_last_non_pad_token(tiny_reward_dir, tiny_tokenizer):
    model = load_scalar_model(tiny_reward_dir).eval()
    short = tiny_tokenizer.encode_document("Paris")
    long = tiny_tokenizer.encode_document("The capital of France is Paris.")
    padded = short + [tiny_tokenizer.pad_id] * (len(long) - len(short))
    with torch.no_grad():
        batch = model(torch.tensor([padded, long])).logits
        alone = model(torch.tensor([short])).logits
    assert batch.shape == (2, 1)
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)


def test_scalar_model_keeps_the_policy_backbone(tiny_policy_dir, tiny_reward_dir):
    policy = load_policy(tiny_policy_dir).state_dict()
    reward = load_scalar_model(tiny_reward_dir).state_dict()
    torch.testing.assert_close(reward["model.layers.0.mlp.up_proj.weight"], policy["model.layers.0.mlp.up_proj.weight"])
    assert reward["score.weight"].shape == (1, TINY_MODEL.hidden_size)


def test_parameter_count_matches_the_architecture(tiny_tokenizer):
    config = llama_config(TINY_MODEL, tiny_tokenizer)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    h, f, v, n = TINY_MODEL.hidden_size, TINY_MODEL.intermediate_size, tiny_tokenizer.vocab_size, TINY_MODEL.num_layers
    kv = h // TINY_MODEL.num_heads * TINY_MODEL.num_kv_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    assert count_parameters(model) == v * h + n * per_layer + h  # tied head


def test_missing_or_broken_model_folders_are_named(tmp_path, tiny_policy_dir):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        check_model_folder(tmp_path / "base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        check_model_folder(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: corrupt"):
        check_model_folder(broken)
    (broken / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        check_model_folder(broken)


def test_a_scalar_model_whose_pad_id_is_not_its_tokenizers_is_refused(tmp_path, tiny_reward_dir,
                                                                      tiny_tokenizer):
    folder = tmp_path / "reward"
    shutil.copytree(tiny_reward_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = tiny_tokenizer.pad_id + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config.json: pad_token_id {tiny_tokenizer.pad_id + 1} "
                                         rf"is not the tokenizer's pad id {tiny_tokenizer.pad_id}"):
        load_scalar_model(folder)
    config["pad_token_id"] = None  # none in the config: the tokenizer's is taken
    (folder / "config.json").write_text(json.dumps(config))
    assert load_scalar_model(folder).config.pad_token_id == tiny_tokenizer.pad_id


def test_a_failed_save_leaves_no_folder_behind(tmp_path, tiny_tokenizer, tiny_policy_dir):
    model = load_policy(tiny_policy_dir)

    class BrokenTokenizer:
        def save(self, folder):
            raise OSError("disk full")

        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

    with pytest.raises(OSError, match="disk full"):
        save_model(model, BrokenTokenizer(), tmp_path / "sft")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the likelihood term


def _by_hand(policy_dir, tokenizer, conversation, weight):
    """The head's score plus `weight` times the mean log-probability of the last turn's tokens
    under the policy the reward model started from, computed apart."""
    from rlhf_ray.data.records import Message

    messages = [Message(**m) for m in conversation]
    ids, mask = tokenizer.render_chat(messages)
    context = len(tokenizer.render_chat(messages[:-1])[0])
    with torch.no_grad():
        logprobs = load_policy(policy_dir)(torch.tensor([ids])).logits[0].log_softmax(-1)
    said = [t for t in range(context, len(ids)) if mask[t]]
    return weight * sum(logprobs[t - 1, ids[t]].item() for t in said) / len(said), messages


CONVERSATION = [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And Peru?"}, {"role": "assistant", "content": "The capital of Peru is Lima."}]


@pytest.mark.parametrize("tied", [True, False])
def test_a_likelihood_weighted_reward_adds_the_last_turns_mean_logprob_to_the_head(tmp_path, tiny_tokenizer, tied):
    """score = head(last token) + w * mean log pi(response token | before), pi the reward model's
    own language model: the tied embeddings, or the lm_head kept from the policy it started from."""
    from rlhf_ray.modeling import LIKELIHOOD_WEIGHT, new_policy, score_conversations

    policy = new_policy(TINY_MODEL.model_copy(update={"tie_word_embeddings": tied}), tiny_tokenizer, seed=1)
    save_model(policy, tiny_tokenizer, tmp_path / "policy")
    torch.manual_seed(0)
    reward = load_scalar_model(tmp_path / "policy", likelihood_weight=2.0).eval()
    likelihood, messages = _by_hand(tmp_path / "policy", tiny_tokenizer, CONVERSATION, 2.0)
    score = score_conversations(reward, tiny_tokenizer, [messages])[0]
    setattr(reward.config, LIKELIHOOD_WEIGHT, 0.0)
    head = score_conversations(reward, tiny_tokenizer, [messages])[0]
    setattr(reward.config, LIKELIHOOD_WEIGHT, 2.0)
    assert likelihood < -1  # a random model: a real term, not a rounding
    assert score == pytest.approx(head + likelihood, abs=1e-4)

    save_model(reward, tiny_tokenizer, tmp_path / "reward")  # the weight and the head travel along
    reloaded = load_scalar_model(tmp_path / "reward").eval()
    assert score_conversations(reloaded, tiny_tokenizer, [messages])[0] == pytest.approx(score, abs=1e-4)


def test_conversations_are_scored_in_batches_of_like_length_and_returned_in_their_order(
        tiny_policy_dir, tiny_tokenizer):
    """Batches go shortest first, so a short reply is not padded to a long one's length; each
    score is the one the conversation gets alone, at its place in the input."""
    from rlhf_ray.data.records import Message
    from rlhf_ray.modeling import score_conversations

    reward = load_scalar_model(tiny_policy_dir, likelihood_weight=1.0).eval()
    short, long = "Lima.", "The capital of Peru is Lima, and its currency is the sol, and it is in South America."
    conversations = [[Message(role="user", content="Peru?"), Message(role="assistant", content=reply)]
                     for reply in (long, short, long + " Yes.", short + " Yes.")]
    widths: list[int] = []
    forward = reward.forward
    reward.forward = lambda *args, **kwargs: widths.append(kwargs["input_ids"].shape[1]) or forward(*args, **kwargs)
    scores = score_conversations(reward, tiny_tokenizer, conversations, batch_size=2)
    lengths = sorted(len(tiny_tokenizer.render_chat(c)[0]) for c in conversations)
    assert widths == [lengths[1], lengths[3]]  # the two short ones together, then the two long ones
    alone = [score_conversations(reward, tiny_tokenizer, [c])[0] for c in conversations]
    assert scores == pytest.approx(alone, abs=1e-5)


def test_a_reward_model_saved_with_a_likelihood_weight_loads_with_it(tmp_path, tiny_policy_dir, tiny_tokenizer):
    from rlhf_ray.modeling import LIKELIHOOD_WEIGHT, likelihood_weight_of

    save_model(load_scalar_model(tiny_policy_dir, likelihood_weight=1.5), tiny_tokenizer, tmp_path / "reward")
    assert likelihood_weight_of(load_scalar_model(tmp_path / "reward")) == 1.5
    assert likelihood_weight_of(load_scalar_model(tiny_policy_dir)) == 0.0  # a plain head by default
    assert json.loads((tmp_path / "reward" / "config.json").read_text())[LIKELIHOOD_WEIGHT] == 1.5


def test_a_likelihood_weighted_score_needs_to_know_the_response(tiny_policy_dir, tiny_tokenizer):
    from rlhf_ray.modeling import sequence_scores

    reward = load_scalar_model(tiny_policy_dir, likelihood_weight=1.0)
    ids = torch.tensor([tiny_tokenizer.encode_document("Paris")])
    with pytest.raises(ValueError, match="likelihood_weight 1.0.*response_mask"):
        sequence_scores(reward, ids, torch.ones_like(ids))


def test_a_likelihood_gate_weighs_each_response_tokens_logprob_by_what_the_model_reads_at_it(
        tmp_path, tiny_policy_dir, tiny_tokenizer):
    """With a gate, the likelihood term is the mean of g_t * log pi(token t | before) over the
    response, g_t = 2 sigmoid(gate(hidden state at token t)): a new gate is 0, so g = 1 and the
    score is the plain one; a trained gate changes it as computed here by hand, and travels with
    the saved model."""
    from rlhf_ray.data.records import Message
    from rlhf_ray.modeling import LIKELIHOOD_GATE, score_conversations

    torch.manual_seed(0)
    plain = load_scalar_model(tiny_policy_dir, likelihood_weight=2.0).eval()
    torch.manual_seed(0)  # the same head
    gated = load_scalar_model(tiny_policy_dir, likelihood_weight=2.0, likelihood_gate=True).eval()
    messages = [Message(**m) for m in CONVERSATION]
    assert score_conversations(gated, tiny_tokenizer, [messages]) == pytest.approx(
        score_conversations(plain, tiny_tokenizer, [messages]), abs=1e-5)

    torch.manual_seed(1)
    torch.nn.init.normal_(gated.likelihood_gate.weight, std=0.5)
    torch.nn.init.constant_(gated.likelihood_gate.bias, -0.3)
    ids, mask = tiny_tokenizer.render_chat(messages)
    context = len(tiny_tokenizer.render_chat(messages[:-1])[0])
    said = [t for t in range(context, len(ids)) if mask[t]]
    with torch.no_grad():
        out = load_policy(tiny_policy_dir)(torch.tensor([ids]), output_hidden_states=True)
        logprobs, hidden = out.logits[0].log_softmax(-1), out.hidden_states[-1][0]
        gates = 2 * torch.sigmoid(gated.likelihood_gate(hidden).squeeze(-1))
        head = plain.score(hidden[-1]).item()
    by_hand = head + 2.0 * sum(gates[t].item() * logprobs[t - 1, ids[t]].item() for t in said) / len(said)
    assert min(gates[t].item() for t in said) < 0.9 < 1.1 < max(gates[t].item() for t in said)  # really gated
    score = score_conversations(gated, tiny_tokenizer, [messages])[0]
    assert score == pytest.approx(by_hand, abs=1e-4)

    save_model(gated, tiny_tokenizer, tmp_path / "reward")
    assert json.loads((tmp_path / "reward" / "config.json").read_text())[LIKELIHOOD_GATE] is True
    with safe_open(str(tmp_path / "reward" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith(LIKELIHOOD_GATE)]  # what transformers expects; the gate apart
    reloaded = load_scalar_model(tmp_path / "reward").eval()
    assert score_conversations(reloaded, tiny_tokenizer, [messages])[0] == pytest.approx(score, abs=1e-4)


def test_a_reward_model_whose_config_names_a_gate_it_lacks_or_cannot_read_is_refused_by_name(
        tmp_path, tiny_policy_dir, tiny_tokenizer):
    save_model(load_scalar_model(tiny_policy_dir, likelihood_weight=1.0), tiny_tokenizer, tmp_path / "reward")
    config = json.loads((tmp_path / "reward" / "config.json").read_text())
    (tmp_path / "reward" / "config.json").write_text(json.dumps(config | {"likelihood_gate": True}))
    with pytest.raises(ValueError, match=r"reward/likelihood_gate.safetensors: missing.*likelihood_gate: true"):
        load_scalar_model(tmp_path / "reward")
    (tmp_path / "reward" / "likelihood_gate.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"reward/likelihood_gate.safetensors: not this reward model's gate"):
        load_scalar_model(tmp_path / "reward")
