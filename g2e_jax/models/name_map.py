"""Declarative parameter-name maps between Hugging Face checkpoints and NNX state paths.

A backbone lists ``Rule(hf_template, nnx_template, transform)`` rows; ``{i}`` stands for a layer
index. The same table converts in both directions, so load and save cannot drift apart.
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
