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
from typing import Callable, Mapping, Sequence

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

# --------------------------------------------------------------------------------------------------
# Stacked layers: a repeated block is one module whose parameters carry a leading layer axis
# (``text.layers.attn.q_proj.kernel`` is ``[L, in, out]``). User-facing names stay per layer: the
# per-layer path of layer ``i`` is the stacked path with ``.{i}`` inserted right after the stack's
# own path (``text.layers.attn.q_proj`` + 5 -> ``text.layers.5.attn.q_proj``).


def _under(path: str, stack: str) -> bool:
    return path == stack or path.startswith(stack + ".")


def unstacked_path(path: str, stack: str, index: int) -> str:
    """A stacked path + a layer index -> that layer's path: (``text.layers.attn.q_proj``,
    ``text.layers``, 5) -> ``text.layers.5.attn.q_proj``. ``stack`` is the stack module's own path."""
    if not _under(path, stack):
        raise ValueError(f"{path!r} is not under the stack {stack!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"layer index must be a non-negative int, got {index!r}")
    return f"{stack}.{index}{path[len(stack) :]}"


def stacked_path(path: str, stacks) -> tuple[str, str | None, int | None]:
    """A per-layer path -> (stacked path, its stack, layer index): (``text.layers.5.attn.q_proj``,
    [``text.layers``]) -> (``text.layers.attn.q_proj``, ``text.layers``, 5). ``stacks`` are the stack
    modules' own paths, or a mapping of them to their ``stack_size`` (then an index past the end is
    a ValueError too); a path under none of them comes back as (path, None, None). A path that
    names a stack without a layer index (``text.layers.attn``) is a ValueError."""
    for stack in sorted(stacks, key=len, reverse=True):  # the innermost stack first
        if not _under(path, stack):
            continue
        rest = path[len(stack) + 1 :]
        head, _, tail = rest.partition(".")
        if not head.isdigit():
            raise ValueError(f"{path!r} is under the stack {stack!r} but names no layer index after it")
        if isinstance(stacks, Mapping) and int(head) >= stacks[stack]:
            raise ValueError(f"{path!r}: layer {int(head)} of {stack!r}, which has {stacks[stack]} layers")
        return stack + ("." + tail if tail else ""), stack, int(head)
    return path, None, None
