"""The OpenAI-compatible server: protocol, engine thread, app, metrics."""
