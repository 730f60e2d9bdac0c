"""Declarative parameter-name maps between Hugging Face checkpoints and NNX state paths.

A backbone lists ``Rule(hf_template, nnx_template, transform)`` rows; ``{i}`` stands for a layer
index. The same table converts in both directions, so load and save cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a tensor changes between layouts; ``to_hf`` gets the target HF shape."""

    name: str
    to_nnx: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    nnx_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


IDENTITY = Transform("identity", lambda x: x, lambda x, shape: x, lambda shape: tuple(shape))
# torch Linear stores [out, in]; nnx.Linear's kernel is [in, out].
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x, shape: x.T, lambda shape: tuple(shape[::-1]))
# A Conv with kernel == stride over flattened patches is a Linear: [out, *k] <-> [prod(k), out].
FLATTEN_CONV = Transform(
    "flatten_conv",
    lambda x: x.reshape(x.shape[0], -1).T,
    lambda x, shape: x.T.reshape(shape),
    lambda shape: (int(np.prod(shape[1:])), shape[0]),
)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    nnx: str
    transform: Transform = IDENTITY

    def match_hf(self, name: str) -> str | None:
        m = _template_regex(self.hf).match(name)
        return None if m is None else self.nnx.format(**m.groupdict())

    def match_nnx(self, path: str) -> str | None:
        m = _template_regex(self.nnx).match(path)
        return None if m is None else self.hf.format(**m.groupdict())


@dataclasses.dataclass(frozen=True)
class NameMap:
    rules: Sequence[Rule]
    # Alternative HF prefixes (e.g. transformers 5's in-memory names) -> canonical hub prefixes.
    aliases: Sequence[tuple[str, str]] = ()

    def canonical(self, hf_name: str) -> str:
        for alias, canonical in self.aliases:
            if hf_name.startswith(alias):
                return canonical + hf_name[len(alias) :]
        return hf_name

    def to_nnx(self, hf_name: str) -> tuple[str, Rule] | None:
        name = self.canonical(hf_name)
        for rule in self.rules:
            path = rule.match_hf(name)
            if path is not None:
                return path, rule
        return None

    def to_hf(self, nnx_path: str) -> tuple[str, Rule] | None:
        for rule in self.rules:
            name = rule.match_nnx(nnx_path)
            if name is not None:
                return name, rule
        return None
