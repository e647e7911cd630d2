"""Error types with messages meant for users: each names the file, field or option at fault."""


class TracerlError(Exception):
    """Base class for errors caused by user input (config, data, checkpoint, request)."""


class CheckpointError(TracerlError):
    """A model folder that cannot be loaded: missing files, unknown layout, bad weights."""


class ConfigError(TracerlError):
    """A bad option value or configuration key."""


class OutputError(TracerlError):
    """An output file or folder that cannot be written: a directory in the way, no permission,
    a full disk.  Names the path; whatever was half-written is removed."""


def brief(e: BaseException) -> str:
    """``e`` in one line for a user message: its type and the last line of its text (libraries
    such as torch and safetensors put the cause last, after lines of context)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1].strip()}" if lines else type(e).__name__
