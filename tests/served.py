"""What the serve tests share: the tiny chat model they serve, the API key, a free port."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import torch

from rlhf_ray.data.records import Message
from rlhf_ray.modeling import load_policy
from rlhf_ray.tokenizer import load_tokenizer
from tests.tiny import memorise

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "The capital of France is"}]
KEY_ENV, KEY = "RLHF_RAY_TEST_API_KEY", "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def chat_model(policy_dir: Path, answer: str = "Paris."):
    """The tiny policy, taught one exchange: "The capital of France is" -> `answer`."""
    tokenizer = load_tokenizer(policy_dir)
    ids, _ = tokenizer.render_chat([Message(**QUESTION[0]), Message(role="assistant", content=answer)])
    model = load_policy(policy_dir)
    memorise(model, torch.tensor([ids]), steps=40)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctrl_c(process: subprocess.Popen) -> str:
    """Stop a server or run started in its own session as Ctrl-C would (killed after 120 s);
    returns the rest of its output."""
    process.send_signal(signal.SIGINT)
    try:
        rest, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        rest, _ = process.communicate()
    return rest
