"""`rlhf-ray demo`, the README's first command, on the test config: every stage, the report with
base vs SFT vs RLHF side by side and the training curves, then every stage served until Ctrl-C."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_ray.run import read_metrics

from tests.served import ctrl_c

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_trains_every_stage_reports_and_serves_until_ctrl_c(tmp_path):
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.cli", "demo", "--config", "configs/test.yaml",
         "--set", f"runs_dir={tmp_path}", "--set", f"serve.port={port}", "--set", "cluster.num_cpus=2",
         "--set", "serve.cpus_per_replica=0.25"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 900
        began = time.monotonic()
        while not any("  chat page: " in line for line in lines):
            line = demo.stdout.readline()
            assert line or demo.poll() is None, "".join(lines[-60:])
            lines.append(f"{time.monotonic() - began:6.1f}s {line}")
            assert time.monotonic() < deadline, "".join(lines[-60:])
        output = "".join(lines)
        (tmp_path / "demo.log").write_text(output)
        url = f"http://127.0.0.1:{port}"
        assert f"  chat page: {url}/" in output and f"  API: {url}/v1" in output

        run = tmp_path / "test"
        report = (run / "report.md").read_text()
        table = report.split("| question | base continues | SFT | RLHF | reference |\n")[1]
        rows = table.split("\n\n")[0].splitlines()[1:]  # after the |---| line
        assert len(rows) >= 3 and all(row.count(" | ") == 4 for row in rows), table
        for stage in ("| pretrain |", "| sft |", "| reward |", "| ppo |"):
            assert stage in report
        assert "report.md" in output and "| question | base continues" in output  # printed too
        assert (run / "plots" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # The evaluation across stages is in the run folder and in the report.
        assert (run / "eval" / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "## Evaluation across stages" in report and "](eval/stages.png)" in report
        for variant in ("| base 0-shot |", "| base 5-shot |", "| sft |", "| rlhf |"):
            assert variant in (run / "eval" / "stages.md").read_text()

        # Off a terminal the console shows plain progress lines, not Ray's logs; those are in
        # logs/driver.log. Every stage's metrics are TensorBoard event files as well, PPO's too.
        for stage, shown in (("pretrain", "loss"), ("sft", "loss"), ("reward", "loss"),
                             ("ppo", "reward_mean")):
            rows = read_metrics(run / "metrics" / f"{stage}.jsonl")
            last = rows[-1]["step"]
            assert re.search(rf"\[{stage}\] step {last}/{last} · {shown} ", output), stage
            numbers = {k for row in rows for k, v in row.items()
                       if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
            events = EventAccumulator(str(run / "tensorboard" / stage))
            events.Reload()
            assert numbers and numbers <= set(events.Tags()["scalars"]), stage
        log = (run / "logs" / "driver.log").read_text()
        for chatter in ("Started a local Ray instance", "TrainController"):
            assert chatter in log and chatter not in output, chatter

        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert sorted(m["id"] for m in models["data"]) == ["base", "reward", "rlhf", "sft"]
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "rlhf", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        rest = ctrl_c(demo)
    assert demo.returncode == 0, rest[-3000:]
    assert "rlhf-ray: stopping the server" in rest
