"""Stages 1–3a: plain-torch training loops (`loop.py`, `tasks.py`) and their Ray Train wrapper."""
