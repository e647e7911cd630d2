"""What J, C and S say to each other: length-prefixed frames on pipes, and plain values as JSON.

Shipped to S with the harness (see :mod:`.bootstrap`): standard library only, and no imports
from the rest of the package.
"""

from __future__ import annotations

import json
import math
import os
import select
import time

# Exit status R uses to say "MemoryError" (stdio runs); anything non-zero is a failure anyway.
_MEMORY_EXIT = 86


# =============================================================================================
# Framing: 8-byte big-endian length, then the payload (JSON, or the harness for the bootstrap).
# =============================================================================================


class _Timeout(Exception):
    pass


class _Eof(Exception):
    pass


class _TooBig(Exception):
    pass


class _Protocol(Exception):
    pass


def _write_all(fd, data, deadline=None):
    """Write ``data`` to ``fd``; with a deadline the fd must be non-blocking."""
    view = memoryview(data)
    poller = None
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _Eof(str(exc)) from None
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        rem = None if deadline is None else deadline - time.monotonic()
        if rem is not None and rem <= 0:
            raise _Timeout("write")
        events = poller.poll(None if rem is None else max(1, int(rem * 1000)))
        for _, ev in events:
            if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                raise _Eof("peer closed")


def _read_exact(fd, n, deadline=None):
    buf = bytearray()
    poller = None
    while len(buf) < n:
        if deadline is not None:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            rem = deadline - time.monotonic()
            if rem <= 0 or not poller.poll(max(1, int(rem * 1000))):
                raise _Timeout("read")
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise _Eof("end of stream")
        buf += chunk
    return bytes(buf)


def _send(fd, obj, deadline=None):
    payload = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
    _write_all(fd, len(payload).to_bytes(8, "big") + payload, deadline)


def _recv_raw(fd, deadline=None, cap=None):
    n = int.from_bytes(_read_exact(fd, 8, deadline), "big")
    if cap is not None and n > cap:
        raise _TooBig(n)
    return _read_exact(fd, n, deadline)


def _recv(fd, deadline=None, cap=None):
    raw = _recv_raw(fd, deadline, cap)
    try:
        obj = json.loads(raw)
    except Exception as exc:  # noqa: BLE001 - anything unparseable is a protocol error
        raise _Protocol(f"unparseable frame: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise _Protocol("frame is not an object")
    return obj


# =============================================================================================
# Value codec: plain Python values <-> JSON.  The decoder only ever builds built-in types.
# =============================================================================================


class _Unencodable(Exception):
    pass


class _OverBound(_Unencodable):
    """A value over one of the codec's bounds: a failed test (``output_limit``), never work
    for the judge."""


class _Remote:
    """Judge-side proxy for a name defined by the program: calling it runs the call in S."""

    __slots__ = ("_name", "_judge")

    def __init__(self, name, judge):
        self._name = name
        self._judge = judge

    def __call__(self, *args, **kwargs):
        return self._judge.call(self._name, args, kwargs)

    def __repr__(self):
        return f"<sandboxed {self._name}>"


# Bounds on one value, checked on both sides: by S so that lazy values (ranges, generators) are
# materialised within the program's own limits, and by J, which trusts nothing S sends, before
# anything is rebuilt.  Under them, whatever a test does with a value stays cheap for J.
_MAX_DEPTH = 200  # nesting
_MAX_ITEMS = 1_000_000  # elements of all containers together (a range counts its length)
_MAX_INT_BITS = 1 << 17  # about 39,000 decimal digits, per int (and per Fraction term)
_MAX_DECIMAL_CHARS = 10_000
_MAX_DECIMAL_EXPONENT = 100_000
_JSON_INT = 1 << 63


class _Budget:
    """Counts the elements of one value against ``_MAX_ITEMS``; the judge side also collects
    the numbers whose hash an attacker can choose (see :func:`_check_collisions`)."""

    __slots__ = ("left", "numbers")

    def __init__(self):
        self.left = _MAX_ITEMS
        self.numbers = []

    def take(self, n):
        self.left -= n
        if self.left < 0:
            raise _OverBound(f"value has more than {_MAX_ITEMS:,} elements")


def _check_int(v):
    if v.bit_length() > _MAX_INT_BITS:
        raise _OverBound(f"integer of {v.bit_length():,} bits is over the limit of "
                         f"{_MAX_INT_BITS:,}")
    return v


def _check_decimal(text):
    import decimal

    if type(text) is not str or len(text) > _MAX_DECIMAL_CHARS:
        raise _OverBound("decimal over the size limit")
    d = decimal.Decimal(text)
    if d.is_finite() and abs(d.adjusted()) > _MAX_DECIMAL_EXPONENT:
        raise _OverBound(f"decimal exponent over the limit of {_MAX_DECIMAL_EXPONENT:,}")
    return d


def _encode(v, lenient=False, depth=0, budget=None):
    """Encode a plain value.  ``lenient`` (the sandbox side) converts subclasses of plain types,
    iterators and numpy scalars to plain values first; the judge side is strict."""
    if depth > _MAX_DEPTH:
        raise _OverBound("value nested too deeply")
    if budget is None:
        budget = _Budget()
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if -_JSON_INT < v < _JSON_INT else {"$": "int", "v": format(_check_int(v), "x")}
    if t is float:
        return v if math.isfinite(v) else {"$": "float", "v": repr(v)}
    d = depth + 1
    enc = lambda x: _encode(x, lenient, d, budget)  # noqa: E731
    if t is list:
        budget.take(len(v))
        return [enc(x) for x in v]
    if t is tuple:
        budget.take(len(v))
        return {"$": "tuple", "v": [enc(x) for x in v]}
    if t is dict:
        budget.take(2 * len(v))
        return {"$": "dict", "v": [[enc(k), enc(x)] for k, x in v.items()]}
    if t is set or t is frozenset:
        budget.take(len(v))
        return {"$": t.__name__, "v": [enc(x) for x in v]}
    if t is bytes or t is bytearray:
        return {"$": t.__name__, "v": bytes(v).hex()}
    if t is complex:
        return {"$": "complex", "v": [_encode(v.real), _encode(v.imag)]}
    if t is range:
        try:
            budget.take(len(v))
        except OverflowError:  # longer than sys.maxsize
            budget.take(_MAX_ITEMS + 1)
        return {"$": "range", "v": [_check_int(v.start), _check_int(v.stop), _check_int(v.step)]}
    mod = getattr(t, "__module__", "")
    if mod == "fractions" and t.__name__ == "Fraction":
        return {"$": "fraction", "v": [format(_check_int(v.numerator), "x"),
                                       format(_check_int(v.denominator), "x")]}
    if mod == "decimal" and t.__name__ == "Decimal":
        return {"$": "decimal", "v": str(_check_decimal(str(v)))}
    if t is _Remote:
        return {"$": "ref", "v": v._name}
    if lenient:
        import collections.abc
        import itertools

        if isinstance(v, collections.abc.Iterator):  # generator, map, zip... stays an iterator
            items = list(itertools.islice(v, budget.left + 1))  # runs in S, under its limits
            budget.take(len(items))
            return {"$": "iter", "v": [enc(x) for x in items]}
        return enc(_plainify(v))
    raise _Unencodable(f"a value of type {t.__name__} cannot be sent to the sandbox")


def _plainify(v):
    """Sandbox side: turn near-plain values into plain ones (or raise _Unencodable)."""
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int.__index__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, tuple):  # namedtuple == tuple holds in Python
        return tuple(v)
    if isinstance(v, list):
        return list(v)
    if isinstance(v, dict):  # OrderedDict, defaultdict, Counter compare equal to dicts
        return dict(v)
    if isinstance(v, frozenset):
        return frozenset(v)
    if isinstance(v, set):
        return set(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    t = type(v)
    if getattr(t, "__module__", "") == "numpy" and getattr(v, "ndim", None) == 0:
        return v.item()
    raise _Unencodable(f"returned a value of type {t.__name__}, which cannot leave the sandbox")


def _encode_result(v):
    return _encode(v, lenient=True)


# Distinct numbers sharing one hash make every set or dict built from them quadratic (in C, where
# no signal interrupts it): ints are hashed modulo 2**61 - 1, so k * (2**61 - 1) all hash to 0.
_HASH_MODULUS = (1 << 61) - 1
_MAX_COLLIDING = 1000


def _check_collisions(numbers):
    if len(numbers) <= _MAX_COLLIDING:
        return
    import collections

    for h, count in collections.Counter(map(hash, numbers)).items():
        if count > _MAX_COLLIDING:
            group = sorted(x for x in numbers if hash(x) == h)
            distinct = 1 + sum(a != b for a, b in zip(group, group[1:]))
            if distinct > _MAX_COLLIDING:
                raise _OverBound(f"{distinct} distinct numbers share one hash value")


def _decode(o, refs=None):
    """Decode a value encoded by :func:`_encode`, within the same bounds.  Builds only built-in
    types (and Fraction, Decimal).  ``refs`` resolves ``ref`` tags (sandbox side) to program
    objects.  A value over a bound raises :class:`_OverBound`, a malformed one ValueError."""
    budget = _Budget()
    value = _decode_node(o, refs, 0, budget)
    _check_collisions(budget.numbers)
    return value


def _decode_node(o, refs, depth, budget):
    if depth > _MAX_DEPTH:
        raise _OverBound("value nested too deeply")
    t = type(o)
    if o is None or t is bool or t is str:
        return o
    if t is float:
        if abs(o) >= _HASH_MODULUS:
            budget.numbers.append(o)
        return o
    if t is int:
        if abs(o) >= _HASH_MODULUS:
            budget.numbers.append(o)
        return _check_int(o)
    d = depth + 1
    dec = lambda x: _decode_node(x, refs, d, budget)  # noqa: E731
    if t is list:
        budget.take(len(o))
        return [dec(x) for x in o]
    if t is not dict:
        raise ValueError(f"unexpected JSON value {t.__name__}")
    tag, v = o.get("$"), o.get("v")
    if tag in ("int", "fraction") or tag == "range":
        parts = [v] if tag == "int" else v
        if type(parts) is not list or not all(type(p) is str or type(p) is int for p in parts):
            raise ValueError(f"bad {tag}")
        for p in parts:
            if type(p) is str and len(p) > _MAX_INT_BITS // 4 + 1:  # before int() parses it
                raise _OverBound(f"integer over the limit of {_MAX_INT_BITS:,} bits")
    if tag == "int":
        n = _check_int(int(v, 16))
        budget.numbers.append(n)
        return n
    if tag == "float":
        if v not in ("nan", "inf", "-inf"):
            raise ValueError("bad float")
        return float(v)
    if tag in ("tuple", "set", "frozenset", "iter", "dict"):
        if type(v) is not list:
            raise ValueError(f"bad {tag}")
        budget.take(len(v) * (2 if tag == "dict" else 1))
    if tag == "tuple":
        return tuple(dec(x) for x in v)
    if tag == "dict":
        return {dec(k): dec(x) for k, x in v}
    if tag == "set":
        return {dec(x) for x in v}
    if tag == "frozenset":
        return frozenset(dec(x) for x in v)
    if tag == "iter":
        return iter([dec(x) for x in v])
    if tag == "bytes":
        return bytes.fromhex(v)
    if tag == "bytearray":
        return bytearray.fromhex(v)
    if tag == "complex":
        re_, im = (dec(x) for x in v)
        if type(re_) is not float or type(im) is not float:
            raise ValueError("bad complex")
        return complex(re_, im)
    if tag == "range":
        a, b, c = v
        if not (type(a) is int and type(b) is int and type(c) is int) or c == 0:
            raise ValueError("bad range")
        r = range(_check_int(a), _check_int(b), _check_int(c))
        try:
            n = len(r)
        except OverflowError:
            n = _MAX_ITEMS + 1
        budget.take(n)
        return r
    if tag == "fraction":
        import fractions

        num, den = (_check_int(int(x, 16)) for x in v)
        q = fractions.Fraction(num, den)  # normalised: a gcd of bounded integers
        budget.numbers.append(q)
        return q
    if tag == "decimal":
        q = _check_decimal(v)
        if q.is_finite():
            budget.numbers.append(q)
        return q
    if tag == "ref" and refs is not None and type(v) is str:
        return refs(v)
    raise ValueError(f"unknown tag {tag!r}")
