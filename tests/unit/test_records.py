"""Record schemas and readers: what is accepted, how it is normalised, and how bad data is reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from rlhf_ray.data.readers import RecordError, read_many, read_records
from rlhf_ray.data.records import ChatRecord, ComparisonRecord, Message, PromptRecord, Record, TextRecord


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def error_of(path: Path, kind: type[Record]) -> str:
    with pytest.raises(RecordError) as caught:
        read_records(path, kind)
    return str(caught.value)


GOOD_CHAT = {"messages": [user("Capital of France?"), assistant("Paris.")]}
GOOD_COMPARISON = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
GOOD_PROMPT = {"prompt": "Capital of France?", "ground_truth": "Paris"}
GOOD_RECORDS = {
    TextRecord: {"text": "Paris is the capital of France."},
    ChatRecord: GOOD_CHAT,
    ComparisonRecord: GOOD_COMPARISON,
    PromptRecord: GOOD_PROMPT,
}


# --------------------------------------------------------------------------- schemas: happy paths


def test_text_record_keeps_text():
    assert TextRecord(text="Paris is the capital of France.").text == "Paris is the capital of France."


def test_chat_record_accepts_messages_with_a_leading_system_message():
    messages = [system("Be brief."), user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye.")]
    record = ChatRecord.model_validate({"messages": messages})
    assert [m.role for m in record.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_chat_record_turns_string_prompt_and_completion_into_user_and_assistant_messages():
    record = ChatRecord.model_validate({"prompt": "Hi", "completion": "Hello."})
    assert record.messages == [
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello."),
    ]
    assert "prompt" not in record.model_dump()


def test_chat_record_joins_message_list_prompt_and_completion():
    record = ChatRecord.model_validate(
        {
            "prompt": [system("Be brief."), user("Hi")],
            "completion": [assistant("Hello."), user("More?"), assistant("No.")],
        }
    )
    assert [m.role for m in record.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_comparison_record_turns_chosen_and_rejected_into_two_ranked_responses():
    record = ComparisonRecord.model_validate(GOOD_COMPARISON)
    assert record.prompt == [Message(role="user", content="Capital of France?")]
    assert record.responses == [
        [Message(role="assistant", content="Paris.")],
        [Message(role="assistant", content="Lyon.")],
    ]
    assert record.pairs() == [(record.responses[0], record.responses[1])]


def test_comparison_record_ranked_responses_give_every_better_worse_pair_in_order():
    record = ComparisonRecord.model_validate({"prompt": "Capital?", "responses": ["A", "B", "C", "D"]})
    texts = [(better[0].content, worse[0].content) for better, worse in record.pairs()]
    assert texts == [("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]  # K*(K-1)/2


def test_comparison_record_accepts_message_list_prompt_and_multi_turn_responses():
    record = ComparisonRecord.model_validate(
        {
            "prompt": [system("Be brief."), user("Hi"), assistant("Hello."), user("Capital of France?")],
            "chosen": [assistant("Paris."), user("Sure?"), assistant("Yes.")],
            "rejected": "Lyon.",
        }
    )
    assert len(record.prompt) == 4
    assert [m.role for m in record.responses[0]] == ["assistant", "user", "assistant"]


def test_prompt_record_normalises_string_prompt_and_keeps_ground_truth():
    record = PromptRecord.model_validate(GOOD_PROMPT)
    assert record.prompt == [Message(role="user", content="Capital of France?")]
    assert record.ground_truth == "Paris"
    assert PromptRecord.model_validate({"prompt": [system("s"), user("q")]}).ground_truth is None


def test_schema_errors_name_the_message_index():
    with pytest.raises(ValidationError, match=r"messages\[2\]\.role"):
        ChatRecord.model_validate({"messages": [user("a"), assistant("b"), assistant("c")]})


# --------------------------------------------------------------------------- reading: happy paths


def test_read_jsonl_skips_blank_lines_and_keeps_order(tmp_path: Path):
    rows = [GOOD_CHAT, "", "   ", {"prompt": "Hi", "completion": "Hello."}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    records = read_records(path, ChatRecord)
    assert [r.messages[0].content for r in records] == ["Capital of France?", "Hi"]


def test_read_jsonl_accepts_a_path_given_as_str_and_a_utf8_bom(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9"}).encode() + b"\r\n")
    assert read_records(str(path), TextRecord) == [TextRecord(text="caf\u00e9")]


def test_read_txt_is_one_document(tmp_path: Path):
    path = tmp_path / "book.txt"
    path.write_text("Line one.\n\nLine two.\n", encoding="utf-8")
    assert read_records(path, TextRecord) == [TextRecord(text="Line one.\n\nLine two.\n")]


def test_read_parquet_round_trips_message_lists(tmp_path: Path):
    path = tmp_path / "sft.parquet"
    rows = [GOOD_CHAT, {"messages": [system("s"), user("Hi"), assistant("Hello.")]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert pa.types.is_list(pq.read_schema(path).field("messages").type)
    assert read_records(path, ChatRecord) == [ChatRecord.model_validate(r) for r in rows]


def test_read_parquet_treats_null_as_absent(tmp_path: Path):
    path = tmp_path / "rl.parquet"
    rows = [GOOD_PROMPT, {"prompt": "Open question", "ground_truth": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r.ground_truth for r in read_records(path, PromptRecord)] == ["Paris", None]


def test_read_many_concatenates_in_order(tmp_path: Path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    second = tmp_path / "b.txt"
    second.write_text("three", encoding="utf-8")
    assert [r.text for r in read_many([first, second], TextRecord)] == ["one", "two", "three"]


# --------------------------------------------------------------------------- reading: bad records

BAD_RECORDS = [
    # (kind, bad record, field the message names, words of the message)
    pytest.param(ChatRecord, {}, "messages", "Field required", id="missing-field"),
    pytest.param(
        ChatRecord, {"messages": [user("a"), assistant("b")], "source": "x"}, "source", "unknown field",
        id="unknown-field",
    ),
    pytest.param(
        ChatRecord, {"messages": [user("a"), {"role": "bot", "content": "b"}]}, "messages[1].role", "'bot'",
        id="wrong-role",
    ),
    pytest.param(
        ChatRecord, {"messages": [system("s"), user("a")]}, "messages", "without an assistant turn",
        id="no-assistant",
    ),
    pytest.param(
        ChatRecord, {"messages": [user("a"), system("s"), assistant("b")]}, "messages[1].role",
        "system message is only allowed first", id="system-not-first",
    ),
    pytest.param(
        ChatRecord, {"messages": [user("a"), user("b"), assistant("c")]}, "messages[1].role",
        "two user turns in a row", id="two-user-turns",
    ),
    pytest.param(
        ChatRecord, {"messages": [assistant("a"), user("b")]}, "messages[0].role",
        "must start with a user turn", id="starts-with-assistant",
    ),
    pytest.param(
        ChatRecord, {"messages": [user("a"), assistant("  ")]}, "messages[1].content", "empty assistant turn",
        id="empty-content",
    ),
    pytest.param(ChatRecord, {"messages": []}, "messages", "empty", id="no-messages"),
    pytest.param(
        ChatRecord, {"messages": [{"role": "user"}]}, "messages[0].content", "Field required",
        id="message-missing-content",
    ),
    pytest.param(
        ChatRecord, {**GOOD_CHAT, "prompt": "a", "completion": "b"}, "", "not both", id="both-chat-forms"
    ),
    pytest.param(ChatRecord, {"prompt": "a"}, "completion", "missing", id="prompt-without-completion"),
    pytest.param(TextRecord, {"text": " \n"}, "text", "empty document", id="blank-text"),
    pytest.param(TextRecord, {"text": 5}, "text", "valid string", id="text-not-a-string"),
    pytest.param(
        ComparisonRecord, {"prompt": "q", "responses": ["only one"]}, "responses",
        "at least 2 responses (got 1)", id="one-response",
    ),
    pytest.param(
        ComparisonRecord, {"prompt": "q", "chosen": "same", "rejected": "same"}, "responses[1]",
        "identical to responses[0]", id="chosen-equals-rejected",
    ),
    pytest.param(
        ComparisonRecord, {"prompt": "q", "responses": ["a", "b", "a"]}, "responses[2]",
        "identical to responses[0]", id="duplicate-ranked-response",
    ),
    pytest.param(
        ComparisonRecord, {"prompt": "q", "chosen": "a"}, "rejected", "missing", id="chosen-without-rejected"
    ),
    pytest.param(
        ComparisonRecord, {"prompt": [user("q"), assistant("a")], "chosen": "x", "rejected": "y"},
        "prompt[1].role", "must end with a user turn", id="comparison-prompt-ends-with-assistant",
    ),
    pytest.param(
        ComparisonRecord, {"prompt": "q", "chosen": [assistant("a"), user("b")], "rejected": "y"},
        "responses[0][1].role", "must end with an assistant turn", id="response-ends-with-user",
    ),
    pytest.param(
        ComparisonRecord, {"prompt": "q", "chosen": [user("a")], "rejected": "y"},
        "responses[0][0].role", "must start with an assistant turn", id="response-starts-with-user",
    ),
    pytest.param(
        ComparisonRecord, {"prompt": "q", "chosen": [system("s"), assistant("a")], "rejected": "y"},
        "responses[0][0].role", "system message is not allowed here", id="system-in-response",
    ),
    pytest.param(
        PromptRecord, {"prompt": [user("q"), assistant("a")]}, "prompt[1].role", "must end with a user turn",
        id="rl-prompt-ends-with-assistant",
    ),
    pytest.param(PromptRecord, {"prompt": ""}, "prompt[0].content", "empty user turn", id="rl-empty-prompt"),
    pytest.param(
        PromptRecord, {"prompt": "q", "ground_truth": 4}, "ground_truth", "valid string",
        id="ground-truth-not-a-string",
    ),
]


@pytest.mark.parametrize(("kind", "record", "field", "words"), BAD_RECORDS)
def test_bad_jsonl_record_names_file_line_and_field(
    tmp_path: Path, kind: type[Record], record: dict[str, Any], field: str, words: str
):
    good = GOOD_RECORDS[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", record])
    message = error_of(path, kind)
    assert message.startswith(f"{path}:3: {field}")
    assert words in message
    assert "Value error" not in message


def test_wrong_value_is_shown_truncated(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "ok", "source": "x" * 500}])
    message = error_of(path, TextRecord)
    assert f"{path}:1: source: unknown field" in message
    got = message[message.index("(got ") + len("(got ") : -1]
    assert got.startswith("'xxxx") and got.endswith("...") and len(got) == 80


def test_missing_file(tmp_path: Path):
    assert error_of(tmp_path / "nope.jsonl", ChatRecord) == f"{tmp_path / 'nope.jsonl'}: file not found"


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet", "empty.txt"])
def test_empty_file_has_no_records(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_bytes(b"")
    assert error_of(path, TextRecord) == f"{path}: no records (the file is empty)"


def test_jsonl_of_only_blank_lines_has_no_records(tmp_path: Path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    assert "no records" in error_of(path, TextRecord)


def test_non_utf8_bytes_name_line_and_byte_offset(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xff"}\n')
    assert error_of(path, TextRecord) == f"{path}:2: not valid UTF-8: byte 0xff at offset 28 of the file"


def test_non_utf8_txt_names_line_and_byte_offset(tmp_path: Path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"one\ntwo\xfe\n")
    assert error_of(path, TextRecord) == f"{path}:2: not valid UTF-8: byte 0xfe at offset 7 of the file"


def test_invalid_json_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "ok"}, '{"text": "unterminated'])
    message = error_of(path, TextRecord)
    assert message.startswith(f"{path}:2: not valid JSON at column 10: ")
    assert message.endswith("(got '{\"text\": \"unterminated')")


def test_json_line_that_is_not_an_object(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", ['["a", "b"]'])
    assert error_of(path, TextRecord) == f"{path}:1: expected a JSON object per line (got ['a', 'b'])"


def test_txt_is_only_for_text_records(tmp_path: Path):
    path = tmp_path / "chats.txt"
    path.write_text("hello", encoding="utf-8")
    message = error_of(path, ChatRecord)
    assert str(path) in message and ".txt" in message and "ChatRecord needs .jsonl or .parquet" in message


def test_unsupported_suffix_names_the_supported_ones(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    expected = f"{path}: unsupported file type '.csv'; supported: .jsonl, .parquet, .txt"
    assert error_of(path, TextRecord) == expected


def test_bad_parquet_row_names_row_number_and_field(tmp_path: Path):
    path = tmp_path / "sft.parquet"
    rows = [GOOD_CHAT, {"messages": [user("a"), {"role": "bot", "content": "b"}]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    expected = f"{path}:2: messages[1].role: Input should be 'system', 'user' or 'assistant' (got 'bot')"
    assert error_of(path, ChatRecord) == expected


def test_unreadable_parquet_file(tmp_path: Path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    assert error_of(path, ChatRecord).startswith(f"{path}: not a readable parquet file")


def test_every_problem_of_a_file_is_reported_and_nothing_is_returned(tmp_path: Path):
    rows = [{"text": "ok"}, "not json", {"text": ""}, {"text": "ok"}, {"txt": "x"}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(RecordError) as caught:
        read_records(path, TextRecord)
    lines = str(caught.value).splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{path}:2", f"{path}:3", f"{path}:5", f"{path}:5"]
    assert len(caught.value.problems) == 4


def test_problem_list_is_capped_with_a_count_of_the_rest(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": ""}] * 25)
    with pytest.raises(RecordError) as caught:
        read_records(path, TextRecord)
    lines = str(caught.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 5 more"
    assert len(caught.value.problems) == 25


def test_read_many_gathers_problems_of_all_files(tmp_path: Path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "ok"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}])
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(RecordError) as caught:
        read_many([bad, good, missing], TextRecord)
    assert caught.value.problems == [f"{bad}:1: text: empty document (got '')", f"{missing}: file not found"]


def test_each_record_remembers_its_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [r.where for r in read_records(path, TextRecord)] == [f"{path}:1", f"{path}:3"]
