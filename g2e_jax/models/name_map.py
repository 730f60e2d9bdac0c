"""Declarative parameter-name maps between Hugging Face checkpoints and NNX state paths.

A backbone lists ``Rule(hf_template, nnx_template, transform)`` rows; ``{i}`` stands for a layer
index. The same table converts in both directions, so load and save cannot drift apart.

Repeated layers are one stacked module (``g2e_jax.models.common.layers.stack_layers``): its parameters
have a leading layer axis and one path without an index (``text.layers.attn.q_proj.kernel``, shape
``[L, in, out]``). The per-layer name of layer i, the one users, Hugging Face and PEFT see, has ``.{i}``
right after the stack's own path (``text.layers.5.attn.q_proj.kernel``); ``stacked_path`` and
``unstacked_path`` translate, and a rule's ``{i}`` marks where the index goes.
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


def stacked_path(path: str) -> tuple[str, int | None]:
    """A per-layer path -> (the stacked path, the layer index): its first all-digit component taken
    out (``text.layers.5.attn.q_proj`` -> ``("text.layers.attn.q_proj", 5)``); ``(path, None)`` for a
    path with no index (not inside a stack of layers)."""
    parts = path.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:k] + parts[k + 1 :]), int(part)
    return path, None


def unstacked_path(path: str, layer: int, stacks) -> str:
    """A stacked path and a layer index -> the per-layer path: ``.{layer}`` right after the stack's own
    path, the longest of ``stacks`` (paths of stacked modules, or one such path) that ``path`` is in
    (``"text.layers.attn.q_proj", 5, ["text.layers"]`` -> ``"text.layers.5.attn.q_proj"``)."""
    stacks = [stacks] if isinstance(stacks, str) else list(stacks)
    inside = [s for s in stacks if path == s or path.startswith(s + ".")]
    if not inside:
        raise ValueError(f"{path} is not inside a stack of layers (stacks: {', '.join(sorted(stacks))})")
    stack = max(inside, key=len)
    return f"{stack}.{layer}{path[len(stack):]}"


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    nnx: str
    transform: Transform = IDENTITY

    def match_hf(self, name: str) -> str | None:
        m = _template_regex(self.hf).match(name)
        return None if m is None else self.nnx.format(**m.groupdict())

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.nnx

    @property
    def stacked(self) -> str:
        """The nnx template's stacked path (``text.layers.{i}.x`` -> ``text.layers.x``)."""
        return self.nnx.replace(".{i}", "")

    def match_nnx(self, path: str, layer: int | None = None) -> str | None:
        """The HF name of ``path``: a per-layer path (or one outside stacks) with ``layer`` None, or a
        stacked path with its ``layer``."""
        if layer is not None:
            return self.hf.format(i=layer) if self.per_layer and path == self.stacked else None
        m = _template_regex(self.nnx).match(path)
        return None if m is None else self.hf.format(**m.groupdict())


class NnxName(tuple):
    """``to_nnx``'s answer: ``(path, rule, layer)``; ``path`` is the stacked parameter's, ``layer``
    the index into its leading axis (None outside stacks of layers)."""

    def __new__(cls, path: str, rule: Rule, layer: int | None):
        return super().__new__(cls, (path, rule, layer))

    path = property(lambda self: self[0])
    rule = property(lambda self: self[1])
    layer = property(lambda self: self[2])


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

    def to_nnx(self, hf_name: str) -> NnxName | None:
        """An HF tensor name -> ``(stacked path, rule, layer index or None)``."""
        name = self.canonical(hf_name)
        for rule in self.rules:
            m = _template_regex(rule.hf).match(name)
            if m is not None:
                i = m.groupdict().get("i")
                return NnxName(rule.stacked, rule, int(i)) if i is not None else NnxName(rule.nnx, rule, None)
        return None

    def to_hf(self, nnx_path: str, layer: int | None = None) -> tuple[str, Rule] | None:
        """A parameter path -> ``(hub name, rule)``: a per-layer path (``text.layers.5.attn.q_proj.kernel``)
        or one outside stacks with ``layer`` None, or a stacked path with its ``layer``."""
        for rule in self.rules:
            name = rule.match_nnx(nnx_path, layer)
            if name is not None:
                return name, rule
        return None

    def hf_names(self, nnx_path: str, shape) -> list[tuple[str, Rule, int | None]] | None:
        """Every ``(hub name, rule, layer)`` a parameter of ``shape`` holds: one per layer of a stacked
        parameter (its leading axis), one with layer None otherwise; None if it has no HF name."""
        match = self.to_hf(nnx_path)
        if match is not None:
            return [(match[0], match[1], None)]
        if self.to_hf(nnx_path, 0) is None:
            return None
        return [(*self.to_hf(nnx_path, i), i) for i in range(shape[0])]
