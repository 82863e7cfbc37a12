"""Every stage's model on the same held-out questions: does each step do what the talk says?

The questions are rl_eval prompts about countries SFT never saw, each with a reference answer. The
base model gets the bare question as a document (as a user would try it) or k worked "Q:/A:"
examples from the SFT data first; SFT, RLHF and DPO (when the run has it) get it as a user turn.
Greedy, 48 new tokens.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from rlhf_ray.config import RunConfig
from rlhf_ray.data.readers import read_many
from rlhf_ray import preference_eval
from rlhf_ray.data.records import ChatRecord, ComparisonRecord, Message, PromptRecord
from rlhf_ray.evaluate import generate_greedy, newline_tokens
from rlhf_ray.modeling import load_policy, load_scalar_model, pad, score_conversations
from rlhf_ray.prompting import exact_match, few_shot_document, prompt_ids
from rlhf_ray.run import CHAT_MODELS, REWARD_MODEL, RunFolder, base_model, data_files, serves_as
from rlhf_ray.run import stage as stage_named
from rlhf_ray.storage import write_json_atomic, write_text_atomic
from rlhf_ray.tokenizer import ChatTokenizer, load_tokenizer

MAX_NEW_TOKENS = 48
SHOTS = (0, 1, 3, 5)
BASE, *CHATS = CHAT_MODELS  # the base model, then the chat models (sft, rlhf, dpo)
SFT = CHATS[0]
RLHF, DPO = stage_named("ppo").folder, stage_named("dpo").folder  # both tuned from SFT


def shots(k: int) -> str:
    """The name of the base model's k-shot variant, e.g. "base 3-shot"."""
    return f"{BASE} {k}-shot"


VARIANTS = [shots(k) for k in SHOTS] + CHATS
SAMPLES = 6  # replies kept per variant, the same questions for each: the report shows them
ANSWERS_RULE = ("A reply *answers* when its first line, stripped, is non-empty, does not end with "
                "\"?\" and is not the question itself (case and trailing punctuation aside).")


def held_out_questions(cfg: RunConfig) -> list[PromptRecord]:
    """rl_eval prompts with a reference answer and a single user turn."""
    paths = data_files(cfg)["rl_eval"]
    records = read_many(paths, PromptRecord) if paths else []
    records = [r for r in records if r.ground_truth and len(r.prompt) == 1]
    if not records:
        where = ", ".join(map(str, paths)) or "no files: set data.rl_eval or data.demo"
        raise ValueError(f"no held-out questions with a ground_truth and one user turn in "
                         f"data.rl_eval ({where})")
    return records


def few_shot_examples(cfg: RunConfig, count: int = 5) -> list[tuple[str, str]]:
    """`count` single-turn SFT (question, answer) pairs, seeded; distinct first words first, so the
    examples show several kinds of question rather than five capitals."""
    paths = data_files(cfg)["sft"]
    pairs = [(r.messages[0].content, r.messages[1].content) for r in read_many(paths, ChatRecord)
             if [m.role for m in r.messages] == ["user", "assistant"]] if paths else []
    if len(pairs) < count:
        raise ValueError(f"few-shot prompting needs {count} single-turn conversations (a user "
                         f"turn, then an assistant turn) in data.sft; "
                         f"{', '.join(map(str, paths)) or 'no files'} hold {len(pairs)}")
    random.Random(cfg.seed).shuffle(pairs)
    seen: set[str] = set()
    distinct, rest = [], []
    for pair in pairs:
        word = pair[0].split()[0].lower()
        (rest if word in seen else distinct).append(pair)
        seen.add(word)
    return (distinct + rest)[:count]


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def first_line_ids(tokenizer: ChatTokenizer, ids: list[int]) -> list[int]:
    """The generated tokens that make up the first line (a token such as "?\n" counts); decoding
    them alone could split a character, so the reply's text comes from all of them."""
    for i, token in enumerate(ids):
        text = tokenizer.decode([token])
        if "\n" in text:
            return ids[: i + bool(text.split("\n", 1)[0].strip())]
    return ids


def answers(question: str, reply: str) -> bool:
    """Whether the reply answers at all rather than continuing the document: its first line is
    non-empty, does not end with "?" (another question) and is not the question repeated (case
    and trailing punctuation aside). Right or wrong does not matter here; exact match says that."""
    def bare(text: str) -> str:
        return text.strip().rstrip("?.!").strip().lower()

    line = first_line(reply)
    return bool(line) and not line.endswith("?") and bare(line) != bare(question)


def has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def right_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A forward pass's inputs on `device`: real tokens keep positions 0..n-1, the padding is
    masked out (the training stages' padding)."""
    ids, attention = pad(rows, pad_id)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device)}


def on_device(model: PreTrainedModel) -> PreTrainedModel:
    """The model in eval mode on the GPU this process was given, if any."""
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def kl_along(policy: PreTrainedModel, reference: PreTrainedModel, prompts: list[list[int]],
             replies: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """Per reply, the sum over its generation steps of the exact KL(policy || reference) of the
    next-token distributions, over the full vocabulary. A step's KL depends on its prefix only, so
    the step that chose the (dropped) stop token counts too when the reply stopped early."""
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        inputs = right_padded([p + r for p, r in zip(prompts[start:end], replies[start:end])], pad_id,
                              policy.device)
        with torch.no_grad():
            logp = torch.log_softmax(policy(**inputs).logits.float(), -1)
            logq = torch.log_softmax(reference(**inputs).logits.float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        for row, i in enumerate(range(start, min(end, len(prompts)))):
            steps = len(replies[i]) + (len(replies[i]) < MAX_NEW_TOKENS)
            out.append(kl[row, len(prompts[i]) - 1 : len(prompts[i]) - 1 + steps].sum().item())
    return out


def scorer(folder: Path) -> Callable[[list[list[Message]]], list[float]]:
    """The reward model (loaded once) as a function from conversations to scores: the scorer
    /v1/score serves."""
    tokenizer, model = load_tokenizer(folder), on_device(load_scalar_model(folder))
    return lambda conversations: score_conversations(model, tokenizer, conversations)


def reward_scores(score: Callable[[list[list[Message]]], list[float]], questions: list[str],
                  replies: dict[str, list[str]]) -> dict[str, list[float]]:
    """The reward model's score of each [question, reply] conversation."""
    return {name: score([[Message(role="user", content=q), Message(role="assistant", content=t)]
                         for q, t in zip(questions, texts)]) for name, texts in replies.items()}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def claim(text: str, left: tuple[str, float | None], op: str, right: tuple[str, float | None]) -> dict:
    """`left op right` decides the claim; the detail shows both numbers, whichever way it goes."""
    (left_name, a), (right_name, b) = left, right
    missing = [name for name, value in (left, right) if value is None]
    if missing:
        return {"claim": text, "holds": None, "detail": f"not measured (no {' or '.join(missing)})"}
    holds = {"<": a < b, ">": a > b, ">=": a >= b}[op]
    return {"claim": text, "holds": holds,
            "detail": f"{left_name} {a:.3f} {op if holds else 'not ' + op} {right_name} {b:.3f}"}


# The held-out pairwise accuracy a reward model must reach for its judgement to count as good:
# InstructGPT's agreed with its labelers 72% of the time, but the demo's labeler is consistent and
# knows the facts, so a reward model that learned its rankings should agree far more often.
REWARD_ACCURACY_GOAL = 0.85


def check_claims(variants: dict[str, dict], wins: dict[str, dict] | None = None,
                 reward_accuracy: float | None = None) -> list[dict]:
    """The talk's claims, each decided by one fixed comparison of the measured numbers; the
    preference claims only when a labeler judged the replies (`wins`, preference_eval.win_rates),
    the reward model's only when it was judged on held-out comparisons (`reward_accuracy`)."""
    def get(name: str, key: str) -> tuple[str, float | None]:
        return f"{name} {key}", variants.get(name, {}).get(key)

    def preferred(name: str) -> list[dict]:
        if wins is None or name not in wins:
            return []
        return [claim(f"{'RLHF' if name == RLHF else 'DPO'} answers are preferred over SFT's",
                      (f"{name} win rate vs {SFT}", wins[name]["win_rate"]), ">", ("even", 0.5))]

    few_shot = [get(shots(k), "exact_match") for k in SHOTS[1:] if shots(k) in variants]
    best = max(few_shot, key=lambda s: s[1]) if few_shot else (f"{BASE} k-shot exact_match", None)
    return [
        claim("a base model rarely answers a bare question", get(shots(0), "answers"), "<",
              ("threshold", 0.5)),
        claim("few-shot examples help the base model", best, ">", get(shots(0), "exact_match")),
        claim("SFT beats few-shot prompting", get(SFT, "exact_match"), ">", best),
        *([claim("the reward model ranks held-out replies as the labeler does",
                 ("reward model held-out accuracy", reward_accuracy), ">=",
                 ("goal", REWARD_ACCURACY_GOAL))] if reward_accuracy is not None else []),
        claim("RLHF raises the reward model's score over SFT", get(RLHF, "reward"), ">",
              get(SFT, "reward")),
        claim("without losing exact match", get(RLHF, "exact_match"), ">=", get(SFT, "exact_match")),
        *preferred(RLHF),
    ] + ([  # DPO, when the run has it, on the same counts
        claim("DPO raises the reward model's score over SFT", get(DPO, "reward"), ">", get(SFT, "reward")),
        claim("DPO keeps SFT's exact match", get(DPO, "exact_match"), ">=", get(SFT, "exact_match")),
        *preferred(DPO),
    ] if DPO in variants else [])


def markdown(name: str, result: dict) -> str:
    """stages.md: what was asked, the table, the definitions, the claims and the chart."""
    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    verdict = {True: "holds", False: "does NOT hold", None: "not measured"}
    lines = [f"# Evaluation across stages: `{name}`", "",
             f"{result['questions']} held-out questions (data.rl_eval; the demo keeps their "
             "countries out of SFT), greedy, "
             f"{MAX_NEW_TOKENS} new tokens. The base model gets the bare question as a document, or "
             "k worked examples `Q: question\\nA: answer` from the SFT data before `Q: question\\nA:`; "
             "its reply is its continuation up to the first newline. SFT, RLHF and DPO get the "
             "question as a user turn.", "",
             "| model | exact match | RM score | KL to SFT | length (tokens) | answers |",
             "|---|---:|---:|---:|---:|---:|"]
    for v in result["variants"]:
        cells = [fmt(v[k], spec) for k, spec in (("exact_match", ".2f"), ("reward", ".3f"),
                                                 ("kl_to_sft", ".3f"), ("length", ".1f"), ("answers", ".2f"))]
        lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    lines += [f"| {n} | skipped: {why} | | | | |" for n, why in result["skipped"].items()]
    lines += ["", f"Exact match: the reference answer appears verbatim in the reply. {ANSWERS_RULE} "
              "KL to SFT: per reply, the summed per-token KL(model ‖ SFT) along the model's own "
              "reply.", *preference_eval.markdown(result, SFT), "",
              "The talk's claims, checked:", ""]
    lines += [f"- {c['claim']}: **{verdict[c['holds']]}** ({c['detail']})" for c in result["claims"]]
    return "\n".join(lines + ["", "![stages](stages.png)", ""])


def plot(variants: list[dict], out: Path, wins: dict[str, dict] | None = None) -> None:
    """Exact match and answer rate per variant (0–1), the mean RM score in a second panel, and
    with a labeler's judgement a third: each stage's wins, ties and losses against SFT."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names, x = [v["name"] for v in variants], range(len(variants))
    figure, axes = plt.subplots(1, 3 if wins else 2, figsize=(15 if wins else 11, 3.6),
                                gridspec_kw={"width_ratios": [3, 3, 1.4] if wins else [1, 1]})
    rates, scores = axes[0], axes[1]
    for offset, key in ((-0.2, "exact_match"), (0.2, "answers")):
        rates.bar([i + offset for i in x], [v[key] for v in variants], width=0.4, label=key)
    rates.set(ylim=(0, 1), title="fraction of held-out questions")
    rates.legend(fontsize=8)
    scored = [i for i in x if variants[i]["reward"] is not None]
    scores.bar(scored, [variants[i]["reward"] for i in scored], color="tab:green")
    scores.set_title("reward model score (mean)" if scored else "no reward model")
    for ax in (rates, scores):
        ax.set_xticks(list(x), names, rotation=20, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    if wins:
        judged, bottom = list(wins), [0] * len(wins)
        for key, color in (("wins", "tab:green"), ("ties", "tab:gray"), ("losses", "tab:red")):
            counts = [wins[n][key] for n in judged]
            axes[2].bar(judged, counts, bottom=bottom, color=color, label=key)
            bottom = [b + c for b, c in zip(bottom, counts)]
        axes[2].set_title(f"judged against {SFT}")
        axes[2].legend(fontsize=8)
    figure.tight_layout()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    os.replace(tmp, out)


def base_variants(folder: Path, questions: list[str], examples: list[tuple[str, str]],
                  log: Callable[[str], None]) -> tuple[dict, dict]:
    """The base model's replies and their token counts (the model loaded once), 0/1/3/5-shot; a
    reply is the first line of the continuation, since what follows is the document going on."""
    tokenizer, model = load_tokenizer(folder), on_device(load_policy(folder))
    line_ends = newline_tokens(tokenizer)
    replies, lengths = {}, {}
    for k in SHOTS:
        log(f"{shots(k)}: {len(questions)} questions")
        docs = [tokenizer.encode_document(few_shot_document(examples[:k], q)) for q in questions]
        out = generate_greedy(folder, docs, MAX_NEW_TOKENS, model=model, end_after=line_ends)
        replies[shots(k)] = [first_line(tokenizer.decode(ids)) for ids in out]
        lengths[shots(k)] = [len(first_line_ids(tokenizer, ids)) for ids in out]
    return replies, lengths


def evaluated_chats(cfg: RunConfig) -> list[str]:
    """The chat models to evaluate: SFT, RLHF, and DPO when configured or there."""
    dpo_there = has_model(RunFolder(cfg.run_dir).model(DPO))
    return [c for c in CHATS if c != DPO or cfg.dpo is not None or dpo_there]


def chat_variants(run_dir: Path, records: list[PromptRecord], log: Callable[[str], None],
                  skipped: dict[str, str], chats: list[str] = CHATS
                  ) -> tuple[dict, dict, dict[str, list[float]]]:
    """The chat models' replies and token counts (each model loaded once), and their KL to SFT,
    each measured along the model's own replies."""
    replies, lengths, kl, sft_model = {}, {}, {}, None
    for stage in chats:
        folder = RunFolder(run_dir).model(stage)
        if not has_model(folder):
            skipped[stage] = f"{folder}: no config.json"
            continue
        log(f"{stage}: {len(records)} questions")
        tokenizer, model = load_tokenizer(folder), on_device(load_policy(folder))
        prompts = [prompt_ids(tokenizer, serves_as(stage), r.prompt) for r in records]
        out = generate_greedy(folder, prompts, MAX_NEW_TOKENS, model=model)
        replies[stage], lengths[stage] = [tokenizer.decode(ids) for ids in out], [len(ids) for ids in out]
        if sft_model is None:  # the first chat model (SFT) is the one KL is measured to
            sft_model, kl[stage] = model, [0.0] * len(out)  # KL of a model to itself
        else:
            kl[stage] = kl_along(model, sft_model, prompts, out, tokenizer.pad_id)
    return replies, lengths, kl


def sample_questions(replies: dict[str, list[str]], count: int) -> list[int]:
    """The questions whose replies the report sets side by side: where SFT's reply differs from
    RLHF's or DPO's first (that is where tuning shows), then others spread over the questions."""
    picks = preference_eval.differing_questions(replies, SFT, [RLHF, DPO], count)
    total = len(next(iter(replies.values()), []))
    for i in preference_eval.spread(list(range(total)), count):
        if len(picks) >= min(count, total):
            break
        if i not in picks:
            picks.append(i)
    return sorted(picks)


def summarise(name: str, records: list[PromptRecord], replies: list[str], lengths: list[int],
              rewards: list[float] | None, kl: list[float] | None, picks: list[int]) -> dict:
    """One row of the table, with the replies to the `picks` questions (the same for every
    variant, so the report can set them side by side)."""
    questions = [r.prompt[0].content for r in records]
    return {
        "name": name,
        "exact_match": mean([float(exact_match(t, r.ground_truth)) for r, t in zip(records, replies)]),
        "reward": mean(rewards) if rewards is not None else None,
        "kl_to_sft": mean(kl) if kl is not None else None,
        "length": mean(lengths),
        "answers": mean([float(answers(q, t)) for q, t in zip(questions, replies)]),
        "count": len(replies),
        "samples": [{"question": questions[i], "reply": replies[i], "reference": records[i].ground_truth}
                    for i in picks],
    }


def evaluate_stages(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """Evaluate base (0/1/3/5-shot), SFT and RLHF on the held-out questions and check the talk's
    claims; writes <run>/eval/stages.{json,md,png} and returns <run>/eval."""
    records = held_out_questions(cfg)
    examples = few_shot_examples(cfg)
    questions = [r.prompt[0].content for r in records]
    replies: dict[str, list[str]] = {}
    lengths: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    base = base_model(cfg)
    if has_model(base):
        replies, lengths = base_variants(base, questions, examples, log)
    else:
        skipped |= {shots(k): f"{base}: no config.json" for k in SHOTS}
    chat, chat_lengths, kl = chat_variants(cfg.run_dir, records, log, skipped, evaluated_chats(cfg))
    replies, lengths = replies | chat, lengths | chat_lengths
    result: dict = {"questions": len(records)}
    rewards: dict[str, list[float]] = {}
    if has_model(reward_dir := RunFolder(cfg.run_dir).model(REWARD_MODEL)):
        log("reward model: scoring every reply and the held-out comparisons")
        score = scorer(reward_dir)
        rewards = reward_scores(score, questions, replies)
        comparisons = read_many(data_files(cfg)["reward_eval"], ComparisonRecord)
        result["reward_model"] = preference_eval.reward_judgement(score, comparisons) if comparisons else {}
    chats = {n: replies[n] for n in CHATS if n in replies}
    if cfg.evaluation.labeler is not None and SFT in chats:
        log(f"labeler {cfg.evaluation.labeler}: judging every reply against {SFT}'s")
        result |= {"labeler": cfg.evaluation.labeler,
                   "win_rates": preference_eval.win_rates(cfg.evaluation.labeler, records, chats, SFT)}
    if cfg.data.demo is not None:  # the demo's questions: its judge names the faults
        result["fault_rates"] = preference_eval.fault_rates(records, {n: replies[n] for n in VARIANTS
                                                                      if n in replies})
    picks = sample_questions(chats or replies, SAMPLES)
    variants = [summarise(n, records, replies[n], lengths[n], rewards.get(n), kl.get(n), picks)
                for n in VARIANTS if n in replies]
    result |= {"variants": variants, "skipped": skipped,
               "claims": check_claims({v["name"]: v for v in variants}, result.get("win_rates"),
                                      result.get("reward_model", {}).get("accuracy"))}
    out_dir = RunFolder(cfg.run_dir).eval
    write_json_atomic(out_dir / "stages.json", result)
    write_text_atomic(out_dir / "stages.md", markdown(cfg.name, result))
    plot(variants, out_dir / "stages.png", result.get("win_rates"))
    log(f"wrote {out_dir}/stages.json, stages.md and stages.png")
    return out_dir


def is_current(cfg: RunConfig) -> bool:
    """eval/stages.json exists and is newer than every model folder it could have read."""
    result = RunFolder(cfg.run_dir).eval / "stages.json"
    if not result.exists():
        return False
    run = RunFolder(cfg.run_dir)
    models = [base_model(cfg), *(run.model(name) for name in (*CHATS, REWARD_MODEL))]
    written = [(m / "config.json").stat().st_mtime for m in models if has_model(m)]
    return all(t < result.stat().st_mtime for t in written)


def run_evaluation(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """evaluate_stages in a Ray task with `evaluation.resources`, so that on a cluster it runs
    where a GPU is rather than on the driver (its lines come back through Ray's log)."""
    import ray

    from rlhf_ray import cluster

    res = cfg.evaluation.resources
    asked = cluster.bundle(res.num_cpus, res.num_gpus)
    cluster.connect(cfg.cluster)
    if not cluster.joins_cluster(cfg.cluster) and (reason := cluster.why_unplaceable([asked])):
        raise cluster.ResourcesError(f"evaluation.resources asks for {cluster.describe(asked)}{reason}")
    log(f"evaluating base, {', '.join(evaluated_chats(cfg))} in a Ray task with {cluster.describe(asked)}")
    task = ray.remote(evaluate_in_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                                runtime_env=cluster.ACTOR_ENV)
    return ray.get(task.remote(cfg, cluster.torch_threads(res)))


def evaluate_in_task(cfg: RunConfig, threads: int) -> Path:
    from rlhf_ray.cluster import require_cuda  # as run_evaluation does: Ray only when used

    require_cuda("the eval task")
    torch.set_num_threads(threads)
    return evaluate_stages(cfg, log=lambda message: print(f"[eval] {message}", flush=True))
