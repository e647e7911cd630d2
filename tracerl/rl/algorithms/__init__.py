"""The RL algorithm registry: ``policy.method`` names an entry; users add their own with
``@register_algorithm`` in a plugin module (see base.py)."""

from __future__ import annotations

from dataclasses import asdict

from tracerl.config import build_section
from tracerl.errors import ConfigError
from tracerl.rl.algorithms.base import VALUE_MODEL_USES, Algorithm, NoOptions

_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``policy.method: <cls.name>``."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)) or not cls.name:
        raise TypeError("register_algorithm: pass an Algorithm subclass with a non-empty `name`")
    if cls.value_model not in VALUE_MODEL_USES:
        raise TypeError(f"{cls.__name__}.value_model: {cls.value_model!r}; valid: {', '.join(VALUE_MODEL_USES)}")
    old = _REGISTRY.get(cls.name)
    same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not same:  # `same`: the module was imported again
        raise ValueError(f"RL algorithm {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def algorithm_names() -> list[str]:
    return list(_REGISTRY)


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise ConfigError(f"policy.method: unknown {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_algorithm(policy) -> Algorithm:
    """The algorithm of a ``PolicyConfig``.  ``policy.options`` holds one section per algorithm
    (``options.tracerl.shrink``), so a config can switch ``policy.method`` without editing it;
    every section is checked against its algorithm's ``Options`` (unknown algorithms and keys are
    errors), and the chosen one is completed with its defaults (written back, so a saved run
    config is complete)."""
    cls = algorithm_class(policy.method)
    if not isinstance(policy.options, dict):
        raise ConfigError(f"policy.options: a mapping of algorithm name -> its keys, got {policy.options!r}")
    built = {}
    for name, section in policy.options.items():
        if name not in _REGISTRY:
            raise ConfigError(f"policy.options.{name}: no RL algorithm {name!r}; valid: {', '.join(_REGISTRY)}")
        built[name] = build_section(_REGISTRY[name].Options, section or {}, f"policy.options.{name}")
    options = built.get(cls.name) or build_section(cls.Options, {}, f"policy.options.{cls.name}")
    policy.options = {**policy.options, cls.name: asdict(options)}
    return cls(options, policy)


from tracerl.rl.algorithms import trace, random_masking, coupled, d1, wd1, spg  # noqa: E402,F401,I001  (built-ins register, in this order)

__all__ = ["Algorithm", "NoOptions", "algorithm_class", "algorithm_names", "make_algorithm", "register_algorithm"]
