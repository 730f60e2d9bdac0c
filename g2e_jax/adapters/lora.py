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
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from g2e_jax.mesh import declared

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
    """L2 norm of each output feature (kernel column) in float32."""
    w = w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=0))


class LoraLinear(nnx.Module):
    """An ``nnx.Linear`` plus a low-rank update (and, for DoRA, a learned magnitude per output).

    Built from an existing ``nnx.Linear`` whose ``kernel``/``bias`` variables it keeps. Adapter
    dropout follows ``model.train()`` / ``model.eval()`` (or ``nnx.view``, or ``deterministic``).
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

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def _delta_kernel(self):
        """``W + s * A B`` in float32 (the merged LoRA kernel, before any DoRA rescaling)."""
        ab = _matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32), _HIGHEST)
        return self.kernel[...].astype(jnp.float32) + self.scaling * ab

    def weight_norm(self):
        """DoRA's ``||W + s * B A||`` per output feature, float32, detached as PEFT does."""
        return jax.lax.stop_gradient(_column_norm(self._delta_kernel()))

    def merged_kernel(self):
        """The kernel that makes a plain Linear compute what this layer computes in eval mode."""
        w = self._delta_kernel()
        if self.is_dora:
            w = w * (self.magnitude[...].astype(jnp.float32) / _column_norm(w))
        return w.astype(self.kernel.get_value().dtype)

    def __call__(self, inputs, *, deterministic: bool | None = None):
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


def apply_adapters(model: nnx.Module, cfg: AdapterConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Wraps every ``nnx.Linear`` whose path fully matches ``cfg.targets``; returns their paths.

    ``full`` and ``none`` leave the model unchanged (see ``trainable_filter``).
    """
    if cfg.kind not in ("lora", "dora"):
        return []
    pattern = re.compile(cfg.targets)
    linears, targets = [], []
    for path, module in nnx.iter_modules(model):
        name = _path_str(path)
        if isinstance(module, LoraLinear) and pattern.fullmatch(name):
            raise ValueError(f"{name} already has adapters; merge them before applying new ones")
        if isinstance(module, nnx.Linear):
            linears.append(name)
            if pattern.fullmatch(name):
                targets.append((path, module))
    if not targets:
        raise ValueError(
            f"adapter targets {cfg.targets!r} match no linear layer (matched against whole paths); "
            f"linear layers include: {', '.join(sorted(linears)[:12])}"
            + (" ..." if len(linears) > 12 else "")
        )
    for path, module in targets:
        _replace(model, path, LoraLinear(module, cfg, rngs=rngs))
    return sorted(_path_str(p) for p, _ in targets)


def merge_adapters(model: nnx.Module) -> None:
    """Folds every adapter into its kernel and restores plain ``nnx.Linear`` layers, in place."""
    adapted = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)]
    for path, module in adapted:
        _replace(model, path, module.to_linear())


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
