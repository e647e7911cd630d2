"""Device names, checked before any work: a device this machine lacks is a one-line error
naming the config key and the devices that are available, not a traceback from deep in torch."""

from __future__ import annotations

import torch

from tracerl.errors import ConfigError


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | torch.device, key: str = "device") -> torch.device:
    """``torch.device(device)`` if this machine has it, else a ConfigError naming ``key``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}: {str(device)!r} is not a device name; valid: cpu, cuda, cuda:N, mps") from None
    available = available_devices()
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"{key}: {str(device)!r} is not available on this machine ({why}); "
                              f"available: {', '.join(available)}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {str(device)!r} does not exist; available: {', '.join(available)}")
        return dev
    if dev.type == "mps" and "mps" in available:
        return dev
    raise ConfigError(f"{key}: {str(device)!r} is not available on this machine; available: {', '.join(available)}")
