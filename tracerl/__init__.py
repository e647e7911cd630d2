"""tracerl: build, post-train (SFT, TraceRL) and serve diffusion language models."""

__version__ = "0.1.0"
