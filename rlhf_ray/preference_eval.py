"""The preference half of the evaluation across stages (rlhf_ray.stage_eval runs it): which
stage's reply a judge prefers, what faults each stage's replies have, and how well the reward
model judges held-out comparisons.

- Win rate: for each held-out question the labeler (evaluation.labeler: 'demo' or any
  `module:function`, as compare.labeler) scores SFT's reply and another stage's together; the
  other stage wins, ties or loses. Identical replies tie without asking the labeler.
- Fault rates: on the demo's questions, the share of each stage's replies with each fault the
  demo's judge names (rlhf_ray.compare.demo_judge).
- The reward model's judgement: every (better, worse) pair of the held-out comparisons
  (data.reward_eval), its pairwise accuracy overall, per kind of pair (on the demo's data: the
  judge's name for each side, e.g. "good > hedged"), and by score margin (calibration: a larger
  margin should mean a surer, more often right, judgement).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from rlhf_ray.compare import demo_judge
from rlhf_ray.compare.labelers import checked_scores, load_labeler
from rlhf_ray.data.demo import asked
from rlhf_ray.data.records import ComparisonRecord, Message, PromptRecord
from rlhf_ray.data.world import fact
from rlhf_ray.train.losses import ranking_pairs

MARGIN_BINS = 4  # calibration: the pairs in quartiles of |score margin|


def win_rates(labeler_spec: str, records: Sequence[PromptRecord], replies: dict[str, list[str]],
              against: str) -> dict[str, dict]:
    """Each stage but `against` judged against it question by question: wins, ties, losses and
    the win rate over the comparisons that were not tied (None when all were)."""
    labeler = load_labeler(labeler_spec)
    prompts = [[m.model_dump() for m in r.prompt] for r in records]
    out = {}
    for stage, texts in replies.items():
        if stage == against:
            continue
        counts = Counter()
        for prompt, record, theirs, ours in zip(prompts, records, replies[against], texts):
            if theirs == ours:
                counts["ties"] += 1
                continue
            base, other = checked_scores(labeler(prompt, [theirs, ours], record.ground_truth), 2,
                                         labeler_spec)
            counts["wins" if other > base else "losses" if other < base else "ties"] += 1
        decided = counts["wins"] + counts["losses"]
        out[stage] = {"wins": counts["wins"], "ties": counts["ties"], "losses": counts["losses"],
                      "win_rate": counts["wins"] / decided if decided else None}
    return out


def fault_rates(records: Sequence[PromptRecord], replies: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per stage, the share of its replies with each fault (demo_judge.FAULTS), and with any."""
    out = {}
    for stage, texts in replies.items():
        found = [demo_judge.faults(r.prompt[-1].content, t, r.ground_truth) for r, t in zip(records, texts)]
        rates = {f: sum(f in fs for fs in found) / len(found) for f in demo_judge.FAULTS}
        out[stage] = {"any": sum(bool(fs) for fs in found) / len(found)} | rates
    return out


def comparison_pairs(records: Sequence[ComparisonRecord]) -> list[tuple[list[Message], list[Message], list[Message]]]:
    """Every (prompt, better, worse) of the records (a ranking of k gives its k(k-1)/2 pairs)."""
    pairs = []
    for record in records:
        better, worse = ranking_pairs(len(record.responses))
        pairs += [(record.prompt, record.responses[i], record.responses[j]) for i, j in zip(better, worse)]
    return pairs


def pair_kind(prompt: list[Message], better: list[Message], worse: list[Message]) -> str | None:
    """"good > hedged": the demo judge's name for each side of a pair on a demo question (None
    for any other question)."""
    question = prompt[-1].content
    if len(prompt) != 1 or (about := asked(question)) is None:
        return None
    truth = fact(*about)
    return " > ".join(demo_judge.kind(question, side[-1].content, truth) for side in (better, worse))


def reward_judgement(score: Callable[[list[list[Message]]], list[float]],
                     records: Sequence[ComparisonRecord]) -> dict:
    """The reward model's pairwise accuracy on `records`: overall, per kind of pair (when the
    demo judge can name them), and by margin quartile. `score` gives one number per conversation."""
    pairs = comparison_pairs(records)
    if not pairs:
        return {}
    conversations = {}
    for prompt, *sides in pairs:
        for side in sides:
            conversations.setdefault(repr([*prompt, *side]), [*prompt, *side])
    scored = dict(zip(conversations, score(list(conversations.values()))))
    margins = [scored[repr([*p, *b])] - scored[repr([*p, *w])] for p, b, w in pairs]
    kinds: dict[str, list[bool]] = {}
    for (prompt, better, worse), margin in zip(pairs, margins):
        if (name := pair_kind(prompt, better, worse)) is not None:
            kinds.setdefault(name, []).append(margin > 0)
    by_margin = sorted(zip((abs(m) for m in margins), (m > 0 for m in margins)))
    size = -(-len(by_margin) // MARGIN_BINS)
    calibration = [{"margin_from": chunk[0][0], "margin_to": chunk[-1][0], "pairs": len(chunk),
                    "accuracy": sum(right for _, right in chunk) / len(chunk)}
                   for chunk in (by_margin[i:i + size] for i in range(0, len(by_margin), size))]
    return {
        "pairs": len(pairs),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "by_kind": {k: {"pairs": len(v), "accuracy": sum(v) / len(v)}
                    for k, v in sorted(kinds.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "calibration": calibration,
    }


def spread(items: list[int], count: int) -> list[int]:
    """`count` of `items` evenly spread from first to last (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[round(k * (len(items) - 1) / max(1, count - 1))] for k in range(count)]


def differing_questions(replies: dict[str, list[str]], first: str, others: Sequence[str], count: int) -> list[int]:
    """Up to `count` question indices where `first`'s reply differs from another stage's, spread
    over the questions; [] when they never differ."""
    return spread([i for i in range(len(replies.get(first, []))) if any(
        o in replies and replies[o][i] != replies[first][i] for o in others)], count)


def markdown(result: dict, against: str) -> list[str]:
    """The preference sections of stages.md: win rates, fault rates, the reward model's judgement."""
    lines: list[str] = []
    if wins := result.get("win_rates"):
        lines += ["", f"Preference against {against}, judged by the labeler `{result['labeler']}` "
                  f"question by question (win rate: wins over the comparisons not tied):", "",
                  f"| model | wins | ties | losses | win rate vs {against} |", "|---|---:|---:|---:|---:|"]
        for stage, w in wins.items():
            rate = "–" if w["win_rate"] is None else f"{w['win_rate']:.0%}"
            lines.append(f"| {stage} | {w['wins']} | {w['ties']} | {w['losses']} | {rate} |")
    if faults := result.get("fault_rates"):
        shown = [f for f in demo_judge.FAULTS if any(r[f] for r in faults.values())]
        lines += ["", "Faults of each model's replies, as the demo's judge names them (share of the "
                  "held-out replies; a reply may have several):", "",
                  "| model | any | " + " | ".join(shown) + " |", "|---" * (len(shown) + 2) + "|"]
        for stage, r in faults.items():
            lines.append(f"| {stage} | {r['any']:.0%} | " + " | ".join(f"{r[f]:.0%}" for f in shown) + " |")
    if judged := result.get("reward_model"):
        lines += ["", f"The reward model on the held-out comparisons (data.reward_eval): pairwise "
                  f"accuracy **{judged['accuracy']:.3f}** over {judged['pairs']} pairs."]
        if judged["by_kind"]:
            lines += ["", "| better > worse | pairs | accuracy |", "|---|---:|---:|"]
            lines += [f"| {k} | {v['pairs']} | {v['accuracy']:.2f} |" for k, v in judged["by_kind"].items()]
        lines += ["", "Calibration: accuracy by the size of the score margin (quartiles of the pairs):",
                  "", "| score margin | pairs | accuracy |", "|---|---:|---:|"]
        lines += [f"| {c['margin_from']:.2f}–{c['margin_to']:.2f} | {c['pairs']} | {c['accuracy']:.2f} |"
                  for c in judged["calibration"]]
    return lines
