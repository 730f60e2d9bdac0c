"""LoRA / DoRA on stacked layers (issue 30): a toy model holding ``text.layers``, a stack of 3 layers
built like ``g2e_jax.models.common.layers.stack_layers`` (``nnx.split_rngs`` + ``nnx.vmap`` with the
``layers`` partition name, ``stack_size`` set) and run with ``nnx.scan``, next to its unstacked twin
(an ``nnx.List`` of the same layers) and a PyTorch mirror under PEFT. Its module names are those of
Qwen2-VL (``text.layers.{i}.attn.q_proj``, ``visual.merger.fc1``), so Qwen2-VL's ``NameMap`` gives the
PEFT keys. Float32, PEFT tolerances as in ``test_lora.py``."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import report
from flax import nnx

from g2e_jax.adapters.lora import (
    AdapterConfig,
    LoraLinear,
    adapter_layers,
    apply_adapters,
    count_parameters,
    find_stacks,
    merge_adapters,
    reseed_dropout,
    trainable_filter,
)
from g2e_jax.adapters.peft import load_peft_adapter, save_peft_adapter
from g2e_jax.models.common import layers as layers_lib
from g2e_jax.models.name_map import stacked_path, unstacked_path
from g2e_jax.models.qwen2_vl import NAME_MAP

ATOL = 1e-5
L, D, H = 3, 16, 24
STACKS = {"text.layers": L}
TARGETS = r"text\.layers\.\d+\.(attn\.(q_proj|o_proj)|mlp\.down_proj)|visual\.merger\.fc1"
TARGET_PATHS = sorted(
    [f"text.layers.{i}.{m}" for i in range(L) for m in ("attn.q_proj", "attn.o_proj", "mlp.down_proj")]
    + ["visual.merger.fc1"]
)
HF_TARGETS = (
    r".*(language_model\.layers\.\d+\.(self_attn\.(q_proj|o_proj)|mlp\.down_proj)|visual\.merger\.mlp\.0)"
)


# --------------------------------------------------------------------------------------------------
# The toy model


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    model_type: str = "qwen2_vl"  # PEFT names come from Qwen2-VL's NameMap


def _linear(din, dout, axes, bias, rngs):
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.3), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.normal(0.1), axes[1:]),
        rngs=rngs,
    )


class Attn(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = _linear(D, H, ("embed", "heads"), True, rngs)
        self.o_proj = _linear(H, D, ("heads", "embed"), False, rngs)


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.down_proj = _linear(D, D, ("mlp", "embed"), False, rngs)


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.attn = Attn(rngs)
        self.mlp = Mlp(rngs)

    def __call__(self, x):
        h = x + self.attn.o_proj(jnp.tanh(self.attn.q_proj(x)))
        return h + self.mlp.down_proj(jnp.tanh(h))


def scan_layers(layers, x, body):
    """``body(layer, x) -> (x, out)`` over a stack (the library's scan: the layer's state, random
    streams included, on axis 0; ``out`` stacked on axis 0)."""
    return layers_lib.scan_layers(layers, lambda layer, carry, _: body(layer, carry), x)


class Text(nnx.Module):
    def __init__(self, stacked, rngs):
        if stacked:
            self.layers = layers_lib.stack_layers(Layer, L, rngs)
        else:
            self.layers = nnx.List([Layer(rngs) for _ in range(L)])

    def __call__(self, x):
        if isinstance(self.layers, nnx.List):
            for layer in self.layers:
                x = layer(x)
            return x
        return scan_layers(self.layers, x, lambda layer, x: (layer(x), None))[0]


class Merger(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = _linear(D, D, ("embed", "embed"), True, rngs)


class Visual(nnx.Module):
    def __init__(self, rngs):
        self.merger = Merger(rngs)


class Toy(nnx.Module):
    def __init__(self, stacked=True, seed=0):
        rngs = nnx.Rngs(seed)
        self.config = ToyConfig()
        self.visual = Visual(rngs)
        self.text = Text(stacked, rngs)

    def __call__(self, x):
        return self.text(self.visual.merger.fc1(x))


def toy(stacked=True, seed=0):
    with nnx.use_eager_sharding(False):  # logical axes as metadata, as the models declare them
        return Toy(stacked, seed)


def flat(model, filter=...):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, filter))}


def unstacked_twin(model):
    """The same model as an ``nnx.List`` of layers holding slice ``i`` of every stacked variable:
    parameters, adapters and dropout streams (keys and counts) alike."""
    plain = toy(stacked=False, seed=99)
    adapted = sorted(p for p, _, _ in adapter_layers(model))
    if adapted:
        layer = next(m for _, m, _ in adapter_layers(model))
        cfg = AdapterConfig(
            kind="dora" if layer.is_dora else "lora",
            rank=layer.rank,
            alpha=layer.scaling * layer.rank,
            dropout=layer.dropout.rate,
            targets="|".join(map(re.escape, adapted)),
        )
        apply_adapters(plain, cfg, rngs=nnx.Rngs(5))
    src = flat(model)
    state = nnx.state(plain)
    leaves = nnx.to_flat_state(state)
    assert len(leaves) == sum(1 if "text.layers" not in k else L for k in src)
    for path, var in leaves:
        stacked, _, i = stacked_path(".".join(map(str, path)), STACKS)
        value = src[stacked].get_value()
        var.set_value(value if i is None else value[i])
    nnx.update(plain, state)
    return plain


def randomise_adapters(model, seed=0):
    """Non-zero B (B = 0 hides bugs) and, for DoRA, a magnitude away from ||W||."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoraLinear):
            shape = m.lora_b.get_value().shape
            m.lora_b.set_value(jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32))
            if m.is_dora:
                mag = np.asarray(m.magnitude[...])
                m.magnitude.set_value(
                    jnp.asarray(mag * (1 + 0.2 * rng.standard_normal(mag.shape)), jnp.float32)
                )


def inputs(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((2, 5, D)), jnp.float32)


def adapted_toy(kind, **kw):
    model = toy()
    rngs = nnx.Rngs(params=0, dropout=1)  # as the trainer and the loaders call it
    paths = apply_adapters(model, AdapterConfig(kind=kind, targets=TARGETS, **kw), rngs=rngs)
    return model, paths


# --------------------------------------------------------------------------------------------------
# 1. Per-layer names


def test_stacked_and_unstacked_paths():
    assert unstacked_path("text.layers.attn.q_proj", "text.layers", 5) == "text.layers.5.attn.q_proj"
    assert (
        unstacked_path("text.layers.attn.q_proj.kernel", "text.layers", 0)
        == "text.layers.0.attn.q_proj.kernel"
    )
    assert stacked_path("text.layers.5.attn.q_proj", ["text.layers"]) == (
        "text.layers.attn.q_proj",
        "text.layers",
        5,
    )
    assert stacked_path("text.layers.12", {"text.layers": 28}) == ("text.layers", "text.layers", 12)
    assert stacked_path("visual.merger.fc1", ["text.layers"]) == ("visual.merger.fc1", None, None)
    assert stacked_path("text.layers_x.1.a", ["text.layers"]) == ("text.layers_x.1.a", None, None)
    # The innermost stack wins; visual.blocks and text.layers do not clash.
    stacks = {"text.layers": 2, "visual.blocks": 4}
    for path in ("text.layers.1.mlp.down_proj", "visual.blocks.3.attn.qkv.kernel"):
        stacked, stack, i = stacked_path(path, stacks)
        assert unstacked_path(stacked, stack, i) == path
    with pytest.raises(ValueError, match="no layer index"):
        stacked_path("text.layers.attn.q_proj", ["text.layers"])
    with pytest.raises(ValueError, match="has 2 layers"):
        stacked_path("text.layers.2.attn.q_proj", {"text.layers": 2})
    with pytest.raises(ValueError, match="not under"):
        unstacked_path("visual.merger.fc1", "text.layers", 0)


def test_toy_contract():
    model = toy()
    assert find_stacks(model) == STACKS
    kernel = model.text.layers.attn.q_proj.kernel
    assert kernel.get_value().shape == (L, D, H)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    # The scanned forward equals the unstacked twin's loop.
    x = inputs()
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(unstacked_twin(model)(x)), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 2. apply_adapters / LoraLinear on a stack


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_apply_stacked_layout(kind):
    model, paths = adapted_toy(kind, rank=4)
    assert paths == TARGET_PATHS
    q = model.text.layers.attn.q_proj
    assert isinstance(q, LoraLinear) and q.stack_depth == L
    assert q.kernel.get_value().shape == (L, D, H) and q.bias.get_value().shape == (L, H)
    assert q.lora_a.get_value().shape == (L, D, 4) and q.lora_b.get_value().shape == (L, 4, H)
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "rank", "rank")
    assert q.dropout.rngs.key.get_value().shape == (L,)
    a = np.asarray(q.lora_a[...])
    assert not np.array_equal(a[0], a[1])  # each layer drew its own A
    assert not np.asarray(q.lora_b[...]).any()
    if kind == "dora":  # each layer's own column norms
        w = np.asarray(q.kernel[...])
        np.testing.assert_allclose(np.asarray(q.magnitude[...]), np.linalg.norm(w, axis=1), rtol=1e-6)
        assert q.magnitude.get_value().shape == (L, H)
    fc1 = model.visual.merger.fc1
    assert isinstance(fc1, LoraLinear) and fc1.stack_depth is None and fc1.lora_a.get_value().shape == (D, 4)
    layers = adapter_layers(model)
    assert sorted(p for p, _, _ in layers) == TARGET_PATHS
    assert [(p, i) for p, m, i in layers if m is q] == [(f"text.layers.{i}.attn.q_proj", i) for i in range(L)]
    assert [(p, i) for p, m, i in layers if m is fc1] == [("visual.merger.fc1", None)]
    per_layer = lambda m: (
        m.rank * (m.in_features + m.out_features) + (m.out_features if kind == "dora" else 0)
    )
    assert count_parameters(model, nnx.LoRAParam) == sum(per_layer(m) for _, m, _ in adapter_layers(model))
    with pytest.raises(ValueError, match="call it inside the nnx.scan"):
        q(jnp.ones((2, D)))


def test_partial_stack_targets_are_errors():
    model = toy()
    with pytest.raises(ValueError, match="only some layers of the stacked text.layers.attn.q_proj") as info:
        apply_adapters(model, AdapterConfig(targets=r"text\.layers\.[01]\.attn\.q_proj"), rngs=nnx.Rngs(0))
    message = str(info.value)
    assert "text.layers.0.attn.q_proj, text.layers.1.attn.q_proj but not text.layers.2.attn.q_proj" in message
    assert "per-layer subsets are not supported" in message
    assert not any(isinstance(m, LoraLinear) for _, m in nnx.iter_modules(model))
    with pytest.raises(ValueError, match=re.escape("text.layers.0.attn.o_proj")) as info:
        apply_adapters(model, AdapterConfig(targets=r"nothing"), rngs=nnx.Rngs(0))
    assert "match no linear layer" in str(info.value)
    apply_adapters(model, AdapterConfig(targets=TARGETS), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"text\.layers\.0\.attn\.q_proj already has adapters"):
        apply_adapters(model, AdapterConfig(targets=r"text\.layers\.0\.attn\.q_proj"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_stacked_equals_per_layer_plain_adapters(kind):
    """Every layer of the scanned stack computes what a plain ``LoraLinear`` on that layer's weights
    computes: eval, and train with the same dropout keys (each layer its own masks); the merged
    kernels and DoRA norms are each layer's own."""
    model, _ = adapted_toy(kind)
    randomise_adapters(model)
    plain = unstacked_twin(model)
    x = inputs()
    diffs = {}
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(plain, mode)()
        out, ref = np.asarray(model(x)), np.asarray(plain(x))
        diffs[mode] = float(np.abs(out - ref).max())
    # The streams advanced alike, layer by layer (scan writes the counts back).
    counts = np.asarray(model.text.layers.attn.q_proj.dropout.rngs.count[...])
    assert counts.tolist() == [1] * L
    assert all(int(plain.text.layers[i].attn.q_proj.dropout.rngs.count[...]) == 1 for i in range(L))
    q = model.text.layers.attn.q_proj
    merged = np.asarray(q.merged_kernel())
    kernel_diff = max(
        float(np.abs(merged[i] - np.asarray(plain.text.layers[i].attn.q_proj.merged_kernel())).max())
        for i in range(L)
    )
    if kind == "dora":
        norms = np.asarray(q.weight_norm())
        for i in range(L):
            np.testing.assert_allclose(
                norms[i], np.asarray(plain.text.layers[i].attn.q_proj.weight_norm()), rtol=1e-6
            )
    report(f"stacked {kind} vs per-layer plain LoraLinear", **diffs, merged_kernel=kernel_diff)
    assert max(diffs.values()) <= ATOL and kernel_diff <= 1e-6
    model.eval()
    base = toy()
    assert float(np.abs(np.asarray(model(x)) - np.asarray(base(x))).max()) > 1e-2  # the adapters matter


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_round_trip_and_gradients(kind):
    model, _ = adapted_toy(kind)
    randomise_adapters(model)
    x = inputs()

    # Only adapters get gradients, each layer its own slice of them.
    model.train()
    wrt = trainable_filter(AdapterConfig(kind=kind))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, wrt))(model)
    g = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert set(g) == set(flat(model, nnx.LoRAParam))
    assert g["text.layers.attn.q_proj.lora_a"].shape == (L, D, 8)
    assert all(np.abs(v[i]).max() > 0 for k, v in g.items() if k.startswith("text.layers") for i in range(L))
    base_before = {
        k: np.asarray(v.get_value())
        for k, v in flat(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))).items()
    }
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    optimizer.update(model, grads)
    base_after = flat(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert all(np.array_equal(base_before[k], np.asarray(base_after[k].get_value())) for k in base_before)

    model.eval()
    adapted_out = np.asarray(model(x))
    expected = np.asarray(model.text.layers.mlp.down_proj.merged_kernel())
    merge_adapters(model)
    assert not any(isinstance(m, LoraLinear) for _, m in nnx.iter_modules(model))
    assert not nnx.state(model, nnx.LoRAParam)
    down = model.text.layers.mlp.down_proj
    assert isinstance(down, nnx.Linear) and down.kernel.get_value().shape == (L, D, D)
    assert down.kernel.get_metadata()["out_sharding"] == ("layers", "mlp", "embed")
    np.testing.assert_array_equal(np.asarray(down.kernel[...]), expected)
    diff = float(np.abs(np.asarray(model(x)) - adapted_out).max())
    report(f"stacked {kind}: merged forward vs adapted", max_abs_diff=diff)
    assert diff <= ATOL
    # Adapters can go back on the merged model.
    assert apply_adapters(model, AdapterConfig(kind=kind, targets=TARGETS), rngs=nnx.Rngs(1)) == TARGET_PATHS


def test_jitted_step_advances_each_layers_dropout():
    cfg = AdapterConfig(kind="dora", targets=TARGETS)
    model, _ = adapted_toy("dora")
    randomise_adapters(model)
    optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=trainable_filter(cfg))
    x = inputs()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, trainable_filter(cfg))
        )(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    train = [float(step(model, optimizer)) for _ in range(2)]
    assert np.asarray(model.text.layers.attn.q_proj.dropout.rngs.count[...]).tolist() == [2] * L
    model.eval()
    evals = [float(step(model, optimizer)) for _ in range(2)]
    assert train[0] != train[1] and evals[0] == evals[1]


# --------------------------------------------------------------------------------------------------
# 3. Dropout streams per layer


def layer_masks(model):
    """Each layer's q_proj adapter dropout applied to ones, drawn inside the scan: ``[L, 4, D]``."""

    def body(layer, x):
        return x, layer.attn.q_proj.dropout(x, deterministic=False)

    return np.asarray(scan_layers(model.text.layers, jnp.ones((4, D)), body)[1])


def test_dropout_streams_per_layer_and_reseeding():
    model, _ = adapted_toy("lora", dropout=0.5)
    assert model.text.layers.attn.q_proj.dropout.rngs.key.tag == "dropout"
    with pytest.raises(ValueError, match="match_shape"):  # why reseeding needs the helper
        nnx.reseed(model, dropout=0)
    reseed_dropout(model, 7)
    first = layer_masks(model)
    assert first.shape == (L, 4, D)
    assert all(not np.array_equal(first[i], first[j]) for i in range(L) for j in range(i))
    again = layer_masks(model)  # the streams advanced
    assert all(not np.array_equal(first[i], again[i]) for i in range(L))
    reseed_dropout(model, 7)
    np.testing.assert_array_equal(layer_masks(model), first)
    reseed_dropout(model, jax.random.key(7))  # a key works as well as an int
    other = layer_masks(model)
    reseed_dropout(model, 8)
    assert not np.array_equal(layer_masks(model), other)
    # The unstacked layer (not in a stack) keeps a scalar stream, reseeded as nnx.reseed would.
    fc1 = model.visual.merger.fc1.dropout.rngs.key
    assert fc1.get_value().shape == ()
    # Reseeded under jit with a traced key (as train/step.py does per chunk and cell), same masks.
    reseed_dropout(model, 3)
    eager = layer_masks(model)

    @nnx.jit
    def traced(model, key):
        reseed_dropout(model, key)
        return layer_masks_traced(model)

    def layer_masks_traced(model):
        def body(layer, x):
            return x, layer.attn.q_proj.dropout(x, deterministic=False)

        return scan_layers(model.text.layers, jnp.ones((4, D)), body)[1]

    np.testing.assert_array_equal(np.asarray(traced(model, jax.random.key(3))), eager)


# --------------------------------------------------------------------------------------------------
# 4. PEFT folders in and out


def torch_mirror(model):
    """The toy in PyTorch under transformers 5's in-memory names, with the toy's base weights (found
    through Qwen2-VL's NameMap and the stacked/unstacked translation)."""
    torch = pytest.importorskip("torch")

    def module():
        return torch.nn.Module()

    class TLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = module()
            self.self_attn.q_proj = torch.nn.Linear(D, H)
            self.self_attn.o_proj = torch.nn.Linear(H, D, bias=False)
            self.mlp = module()
            self.mlp.down_proj = torch.nn.Linear(D, D, bias=False)

        def forward(self, x):
            h = x + self.self_attn.o_proj(torch.tanh(self.self_attn.q_proj(x)))
            return h + self.mlp.down_proj(torch.tanh(h))

    class TToy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module()
            self.model.visual = module()
            self.model.visual.merger = module()
            self.model.visual.merger.mlp = torch.nn.Sequential(torch.nn.Linear(D, D))
            self.model.language_model = module()
            self.model.language_model.layers = torch.nn.ModuleList([TLayer() for _ in range(L)])

        def forward(self, x):
            x = self.model.visual.merger.mlp(x)
            for layer in self.model.language_model.layers:
                x = layer(x)
            return x

    net = TToy()
    params = flat(model, nnx.Param)
    with torch.no_grad():
        for name, p in net.named_parameters():
            stacked, rule, i = NAME_MAP.to_nnx(name)  # the stacked path and the layer (None outside)
            value = np.array(params[stacked].get_value())
            value = value if i is None else value[i]
            p.copy_(torch.from_numpy(np.ascontiguousarray(rule.transform.to_hf(value, tuple(p.shape)))))
    return net.eval()


def peft_folder(net, kind, folder, seed=1, targets=HF_TARGETS):
    """PEFT on the mirror with random non-zero A, B (and magnitude), saved to ``folder``."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_reference import perturb_adapters

    wrapped = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=kind == "dora")
    )
    perturb_adapters(wrapped, seed)
    wrapped.save_pretrained(folder)
    return wrapped.eval()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_folders_on_stacked_layers(tmp_path, kind):
    """A real PEFT folder onto the stacked toy: PEFT's numerics per layer; written back key-exact and
    bit-identical (slice i of each stacked adapter is layer i's tensor); read again bit for bit; the
    unstacked twin writes the very same file; merged kernels equal PEFT's merge_and_unload."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    model = toy()
    wrapped = peft_folder(torch_mirror(model), kind, tmp_path / "theirs")
    cfg = load_peft_adapter(model, tmp_path / "theirs")
    assert cfg.kind == kind and cfg.rank == 4 and cfg.scaling == 4.0
    assert isinstance(model.text.layers.attn.q_proj, LoraLinear)
    assert [p for p, _, _ in sorted(adapter_layers(model))] == TARGET_PATHS

    model.eval()
    x = inputs()
    with torch.no_grad():
        ref = wrapped(torch.from_numpy(np.array(x))).numpy()
        with wrapped.disable_adapter():
            base = wrapped(torch.from_numpy(np.array(x))).numpy()
    out = np.asarray(model(x))
    diff, effect = float(np.abs(out - ref).max()), float(np.abs(ref - base).max())
    report(f"PEFT {kind} folder -> stacked toy", max_abs_diff=diff, adapter_effect=effect)
    assert effect > 1e-2 and diff <= ATOL

    save_peft_adapter(model, tmp_path / "ours")
    theirs, ours = (
        load_file(tmp_path / "theirs/adapter_model.safetensors"),
        load_file(tmp_path / "ours/adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.model.language_model.layers.2.self_attn.q_proj.lora_A.weight" in ours
    assert all(ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert config["use_dora"] == (kind == "dora")
    assert len(config["target_modules"]) == len(TARGET_PATHS)

    again = toy()
    load_peft_adapter(again, tmp_path / "ours")
    first, second = flat(model, nnx.LoRAParam), flat(again, nnx.LoRAParam)
    assert first.keys() == second.keys()
    assert all(
        np.array_equal(np.asarray(first[k].get_value()), np.asarray(second[k].get_value())) for k in first
    )

    plain = unstacked_twin(toy())  # the same base weights in an nnx.List of layers
    load_peft_adapter(plain, tmp_path / "theirs")
    plain.eval()
    save_peft_adapter(plain, tmp_path / "plain")
    plain_t = load_file(tmp_path / "plain/adapter_model.safetensors")
    assert sorted(plain_t) == sorted(ours) and all(np.array_equal(plain_t[k], ours[k]) for k in ours)
    np.testing.assert_allclose(np.asarray(plain(x)), out, atol=ATOL)

    merged = wrapped.merge_and_unload()
    merge_adapters(model)
    kernels = flat(model, nnx.Param)
    kernel_diff = 0.0
    for name, p in merged.named_parameters():
        stacked, rule, i = NAME_MAP.to_nnx(name)  # the stacked path and the layer (None outside)
        value = np.asarray(kernels[stacked].get_value())
        value = value if i is None else value[i]
        kernel_diff = max(kernel_diff, float(np.abs(rule.transform.to_nnx(p.detach().numpy()) - value).max()))
    report(f"stacked {kind} merged kernels vs PEFT merge_and_unload", max_abs_diff=kernel_diff)
    assert kernel_diff <= ATOL


def test_peft_folder_on_part_of_a_stack_is_an_error(tmp_path):
    model = toy()
    peft_folder(
        torch_mirror(model), "lora", tmp_path / "a", targets=r".*language_model\.layers\.1\.self_attn\.q_proj"
    )
    with pytest.raises(ValueError, match=r"only some layers of the stacked text\.layers\.attn\.q_proj"):
        load_peft_adapter(model, tmp_path / "a")
