"""A run's comparison files, and the one way rankings are added to them.

    <run>/compare/candidates.jsonl  a line per prompt: {id, prompt, responses, ground_truth}, the
                                    K sampled responses (distinct, in sampled order)
    <run>/compare/rankings.jsonl    a ComparisonRecord per ranked prompt: {id, prompt, responses
                                    best first, labeler, time, unacceptable}; the reward stage
                                    reads it as it is
    <run>/compare/leases.json       which unranked prompt is shown to whom, until when

Every change takes an exclusive lock (flock on compare/.lock) and re-reads the files under it, so
any number of processes (Serve replicas, two servers, a labeler script) may add rankings at once:
a record is appended whole and fsynced before the lock is let go, and a prompt that already has a
ranking is refused rather than ranked twice. Nothing is ever rewritten but the leases.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from rlhf_ray.data.records import ComparisonRecord, Message
from rlhf_ray.storage import write_json_atomic, write_text_atomic


class Candidate(BaseModel):
    """One prompt and the K responses sampled for it, to be ranked."""

    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: list[Message]
    responses: list[str]
    ground_truth: str | None = None

    @field_validator("responses")
    @classmethod
    def _distinct(cls, responses: list[str]) -> list[str]:
        if len(set(responses)) < 2 or len(set(responses)) != len(responses):
            raise ValueError("a candidate needs at least 2 responses, all different")
        return responses


class RankingError(ValueError):
    """A ranking that cannot be recorded as sent (the person's input is wrong)."""


class AlreadyRanked(RankingError):
    """The prompt has a ranking already; the first one stands."""


def check_order(order: list[int], count: int) -> None:
    """`order` must name each of the `count` responses exactly once."""
    repeated = sorted({i for i in order if order.count(i) > 1})
    outside = sorted({i for i in order if not 0 <= i < count})
    omitted = sorted(set(range(count)) - set(order))
    problems = [f"repeats response {', '.join(map(str, repeated))}"] if repeated else []
    problems += [f"names response {', '.join(map(str, outside))}, which does not exist"] if outside else []
    problems += [f"omits response {', '.join(map(str, omitted))}"] if omitted else []
    if problems:
        raise RankingError(f"the ranking {order} {' and '.join(problems)}; order all {count} "
                           f"responses (0..{count - 1}) from best to worst, each once")


class ComparisonStore:
    def __init__(self, folder: Path, lease_s: float = 600.0) -> None:
        self.folder = Path(folder)
        self.lease_s = lease_s
        self.candidates_path = self.folder / "candidates.jsonl"
        self.rankings_path = self.folder / "rankings.jsonl"
        self.leases_path = self.folder / "leases.json"
        self._cache: tuple[float, dict[str, Candidate]] | None = None

    # ------------------------------------------------------------------ reading

    def has_candidates(self) -> bool:
        return self.candidates_path.is_file()

    def candidates(self) -> dict[str, Candidate]:
        """By id, in file order (cached until the file changes)."""
        if not self.has_candidates():
            raise FileNotFoundError(f"{self.candidates_path}: no candidates; sample them first "
                                    "(rlhf-ray compare-data)")
        stamp = self.candidates_path.stat().st_mtime
        if self._cache is None or self._cache[0] != stamp:
            lines = self.candidates_path.read_text(encoding="utf-8").splitlines()
            found = [Candidate.model_validate_json(line) for line in lines if line.strip()]
            self._cache = (stamp, {c.id: c for c in found})
        return self._cache[1]

    def rankings(self) -> list[dict[str, Any]]:
        """The recorded rankings, oldest first (a torn last line, never acknowledged, is skipped)."""
        if not self.rankings_path.exists():
            return []
        text = self.rankings_path.read_text(encoding="utf-8")
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def progress(self, labeler: str | None = None) -> dict[str, int]:
        rankings = self.rankings()
        total = len(self.candidates())
        return {"total": total, "ranked": len(rankings), "remaining": total - len(rankings),
                "by_you": sum(r.get("labeler") == labeler for r in rankings)}

    # ------------------------------------------------------------------ writing

    def write_candidates(self, candidates: list[Candidate]) -> None:
        if self.has_candidates():
            raise FileExistsError(f"{self.candidates_path}: already sampled (delete the folder "
                                  f"{self.folder} to sample again; its rankings go with it)")
        write_text_atomic(self.candidates_path, "".join(c.model_dump_json() + "\n" for c in candidates))

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def next_for(self, labeler: str) -> Candidate | None:
        """The prompt `labeler` should rank next: the one shown to them before and still unranked
        (so a reload resumes it), else the first that is neither ranked nor shown to someone else
        within lease_s. None when nothing is left for them."""
        with self.locked():
            ranked = {r["id"] for r in self.rankings()}
            now = time.time()
            leases = {i: lease for i, lease in self._leases().items()
                      if lease["until"] > now and i not in ranked}
            mine = [i for i, lease in leases.items() if lease["labeler"] == labeler]
            free = [i for i in self.candidates() if i not in ranked and i not in leases]
            chosen = (mine or free or [None])[0]
            if chosen is not None:
                leases[chosen] = {"labeler": labeler, "until": now + self.lease_s}
            write_json_atomic(self.leases_path, leases)
        return None if chosen is None else self.candidates()[chosen]

    def submit(self, prompt_id: str, order: list[int], labeler: str,
               unacceptable: list[int] | None = None) -> ComparisonRecord:
        """Record a person's ranking: `order` lists the candidate's response indices best first;
        `unacceptable` names responses (by the same indices) marked unacceptable."""
        candidate = self.candidates().get(prompt_id)
        if candidate is None:
            raise RankingError(f"unknown prompt id {prompt_id!r}")
        check_order(order, len(candidate.responses))
        bad = [i for i in unacceptable or [] if i not in order]
        if bad:
            raise RankingError(f"unacceptable names response {bad[0]}, which does not exist")
        marked = sorted(order.index(i) for i in set(unacceptable or []))
        return self.append(candidate, [candidate.responses[i] for i in order], labeler, marked)

    def append(self, candidate: Candidate, ranked: list[str], labeler: str,
               unacceptable: list[int] | None = None) -> ComparisonRecord:
        """Append the ranking of `candidate` (`ranked`: responses best first), exactly once."""
        if not labeler.strip():
            raise RankingError("the labeler id is empty; say who is ranking")
        row = {"id": candidate.id, "prompt": [m.model_dump() for m in candidate.prompt],
               "responses": ranked, "labeler": labeler,
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "unacceptable": unacceptable or []}
        record = ComparisonRecord.model_validate(row)  # a bad record never reaches the file
        with self.locked():
            earlier = next((r for r in self.rankings() if r["id"] == candidate.id), None)
            if earlier is not None:
                raise AlreadyRanked(f"prompt {candidate.id} was ranked already, by "
                                    f"{earlier['labeler']} at {earlier['time']}")
            self._append_line(json.dumps(row, ensure_ascii=False) + "\n")
            leases = self._leases()
            if leases.pop(candidate.id, None) is not None:
                write_json_atomic(self.leases_path, leases)
        return record

    def _append_line(self, line: str) -> None:
        with open(self.rankings_path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:  # a line torn by a crash was never acknowledged: cut it, keep the rest
                f.seek(0)
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def _leases(self) -> dict[str, dict[str, Any]]:
        if not self.leases_path.exists():
            return {}
        return json.loads(self.leases_path.read_text(encoding="utf-8"))
