"""The model format: Hugging Face Llama-architecture folders (safetensors) that vLLM loads unchanged.

Policies are causal LMs. Reward and value models are the same backbone with a scalar head
(`AutoModelForSequenceClassification`, `num_labels=1`) whose score is read at the last non-pad
token. A reward model may also weigh in how likely its own language model finds the response
(`likelihood_weight` in its config.json, optionally token by token through a learned gate; see
`sequence_scores`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from rlhf_ray.config import ModelConfig
from rlhf_ray.data.records import Message
from rlhf_ray.storage import atomic_folder
from rlhf_ray.tokenizer import ChatTokenizer, load_tokenizer, render_reply

WEIGHTS_FILE = "model.safetensors"
# A bar per tiny local folder loaded (the demo loads a dozen) says nothing.
hf_logging.disable_progress_bar()


def llama_config(cfg: ModelConfig, tokenizer: ChatTokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.stop_ids,
        pad_token_id=tokenizer.pad_id,
        torch_dtype="float32",
    )


def new_policy(cfg: ModelConfig, tokenizer: ChatTokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised causal LM for pretraining."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(cfg, tokenizer))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_model_folder(folder: Path) -> None:
    """Raise a clear error unless `folder` looks like a complete Hugging Face model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'config.json'}: corrupt: {e}") from None
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")


def model_max_len(folder: Path) -> int:
    """The context length of a saved model folder, in tokens."""
    return int(json.loads((Path(folder) / "config.json").read_text())["max_position_embeddings"])


def inspect_policies_in_vllms_process() -> None:
    """Has vLLM inspect the policies' architecture (LlamaForCausalLM) in this process.

    Before an engine starts, vLLM asks which interfaces the model's class implements. Unless its
    cache (VLLM_CACHE_ROOT/modelinfos) holds the answer, it asks a new Python process, which
    imports vLLM and torch again: on a new 2-core machine the demo's first engine waited 10 s for
    it. Registering the class itself has vLLM inspect it here, where the engine loads it anyway.
    """
    from vllm import ModelRegistry
    from vllm.model_executor.models.llama import LlamaForCausalLM as VLLMLlamaForCausalLM

    ModelRegistry.register_model("LlamaForCausalLM", VLLMLlamaForCausalLM)


def load_policy(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    check_model_folder(folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


# The keys in a reward model's config.json: the weight of the response's mean log-probability
# in its score (absent or 0: the scalar head alone), and whether a learned gate weighs its tokens.
LIKELIHOOD_WEIGHT = "likelihood_weight"
LIKELIHOOD_GATE = "likelihood_gate"
# The gate's weights, apart, so that model.safetensors stays what transformers expects of a
# sequence-classification model (it would report a gate there as an unexpected weight).
GATE_FILE = "likelihood_gate.safetensors"


def load_scalar_model(folder: Path, dtype: torch.dtype = torch.float32,
                      likelihood_weight: float | None = None, likelihood_gate: bool | None = None
                      ) -> PreTrainedModel:
    """A reward/value model: a saved one, or a policy folder given a new scalar head.
    `likelihood_weight` sets the weight of the likelihood term and `likelihood_gate` whether a
    new gate weighs its tokens (as a new reward model starts); by default the folder's own. A
    model with untied embeddings keeps its language-model head for that term."""
    check_model_folder(folder)
    config = AutoConfig.from_pretrained(str(folder))
    config.num_labels = 1
    if likelihood_weight is not None:
        setattr(config, LIKELIHOOD_WEIGHT, likelihood_weight)
    if likelihood_gate is not None:
        setattr(config, LIKELIHOOD_GATE, likelihood_gate)
    pad = load_tokenizer(folder).pad_id
    if config.pad_token_id is None:
        config.pad_token_id = pad
    elif config.pad_token_id != pad:
        raise ValueError(f"{folder / 'config.json'}: pad_token_id {config.pad_token_id} is not the "
                         f"tokenizer's pad id {pad} (the folder's tokenizer files); a batch padded "
                         "with one would be read with the other")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), config=config, dtype=dtype)
    if likelihood_weight_of(model) and not config.tie_word_embeddings:
        model.lm_head = _saved_lm_head(folder, model, dtype)
    if getattr(config, LIKELIHOOD_GATE, False):
        model.likelihood_gate = _likelihood_gate(folder, model, dtype, new=likelihood_gate is not None)
    return model


def _likelihood_gate(folder: Path, model: PreTrainedModel, dtype: torch.dtype, new: bool) -> torch.nn.Linear:
    """The gate of a reward model's likelihood term: zero for a new one (g = 1 on every token,
    the plain mean), else the folder's saved weights."""
    gate = torch.nn.Linear(model.config.hidden_size, 1, dtype=dtype)
    model._keys_to_ignore_on_save = {*(model._keys_to_ignore_on_save or ()), *(
        f"{LIKELIHOOD_GATE}.{name}" for name, _ in gate.named_parameters())}
    if new:
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.zeros_(gate.bias)
        return gate
    path = Path(folder) / GATE_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing; the reward model's config.json ({LIKELIHOOD_GATE}: true) "
                         "says its score reads a gate saved there")
    try:
        gate.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path)).items()})
    except (RuntimeError, OSError, SafetensorError) as e:  # other keys or shapes, or not safetensors
        raise ValueError(f"{path}: not this reward model's gate ({model.config.hidden_size} wide): {e}") from None
    return gate


def _saved_lm_head(folder: Path, model: PreTrainedModel, dtype: torch.dtype) -> torch.nn.Linear:
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
        if "lm_head.weight" not in f.keys():
            raise ValueError(f"{folder / WEIGHTS_FILE}: no lm_head.weight, which a reward model with "
                             f"{LIKELIHOOD_WEIGHT} > 0 and untied embeddings reads the response's "
                             "likelihood with; start it from a causal LM folder (sft/)")
        weight = f.get_tensor("lm_head.weight").to(dtype)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, dtype=dtype)
    head.weight.data.copy_(weight)
    return head


def saved_likelihood_weight(folder: Path) -> float:
    """The likelihood weight a saved reward model's config.json gives (0 for any other folder)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return float(config.get(LIKELIHOOD_WEIGHT) or 0.0)


def likelihood_weight_of(model: torch.nn.Module) -> float:
    """The weight of the likelihood term in a reward model's score (0: the scalar head alone)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return float(getattr(config, LIKELIHOOD_WEIGHT, 0.0) or 0.0)


def pad(sequences: Sequence[Sequence[int] | np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest (numpy arrays or lists of ids): (ids, attention mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(np.asarray(sequence, dtype=np.int64))
        attention[row, : len(sequence)] = 1
    return ids, attention


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A scalar-head model's score (B,) at each sequence's last real token, found from the
    attention mask: transformers finds it from pad_token_id, which may also be a real token (a
    pad shared with the end-of-text token ends every finished response). The pass goes through
    the model's own forward, so a DistributedDataParallel wrapper still syncs the gradients.

    A reward model with a likelihood weight w adds w times the mean log-probability its own
    language model (the same hidden states, read by the tied embeddings or the kept lm_head)
    gives the response's tokens: `response_mask` (B, T-1), 1 where column t predicts a response
    token. The head learns what the labeler likes; the likelihood carries what the model knows
    (a false fact is unlikely), which a head learns slowly from comparisons alone."""
    return combined_score(model, *score_parts(model, input_ids, attention_mask, response_mask))


def combined_score(model: torch.nn.Module, head: torch.Tensor, likelihood: torch.Tensor | None) -> torch.Tensor:
    """head + w * likelihood, w the model's likelihood weight (the head alone without that term)."""
    return head if likelihood is None else head.float() + likelihood_weight_of(model) * likelihood


def score_parts(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two terms of `sequence_scores`, apart: the scalar head's value (B,) and, for a reward
    model with a likelihood weight, the response's mean token log-probability (B,) (else None)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # after the final norm: what the score head reads
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (columns * attention_mask).argmax(1)  # the last 1 of each row, left- or right-padded
    inner = getattr(model, "module", model)
    scores = inner.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1)
    weight = likelihood_weight_of(model)
    if not weight:
        return scores, None
    if response_mask is None:
        raise ValueError(f"this reward model's score includes the response's likelihood "
                         f"({LIKELIHOOD_WEIGHT} {weight}): pass response_mask")
    head = inner.lm_head if hasattr(inner, "lm_head") else inner.get_input_embeddings()
    logprobs = token_logprobs(torch.nn.functional.linear(hidden[:, :-1], head.weight).float(), input_ids)
    if (gate := getattr(inner, LIKELIHOOD_GATE, None)) is not None:
        # token t+1's weight, read at that token (column t predicts it): what the model has learned
        # the token tells, e.g. little for the unlikely first word of a bare "Paris."
        logprobs = logprobs * 2 * torch.sigmoid(gate(hidden[:, 1:]).squeeze(-1).float())
    mask = response_mask.to(logprobs.dtype)
    return scores, (logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def token_logprobs(logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Logprob (B, T-1) of each next token under `logits` (B, T-1, V), the predictions of
    columns 0..T-2."""
    return torch.log_softmax(logits, -1).gather(-1, sequences[:, 1:, None]).squeeze(-1)


def score_conversations(model: PreTrainedModel, tokenizer: ChatTokenizer,
                        conversations: Sequence[Sequence[Message]], batch_size: int = 32) -> list[float]:
    """The reward model's score of each conversation (its last turn the assistant's): what
    `/v1/score`, the evaluation across stages and the report all read. A conversation longer
    than the model's context is refused by name rather than truncated."""
    replies = [render_reply(tokenizer, c[:-1], c[-1:]) for c in conversations]  # (ids, last turn)
    limit = model.config.max_position_embeddings
    if replies and (longest := max(len(ids) for ids, _ in replies)) > limit:
        raise ValueError(f"a conversation is {longest} tokens; the reward model's context is {limit}")
    device = next(model.parameters()).device
    # Shortest first, so a batch pads to a length near its own (the held-out comparisons in the
    # demo's evaluation: 11 s in input order, 2.4 s sorted); the scores go back in input order.
    order = sorted(range(len(replies)), key=lambda i: len(replies[i][0]))
    scores = [0.0] * len(replies)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, attention = pad([replies[i][0] for i in rows], tokenizer.pad_id)
        response, _ = pad([replies[i][1] for i in rows], 0)
        with torch.no_grad():
            batch = sequence_scores(model, ids.to(device), attention.to(device), response[:, 1:].to(device))
        for row, value in zip(rows, batch.float().tolist()):
            scores[row] = value
    return scores


def save_model(model: PreTrainedModel, tokenizer: ChatTokenizer, dest: Path) -> None:
    """Write model + tokenizer as one folder; it appears only once everything is written."""
    with atomic_folder(Path(dest), replace=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if (gate := getattr(model, LIKELIHOOD_GATE, None)) is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}, str(tmp / GATE_FILE))
        tokenizer.save(tmp)
        if model.can_generate():
            GenerationConfig(
                bos_token_id=tokenizer.bos_id,
                eos_token_id=tokenizer.stop_ids,
                pad_token_id=tokenizer.pad_id,
            ).save_pretrained(str(tmp))
