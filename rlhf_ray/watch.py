"""A stage's metric rows as its workers write them (metrics/<stage>.jsonl), passed on by the driver
to the console's progress and to the experiment trackers; the workers know of neither."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_ray.config import RunConfig
from rlhf_ray.console import Progress, say
from rlhf_ray.run import RunFolder, stage, steps_of
from rlhf_ray.tracking import open_trackers


class MetricsTail:
    """The rows appended to a JSONL file since the last look. Rows already there when it starts
    were passed on by whoever ran the stage before; a file rewritten shorter (a resumed stage
    drops the rows after its checkpoint) is followed from its new end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        if self.path.stat().st_size < self.offset:
            self.offset, self.partial = self.path.stat().st_size, b""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a rewrite under our feet: the file still has it
                continue
        return rows


@contextmanager
def watch_stage(cfg: RunConfig, name: str, poll_s: float = 1.0) -> Iterator[None]:
    """While stage `name` runs: its progress on the console, its rows to the trackers. When it
    ends, the last rows are passed on and the trackers closed (with its folder, if finished)."""
    run = RunFolder(cfg.run_dir)
    tail = MetricsTail(run.metrics(name))
    progress = Progress(name, steps_of(cfg, name), stage(name).shows)
    trackers = open_trackers(cfg, name, warn=lambda message: say(f"[{name}] warning: {message}"))
    stop = threading.Event()

    def forward() -> None:
        for row in tail.rows():
            progress.update(row)
            trackers.log(row)

    def follow() -> None:
        while not stop.wait(poll_s):
            forward()

    thread = threading.Thread(target=follow, name=f"rlhf-ray-watch-{name}", daemon=True)
    thread.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        stop.set()
        thread.join()
        forward()
        progress.close()
        output = run.output(name)
        trackers.finish(output if finished and output.exists() else None)
