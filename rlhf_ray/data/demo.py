"""The demo data: facts about the countries of `world.py` written as the four kinds of records.

Pretraining documents cover every country. SFT conversations and reward comparisons cover only the
`sft` countries, RL prompts the `rl` ones; the `eval` countries appear in pretraining and in the
held-out eval files only. So when the SFT model answers "The capital of Kenya is Nairobi." for an
eval country, it learned the fact in pretraining and only the answering style in SFT.

The base model only ever saw documents: quiz sheets (bare questions, one per line) teach it to go
on from "What is the capital of France?" with more questions, the way the talk shows.

Every generator seeds its own `random.Random(cfg.seed)`, so each file depends only on the config.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf_ray.config import DemoDataConfig
from rlhf_ray.data.world import ATTRIBUTES, COUNTRIES, Country, fact
from rlhf_ray.run import record_file
from rlhf_ray.storage import write_text_atomic

Row = dict[str, Any]  # one JSON record

ALWAYS_SFT = "France"  # the talk's example must be trained on

# --------------------------------------------------------------------------- facts as text


# A full sentence per fact; {n} is the country, {v} the fact. The first is the canonical answer,
# and names the country after a word, as the questions do: the tokenizer writes a text's opening
# word as another token ("Germany" vs " Germany"), which the model learns to copy only for the
# SFT countries (opening with the name, SFT got 3 of 23 held-out continents right).
STATEMENTS = {
    "capital": ["The capital of {n} is {v}.", "{v} is the capital of {n}.",
                "The capital city of {n} is {v}."],
    "language": ["The main language of {n} is {v}.", "Most people in {n} speak {v}.",
                 "{v} is the main language spoken in {n}."],
    "continent": ["The continent of {n} is {v}.", "{n} is in {v}.", "{n} is a country in {v}."],
    "population": ["The population of {n} is about {v}.", "About {v} people live in {n}.",
                   "{n} has a population of about {v}."],
    "currency": ["The currency of {n} is the {v}.", "{n} uses the {v}.",
                 "The official currency of {n} is the {v}."],
}
# The same facts for a sentence that follows one naming the country.
PRONOUN_STATEMENTS = {
    "capital": ["Its capital is {v}.", "Its capital city is {v}."],
    "language": ["Most people there speak {v}.", "Its main language is {v}."],
    "continent": ["It lies in {v}.", "It is located in {v}."],
    "population": ["About {v} people live there.", "It has a population of about {v}."],
    "currency": ["Its currency is the {v}.", "People there pay with the {v}."],
}
# The first three are plain questions (used on quiz sheets); the rest are chattier.
QUESTIONS = {
    "capital": ["What is the capital of {n}?", "Which city is the capital of {n}?",
                "What is the capital city of {n}?", "What's the capital of {n}?",
                "Can you tell me the capital of {n}?", "Do you know what the capital of {n} is?",
                "Tell me the capital of {n}, please.", "capital of {n}?"],
    "language": ["Which language is spoken in {n}?", "What is the main language of {n}?",
                 "What language do people speak in {n}?", "What do people in {n} speak?",
                 "Could you tell me which language they speak in {n}?", "main language of {n}?"],
    "continent": ["Which continent is {n} in?", "On which continent is {n}?", "Where is {n} located?",
                  "What continent is {n} part of?", "Can you tell me which continent {n} is on?"],
    "population": ["What is the population of {n}?", "How many people live in {n}?",
                   "How large is the population of {n}?", "Roughly how many people live in {n}?",
                   "Do you know the population of {n}?"],
    "currency": ["What is the currency of {n}?", "Which currency is used in {n}?",
                 "What money do people use in {n}?", "What's the currency of {n}?",
                 "Can you tell me what currency {n} uses?"],
}
# Later turns of a conversation refer back to the country.
FOLLOW_UPS = {
    "capital": ["And what is its capital?", "What is its capital city?", "Which city is its capital?"],
    "language": ["What language do they speak there?", "And which language is spoken there?"],
    "continent": ["Which continent is it in?", "Where is it located?"],
    "population": ["How many people live there?", "And what is its population?"],
    "currency": ["What currency do they use there?", "And what is its currency?"],
}
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant who answers questions about the countries of the world.",
    "You are a friendly assistant. Answer briefly and accurately.",
]


def statement(country: Country, attribute: str, rng: random.Random, canonical: float = 0.0) -> str:
    """A sentence stating the fact; with probability `canonical` the first (canonical) phrasing."""
    options = STATEMENTS[attribute]
    template = options[0] if rng.random() < canonical else rng.choice(options)
    return template.format(n=country.name, v=fact(country, attribute))


def question(country: Country, attribute: str, rng: random.Random, plain: bool = False) -> str:
    options = QUESTIONS[attribute][:3] if plain else QUESTIONS[attribute]
    return rng.choice(options).format(n=country.name)


def asked(text: str, countries: list[Country] = list(COUNTRIES)) -> tuple[Country, str] | None:
    """The country and attribute a question of QUESTIONS asks about; None for any other text."""
    for country in sorted(countries, key=lambda c: len(c.name), reverse=True):
        template = text.replace(country.name, "{n}")
        if template != text:
            found = [a for a, templates in QUESTIONS.items() if template in templates]
            if found:
                return country, found[0]
    return None


def answer(country: Country, attribute: str, rng: random.Random) -> str:
    """The assistant's answer: a polite, complete sentence, most often the canonical one."""
    return statement(country, attribute, rng, canonical=0.6)


# --------------------------------------------------------------------------- the split


def world_countries(cfg: DemoDataConfig) -> list[Country]:
    """The first `num_countries` countries of the built-in world (France is first)."""
    n = len(COUNTRIES) if cfg.num_countries is None else cfg.num_countries
    if n > len(COUNTRIES):
        raise ValueError(f"num_countries is {n}, but the demo world has only {len(COUNTRIES)} countries")
    return list(COUNTRIES[:n])


def split_countries(cfg: DemoDataConfig) -> dict[str, list[Country]]:
    """Split the countries into `sft`, `rl` and `eval`, each in world order.

    The seed alone picks the held-out countries: the countries other than France are shuffled with
    `random.Random(cfg.seed)`; the first round(eval_fraction * N) (at least 1) are `eval`, the next
    round(rl_fraction * N) (at least 1) are `rl`, and the rest, France included, are `sft`.
    """
    countries = world_countries(cfg)
    others = [c for c in countries if c.name != ALWAYS_SFT]
    random.Random(cfg.seed).shuffle(others)
    n_eval = max(1, round(cfg.eval_fraction * len(countries)))
    n_rl = max(1, round(cfg.rl_fraction * len(countries)))
    evals, rls = set(others[:n_eval]), set(others[n_eval:n_eval + n_rl])
    return {
        "sft": [c for c in countries if c not in evals and c not in rls],
        "rl": [c for c in countries if c in rls],
        "eval": [c for c in countries if c in evals],
    }


# --------------------------------------------------------------------------- pretraining documents


def article(country: Country, countries: list[Country], rng: random.Random) -> str:
    """An encyclopedia entry: a lead with the facts in random order, maybe an infobox, then sections."""
    n, native = country.name, country.native_name
    if native == n:
        opening = f"{n} is a country in {country.continent}."
    else:
        opening = rng.choice([
            f"{n} ({native}) is a country in {country.continent}.",
            f"{n}, known in its own language as {native}, is a country in {country.continent}.",
            f"{n} is a country in {country.continent}. In its own language it is called {native}.",
        ])
    lead = [opening]
    for attribute in rng.sample(["capital", "language", "population", "currency"], 4):
        if rng.random() < 0.5:
            lead.append(statement(country, attribute, rng))
        else:
            lead.append(rng.choice(PRONOUN_STATEMENTS[attribute]).format(v=fact(country, attribute)))
    parts = [rng.choice([n, f"{n}: an overview", f"About {n}", f"{n} — facts"]), " ".join(lead)]
    if rng.random() < 0.5:
        parts.insert(1, "\n".join([
            f"Native name: {native}", f"Capital: {country.capital}", f"Main language: {country.language}",
            f"Continent: {country.continent}", f"Population: about {country.population_text}",
            f"Currency: {country.currency}",
        ]))
    # The sections state every fact in the canonical phrasing the SFT answers use, country first:
    # a model that only read "Paris is the capital of France." cannot complete "The capital of
    # France is" (the reversal curse).
    sections = {"Geography": ["continent", "capital"], "People": ["population", "language"],
                "Economy": ["currency"]}
    for heading, attributes in sections.items():
        sentences = [STATEMENTS[a][0].format(n=n, v=fact(country, a)) for a in attributes]
        sentences += [s for a in attributes if (s := shared_fact(country, a, countries, rng))]
        parts.append(f"{heading}\n{' '.join(sentences)}")
    return "\n\n".join(parts)


def shared_fact(
    country: Country, attribute: str, countries: list[Country], rng: random.Random
) -> str | None:
    """A sentence naming other countries with the same continent, language or currency, if any."""
    if attribute not in ("continent", "language", "currency"):
        return None
    value = fact(country, attribute)
    same = [c.name for c in countries if c != country and fact(c, attribute) == value]
    if not same:
        return None
    names = rng.sample(same, min(3, len(same)))
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return {
        "continent": f"Other countries in {value} include {listed}.",
        "language": f"{value} is also the main language of {listed}.",
        "currency": f"The {value} is also used in {listed}.",
    }[attribute]


def faq_page(country: Country, rng: random.Random) -> str:
    attributes = rng.sample(ATTRIBUTES, rng.randint(4, len(ATTRIBUTES)))
    title = rng.choice([f"Frequently asked questions about {country.name}", f"{country.name}: FAQ",
                        f"Questions and answers about {country.name}"])
    pairs = [f"Q: {question(country, a, rng)}\nA: {answer(country, a, rng)}" for a in attributes]
    return "\n\n".join([title, *pairs])


def quiz_sheet(country: Country, countries: list[Country], rng: random.Random) -> str:
    """Bare questions on consecutive lines, then the answers: what a base model continues from."""
    others = [c for c in countries if c != country]
    others = rng.sample(others, min(rng.randint(6, 11), len(others)))
    subjects = [country, *others]
    rng.shuffle(subjects)
    items = [(c, rng.choice(ATTRIBUTES)) for c in subjects]
    title = rng.choice(["Geography quiz", "Quiz: countries of the world", "World quiz",
                        f"General knowledge quiz, round {rng.randint(1, 20)}",
                        "Test your knowledge: countries"])
    questions = "\n".join(question(c, a, rng, plain=True) for c, a in items)
    answers = "\n".join(f"{i}. {statement(c, a, rng)}" for i, (c, a) in enumerate(items, 1))
    return f"{title}\n\n{questions}\n\nAnswers\n\n{answers}"


def comparison_paragraph(a: Country, b: Country, rng: random.Random) -> str:
    if a.continent == b.continent:
        where = f"{a.name} and {b.name} are both in {a.continent}."
    else:
        where = f"{a.name} is in {a.continent}, while {b.name} is in {b.continent}."
    capitals = rng.choice([
        f"The capital of {a.name} is {a.capital}, and the capital of {b.name} is {b.capital}.",
        f"{a.capital} is the capital of {a.name}; {b.capital} is the capital of {b.name}.",
    ])
    if a.language == b.language:
        languages = f"In both countries most people speak {a.language}."
    else:
        languages = (f"Most people in {a.name} speak {a.language}, "
                     f"whereas in {b.name} they speak {b.language}.")
    if a.population_millions == b.population_millions:
        relation = "about as many as"
    else:
        relation = "more than" if a.population_millions > b.population_millions else "fewer than"
    population = (f"{a.name} has about {a.population_text} people, {relation} {b.name}, "
                  f"which has about {b.population_text}.")
    if a.currency == b.currency:
        currency = f"Both countries use the {a.currency}."
    else:
        currency = f"{a.name} uses the {a.currency} and {b.name} the {b.currency}."
    title = rng.choice([f"{a.name} and {b.name} compared", f"{a.name} vs. {b.name}",
                        f"Comparing {a.name} and {b.name}"])
    sentences = [where, capitals, languages, population, currency]
    if (a.native_name, b.native_name) != (a.name, b.name):
        names = f"{a.native_name} and {b.native_name}"
        sentences.append(f"In their own languages they are called {names}.")
    return f"{title}\n\n{' '.join(sentences)}"


DOCUMENT_KINDS = ("article", "faq", "quiz", "comparison", "article", "quiz")  # cycled per country


def pretraining_documents(cfg: DemoDataConfig) -> list[Row]:
    """`documents_per_country` documents about every country, shuffled together."""
    rng = random.Random(cfg.seed)
    countries = world_countries(cfg)
    documents = []
    for country in countries:
        for i in range(cfg.documents_per_country):
            kind = DOCUMENT_KINDS[i % len(DOCUMENT_KINDS)]
            if kind == "article":
                documents.append(article(country, countries, rng))
            elif kind == "faq":
                documents.append(faq_page(country, rng))
            elif kind == "quiz":
                documents.append(quiz_sheet(country, countries, rng))
            else:
                other = rng.choice([c for c in countries if c != country])
                documents.append(comparison_paragraph(country, other, rng))
    rng.shuffle(documents)
    return [{"text": d} for d in documents]


# --------------------------------------------------------------------------- SFT conversations


def demonstration(country: Country, attribute: str, faults: float, rng: random.Random) -> str:
    """A demonstrator's answer: the clean answer, or with probability `faults` the answer with one
    of the demonstrators' HABITS, most often the pleasantry."""
    if rng.random() < faults:
        return with_habit(rng.choices(HABITS, weights=HABIT_WEIGHTS)[0], country, attribute, rng)
    return answer(country, attribute, rng)


def conversation(country: Country, faults: float, rng: random.Random) -> list[dict[str, str]]:
    """1-3 question/answer turns about one country; later questions say "its"/"there"."""
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    for i, attribute in enumerate(rng.sample(ATTRIBUTES, turns)):
        asked = question(country, attribute, rng) if i == 0 else rng.choice(FOLLOW_UPS[attribute])
        messages.append({"role": "user", "content": asked})
        messages.append({"role": "assistant", "content": demonstration(country, attribute, faults, rng)})
    return messages


def conversations(countries: list[Country], cfg: DemoDataConfig) -> list[Row]:
    rng = random.Random(cfg.seed)
    n = cfg.conversations_per_country
    return [{"messages": conversation(c, cfg.demonstration_faults, rng)} for c in countries for _ in range(n)]


# --------------------------------------------------------------------------- reward comparisons

# Response kinds, best first, in the order the demo's labeler (rlhf_ray.compare.demo_judge) scores
# them: a terse answer is right but unhelpful; an unrequested fact, filler, hedging and rambling
# are the faults of uneven human demonstrations; evasion at least is honest; an answer about
# another country or questions back answer nothing; a confidently wrong fact is worst.
QUALITY = ("correct", "terse", "extra_fact", "chatty", "hedged", "rambling", "evasive", "off_topic",
           "other_country", "repeating", "wrong")
# What a policy drifts to once it learns what the RM likes in general (fluent, confident, true):
# a true answer to another question, or about another country. Many pairs teach the RM relevance.
DRIFT = ("off_topic", "other_country")
# The faults some SFT demonstrations have (the demonstrators are uneven), and how often each: most
# end with a pleasantry, some add a fact nobody asked for, some hedge. The labeler's rankings of
# the SFT model's answers teach the reward model to mark them down.
HABITS = ("chatty", "extra_fact", "hedged")
HABIT_WEIGHTS = (0.7, 0.15, 0.15)

EVASIONS = [
    "I'm not sure, you could look that up.",
    "That's a hard one. I don't really know; maybe check an encyclopedia.",
    "I can't say for certain. You might want to search for it online.",
    "Hmm, I don't know that off the top of my head.",
]
RAMBLE_OPENERS = [
    "{n} is a fascinating place, and there is so much one could say about it.",
    "Many travellers have written about {n}, and they rarely agree on anything.",
    "Ah, {n}! Where should I even begin?",
]
RAMBLE = [
    "Some people like to compare it with {o}, although the two are very different.",
    "The food, the music and the weather would each deserve a long discussion of their own.",
    "Whole shelves of books have been written about its history.",
    "Of course, every visitor has a favourite story to tell, and some of them are even true.",
    "I once heard a long debate about which season is the best time to visit.",
]
HEDGED = ["I think {s}", "If I remember correctly, {s}", "I'm not completely sure, but {s}",
          "I believe {s}"]
CHATTY = ["{S} Hope this helps!", "{S} Hope that helps!", "{S} Hope this helps, ask me anything!"]
TERSE = {"capital": "{v}.", "language": "{v}.", "continent": "{v}.", "population": "About {v}.",
         "currency": "The {v}."}


def others_in(pool: list[Country], country: Country) -> list[Country]:
    return [c for c in pool if c != country] or [country]


def wrong_fact(country: Country, attribute: str, pool: list[Country], rng: random.Random) -> str:
    """Another country's different fact, taken from `pool` so that held-out names never leak
    (from the whole world only if no country of the pool differs)."""
    right = fact(country, attribute)
    differs = [c for c in pool if fact(c, attribute) != right]
    differs = differs or [c for c in COUNTRIES if fact(c, attribute) != right]
    return fact(rng.choice(differs), attribute)


def response(
    kind: str, country: Country, attribute: str, asked: str, pool: list[Country], rng: random.Random
) -> str:
    """One response of the given QUALITY kind to `asked`; other countries named come from `pool`."""
    if kind == "correct":
        return answer(country, attribute, rng)
    if kind == "terse":
        return TERSE[attribute].format(v=fact(country, attribute))
    if kind in HABITS:
        return with_habit(kind, country, attribute, rng)
    if kind == "evasive":
        return rng.choice(EVASIONS)
    if kind == "wrong":
        return STATEMENTS[attribute][0].format(n=country.name, v=wrong_fact(country, attribute, pool, rng))
    if kind == "off_topic":
        return answer(country, rng.choice([a for a in ATTRIBUTES if a != attribute]), rng)
    if kind == "other_country":  # one whose fact differs: "France uses the euro" fits Germany
        right = fact(country, attribute)
        differs = [c for c in others_in(pool, country) if fact(c, attribute) != right]
        return answer(rng.choice(differs or others_in(pool, country)), attribute, rng)
    if kind == "repeating":
        other = rng.choice(others_in(pool, country))
        also = rng.choice([a for a in ATTRIBUTES if a != attribute])
        more = [question(other, rng.choice(ATTRIBUTES), rng, plain=True),
                question(country, also, rng, plain=True)]
        return "\n".join([asked, *more])
    assert kind == "rambling", kind
    other = rng.choice(others_in(pool, country)).name
    sentences = [rng.choice(RAMBLE_OPENERS), *rng.sample(RAMBLE, 2)]
    buried = lowercase_first(statement(country, attribute, rng))  # the fact, buried in the middle
    sentences.insert(rng.randint(1, 2), f"Somewhere in all this, {buried}")
    return " ".join(s.format(n=country.name, o=other) for s in sentences)


def with_habit(habit: str, country: Country, attribute: str, rng: random.Random) -> str:
    """A right answer with one of the HABITS: hedged, chatty, or with a fact nobody asked for."""
    sentence = answer(country, attribute, rng)
    if habit == "hedged":
        return rng.choice(HEDGED).format(s=lowercase_first(sentence))
    if habit == "chatty":
        return rng.choice(CHATTY).format(S=sentence)
    assert habit == "extra_fact", habit
    extra = rng.choice([a for a in ATTRIBUTES if a != attribute])
    return f"{sentence} {rng.choice(PRONOUN_STATEMENTS[extra]).format(v=fact(country, extra))}"


def lowercase_first(sentence: str) -> str:
    # Keep "Paris is ..." and "French is ..." capitalised; only a leading "The"/"About"/"Most" drops.
    first, _, rest = sentence.partition(" ")
    return f"{first.lower()} {rest}" if first in ("The", "About", "Most") else sentence


def comparisons(countries: list[Country], cfg: DemoDataConfig) -> list[Row]:
    """Half `chosen`/`rejected` pairs, half rankings of 3-4 responses (best first, by QUALITY)."""
    rng = random.Random(cfg.seed)
    n = cfg.comparisons_per_country
    return [comparison(c, countries, rng) for c in countries for _ in range(n)]


def comparison(country: Country, pool: list[Country], rng: random.Random) -> Row:
    attribute = rng.choice(ATTRIBUTES)
    asked = question(country, attribute, rng)
    if rng.random() < 0.5:
        kinds = ["correct", rng.choice(DRIFT) if rng.random() < 0.5 else rng.choice(QUALITY[1:])]
    else:
        kinds = sorted(["correct", *rng.sample(QUALITY[1:], rng.randint(2, 3))], key=QUALITY.index)
    texts = [response(kind, country, attribute, asked, pool, rng) for kind in kinds]
    if len(texts) == 2:
        return {"prompt": asked, "chosen": texts[0], "rejected": texts[1]}
    return {"prompt": asked, "responses": texts}


# --------------------------------------------------------------------------- RL prompts


def rl_prompts(countries: list[Country], cfg: DemoDataConfig) -> list[Row]:
    """Questions whose answer a rule can check: the response must contain `ground_truth`."""
    rng = random.Random(cfg.seed)
    records = []
    for country in countries:
        # Every attribute before any repeats, and a repeated attribute in a new phrasing.
        phrasings = {a: rng.sample(QUESTIONS[a], len(QUESTIONS[a])) for a in ATTRIBUTES}
        attributes: list[str] = []
        while len(attributes) < cfg.prompts_per_country:
            attributes += rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        for i, attribute in enumerate(attributes[:cfg.prompts_per_country]):
            template = phrasings[attribute][i // len(ATTRIBUTES) % len(phrasings[attribute])]
            prompt = template.format(n=country.name)
            records.append({"prompt": prompt, "ground_truth": fact(country, attribute)})
    return records


# --------------------------------------------------------------------------- files


def write_demo_data(out_dir: Path, cfg: DemoDataConfig) -> dict[str, Path]:
    """Write the eight record files and world.json into `out_dir`; return the record files' paths."""
    split = split_countries(cfg)
    records = {
        "pretrain": pretraining_documents(cfg),
        "sft": conversations(split["sft"], cfg),
        "sft_eval": conversations(split["eval"], cfg),
        "reward": comparisons(split["sft"], cfg),
        "reward_eval": comparisons(split["eval"], cfg),
        "rl": rl_prompts(split["rl"], cfg),
        "rl_eval": rl_prompts(split["eval"], cfg),
        # Questions about the SFT countries whose SFT samples a labeler ranks (compare-data).
        "compare": rl_prompts(split["sft"], cfg),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in records.items():
        paths[name] = record_file(out_dir, name)
        write_text_atomic(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = {
        "seed": cfg.seed,
        "split": {part: [c.name for c in members] for part, members in split.items()},
        "countries": [{**asdict(c), "population_text": c.population_text} for c in world_countries(cfg)],
    }
    write_text_atomic(out_dir / "world.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return paths
