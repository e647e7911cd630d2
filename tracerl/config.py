"""Typed YAML configs with dotted ``key=value`` overrides.

A recipe's config is a tree of dataclasses.  ``load_config(Schema, path, ["a.b=3"])`` reads the
YAML file, applies the overrides (values parsed as YAML scalars: ``3``, ``0.5``, ``true``,
``[1, 2]``, ``null``), and builds the dataclasses, checking every key and type.  An unknown key
or a wrong type is an error that names the key (and the file) and lists the valid choices.

``describe_fields``, ``config_entries`` and ``default_yaml`` describe a config: a field's
description is the trailing ``# comment`` on its line in the dataclass source.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.composer import ComposerError

from tracerl.errors import ConfigError
from tracerl.files import read_utf8

T = TypeVar("T")

MAX_YAML_VALUES = 100_000  # values a YAML document may hold once its aliases are expanded


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with a budget on aliases.  An alias is cheap to parse (the loaded value shares
    the anchored object) but every walk over the config (merging, type checks, ``asdict``, JSON)
    expands it: 1 KB of nested aliases ("billion laughs") expands to 10**9 values and hangs the
    command.  Each alias adds the expanded size of the node it repeats; past ``MAX_YAML_VALUES``
    the document is refused at the line of that alias."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded
        self._expanded = 0

    def _size(self, node: yaml.Node) -> int:
        if id(node) not in self._sizes:
            if isinstance(node, yaml.ScalarNode):
                size = 1
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(child) for child in node.value)
            else:
                size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            self._sizes[id(node)] = size
        return self._sizes[id(node)]

    def compose_node(self, parent, index):
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        if not isinstance(node, yaml.ScalarNode) and node.end_mark is None:  # still being composed
            raise ComposerError(None, None, "an alias inside its own anchor (a recursive "
                                "value) is not supported", mark)
        self._expanded += self._size(node)
        if self._expanded > MAX_YAML_VALUES:
            raise ComposerError(None, None, f"aliases expand to more than {MAX_YAML_VALUES} values "
                                "(an alias bomb?); write the values out", mark)
        return node


def parse_yaml(text: str):
    """``yaml.safe_load`` with a budget on alias expansion (see ``_BoundedLoader``)."""
    return yaml.load(text, Loader=_BoundedLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. sampling.steps=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any, where: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where}: {key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {key} = {value!r}; valid: {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a section (mapping), got {value!r}")
        return _build(tp, value, where, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where "1e-3" (no dot) is a string, not a float.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    return value


def _shallow_dict(obj: Any) -> dict:
    """Field values of a dataclass instance, nested dataclasses as dicts (for merging)."""
    return {f.name: (_shallow_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v)
            for f in dataclasses.fields(obj)}


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _qualified(message: str, cls: type, prefix: str) -> str:
    """A section's own check names its key relative to itself ("seed: ..." or, naming itself,
    "task.seed: ..."); give the key in full where the section sits at ``prefix``
    ("data.task.seed: ...").  Other messages are left as they are."""
    if not prefix:
        return message
    first = message.split(":", 1)[0].split(".", 1)[0].split(" ", 1)[0]
    section = prefix.rstrip(".").split(".")
    if first in {f.name for f in dataclasses.fields(cls)}:
        return prefix + message
    if first == section[-1] and len(section) > 1:
        return ".".join(section[:-1]) + "." + message
    return message


def _build(cls: type[T], data: dict, where: str, prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {prefix}{unknown[0]}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    data = dict(data)
    for name, value in data.items():
        # A partial section keeps the recipe's own defaults for the keys it does not set (e.g. an
        # RL task defaults to the train split even when only task.name is given).
        f = fields[name]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                data[name] = _deep_merge(_shallow_dict(default), value)
    kwargs = {name: _coerce(value, hints[name], prefix + name, where) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        message = _qualified(str(e), cls, prefix)
        if prefix and where == prefix.rstrip(".") and message.startswith(prefix):
            raise ConfigError(message) from None  # already names the key in full
        raise ConfigError(f"{where}: {message}") from None
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {e}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and dotted overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = parse_yaml(read_utf8(path, ConfigError))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, f"override {text!r}")
    return _build(cls, data, where)


def config_to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def build_section(cls: type[T], data: dict, key: str) -> T:
    """Build the dataclass ``cls`` from a mapping found at dotted ``key`` (a section whose schema
    is known only at run time, e.g. an RL algorithm's ``policy.options``), checked like
    ``load_config``: unknown keys and wrong types are errors naming ``key.field``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: must be a mapping, got {data!r}")
    return _build(cls, data, key, prefix=key + ".")


# -- describing a config: field comments, a flat key list, a commented YAML ----------------------


@functools.lru_cache(maxsize=None)
def _own_field_comments(cls: type) -> dict[str, str]:
    """Trailing comments of the annotated fields written in ``cls``'s own body (only the fields
    that have one); {} when the source is not available or does not parse."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    nested = source[:1].isspace()  # a class defined in a function or class: parse it as a block
    if nested:
        source = "if 1:\n" + source
    try:
        tree = ast.parse(source)
        trailing: dict[int, str] = {}  # line -> the comment that follows code on that line
        code_row = 0  # the line where the last code token ended
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                if tok.start[0] == code_row:
                    trailing[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                code_row = tok.end[0]
    except (SyntaxError, tokenize.TokenError):
        return {}
    node = tree.body[0].body[0] if nested else tree.body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            rows = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
            comment = next((trailing[r] for r in rows if trailing.get(r)), "")
            if comment:
                out[stmt.target.id] = comment
    return out


def describe_fields(cls: Any) -> dict[str, str]:
    """``{field: one-line description}`` of a dataclass (or instance), in field order: the trailing
    ``# comment`` on the field's line in the class source ("" for a field without one).  A field
    redeclared without a comment in a subclass keeps its base class's description."""
    if not isinstance(cls, type):
        cls = type(cls)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"describe_fields: {cls!r} is not a dataclass")
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            comments.update(_own_field_comments(base))
    return {f.name: comments.get(f.name, "") for f in dataclasses.fields(cls)}


def _is_section(value: Any) -> bool:
    """Values written as a nested mapping: config sections (dataclass instances) and non-empty
    mappings (e.g. ``policy.options``, ``task.params``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return bool(dataclasses.fields(value))
    return isinstance(value, dict) and bool(value)


def _section_items(section: Any) -> list[tuple[Any, Any, str]]:
    """(key, value, description) of a section: a dataclass instance or class (a field without a
    default: ``dataclasses.MISSING``), or a mapping (no descriptions)."""
    if isinstance(section, dict):
        return [(k, v, "") for k, v in section.items()]
    described = describe_fields(section)
    items = []
    for f in dataclasses.fields(section):
        if not f.init:
            continue
        if not isinstance(section, type):
            value = getattr(section, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        items.append((f.name, value, described[f.name]))
    return items


def config_entries(config: Any) -> list[tuple[str, Any, str]]:
    """Every leaf key of a config class or instance as ``(dotted_key, value, description)``, in
    field order; nested sections (dataclass defaults and ``default_factory`` instances, non-empty
    mappings) are flattened into dotted keys (``rollout.sampling.steps``).  For a class, the
    values are the defaults (``dataclasses.MISSING`` for a required field)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config_entries: {config!r} is not a dataclass")

    def walk(section: Any, prefix: str) -> None:
        for key, value, description in _section_items(section):
            if _is_section(value):
                walk(value, f"{prefix}{key}.")
            else:
                out.append((f"{prefix}{key}", value, description))

    out: list[tuple[str, Any, str]] = []
    walk(config, "")
    return out


def _plain(value: Any) -> Any:
    """``value`` as YAML-representable builtins (dataclasses as mappings, tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def format_value(value: Any) -> str:
    """One-line YAML of a value, as a config file or a ``key=value`` override writes it
    (``null``, ``true``, ``[1, 2]``, ``' {answer}'``)."""
    value = _plain(value)
    style = '"' if isinstance(value, str) and not value.isprintable() else None  # newlines: escaped
    text = yaml.safe_dump(value, default_flow_style=True, default_style=style, allow_unicode=True,
                          width=float("inf"), sort_keys=False)
    text = text.strip()
    if text.endswith("\n..."):  # a bare scalar's document-end marker
        text = text[: -len("\n...")].rstrip()
    return text


def default_yaml(config: Any) -> str:
    """A complete, commented YAML of a config instance: nested sections as mappings, each key
    followed by ``# description`` where it has one.  ``load_config(type(config), file)`` reads
    it back to an equal object."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"default_yaml: {config!r} is not a dataclass instance")

    def walk(section: Any, indent: str) -> None:
        for key, value, description in _section_items(section):
            comment = f"  # {description}" if description else ""
            if _is_section(value):
                lines.append(f"{indent}{format_value(key)}:{comment}")
                walk(value, indent + "  ")
            else:
                lines.append(f"{indent}{format_value(key)}: {format_value(value)}{comment}")

    lines: list[str] = []
    walk(config, "")
    return "\n".join(lines) + "\n"
