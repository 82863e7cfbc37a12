"""The README is short, and every command and link in it and in docs/ works as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHEAP = ("--help", " plan ", " config ")  # commands that only read configs: run them all


def commands(page: Path) -> list[str]:
    """The rlhf-ray command lines of the page's bash blocks, comments dropped."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if re.match(r"(\.venv/bin/)?rlhf-ray ", line)]


CHEAP_COMMANDS = [(page.relative_to(REPO).as_posix(), line) for page in PAGES
                  for line in commands(page) if any(c in f" {line} " for c in CHEAP)]


def test_the_readme_is_a_five_minute_read():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_there_are_cheap_commands_to_check():
    assert len(CHEAP_COMMANDS) >= 3 and {"README.md"} <= {page for page, _ in CHEAP_COMMANDS}


@pytest.mark.parametrize("page, line", CHEAP_COMMANDS)
def test_a_cheap_command_runs_as_written(page, line):
    args = shlex.split(line)[1:]
    done = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{page}: `{line}` failed:\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(page):
    targets = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", page.read_text())
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).exists()]
    assert missing == [], f"{page.name}: broken links {missing}"
