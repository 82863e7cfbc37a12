"""Running a command on a pseudo-terminal, as a person at a terminal would see it."""

import os
import pty
import struct
import subprocess
import termios
from fcntl import ioctl
from pathlib import Path


def on_a_terminal(command: list[str], env: dict[str, str], cwd: Path | None = None,
                  timeout: float = 600, columns: int = 120) -> str:
    """Everything `command` wrote to a `columns`-wide terminal; fails with its tail if it failed."""
    leader, follower = pty.openpty()
    ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower,
                               stderr=follower, start_new_session=True)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert process.wait(timeout=timeout) == 0, shown.decode(errors="replace")[-3000:]
    return shown.decode(errors="replace")
