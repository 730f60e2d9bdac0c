"""Config files (``get_config()`` returning an ``ml_collections.ConfigDict``) and ``--config.a.b=value``
overrides, parsed by ``ml_collections.config_flags`` itself on explicit argument lists.

``DEFINE_config_file`` / ``DEFINE_config_dict`` take ``flag_values=`` (a fresh ``absl.flags.FlagValues``
per call) and ``sys_argv=``, so there is no global flag state and ``g2e_jax.cli`` keeps argparse for
everything else. This thin layer adds what users rely on and ml_collections does not do: full-path
suggestions for unknown keys, errors as ``ValueError`` (the CLI prints them as usage errors),
built-in defaults when ``--config`` is left out, and ``a.b=None`` to unset a placeholder field.

Typical use from a subcommand::

    overrides, rest = split_config_overrides(argv)
    args = parser.parse_args(rest)
    cfg = load_config(args.config, overrides)
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

__all__ = ["apply_override", "config_to_json", "load_config", "override_config", "sibling_config",
           "split_config_overrides"]  # fmt: skip

_FLAG_PREFIX = "--config."


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``file.py`` or ``file.py:arg`` (everything after the first ``:`` goes to ``get_config``),
    applies ``a.b=value`` overrides and returns the config locked (a typo'd new key is an error)."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"config file {file} does not exist")
    # ml_collections imports every file as module "config_config" and re-executes into an existing one:
    # a second file would inherit the first one's names (a missing get_config found the old one).
    sys.modules.pop("config_config", None)
    try:
        cfg = _parse(lambda fv, argv: config_flags.DEFINE_config_file(
            "config", flag_values=fv, sys_argv=argv, lock_config=False), [f"--config={path}"])
    except AttributeError as e:
        raise ValueError(f"config file {file} defines no get_config() function") from e
    except ValueError as e:
        if arg and "get_config() takes 0 positional arguments" in str(e):
            message = f"config file {file}: get_config() takes no argument, but {arg!r} was given"
            raise ValueError(message) from e
        raise ValueError(f"config file {path}: {str(e).strip().splitlines()[-1]}") from e
    if type(cfg).__name__ == "_ErrorConfig":  # ml_collections defers an OSError of get_config(); raise it now
        raise object.__getattribute__(cfg, "_error")
    if isinstance(cfg, ml_collections.FrozenConfigDict):
        cfg = ml_collections.ConfigDict(cfg)  # Frozen configs cannot take overrides; thaw a copy.
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(  # noqa: TRY004 (the CLI reports ValueError as a usage error)
            f"config file {file}: get_config() returned {type(cfg).__name__}, "
            "not an ml_collections.ConfigDict"
        )
    return override_config(cfg, overrides).lock()


def sibling_config(anchor: str, name: str, *args) -> ml_collections.ConfigDict:
    """``get_config(*args)`` of the config file ``name`` beside ``anchor`` (a config file's ``__file__``):
    how configs/ share a recipe without being a package (they are loaded by path, not imported)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{anchor}: config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"g2e_jax_config_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def override_config(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Sets existing fields from ``a.b=value`` (or ``--config.a.b=value``), in place; later ones win."""
    last: dict[str, str] = {}
    for override in overrides:
        key, sep, raw = override.removeprefix(_FLAG_PREFIX).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {override!r} is not of the form a.b=value")
        _check_key(cfg, key.strip(), raw)
        last.pop(key.strip(), None)
        last[key.strip()] = raw
    unset = [k for k, raw in last.items() if raw.strip() == "None" and _nullable(cfg, k)]
    argv = [f"{_FLAG_PREFIX}{k}={raw}" for k, raw in last.items() if k not in unset]
    _parse(lambda fv, a: config_flags.DEFINE_config_dict("config", cfg, flag_values=fv, sys_argv=a,
                                                         lock_config=False), argv)
    for key in unset:
        parent, leaf = _parent(cfg, key)
        parent[leaf] = None
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, override: str) -> None:
    """One ``a.b=value`` override, in place (``override_config`` for several)."""
    override_config(cfg, [override])


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits argv into (``a.b=value`` overrides, the rest for argparse).

    Accepts ``--config.a.b=value`` and the two-token ``--config.a.b value``; ``--config path`` (no dot)
    and everything after a bare ``--`` stay in the rest. Overrides come back without the ``--config.``
    prefix, in command-line order, so later ones win.
    """
    overrides, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest.extend(argv[i:])
            break
        if not token.startswith(_FLAG_PREFIX):
            rest.append(token)
        elif "=" in token:
            overrides.append(token[len(_FLAG_PREFIX) :])
        elif i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            # Two-token form; a following ``--option`` means the value was forgotten, not the value.
            raise ValueError(f"{token} needs a value: use {token}=VALUE or {token} VALUE")
        else:
            overrides.append(f"{token[len(_FLAG_PREFIX) :]}={argv[i + 1]}")
            i += 1
        i += 1
    return overrides, rest


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    """Stable JSON (sorted keys, resolved references) for run meta files; non-JSON values become strings."""
    return cfg.to_json_best_effort(sort_keys=True, indent=2)


def _parse(define, argv: list[str]):
    """Runs ml_collections' flag parsing on ``argv`` with fresh FlagValues; flag errors -> ValueError."""
    values = flags.FlagValues()
    argv = ["g2e-jax", *argv]
    try:
        holder = define(values, argv)  # a config dict is parsed (and its overrides defined) right here
        values(argv)
    except flags.Error as e:
        message = re.sub(r"^flag --config\.", "", str(e))
        raise ValueError(f"config override {message}") from None
    return holder.value


def _check_key(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """An unknown key is an error naming the full key and the closest existing one."""
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            prefix = ".".join(parts[:depth])
            kind = type(node).__name__
            raise ValueError(f"unknown config key {key!r}: {prefix!r} is a {kind}, not a ConfigDict")
        if part not in node:
            keys = _all_keys(cfg)
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            if not close:  # A typo in a long path can fall under the cutoff; compare the last component.
                by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
                matches = difflib.get_close_matches(parts[-1], list(by_leaf), n=1, cutoff=0.8)
                close = [by_leaf[m] for m in matches]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"config override {key}={raw!r}: {key} is a ConfigDict and cannot be replaced; "
                         f"override its fields ({key}.<field>=...) instead")


def _nullable(cfg: ml_collections.ConfigDict, key: str) -> bool:
    """A placeholder / FieldReference field, which may be unset again with ``None``."""
    parent, leaf = _parent(cfg, key)
    return isinstance(parent._fields.get(leaf), ml_collections.FieldReference)


def _parent(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    *path, leaf = key.split(".")
    for part in path:
        cfg = cfg[part]
    return cfg, leaf


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg:
        keys.append(f"{prefix}{k}")
        if isinstance(cfg[k], ml_collections.ConfigDict):
            keys.extend(_all_keys(cfg[k], f"{prefix}{k}."))
    return keys
