"""LoRA / DoRA adapters: parity with PEFT (float32), gradients only for adapters, merge and export."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import report
from flax import nnx

from g2e_jax.models.qwen2_vl import NAME_MAP, load, rope_index, save
from g2e_jax.models.qwen2_vl.tiny import random_model, tiny_config
from g2e_jax.adapters.lora import (
    AdapterConfig,
    LoraLinear,
    adapter_layers,
    apply_adapters,
    count_parameters,
    find_stacks,
    merge_adapters,
    trainable_filter,
)
from g2e_jax.models.name_map import stacked_path

ATOL = 1e-5
HF_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
TARGET_PATHS = [
    f"text.layers.{i}.{m}"
    for i in range(2)
    for m in ("attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp.down_proj")
]


def text_batch(cfg, seed=0):
    """Two rows of random token ids, the second right-padded, with their M-RoPE positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    return ids, mask, rope_index(ids, mask, None, cfg, "mrope")


def module_at(model, path: str):
    """The module holding the per-layer path ``path`` and the layer's index in its leading axis: the
    stacked module and ``i`` for layer ``i`` of a stack of layers, else the module itself and None."""
    path, _, index = stacked_path(path, find_stacks(model))
    node = model
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node, index


def layer_value(var, index) -> np.ndarray:
    """One layer's value of a variable (its slice ``index`` when stacked)."""
    value = np.asarray(var[...])
    return value if index is None else value[index]


def set_layer_value(var, index, value) -> None:
    value = jnp.asarray(value, var.get_value().dtype)
    var.set_value(value if index is None else var.get_value().at[index].set(value))


def hf_module_name(path: str) -> str:
    """Our module path -> transformers 5's in-memory module name."""
    hub = NAME_MAP.to_hf(path + ".kernel")[0].removesuffix(".weight")
    return "model.language_model." + hub.removeprefix("model.")


def flat_params(model, filter=nnx.Param) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, filter))
    }


def forward(model, batch):
    ids, mask, pos = batch
    return np.asarray(model(ids, mask, position_ids=pos))


# --------------------------------------------------------------------------------------------------
# 1. Parity with PEFT on the tiny model


def _set_adapter_weights(peft_layer, ours, a, b, index=None):
    """The same A [r, in] and B [out, r] in a PEFT layer and in ours (kernels are [in, out]; layer
    ``index`` of a stacked adapter)."""
    import torch

    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
        peft_layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    set_layer_value(ours.lora_a, index, a.T)
    set_layer_value(ours.lora_b, index, b.T)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_parity(tiny_dir, kind):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_reference import hf_hidden_states, load_hf_model

    cfg = AdapterConfig(kind=kind)
    ours = load(tiny_dir, progress=False)
    paths = apply_adapters(ours, cfg, rngs=nnx.Rngs(0))
    assert paths == sorted(TARGET_PATHS)

    hf = load_hf_model(tiny_dir)
    peft_config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=HF_TARGETS,
        use_dora=kind == "dora",
        init_lora_weights="gaussian",
    )
    wrapped = peft.get_peft_model(hf, peft_config).eval()
    n_peft = sum(1 for n, _ in wrapped.named_modules() if n.endswith(".lora_A"))
    assert n_peft == len(paths)

    # Random non-zero adapters (B = 0 at init would hide bugs), copied into ours ([out, in] -> [in, out]).
    rng = np.random.default_rng(1)
    max_mag_diff = 0.0
    for path in paths:
        layer = wrapped.base_model.model.get_submodule(hf_module_name(path))
        mine, index = module_at(ours, path)
        a = rng.standard_normal(layer.lora_A["default"].weight.shape).astype(np.float32) / np.sqrt(
            mine.in_features
        )
        b = 0.05 * rng.standard_normal(layer.lora_B["default"].weight.shape).astype(np.float32)
        _set_adapter_weights(layer, mine, a, b, index)
        if kind == "dora":
            # Both initialised the magnitude to ||W|| per output feature.
            peft_m = layer.lora_magnitude_vector["default"].weight.detach().numpy()
            max_mag_diff = max(max_mag_diff, float(np.abs(peft_m - layer_value(mine.magnitude, index)).max()))
            m = (peft_m * (1.0 + 0.2 * rng.standard_normal(peft_m.shape))).astype(np.float32)
            with torch.no_grad():
                layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
            set_layer_value(mine.magnitude, index, m)
    if kind == "dora":
        report(f"{kind} initial magnitude vs PEFT", max_abs_diff=max_mag_diff)
        assert max_mag_diff <= ATOL

    batch = text_batch(ours.config)
    ids, mask, pos = batch
    ours.eval()
    hf_batch = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
    ref = hf_hidden_states(hf, hf_batch, pos)
    out = forward(ours, batch)
    real = mask.astype(bool)
    base = hf_hidden_states(load_hf_model(tiny_dir), hf_batch, pos)
    effect = float(np.abs(ref[real] - base[real]).max())
    diff = float(np.abs(ref[real] - out[real]).max())
    report(f"{kind} adapted hidden states vs PEFT", max_abs_diff=diff, adapter_effect=effect)
    assert effect > 1e-2, "the adapters should change the output visibly"
    assert diff <= ATOL

    # Merged kernels: PEFT merge_and_unload vs merge_adapters.
    merged_hf = wrapped.merge_and_unload()
    merge_adapters(ours)
    assert not any(isinstance(m, LoraLinear) for _, m in nnx.iter_modules(ours))
    assert not nnx.state(ours, nnx.LoRAParam)
    kernel_diff = max(
        float(
            np.abs(
                merged_hf.get_submodule(hf_module_name(p)).weight.detach().numpy().T
                - layer_value(module_at(ours, p)[0].kernel, module_at(ours, p)[1])
            ).max()
        )
        for p in paths
    )
    report(f"{kind} merged kernels vs PEFT merge_and_unload", max_abs_diff=kernel_diff)
    assert kernel_diff <= ATOL

    merged_out = forward(ours, batch)
    merged_ref = hf_hidden_states(merged_hf, hf_batch, pos)
    self_diff = float(np.abs(merged_out[real] - out[real]).max())
    ref_diff = float(np.abs(merged_out[real] - merged_ref[real]).max())
    report(f"{kind} merged forward vs adapted forward", max_abs_diff=self_diff, vs_peft_merged=ref_diff)
    assert self_diff <= ATOL and ref_diff <= ATOL


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_peft_layer_parity_in_train_mode(kind, use_bias):
    """Dropout active: the same fixed mask on both sides checks PEFT's training-mode formulas
    (DoRA recomputes the base product from the dropped input)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    din, dout = 24, 16
    cfg = AdapterConfig(kind=kind, targets="proj")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((dout, din)).astype(np.float32) / np.sqrt(din)
    bias = 0.1 * rng.standard_normal(dout).astype(np.float32)
    x = rng.standard_normal((3, 5, din)).astype(np.float32)
    keep = (rng.random(x.shape) >= cfg.dropout).astype(np.float32)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(din, dout, bias=use_bias)

    class FixedMask(torch.nn.Module):
        def forward(self, t):
            return t * torch.from_numpy(keep) / (1 - cfg.dropout) if self.training else t

    net = Net()
    with torch.no_grad():
        net.proj.weight.copy_(torch.from_numpy(w))
        if use_bias:
            net.proj.bias.copy_(torch.from_numpy(bias))
    peft_config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=["proj"],
        use_dora=kind == "dora",
        init_lora_weights="gaussian",
    )
    net = peft.inject_adapter_in_model(peft_config, net)
    layer = net.proj
    layer.lora_dropout["default"] = FixedMask()

    linear = nnx.Linear(din, dout, use_bias=use_bias, rngs=nnx.Rngs(0))
    linear.kernel.set_value(jnp.asarray(w.T))
    if use_bias:
        linear.bias.set_value(jnp.asarray(bias))
    mine = LoraLinear(linear, cfg, rngs=nnx.Rngs(0))

    class FixedMaskNNX(nnx.Module):
        def __init__(self):
            self.rate, self.deterministic = cfg.dropout, False

        def __call__(self, t, deterministic=None):
            return t * jnp.asarray(keep) / (1 - cfg.dropout)

    mine.dropout = FixedMaskNNX()

    a = rng.standard_normal((cfg.rank, din)).astype(np.float32) / np.sqrt(din)
    b = 0.1 * rng.standard_normal((dout, cfg.rank)).astype(np.float32)
    _set_adapter_weights(layer, mine, a, b)
    if kind == "dora":
        m = np.linalg.norm(w, axis=1) * (1 + 0.2 * rng.standard_normal(dout))
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m.astype(np.float32)))
        mine.magnitude.set_value(jnp.asarray(m, jnp.float32))

    diffs = {}
    for mode in ("train", "eval"):
        net.train(mode == "train")
        with torch.no_grad():
            ref = layer(torch.from_numpy(x)).numpy()
        out = np.asarray(mine(jnp.asarray(x), deterministic=mode == "eval"))
        diffs[mode] = float(np.abs(ref - out).max())
    report(f"{kind} layer bias={use_bias} vs PEFT", train=diffs["train"], eval=diffs["eval"])
    assert max(diffs.values()) <= ATOL


# --------------------------------------------------------------------------------------------------
# 2. Training behaviour


@pytest.fixture(scope="module")
def tiny_cfg():
    return tiny_config()


def adapted(tiny_cfg, kind, **kw):
    model = random_model(tiny_cfg, seed=0)
    apply_adapters(model, AdapterConfig(kind=kind, **kw), rngs=nnx.Rngs(0))
    return model


def randomise_b(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoraLinear):
            m.lora_b.set_value(
                jnp.asarray(0.05 * rng.standard_normal(m.lora_b.get_value().shape), jnp.float32)
            )


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_zero_init_is_identity(tiny_cfg, kind):
    base = random_model(tiny_cfg, seed=0)
    model = adapted(tiny_cfg, kind)
    batch = text_batch(tiny_cfg)
    ref = forward(base, batch)
    diffs = {}
    for mode in ("eval", "train"):  # with B = 0 the dropout mask cannot matter either
        getattr(model, mode)()
        diffs[mode] = float(np.abs(forward(model, batch) - ref).max())
    report(f"{kind} zero-init forward vs base", eval=diffs["eval"], train=diffs["train"])
    # LoRA: exactly the base model. DoRA: g = m / ||W|| is 1 up to the last bit of the column norm,
    # which the scan over stacked layers computes inside its compiled body (issue 30) and the
    # adapter's construction outside it: at most a few float32 roundings of the outputs.
    bound = 0.0 if kind == "lora" else 4 * np.finfo(np.float32).eps * float(np.abs(ref).max())
    assert max(diffs.values()) <= bound


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_only_adapters_get_gradients(tiny_cfg, kind):
    model = adapted(tiny_cfg, kind)
    randomise_b(model)
    model.train()
    cfg = AdapterConfig(kind=kind)
    wrt = trainable_filter(cfg)
    assert wrt is nnx.LoRAParam and issubclass(nnx.LoRAParam, nnx.Param)

    adapter_state = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    leaves = {".".join(map(str, p)).rsplit(".", 1)[1] for p, _ in adapter_state}
    assert leaves == ({"lora_a", "lora_b", "magnitude"} if kind == "dora" else {"lora_a", "lora_b"})
    n_adapter = count_parameters(model, nnx.LoRAParam)
    per_layer = lambda m: (
        m.rank * (m.in_features + m.out_features) + (m.out_features if kind == "dora" else 0)
    )
    assert n_adapter == sum(per_layer(m) for _, m, _ in adapter_layers(model))
    base_before = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    }
    adapters_before = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in adapter_state}

    ids, mask, pos = text_batch(tiny_cfg)

    def loss_fn(m):
        h = m(ids, mask, position_ids=pos)
        return jnp.mean(jnp.square(h[:, -4:]))

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    flat = nnx.to_flat_state(grads)
    assert {".".join(map(str, p)) for p, _ in flat} == set(adapters_before)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in flat)
    nonzero = {
        ".".join(map(str, p)).rsplit(".", 1)[1]
        for p, v in flat
        if np.abs(np.asarray(v.get_value())).max() > 0
    }
    assert nonzero == leaves

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    optimizer.update(model, grads)
    base_after = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    }
    assert base_after.keys() == base_before.keys()
    assert all(np.array_equal(base_before[k], base_after[k]) for k in base_before)
    adapters_after = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    }
    assert all(not np.array_equal(adapters_before[k], adapters_after[k]) for k in adapters_before)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dropout_only_in_train_mode(tiny_cfg, kind):
    model = adapted(tiny_cfg, kind)
    randomise_b(model)
    batch = text_batch(tiny_cfg)
    model.eval()
    e1, e2 = forward(model, batch), forward(model, batch)
    model.train()
    t1, t2 = forward(model, batch), forward(model, batch)
    model.eval()
    e3 = forward(model, batch)
    report(
        f"{kind} dropout",
        train_vs_eval=float(np.abs(t1 - e1).max()),
        train_vs_train=float(np.abs(t1 - t2).max()),
    )
    assert np.array_equal(e1, e2) and np.array_equal(e1, e3)
    assert np.abs(t1 - e1).max() > 1e-3 and np.abs(t1 - t2).max() > 1e-3

    no_dropout = adapted(tiny_cfg, kind, dropout=0.0)
    nnx.update(no_dropout, nnx.state(model, nnx.LoRAParam))
    no_dropout.train()
    assert np.array_equal(forward(no_dropout, batch), e1)


def test_full_and_none_kinds(tiny_cfg):
    model = random_model(tiny_cfg, seed=0)
    total = count_parameters(model, nnx.Param)
    for kind in ("full", "none"):
        assert apply_adapters(model, AdapterConfig(kind=kind), rngs=nnx.Rngs(0)) == []
    assert not any(isinstance(m, LoraLinear) for _, m in nnx.iter_modules(model))
    assert count_parameters(model, trainable_filter(AdapterConfig(kind="full"))) == total
    assert count_parameters(model, trainable_filter(AdapterConfig(kind="none"))) == 0
    ids, mask, pos = text_batch(tiny_cfg)
    grads = nnx.grad(
        lambda m: jnp.mean(m(ids, mask, position_ids=pos) ** 2),
        argnums=nnx.DiffState(0, trainable_filter(AdapterConfig(kind="full"))),
    )(model)
    assert sum(x.size for x in jax.tree.leaves(grads)) == total


def test_bad_targets_and_config(tiny_cfg):
    model = random_model(tiny_cfg, seed=0)
    with pytest.raises(ValueError, match=re.escape("text.layers.0.attn.q_proj")) as info:
        apply_adapters(model, AdapterConfig(targets=r"nothing\.here"), rngs=nnx.Rngs(0))
    assert "match no linear layer" in str(info.value)
    assert not any(isinstance(m, LoraLinear) for _, m in nnx.iter_modules(model))
    apply_adapters(model, AdapterConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig(), rngs=nnx.Rngs(0))
    for bad in ({"kind": "qlora"}, {"init": "pissa"}, {"rank": 0}, {"targets": "("}):
        with pytest.raises(ValueError):
            AdapterConfig(**bad)


def test_init_schemes(tiny_cfg):
    """gaussian: A ~ N(0, (1/r)^2); default: A ~ U(+-1/sqrt(in)); B = 0; DoRA magnitude = ||W||."""
    base = random_model(tiny_cfg, seed=0)
    for init in ("gaussian", "default"):
        model = adapted(tiny_cfg, "dora", init=init, rank=4)
        a = np.concatenate(
            [
                np.asarray(m.lora_a[...]).ravel()
                for _, m in nnx.iter_modules(model)
                if isinstance(m, LoraLinear)
            ]
        )
        if init == "gaussian":
            assert abs(a.std() - 1 / 4) < 0.02
        else:
            assert np.abs(a).max() <= 1 / np.sqrt(64) + 1e-7
        down, i = module_at(model, "text.layers.1.mlp.down_proj")
        assert not layer_value(down.lora_b, i).any()
        base_down, j = module_at(base, "text.layers.1.mlp.down_proj")
        kernel = layer_value(base_down.kernel, j)
        np.testing.assert_allclose(layer_value(down.magnitude, i), np.linalg.norm(kernel, axis=0), rtol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_save_requires_merge_and_round_trips(tiny_cfg, kind, tmp_path):
    model = adapted(tiny_cfg, kind)
    randomise_b(model)
    model.eval()
    batch = text_batch(tiny_cfg)
    adapted_out = forward(model, batch)
    with pytest.raises(ValueError, match="merge adapters before saving"):
        save(model, tmp_path / "unmerged", progress=False)
    merge_adapters(model)
    assert isinstance(module_at(model, "text.layers.0.attn.q_proj")[0], nnx.Linear)
    save(model, tmp_path / "merged", progress=False)
    loaded = load(tmp_path / "merged", progress=False)
    saved, reloaded = flat_params(model), flat_params(loaded)
    assert saved.keys() == reloaded.keys()
    assert all(np.array_equal(saved[k], reloaded[k]) for k in saved)
    diff = float(np.abs(forward(loaded, batch) - adapted_out).max())
    report(f"{kind} saved+loaded merged model vs adapted", max_abs_diff=diff)
    assert diff <= ATOL


def test_jitted_train_step_advances_dropout(tiny_cfg):
    """Under ``nnx.jit`` the dropout streams are model state: each step draws a new mask."""
    cfg = AdapterConfig(kind="dora")
    model = adapted(tiny_cfg, "dora")
    randomise_b(model)
    optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=trainable_filter(cfg))
    ids, mask, pos = text_batch(tiny_cfg)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean(m(ids, mask, position_ids=pos)[:, -1] ** 2),
            argnums=nnx.DiffState(0, trainable_filter(cfg)),
        )(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    train_losses = [float(step(model, optimizer)) for _ in range(2)]
    model.eval()
    eval_losses = [float(step(model, optimizer)) for _ in range(2)]
    assert train_losses[0] != train_losses[1]
    assert eval_losses[0] == eval_losses[1]
