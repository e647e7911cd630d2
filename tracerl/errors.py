"""Error types with messages meant for users: each names the file, field or option at fault."""


class TracerlError(Exception):
    """Base class for errors caused by user input (config, data, checkpoint, request)."""


class CheckpointError(TracerlError):
    """A model folder that cannot be loaded: missing files, unknown layout, bad weights."""


class ConfigError(TracerlError):
    """A bad option value or configuration key."""
