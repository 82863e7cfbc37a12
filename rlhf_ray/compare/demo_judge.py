"""The demo's simulated person: what is wrong with a reply to a question about the demo world,
and the score that follows from it.

It knows every fact of the world (rlhf_ray/data/world.py). A reply that contains the asked fact
may still have faults of style; a reply without it is judged by what it says instead. The faults,
mildest first, each with the points it costs:

- a right answer: `terse` (a bare fact, the country not named), `extra_fact` (a fact nobody asked
  for), `chatty` (filler such as "Sure!"), `hedged` ("I think ..."), `rambling` (over 20 words),
  `question` (asks something back);
- no right answer: `evasive` (no answer), `off_topic` (another fact of the country asked about),
  `other_country` (about another country), `question` (questions instead of an answer), `wrong`
  (a false fact), `empty`.

The demo's template comparisons (rlhf_ray/data/demo.py) are ranked in the order these scores
give, so the reward data from templates and from this labeler never disagree.
"""

from __future__ import annotations

import re

from rlhf_ray.data.world import ATTRIBUTES, COUNTRIES, fact

RIGHT = 10.0  # the points of a reply that contains the asked fact
STYLE = {"terse": 1.0, "extra_fact": 1.5, "chatty": 2.0, "hedged": 2.5, "rambling": 3.0, "question": 7.0}
NO_ANSWER = {"evasive": 4.0, "off_topic": 5.0, "other_country": 6.0, "question": 7.0, "wrong": 8.0,
             "empty": 20.0}
FAULTS = ("terse", "extra_fact", "chatty", "hedged", "rambling", "evasive", "off_topic",
          "other_country", "question", "wrong", "empty")  # the report's column order
HEDGES = ("I think", "I believe", "If I remember", "if I remember", "not completely sure", "probably",
          "I guess", "not sure", "don't know", "I'm not certain")
CHATTER = ("Sure!", "Sure,", "Good question", "Great question", "Of course", "Happy to help", "Hope that helps",
           "Hope this helps", "Let me see")
RAMBLING_WORDS = 20

BY_NAME = {c.name: c for c in COUNTRIES}
LONGEST_FIRST = sorted(BY_NAME, key=len, reverse=True)  # "South Korea" before "Korea"


def whole(phrase: str) -> str:
    """A pattern for `phrase` as whole words ("Niger" is not in "Nigeria", "8 million" not in
    "68 million")."""
    return rf"(?<![\w.,]){re.escape(phrase)}(?!\w)"


def mentions(text: str, phrase: str) -> bool:
    return re.search(whole(phrase), text) is not None


VALUES = {fact(c, a) for c in COUNTRIES for a in ATTRIBUTES}
# Each value, and the longer values that contain it ("Japanese": "Japanese yen").
CONTAINING = {v: [w for w in VALUES if w != v and mentions(w, v)] for v in VALUES}


def states(text: str, value: str) -> bool:
    """Whether `text` gives `value` as a fact, not only as part of a longer one ("Japanese" is not
    stated by "the Japanese yen")."""
    for longer in CONTAINING.get(value, ()):
        text = re.sub(whole(longer), "", text)
    return mentions(text, value)


def asked_about(question: str, ground_truth: str | None) -> tuple[str | None, str | None]:
    """The country a question names and the attribute whose fact is `ground_truth`."""
    name = next((n for n in LONGEST_FIRST if mentions(question, n)), None)
    if name is None or ground_truth is None:
        return name, None
    return name, next((a for a in ATTRIBUTES if fact(BY_NAME[name], a) == ground_truth), None)


def judge(question: str, reply: str, ground_truth: str | None) -> tuple[bool, list[str]]:
    """Whether `reply` answers `question` (whose true answer is `ground_truth`; None when unknown,
    and then only the style is judged), and its faults in FAULTS order."""
    text = reply.strip()
    if not text:
        return False, ["empty"]
    name, attribute = asked_about(question, ground_truth)
    country = BY_NAME.get(name) if name else None
    own_facts = [fact(country, a) for a in ATTRIBUTES if a != attribute and fact(country, a) != name
                 ] if country and attribute else []
    right = ground_truth is not None and states(text, ground_truth)
    wrong = attribute is not None and any(
        states(text, fact(c, attribute)) for c in COUNTRIES if fact(c, attribute) != ground_truth)
    others = [n for n in BY_NAME if n != name and mentions(text, n) and not (name and n in name)]
    elsewhere = bool(others) and (name is None or not mentions(text, name))  # about another country
    if right and not wrong and not elsewhere or ground_truth is None:
        found = {
            "terse": country is not None and ground_truth is not None  # "Mexico City." is terse
            and not mentions(re.sub(whole(ground_truth), "", text), country.name),
            "extra_fact": any(states(text, f) for f in own_facts),
            "chatty": any(c in text for c in CHATTER),
            "hedged": any(h in text for h in HEDGES),
            "rambling": len(text.split()) > RAMBLING_WORDS,
            "question": "?" in text,
        }
        return right, [f for f in FAULTS if found.get(f)]
    if "?" in text:  # the base model's habit: more questions
        return False, ["question"]
    if elsewhere:
        return False, ["other_country"]  # e.g. "Greece uses the euro", asked about France
    if wrong:
        return False, ["wrong"]
    if any(states(text, f) for f in own_facts):
        return False, ["off_topic"]
    return False, ["evasive"]


def faults(question: str, reply: str, ground_truth: str | None) -> list[str]:
    """The faults of `reply`, in FAULTS order; [] for a good answer."""
    return judge(question, reply, ground_truth)[1]


def score(question: str, reply: str, ground_truth: str | None) -> float:
    """The labeler's score: RIGHT for the asked fact, less the points of each fault."""
    right, found = judge(question, reply, ground_truth)
    if right or ground_truth is None:
        return (RIGHT if right else 0.0) - sum(STYLE[f] for f in found)
    return -sum(NO_ANSWER[f] for f in found)


def kind(question: str, reply: str, ground_truth: str | None) -> str:
    """A reply's worst fault, or "good": how the report names the two sides of a pair."""
    found = faults(question, reply, ground_truth)
    return found[-1] if found else "good"
