"""Stable seeds for per-request random streams.

``derive_seed(*keys)`` maps a tuple of non-negative integers to a 63-bit seed that is the same
on every machine, Python version and process (unlike ``hash()``, which is salted per process):

    blake2b(digest_size=8) over the keys, each as 8 bytes little-endian, concatenated;
    the digest read as a little-endian unsigned integer, shifted right by one bit.

Fixed-width encoding makes the concatenation unambiguous, so different key tuples (including
tuples of different lengths) hash different inputs.  The sampler uses ``derive_seed(seed, i)``
for request i of a call that passes a base seed but no explicit per-request seeds.
"""

from __future__ import annotations

import hashlib
import numbers

from tracerl.errors import ConfigError

KEY_LIMIT = 2**64  # keys are encoded as 8 unsigned bytes


def check_seed_value(value: object, where: str, limit: int = KEY_LIMIT) -> int:
    """``value`` as an int if it is a non-negative integer (int or e.g. numpy integer; not a bool)
    below ``limit``; else a one-line ``ConfigError`` that starts with ``where`` and names the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: must be a non-negative integer, got {value!r} ({type(value).__name__})")
    if not 0 <= value < limit:
        raise ConfigError(f"{where}: must be an integer in [0, 2**{limit.bit_length() - 1}), got {value!r}")
    return int(value)


def derive_seed(*keys: int) -> int:
    """A stable 63-bit seed (``0 <= seed < 2**63``) for the key tuple (see the module docstring)."""
    if not keys:
        raise ConfigError("derive_seed: needs at least one key")
    data = b"".join(check_seed_value(k, f"derive_seed: key {i}").to_bytes(8, "little")
                    for i, k in enumerate(keys))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
