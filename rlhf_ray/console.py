"""What a person sees while a run goes on: our own lines, one progress bar per training stage (off
a terminal, in CI or `ray job logs`, a plain progress line every tenth of the stage or 30 s
instead), and the warnings and errors of everything else. Everything that Ray, vLLM and the
stages print goes to <run>/logs/driver.log; `--verbose` shows it live as well.

Outside `capture` (a library call, a test) the console is just stdout.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

# A line of the captured output that a person should see although the console hides the rest.
ALERT = re.compile(r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|\w(Warning|Error|Exception):")
# Ray's prefix naming the process a line came from, e.g. "(RolloutActor pid=123, ip=10.0.0.2) ".
PROCESS_PREFIX = re.compile(r"^\([^)]*pid=\d+[^)]*\)\s*")


class Console:
    def __init__(self) -> None:
        self.terminal: TextIO | None = None  # set while capturing: where people read
        self.verbose = False
        self.bars = 0  # progress bars on screen: lines go above them
        self.lock = threading.Lock()

    @property
    def stream(self) -> TextIO:
        return self.terminal if self.terminal is not None else sys.stdout

    @property
    def tty(self) -> bool:
        return self.stream.isatty()

    def say(self, text: str) -> None:
        with self.lock:
            if self.bars:
                tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)


console = Console()


def say(text: str) -> None:
    """A line for people: always on the console."""
    console.say(text)


def detail(text: str) -> None:
    """A line that the log keeps and the console shows only with --verbose (e.g. each PPO
    step's line, which the progress bar already sums up)."""
    if console.terminal is None or console.verbose:
        console.say(text)
    else:
        print(text, flush=True)  # stdout is the log file while capturing


def is_alert(line: str) -> bool:
    return ALERT.search(line) is not None


@contextmanager
def capture(folder: Path, verbose: bool = False, poll_s: float = 0.2) -> Iterator[Path]:
    """Send this process's stdout and stderr (its own, Ray's streamed worker logs, C++ logs) to
    <folder>/driver.log; the console gets our lines, progress, and the log's warnings and errors
    (every line with `verbose`). On a failure it names the log. Where stdout is no file (a test's
    capsys, a notebook) whoever replaced it already captures, and nothing is redirected."""
    try:
        sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        yield folder / "driver.log"
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "driver.log"
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1,
                         encoding=sys.stdout.encoding, errors="replace")
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    console.terminal, console.verbose = terminal, verbose
    tail = LogTail(path, verbose)
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(poll_s):
            tail.forward()

    thread = threading.Thread(target=follow, name="rlhf-ray-console", daemon=True)
    thread.start()
    try:
        yield path
    except BaseException:
        _restore(stop, thread, tail, saved, log_fd)
        terminal.write(f"rlhf-ray: the full log is {path}\n")
        raise
    else:
        _restore(stop, thread, tail, saved, log_fd)
    finally:
        console.terminal, console.verbose = None, False
        terminal.close()


def _restore(stop: threading.Event, thread: threading.Thread, tail: LogTail,
             saved: tuple[int, int], log_fd: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    stop.set()
    thread.join()
    tail.forward()  # what was written since the last look
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in (*saved, log_fd):
        os.close(fd)


class LogTail:
    """The new lines of the captured log, passed to the console: all of them when verbose, else
    each distinct warning or error once."""

    def __init__(self, path: Path, verbose: bool) -> None:
        self.path, self.verbose = path, verbose
        self.offset = path.stat().st_size
        self.partial = b""
        self.seen: set[str] = set()

    def forward(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if self.verbose:
                console.say(line)
            elif is_alert(line):
                key = PROCESS_PREFIX.sub("", line)
                if key not in self.seen:
                    self.seen.add(key)
                    console.say(line)


# --------------------------------------------------------------------------- progress


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else \
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


class Progress:
    """One stage's progress from its metric rows: a bar on a terminal, else a line at every
    tenth of the stage (and at least every `every_s`)."""

    def __init__(self, stage: str, total: int, shows: tuple[str, str], every_s: float = 30.0) -> None:
        self.stage, self.total, self.shows, self.every_s = stage, total, shows, every_s
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.last_said = (-1, 0.0)  # (tenth of the stage, time) of the last plain line
        self.bar: tqdm | None = None
        if console.tty:
            sized = _width(console.stream) > 0  # a pseudo-terminal may report 0 columns
            self.bar = tqdm(total=total, desc=f"[{stage}]", unit="step", file=console.stream,
                            dynamic_ncols=sized, ncols=None if sized else 100, leave=True)
            console.bars += 1

    def describe(self, row: dict[str, Any]) -> str:
        headline, speed = self.shows
        parts = []
        if headline in row:
            parts.append(f"{headline} {row[headline]:.4g}")
        evals = sorted(k for k in row if k.startswith("eval_"))
        if evals:
            parts.append(f"{evals[0]} {row[evals[0]]:.4g}")
        if speed in row:
            parts.append(f"{row[speed]:,.0f} tok/s")
        return " · ".join(parts)

    def update(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if step == 0:  # e.g. PPO's evaluation of the starting model
            return
        if self.first_step is None:
            self.first_step, self.started = step - 1, time.monotonic()
            if self.bar is not None:
                self.bar.reset(total=self.total)
                self.bar.update(step - 1)
        if self.bar is not None:
            self.bar.set_postfix_str(self.describe(row), refresh=False)
            self.bar.update(step - self.bar.n)
            return
        tenth, now = step * 10 // self.total, time.monotonic()
        if tenth > self.last_said[0] or now - self.last_said[1] >= self.every_s or step == self.total:
            self.last_said = (tenth, now)
            elapsed = now - self.started
            rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
            eta = f", eta {_clock((self.total - step) / rate)}" if rate > 0 and step < self.total else ""
            say(f"[{self.stage}] step {step}/{self.total} · {self.describe(row)} · "
                f"{_clock(elapsed)} elapsed{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            console.bars -= 1
