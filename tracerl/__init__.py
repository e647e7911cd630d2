"""tracerl: build, post-train (SFT, TraceRL) and serve diffusion language models."""

__version__ = "0.1.0"

_LLM_NAMES = ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput")


def __getattr__(name: str):
    # Lazy: `import tracerl` stays light (no torch / transformers) until the LLM API is used.
    if name in _LLM_NAMES:
        from tracerl import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'tracerl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LLM_NAMES])
