"""rlhf-ray: raw text to a served assistant, every stage on Ray."""

__version__ = "0.1.0"
