"""How each kind of model is asked, and when a reply counts as right: one rule for serving, the
evaluation and the report."""

import pytest

from rlhf_ray.data.records import Message
from rlhf_ray.prompting import as_document, exact_match, few_shot_document, prompt_ids

USER = Message(role="user", content="What is the capital of Kenya?")


def test_a_base_model_continues_the_conversation_as_a_document(tiny_tokenizer):
    system = Message(role="system", content="Be brief.")
    assert as_document([system, USER]) == "Be brief.\nWhat is the capital of Kenya?\n"
    assert prompt_ids(tiny_tokenizer, "document", [USER]) == tiny_tokenizer.encode_document(
        "What is the capital of Kenya?\n")


def test_a_chat_model_gets_the_chat_template_and_writes_the_next_turn(tiny_tokenizer):
    assert prompt_ids(tiny_tokenizer, "chat", [USER]) == tiny_tokenizer.render_prompt([USER])
    with pytest.raises(ValueError, match="the last message must be the user's"):
        prompt_ids(tiny_tokenizer, "chat", [USER, Message(role="assistant", content="Nairobi.")])


def test_the_few_shot_document_format():
    examples = [("Where is Peru?", "Peru is in South America."), ("Capital of Japan?", "Tokyo.")]
    assert few_shot_document([], "What is the capital of Kenya?") == "What is the capital of Kenya?\n"
    assert few_shot_document(examples, "Capital of Kenya?") == (
        "Q: Where is Peru?\nA: Peru is in South America.\n\n"
        "Q: Capital of Japan?\nA: Tokyo.\n\n"
        "Q: Capital of Kenya?\nA:")


@pytest.mark.parametrize("reply, reference, expected", [
    ("The capital of Kenya is Nairobi.", "Nairobi", True),
    ("nairobi", "Nairobi", False),  # verbatim, case included
    ("Nairobi", None, False),  # nothing matches a missing reference
    ("Nairobi", "", False),
])
def test_exact_match_is_the_reference_verbatim_in_the_reply(reply, reference, expected):
    assert exact_match(reply, reference) is expected
