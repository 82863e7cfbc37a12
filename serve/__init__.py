"""Ray Serve: every stage's model as an OpenAI-compatible assistant endpoint (see app.py)."""
