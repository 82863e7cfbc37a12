"""The built wheel carries everything the service reads at run time: both HTML pages included."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def clean_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them: no egg-info, whose file list would
    smuggle in what pyproject's package data leaves out."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, text=True,
                           capture_output=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_the_wheel_installs_and_serves_both_pages_from_outside_the_repository(tmp_path):
    source = clean_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("rlhf_ray-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    check = ("import rlhf_ray, serve.ingress, serve.rank\n"
             "print(rlhf_ray.__file__)\n"
             "assert '<html' in serve.ingress.PAGE.read_text().lower()\n"
             "assert '<html' in serve.rank.PAGE.read_text().lower()\n")
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, text=True, capture_output=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(site))  # the installed copy, not the repository's
