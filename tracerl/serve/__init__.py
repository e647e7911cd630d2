"""OpenAI-compatible serving on the engine: ``tracerl serve`` (app.py), the engine thread
(async_engine.py), OpenAI's shapes (protocol.py), streamed text (streaming.py), metrics."""

from tracerl.serve.config import ServeConfig

__all__ = ["ServeConfig"]
