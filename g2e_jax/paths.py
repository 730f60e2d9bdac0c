"""The one rule for paths that outlive a process.

A path the project writes into a file that something else reads back (corpus rows, cluster files,
prepared-dataset metadata, configs and meta saved in workdirs and output folders) is absolute, or
relative to the folder of the file that holds it; never relative to the working directory of the
process that wrote it, which the reader cannot know. Readers resolve a relative path against the
holding file's folder (``resolve_from``). Paths typed on the command line are relative to the
working directory, so the CLI makes them absolute once, at the start (``absolute_config_paths``);
nothing downstream joins a path onto another twice.

MMEB-format dataset rows (MMEB itself, ``make-synthetic``) keep MMEB's own convention: their image
paths are relative to the image folder given as ``data.image_dir``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import ml_collections

# Config fields that name files or folders: ``path``, ``root``, ``*_dir``, ``*_file`` (model.path,
# data.root, data.image_dir, data.groups_file, output_dir, mine.output_dir, eval.root, ...).
PATH_FIELD = re.compile(r"^(path|root|\w+_dir|\w+_file)$")


def absolute(path: str | os.PathLike) -> str:
    """``path`` made absolute against the working directory (``~`` expanded), not resolving links;
    a URL (``gs://bucket/run``) is returned as it is."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve_from(holder: str | os.PathLike, path: str | os.PathLike) -> str:
    """A path read from the file ``holder``: absolute as is, relative against ``holder``'s folder."""
    return resolve_in(os.path.dirname(absolute(holder)), path)


def resolve_in(folder: str | os.PathLike, path: str | os.PathLike) -> str:
    """``path`` if absolute, else ``folder/path``; absolute either way."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isabs(path) or is_url(path):
        return path
    return os.path.normpath(os.path.join(absolute(folder), path))


def relative_to_file(path: str | os.PathLike, holder: str | os.PathLike) -> str:
    """``path`` as the file ``holder`` should store it: relative to ``holder``'s folder (POSIX separators),
    so that the folder can move as a whole; absolute when no relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(absolute(path), os.path.dirname(absolute(holder)))).as_posix()
    except ValueError:
        return absolute(path)


def absolute_config_paths(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` (lock state kept) whose path fields (see ``PATH_FIELD``) are absolute."""
    out = copy.deepcopy(cfg)
    _absolutize(out, set())
    return out


def _absolutize(cfg: ml_collections.ConfigDict, seen: set[int]) -> None:
    if id(cfg) in seen:
        return
    seen.add(id(cfg))
    for key in list(cfg.keys()):
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            _absolutize(value, seen)
        elif isinstance(value, str) and value and PATH_FIELD.match(key):
            cfg[key] = absolute(value)
