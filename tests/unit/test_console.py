"""The console: our lines and progress for people, everything else in <run>/logs/driver.log with
its warnings and errors shown; a metrics file followed as its stage writes it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rlhf_ray.console import Progress, is_alert
from rlhf_ray.watch import MetricsTail
from tests.terminal import on_a_terminal

REPO = Path(__file__).resolve().parents[2]


def append(path: Path, *rows: dict) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_the_tail_passes_on_only_rows_written_since_it_started(tmp_path):
    path = tmp_path / "sft.jsonl"
    append(path, {"step": 1, "loss": 3.0})  # an earlier attempt's row: already passed on then
    tail = MetricsTail(path)
    assert tail.rows() == []
    append(path, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0})
    assert [r["step"] for r in tail.rows()] == [2, 3]
    assert tail.rows() == []


def test_the_tail_waits_for_a_line_to_be_complete(tmp_path):
    path = tmp_path / "sft.jsonl"
    tail = MetricsTail(path)
    assert tail.rows() == []  # no file yet
    with open(path, "a") as f:
        f.write('{"step": 1, "lo')
    assert tail.rows() == []
    with open(path, "a") as f:
        f.write('ss": 2.0}\n')
    assert tail.rows() == [{"step": 1, "loss": 2.0}]


def test_a_resumed_stage_rewriting_the_file_shorter_is_followed_from_its_new_end(tmp_path):
    path = tmp_path / "ppo.jsonl"
    append(path, *({"step": s} for s in range(1, 6)))
    tail = MetricsTail(path)
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 3)))  # back to step 2
    assert tail.rows() == []
    append(path, {"step": 3})
    assert tail.rows() == [{"step": 3}]


def test_warnings_and_errors_are_alerts_and_ordinary_chatter_is_not():
    for line in ("(RolloutActor pid=12) WARNING 12-04 10:00:01 [config.py] enforce_eager is set",
                 "2026-12-04 10:00:01,000 ERROR worker.py:1 -- a task failed",
                 "ValueError: sft.steps must be positive",
                 "/x.py:3: UserWarning: something odd"):
        assert is_alert(line), line
    for line in ("(TrainController pid=1) Reporting training result 1: TrainingReport(...)",
                 "2026-12-04 10:00:01,000 INFO worker.py:1 -- Started a local Ray instance.",
                 "[sft] done in 12s (loss 1.2) -> runs/demo/sft"):
        assert not is_alert(line), line


def test_off_a_terminal_progress_is_a_line_at_each_tenth_of_the_stage(capsys):
    progress = Progress("sft", total=20, shows=("loss", "tokens_per_s"))
    for step in range(0, 21):  # step 0 (an evaluation of the starting model) is no progress
        progress.update({"step": step, "loss": 3.0 - step / 10, "tokens_per_s": 1234.5})
    progress.update({"step": 20, "loss": 1.0, "eval_loss": 1.5, "tokens_per_s": 1000.0})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[0] for line in lines[:3]] == ["[sft] step 1/20", "[sft] step 2/20",
                                                            "[sft] step 4/20"]
    assert len(lines) == 12  # steps 1, 2, 4, ..., 20, and the last row again (its evaluation)
    assert "loss 2.9 · 1,234 tok/s" in lines[0] and "eta" in lines[0]
    assert "eval_loss 1.5" in lines[-1] and "eta" not in lines[-1]


SCRIPT = textwrap.dedent("""
    import sys, warnings
    from pathlib import Path
    from rlhf_ray.console import Progress, capture, say
    verbose = sys.argv[2] == "verbose"
    with capture(Path(sys.argv[1]), verbose=verbose, poll_s=0.05):
        print("(TrainController pid=7) Reporting training result 1: TrainingReport(...)", flush=True)
        print("(RolloutActor pid=9) WARNING the KV cache is small", file=sys.stderr, flush=True)
        print("(RolloutActor pid=10) WARNING the KV cache is small", file=sys.stderr, flush=True)
        say("[sft] done in 3s")
        progress = Progress("sft", total=4, shows=("loss", "tokens_per_s"))
        for step in range(1, 5):
            progress.update({"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0})
        progress.close()
    print("after the capture", flush=True)
""")


def run_script(tmp_path: Path, mode: str, tty: bool) -> str:
    command = [sys.executable, "-c", SCRIPT, str(tmp_path / "logs"), mode]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not tty:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                              check=True).stdout
    return on_a_terminal(command, env, timeout=60)


def test_captured_output_goes_to_the_log_and_the_console_shows_our_lines_and_warnings(tmp_path):
    shown = run_script(tmp_path, "quiet", tty=False)
    log = (tmp_path / "logs" / "driver.log").read_text()
    assert "Reporting training result" in log and "(RolloutActor pid=10) WARNING" in log
    assert "Reporting training result" not in shown
    assert shown.count("WARNING the KV cache is small") == 1  # the same warning from two workers
    assert "[sft] done in 3s" in shown and "after the capture" in shown
    assert "[sft] step 4/4 · loss 0.25 · 100 tok/s" in shown  # a plain line off a terminal
    assert "[sft] done" not in log  # our lines are for the console


def test_on_a_terminal_progress_is_a_bar(tmp_path):
    shown = run_script(tmp_path, "quiet", tty=True)
    assert "\r" in shown and "4/4" in shown and "loss 0.25" in shown  # a bar redrawn in place
    assert "[sft] step 4/4" not in shown
    assert "Reporting training result" not in shown and "WARNING the KV cache" in shown


def test_verbose_shows_everything_live_and_still_logs_it(tmp_path):
    shown = run_script(tmp_path, "verbose", tty=False)
    assert "Reporting training result" in shown and shown.count("WARNING the KV cache") == 2
    assert "Reporting training result" in (tmp_path / "logs" / "driver.log").read_text()
