"""LoRA / DoRA adapters for NNX linear layers, numerically equal to PEFT's.

``apply_adapters`` swaps each targeted ``nnx.Linear`` for a ``LoraLinear`` in place. The base weights
keep their attribute names (``kernel``, ``bias``) and their ``nnx.Param`` type, so checkpoint paths are
unchanged; the adapter weights are ``nnx.LoRAParam`` and are what ``nnx.DiffState(0, nnx.LoRAParam)``
differentiates. ``merge_adapters`` folds them back into plain ``nnx.Linear`` layers for export.

Formulas (PEFT 0.21, ``tuners/lora/layer.py``, ``variants.py``, ``dora.py``), with ``s = alpha / rank``,
``W`` the base kernel, ``b`` its bias and ``drop`` the adapter dropout:

- LoRA: ``y = x W + b + s * drop(x) A B``.
- DoRA: ``n = ||W + s * stop_grad(A B)||`` per output feature, itself detached; ``g = m / n``;
  ``y = x W + b + (g - 1) * x' W + g * s * x' A B`` where ``x' = drop(x)`` when dropout is active and
  ``x`` otherwise (PEFT then recomputes the base product from the dropped input, without bias).
  The magnitude ``m`` starts as ``||W + s A B||`` (``= ||W||`` since ``B = 0``).
- Merge: LoRA ``W + s A B``; DoRA ``g * (W + s A B)``; the bias is unchanged.

Stacked layers: a linear inside a stack of layers (a module carrying ``stack_size``, whose variables
have a leading layer axis: kernel ``[L, in, out]``) becomes one stacked ``LoraLinear``
(``LoraLinear.stacked``): ``lora_a [L, in, r]``, ``lora_b [L, r, out]``, DoRA ``magnitude [L, out]``
(each layer's own column norms) and a dropout stream per layer (key ``[L]``). Its ``__call__`` runs
per layer, inside the ``nnx.scan`` over the stack (which hands it one layer's slices); the kernel
arithmetic (``merged_kernel``, ``weight_norm``, ``merge_adapters``) works on either layout, layer by
layer. Targets and returned paths are per-layer names (``text.layers.5.attn.q_proj``), translated
by ``g2e_jax.models.name_map.stacked_path`` / ``unstacked_path``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from g2e_jax.mesh import declared
from g2e_jax.models.name_map import unstacked_path

KINDS = ("lora", "dora", "full", "none")
INITS = ("gaussian", "default")
# The reference's target set: the text decoder's attention projections and the MLP down projection.
DEFAULT_TARGETS = r"text\.layers\.\d+\.(attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What to fine-tune. ``targets`` must match a whole module path (like PEFT's string targets)."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 64.0
    dropout: float = 0.1
    targets: str = DEFAULT_TARGETS
    init: str = "gaussian"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {KINDS}")
        if self.init not in INITS:
            raise ValueError(f"unknown adapter init {self.init!r}; expected one of {INITS}")
        if self.kind in ("lora", "dora"):
            if self.rank <= 0:
                raise ValueError(f"adapter rank must be positive, got {self.rank}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"adapter targets {self.targets!r} is not a valid regex: {e}") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _matmul(x, w, precision):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _column_norm(w):
    """L2 norm of each output feature (kernel column) in float32; per layer for a stacked kernel."""
    w = w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=-2))


def _per_layer(fn, *arrays):
    """``fn`` on one layer's arrays (kernel ``[in, out]``), mapped over the leading layer axis when
    the kernel (the first array) is stacked."""
    return fn(*arrays) if arrays[0].ndim == 2 else jax.vmap(fn)(*arrays)


class LoraLinear(nnx.Module):
    """An ``nnx.Linear`` plus a low-rank update (and, for DoRA, a learned magnitude per output).

    Built from an existing ``nnx.Linear`` whose ``kernel``/``bias`` variables it keeps. Adapter
    dropout follows ``model.train()`` / ``model.eval()`` (or ``nnx.view``, or ``deterministic``).
    For a linear inside a stack of layers use ``LoraLinear.stacked``.
    """

    def __init__(self, linear: nnx.Linear, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        if cfg.kind not in ("lora", "dora"):
            raise ValueError(f"LoraLinear needs kind 'lora' or 'dora', got {cfg.kind!r}")
        self.kernel = linear.kernel
        self.bias = linear.bias if linear.use_bias else nnx.data(None)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.use_bias = linear.use_bias
        self.dtype, self.param_dtype = linear.dtype, linear.param_dtype
        self.precision = linear.precision
        self.dot_general, self.promote_dtype = linear.dot_general, linear.promote_dtype
        self.preferred_element_type = linear.preferred_element_type
        self.rank, self.scaling = cfg.rank, cfg.scaling

        pdtype = self.kernel.get_value().dtype
        shape = (self.in_features, cfg.rank)
        key = rngs.params()
        if cfg.init == "gaussian":  # PEFT: nn.init.normal_(A, std=1 / r)
            a = jax.random.normal(key, shape, jnp.float32) / cfg.rank
        else:  # PEFT default: kaiming_uniform_(A, a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(self.in_features)
            a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        # Declared replicated (``rank``): small, and every device needs them whole. Axes the kernel
        # declares before its (in, out) pair (a stacked layer's ``layers``) lead theirs.
        lead = tuple(self.kernel.get_metadata().get("out_sharding") or ())[:-2]
        self.lora_a = nnx.LoRAParam(a.astype(pdtype), **declared(lead + ("rank", "rank")))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((cfg.rank, self.out_features), pdtype), **declared(lead + ("rank", "rank"))
        )
        self.magnitude = (
            nnx.LoRAParam(_column_norm(self._delta_kernel()).astype(pdtype), **declared(lead + ("rank",)))
            if cfg.kind == "dora"
            else nnx.data(None)
        )
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=False, rngs=rngs if cfg.dropout > 0 else None)

    @classmethod
    def stacked(cls, linear: nnx.Linear, cfg: AdapterConfig, stack_size: int, *, rngs: nnx.Rngs):
        """The adapter of a linear inside a stack of ``stack_size`` layers (kernel ``[L, in, out]``):
        one ``LoraLinear`` per layer, built under ``nnx.vmap`` like the stack itself, so every
        adapter variable (and the dropout stream) gets the leading layer axis, and each layer draws
        its own initial ``A`` and dropout key. The kernel and bias variables are the linear's own."""
        shape = tuple(linear.kernel.get_value().shape)
        if len(shape) != 3 or shape[0] != stack_size:
            raise ValueError(
                f"a linear in a stack of {stack_size} layers needs a kernel [L, in, out], got {shape}"
            )

        @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(linear, rngs):
            return cls(linear, cfg, rngs=rngs)

        return make(linear, rngs.split(stack_size))

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def stack_depth(self) -> int | None:
        """The number of layers on the leading axis (stacked), or None (one layer, or one layer's
        slice inside the scan over its stack)."""
        shape = self.kernel.get_value().shape
        return shape[0] if len(shape) == 3 else None

    def _one_delta(self, w, a, b):
        """One layer's ``W + s * A B`` in float32."""
        ab = _matmul(a.astype(jnp.float32), b.astype(jnp.float32), _HIGHEST)
        return w.astype(jnp.float32) + self.scaling * ab

    def _delta_kernel(self):
        """``W + s * A B`` in float32 (the merged LoRA kernel, before any DoRA rescaling)."""
        return _per_layer(self._one_delta, self.kernel[...], self.lora_a[...], self.lora_b[...])

    def weight_norm(self):
        """DoRA's ``||W + s * B A||`` per output feature (per layer), float32, detached as PEFT does."""
        return jax.lax.stop_gradient(_column_norm(self._delta_kernel()))

    def merged_kernel(self):
        """The kernel that makes a plain Linear compute what this layer computes in eval mode
        (``[L, in, out]`` for a stack: each layer's own)."""
        w = self._delta_kernel()
        if self.is_dora:
            g = self.magnitude[...].astype(jnp.float32) / _column_norm(w)
            w = w * g[..., None, :]
        return w.astype(self.kernel.get_value().dtype)

    def __call__(self, inputs, *, deterministic: bool | None = None):
        if self.stack_depth is not None:
            raise ValueError(
                "a stacked LoraLinear runs one layer at a time: call it inside the nnx.scan over its "
                "stack of layers, which hands it one layer's slices"
            )
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        a, b = self.lora_a[...], self.lora_b[...]
        x, kernel, bias, a, b = self.promote_dtype((inputs, kernel, bias, a, b), dtype=self.dtype)
        kwargs = {}
        if self.preferred_element_type is not None:
            kwargs["preferred_element_type"] = self.preferred_element_type
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        base = self.dot_general(x, kernel, dims, precision=self.precision, **kwargs)  # x W, no bias
        y = base if bias is None else base + jnp.reshape(bias, (1,) * (base.ndim - 1) + (-1,))

        deterministic = self.dropout.deterministic if deterministic is None else deterministic
        active = self.dropout.rate > 0 and not deterministic
        xd = self.dropout(x, deterministic=False) if active else x
        lora = _matmul(_matmul(xd, a, self.precision), b, self.precision).astype(y.dtype)
        if not self.is_dora:
            return y + lora * self.scaling
        g = (self.magnitude[...].astype(jnp.float32) / self.weight_norm()).astype(y.dtype)
        # PEFT reuses the layer's output (minus bias) unless dropout is active, in which case it
        # recomputes the base product from the dropped input.
        base_d = self.dot_general(xd, kernel, dims, precision=self.precision, **kwargs) if active else base
        return y + ((g - 1) * base_d.astype(y.dtype) + g * lora * self.scaling)

    def to_linear(self) -> nnx.Linear:
        """A plain ``nnx.Linear`` with the merged kernel (same variables, same metadata)."""
        merged = self.merged_kernel()
        linear = nnx.eval_shape(
            lambda: nnx.Linear(
                self.in_features,
                self.out_features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                dot_general=self.dot_general,
                promote_dtype=self.promote_dtype,
                preferred_element_type=self.preferred_element_type,
                rngs=nnx.Rngs(0),
            )
        )
        self.kernel.set_value(merged)
        linear.kernel = self.kernel
        if self.use_bias:
            linear.bias = self.bias
        return linear


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _replace(model, path, new) -> None:
    """Sets the submodule at ``path``: attribute of its parent, or item of an ``nnx.List``."""
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def find_stacks(model: nnx.Module) -> dict[str, int]:
    """The stacks of layers in ``model``: each stack module's path -> its ``stack_size``. Stacks
    inside stacks are not supported (a ValueError)."""
    stacks = {
        _path_str(path): int(module.stack_size)
        for path, module in nnx.iter_modules(model)
        if getattr(module, "stack_size", None)
    }
    for inner in stacks:
        for outer in stacks:
            if inner != outer and inner.startswith(outer + "."):
                raise ValueError(
                    f"stack {inner!r} is inside stack {outer!r}; nested stacks are not supported"
                )
    return stacks


def _layer_paths(name: str, stacks: dict[str, int]) -> list[str]:
    """A module's path -> the per-layer paths it holds (itself when it is in no stack)."""
    for stack, size in stacks.items():
        if name.startswith(stack + "."):
            return [unstacked_path(name, stack, i) for i in range(size)]
    return [name]


def _stack_of(name: str, stacks: dict[str, int]) -> tuple[str, int] | tuple[None, None]:
    for stack, size in stacks.items():
        if name.startswith(stack + "."):
            return stack, size
    return None, None


def adapter_layers(model: nnx.Module) -> list[tuple[str, LoraLinear, int | None]]:
    """Every adapted layer as (per-layer path, its ``LoraLinear``, layer index in that module's
    leading axis or None), in module order: a stacked ``LoraLinear`` appears once per layer."""
    stacks = find_stacks(model)
    out = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoraLinear):
            name = _path_str(path)
            stack, _ = _stack_of(name, stacks)
            if stack is None:
                out.append((name, module, None))
            else:
                out.extend((unstacked_path(name, stack, i), module, i) for i in range(module.stack_depth))
    return out


def apply_adapters(model: nnx.Module, cfg: AdapterConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Wraps every ``nnx.Linear`` whose path fully matches ``cfg.targets``; returns their per-layer
    paths, sorted.

    Targets are matched against per-layer paths (``text.layers.5.attn.q_proj``) whether or not the
    layers are stacked. A linear inside a stack of layers (a module with ``stack_size``) is one
    stacked module, so it is adapted in all of its layers or in none: a target matching only some
    layers of a stack is a ValueError naming them (adapting a subset of a stack's layers is not
    supported). ``full`` and ``none`` leave the model unchanged (see ``trainable_filter``).
    """
    if cfg.kind not in ("lora", "dora"):
        return []
    pattern = re.compile(cfg.targets)
    stacks = find_stacks(model)
    linears, targets, names = [], [], []
    for path, module in nnx.iter_modules(model):
        name = _path_str(path)
        if not isinstance(module, (nnx.Linear, LoraLinear)):
            continue
        layers = _layer_paths(name, stacks)
        matched = [p for p in layers if pattern.fullmatch(p)]
        if matched and isinstance(module, LoraLinear):
            raise ValueError(f"{matched[0]} already has adapters; merge them before applying new ones")
        if isinstance(module, LoraLinear):
            continue
        linears.extend(layers)
        if matched and len(matched) < len(layers):
            missed = [p for p in layers if p not in matched]
            raise ValueError(
                f"adapter targets {cfg.targets!r} match only some layers of the stacked {name}: "
                f"{', '.join(matched)} but not {', '.join(missed)}; a stack of layers is adapted in all "
                f"of its layers or none (per-layer subsets are not supported)"
            )
        if matched:
            targets.append((path, module, _stack_of(name, stacks)[1]))
            names.extend(matched)
    if not targets:
        linears = sorted(linears)
        raise ValueError(
            f"adapter targets {cfg.targets!r} match no linear layer (matched against whole per-layer "
            f"paths); linear layers include: {', '.join(linears[:12])}"
            + (" ..." if len(linears) > 12 else "")
        )
    for path, module, size in targets:
        if size is None:
            new = LoraLinear(module, cfg, rngs=rngs)
        else:
            new = LoraLinear.stacked(module, cfg, size, rngs=rngs)
        _replace(model, path, new)
    return sorted(names)


def merge_adapters(model: nnx.Module) -> None:
    """Folds every adapter into its kernel and restores plain ``nnx.Linear`` layers, in place
    (a stacked adapter into its stacked kernel, each layer its own)."""
    adapted = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)]
    for path, module in adapted:
        _replace(model, path, module.to_linear())


def reseed_dropout(model: nnx.Module, key) -> None:
    """Reseeds every ``dropout`` stream of ``model`` from ``key`` (an int or a key), in place.

    A stacked stream (key ``[L]``, one per layer of a stack) gets ``L`` keys split from its share,
    so each layer draws its own masks; a scalar stream gets its share as ``nnx.reseed`` gives it.
    The same key reproduces the same masks."""
    nnx.reseed(model, dropout=key, policy="match_shape")


def trainable_filter(cfg: AdapterConfig):
    """The NNX filter of the variables that training updates (for ``DiffState`` and the optimizer)."""
    if cfg.kind in ("lora", "dora"):
        return nnx.LoRAParam
    if cfg.kind == "full":
        return nnx.Param  # includes LoRAParam, its subclass
    return nnx.Nothing


def count_parameters(model: nnx.Module, filter=nnx.Param) -> int:
    """Number of scalars in the variables selected by ``filter``."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, filter))))
