"""big_vision-style config files, overridable as ``--config.a.b=value`` from an argparse CLI.

A config file is a plain Python file with ``get_config()`` (or ``get_config(arg)``, selected as
``configs/x.py:arg``) returning an ``ml_collections.ConfigDict``. ``ml_collections.config_flags`` does the
same but only through absl's global flag parsing of ``sys.argv``; this module does it with explicit
argument lists so that ``g2e_jax.cli`` keeps argparse and tests need no global state.

Typical use from a subcommand::

    overrides, rest = split_config_overrides(argv)
    args = parser.parse_args(rest)
    cfg = load_config(args.config, overrides)
"""

from __future__ import annotations

import ast
import difflib
import enum
import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

__all__ = ["apply_override", "config_to_json", "load_config", "split_config_overrides"]

_FLAG_PREFIX = "--config."
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
# The marker that separates the file from its argument: the first ``.py:`` rather than the first ``:``,
# so that a directory containing a colon still works and the argument itself may contain colons.
_ARG_SEP = ".py:"


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``file.py`` or ``file.py:arg``, applies ``a.b=value`` overrides, returns it locked.

    Locking makes a later ``cfg.mdoel = ...`` in code an error instead of a silently ignored new key.
    """
    file, arg = _split_path(path)
    module = _import_file(file)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {file} defines no get_config() function")  # noqa: TRY004
    try:
        cfg = get_config() if arg is None else get_config(arg)
    except TypeError as e:
        # A signature mismatch is the common case (``x.py:arg`` for a get_config() without parameters).
        if arg is not None and not _accepts_one_arg(get_config):
            raise ValueError(
                f"config file {file}: get_config() takes no argument, but {arg!r} was given"
            ) from e
        raise
    if isinstance(cfg, ml_collections.FrozenConfigDict):
        cfg = ml_collections.ConfigDict(cfg)  # Frozen configs cannot take overrides; thaw a copy.
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(  # noqa: TRY004 (the CLI reports ValueError as a usage error)
            f"config file {file}: get_config() returned {type(cfg).__name__}, "
            "not an ml_collections.ConfigDict"
        )
    for override in overrides:
        apply_override(cfg, override)
    return cfg.lock()


def apply_override(cfg: ml_collections.ConfigDict, override: str) -> None:
    """Sets one existing field from ``a.b=value`` (or ``--config.a.b=value``), parsed to its type."""
    key, sep, raw = _strip_prefix(override).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"config override {override!r} is not of the form a.b=value")
    parent, leaf = _resolve(cfg, key)
    field_type = parent.get_type(leaf)
    nullable = isinstance(parent._fields.get(leaf), ml_collections.FieldReference)
    # A field declared as a placeholder / FieldReference may be unset again with the literal None.
    value = None if nullable and raw.strip() == "None" else _parse_value(key, field_type, raw)
    try:
        parent[leaf] = value
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"config override {key}={raw!r}: {e}") from e


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits argv into (``a.b=value`` overrides, the rest for argparse).

    Accepts ``--config.a.b=value`` and the two-token ``--config.a.b value``; ``--config path`` (no dot)
    and everything after a bare ``--`` stay in the rest. Overrides come back without the ``--config.``
    prefix, in command-line order, so later ones win.
    """
    overrides: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest.extend(argv[i:])
            break
        if not token.startswith(_FLAG_PREFIX):
            rest.append(token)
            i += 1
            continue
        body = token[len(_FLAG_PREFIX) :]
        if "=" in body:
            overrides.append(body)
            i += 1
            continue
        # Two-token form; a following ``--option`` means the value was forgotten, not that it is the value.
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ValueError(f"{token} needs a value: use {token}=VALUE or {token} VALUE")
        overrides.append(f"{body}={argv[i + 1]}")
        i += 2
    return overrides, rest


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    """Stable JSON (sorted keys, resolved references) for run meta files; non-JSON values become strings."""
    return cfg.to_json_best_effort(sort_keys=True, indent=2)


def _split_path(path: str) -> tuple[str, str | None]:
    if os.path.isfile(path):
        return path, None
    idx = path.find(_ARG_SEP)
    if idx < 0:
        return path, None
    return path[: idx + len(".py")], path[idx + len(_ARG_SEP) :]


def _import_file(file: str):
    """Imports a file by path under a unique module name (config files need not be on sys.path)."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"config file {file} does not exist")
    abspath = os.path.abspath(file)
    stem = os.path.splitext(os.path.basename(abspath))[0]
    digest = hashlib.sha1(abspath.encode()).hexdigest()[:12]
    name = f"_g2e_config_{''.join(c if c.isalnum() else '_' for c in stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, abspath)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {file} cannot be imported as Python source")
    module = importlib.util.module_from_spec(spec)
    # Registered while executing so dataclasses/pickle inside the config can find their module.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _accepts_one_arg(fn) -> bool:
    try:
        inspect.signature(fn).bind("arg")
    except TypeError:
        return False
    except ValueError:  # No signature available (builtins); assume it does.
        return True
    return True


def _strip_prefix(override: str) -> str:
    return override.removeprefix(_FLAG_PREFIX)


def _resolve(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """Walks ``a.b.c`` down to (the ConfigDict holding ``c``, ``"c"``); errors name the full key."""
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            prefix = ".".join(parts[:depth])
            raise ValueError(  # noqa: TRY004
                f"unknown config key {key!r}: {prefix!r} is a {type(node).__name__}, not a ConfigDict"
            )
        if part not in node:
            raise ValueError(f"unknown config key {key!r}{_suggest(cfg, key)}")
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _suggest(cfg: ml_collections.ConfigDict, key: str) -> str:
    keys = _all_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    # A typo in a long path can fall under the cutoff; compare the last component as a second chance.
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    return f"; did you mean {by_leaf[close[0]]!r}?" if close else ""


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "", seen: set[int] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    if id(cfg) in seen:
        return []
    seen.add(id(cfg))
    keys = []
    for k in cfg:
        full = f"{prefix}{k}"
        keys.append(full)
        v = cfg[k]
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, f"{full}.", seen))
    return keys


def _parse_value(key: str, field_type: type, raw: str) -> Any:
    """Parses ``raw`` to ``field_type`` (the field's current or placeholder type)."""

    def fail(expected: str, hint: str = "") -> ValueError:
        return ValueError(f"config override {key}: expected {expected}, got {raw!r}{hint}")

    if isinstance(field_type, type) and issubclass(field_type, ml_collections.ConfigDict):
        raise ValueError(  # noqa: TRY004
            f"config override {key}={raw!r}: {key} is a ConfigDict and cannot be replaced by a value; "
            f"override its fields ({key}.<field>=...) instead"
        )
    if field_type is str:
        return raw
    if field_type is bool:  # Before int: bool is a subclass of int.
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise fail("bool", " (true/false/1/0/yes/no)")
    if field_type is int:
        try:
            return int(raw)
        except ValueError:
            pass
        try:
            return int(raw.strip(), 0)  # 0x10, 0b101, ...
        except ValueError:
            raise fail("int") from None
    if field_type is float:
        try:
            return float(raw)
        except ValueError:
            raise fail("float") from None
    if field_type in (tuple, list):
        try:
            value = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            raise fail(field_type.__name__, " (a Python literal such as (1, 2) or ['a', 'b'])") from None
        if not isinstance(value, (tuple, list)):
            raise fail(field_type.__name__, " (a Python literal such as (1, 2) or ['a', 'b'])")
        return field_type(value)
    if isinstance(field_type, type) and issubclass(field_type, enum.Enum):
        by_name = {m.name.lower(): m for m in field_type}
        if raw.strip().lower() in by_name:
            return by_name[raw.strip().lower()]
        raise fail(f"{field_type.__name__} (one of {', '.join(m.name for m in field_type)})")
    if field_type in (type(None), object):
        return _literal_or_str(raw)
    # Any other type (dict, a class...): accept a literal of exactly that type.
    value = _literal_or_str(raw)
    if isinstance(value, field_type):
        return value
    raise fail(getattr(field_type, "__name__", str(field_type)), " (overriding this type from a string)")


def _literal_or_str(raw: str) -> Any:
    """``ast.literal_eval`` with absl's lower-case booleans; anything unparsable is a plain string."""
    if raw in ("true", "false"):
        return raw == "true"
    try:
        return ast.literal_eval(raw)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return raw
