"""Stage 0: the tokenizer and the chat format.

Our own tokenizer is a byte-level BPE trained with rustbpe and encoded with tiktoken. It is saved
as a Hugging Face folder (`tokenizer.json` + a chat template) so that transformers and vLLM load it
and produce the same ids. A model from the Hugging Face hub keeps its own tokenizer and is used
through the same interface (`HFTokenizer`).

Chat format (our tokenizer):

    <|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

`<|endoftext|>` starts every document and conversation (and so separates documents in the token
shards); a generation prompt ends with `<|assistant|>`; the assistant's `<|end|>` stops generation.
The loss mask is 1 on the assistant's content and on the `<|end|>` that closes its turn.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import rustbpe
import tiktoken

from rlhf_ray.data.readers import RecordError
from rlhf_ray.data.records import Message, PromptRecord

BOS = "<|endoftext|>"
PAD = "<|pad|>"
END = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, PAD, *ROLE_TOKENS.values(), END]

# The same format as a Jinja template, for transformers' apply_chat_template and vLLM's chat API.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "rlhf_ray_tokenizer.json"


class ChatTokenizer(Protocol):
    """What every stage needs from a tokenizer, ours or a pretrained model's."""

    vocab_size: int
    bos_id: int  # starts (and so separates) documents
    pad_id: int
    stop_ids: list[int]  # generation of an assistant turn or a document ends at any of these

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def is_special(self, token_id: int) -> bool: ...
    def encode_document(self, text: str) -> list[int]: ...
    def render_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]: ...
    def render_prompt(self, messages: Sequence[Message]) -> list[int]: ...
    def save(self, folder: Path) -> None: ...


class BPETokenizer:
    """Our trained byte-level BPE, encoded with tiktoken."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str) -> None:
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        first_special = len(mergeable_ranks)
        self.special_ids = {tok: first_special + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name="rlhf_ray", pat_str=pattern, mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_ids,
        )
        self.vocab_size = self.encoding.n_vocab
        self.bos_id = self.special_ids[BOS]
        self.pad_id = self.special_ids[PAD]
        self.end_id = self.special_ids[END]
        self.stop_ids = [self.end_id, self.bos_id]

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token strings in the text are encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.mergeable_ranks)

    def encode_document(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text)]

    def render_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and its loss mask (1 on what the assistant says)."""
        ids, mask = [self.bos_id], [0]
        for message in messages:
            is_assistant = int(message.role == "assistant")
            content = self.encode(message.content)
            ids += [self.special_ids[ROLE_TOKENS[message.role]], *content, self.end_id]
            mask += [0] + [is_assistant] * (len(content) + 1)
        return ids, mask

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids that ask the model for the next assistant turn."""
        ids, _ = self.render_chat(messages)
        return ids + [self.special_ids[ROLE_TOKENS["assistant"]]]

    def save(self, folder: Path) -> None:
        """Write the ranks (our source of truth) and the Hugging Face files derived from them."""
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / RANKS_FILE, "w", encoding="ascii") as f:
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        (folder / META_FILE).write_text(
            json.dumps({"pattern": self.pattern, "special_tokens": SPECIAL_TOKENS}, indent=2)
        )
        _write_hf_files(folder, self.pattern)

    @classmethod
    def load(cls, folder: Path) -> BPETokenizer:
        meta = json.loads((folder / META_FILE).read_text())
        if meta["special_tokens"] != SPECIAL_TOKENS:
            raise ValueError(
                f"{folder / META_FILE}: special_tokens {meta['special_tokens']} differ from this "
                f"version's {SPECIAL_TOKENS}"
            )
        return cls(_read_ranks(folder / RANKS_FILE), meta["pattern"])


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str, max_chars: int) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` ids, the special tokens included."""
    num_merged = vocab_size - len(SPECIAL_TOKENS)
    if num_merged < 256:
        raise ValueError(
            f"tokenizer.vocab_size {vocab_size} leaves no room for merges: it must be at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_capped(texts, max_chars), num_merged, pattern=pattern)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    return BPETokenizer(ranks, pattern)


def _capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    seen = 0
    for text in texts:
        if seen >= max_chars:
            return
        yield text[: max_chars - seen]
        seen += len(text)


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: expected '<base64 token> <rank>': {e}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} with none missing or repeated")
    return ranks


def _write_hf_files(folder: Path, pattern: str) -> None:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(folder / RANKS_FILE), pattern=pattern, extra_special_tokens=SPECIAL_TOKENS
    )
    converter.converted().save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": END,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 30,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


class HFTokenizer:
    """A pretrained model's own tokenizer (and chat template) behind the same interface."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder))
        if not self.hf.chat_template:
            raise ValueError(f"{folder}: the tokenizer has no chat_template; SFT needs one")
        self.vocab_size = len(self.hf)
        self.special = set(self.hf.all_special_ids) | set(self.hf.added_tokens_decoder)
        self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id
        self.stop_ids = sorted({i for i in (self.hf.eos_token_id, self.bos_id) if i is not None}
                               | set(_generation_eos_ids(Path(folder))) | set(self._turn_end_ids()))

    def _turn_end_ids(self) -> list[int]:
        """The special token the chat template closes an assistant turn with (Qwen's
        <|im_end|>, Llama 3's <|eot_id|>): a reply ends there even when eos is another token."""
        reply = "ok"
        ids, mask = self.render_chat([Message(role="user", content="hi"),
                                      Message(role="assistant", content=reply)])
        turn, content = [i for i, m in zip(ids, mask) if m], self.encode(reply)
        after = turn[len(content):] if turn[: len(content)] == content else []
        return [i for i in after if i in self.special][:1]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        # transformers spells a token as text; part of a character comes out as U+FFFD
        return self.hf.decode([token_id]).encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special

    def encode_document(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text)]

    def _template(self, messages: Sequence[Message], generation_prompt: bool) -> list[int]:
        dicts = [m.model_dump() for m in messages]
        return list(self.hf.apply_chat_template(
            dicts, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        ))

    def render_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """The template's ids; the mask marks each assistant turn, found as the ids it adds."""
        ids = self._template(messages, generation_prompt=False)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before = self._template(messages[:i], generation_prompt=True)
            after = self._template(messages[: i + 1], generation_prompt=False)
            if ids[: len(after)] != after or after[: len(before)] != before:
                raise ValueError(
                    "the model's chat template does not render conversations prefix by prefix, "
                    "so assistant turns cannot be masked"
                )
            mask[len(before) : len(after)] = [1] * (len(after) - len(before))
        return ids, mask

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self._template(messages, generation_prompt=True)

    def save(self, folder: Path) -> None:
        self.hf.save_pretrained(str(folder))


def _generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id, an id or a list of them (Llama 3 and Qwen list
    several): every one of them ends a generation."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def load_tokenizer(folder: Path) -> ChatTokenizer:
    """Our tokenizer if the folder holds its ranks, else the folder's Hugging Face tokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    if (folder / RANKS_FILE).exists():
        return BPETokenizer.load(folder)
    return HFTokenizer(folder)


def render_reply(tokenizer: ChatTokenizer, context: Sequence[Message], reply: Sequence[Message]
                 ) -> tuple[list[int], list[int]]:
    """The ids of context + reply and a mask of 1 on what the assistant says in the reply: the
    tokens a reward model or DPO judges (the context's own assistant turns are not the reply)."""
    ids, mask = tokenizer.render_chat([*context, *reply])
    context_len = len(tokenizer.render_chat(context)[0])
    return ids, [0] * context_len + mask[context_len:]


def render_prompts(records: Sequence[PromptRecord], tokenizer: ChatTokenizer, max_new_tokens: int,
                   max_seq_len: int, setting: str) -> list[list[int]]:
    """Each record's prompt rendered for generation. A prompt that leaves no room in the context
    for `max_new_tokens` (the config's `setting`) is an error naming its file and line."""
    rendered, problems = [], []
    for r in records:
        ids = tokenizer.render_prompt(r.prompt)
        if len(ids) + max_new_tokens > max_seq_len:
            problems.append(f"{r.where}: prompt: {len(ids)} tokens + {setting} {max_new_tokens} "
                            f"exceed the model's context of {max_seq_len}")
        rendered.append(ids)
    if problems:
        raise RecordError(problems)
    return rendered
