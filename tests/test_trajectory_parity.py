"""Training against PyTorch, step by step: from the same PEFT LoRA/DoRA folder (non-zero A, B and
magnitude), N AdamW steps (linear schedule with warm-up, weight decay, gradient clipping, dropout 0,
filters off) on a fixed batch give the losses, gradient norms and adapter weights of
transformers + PEFT + torch.optim.AdamW + get_linear_schedule_with_warmup + clip_grad_norm_ with an
InfoNCE written here in torch. Nothing on the torch side is computed by g2e_jax.

``pytest -s`` prints the trajectory table.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from hf_reference import OFFICIAL_SYSTEM, load_hf_model, official_template, sequential_positions  # noqa: E402

from g2e_jax.adapters.peft import load_peft_adapter  # noqa: E402
from g2e_jax.data.prepared import content_id  # noqa: E402
from g2e_jax.models import backbone, load  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402
from g2e_jax.preprocess import Preprocessor  # noqa: E402
from g2e_jax.train.batch import BatchShape, build_batch  # noqa: E402
from g2e_jax.train.step import StepConfig, make_optimizer, train_step  # noqa: E402

HF_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
STEPS, WARMUP, LR, WEIGHT_DECAY, MAX_NORM, TEMPERATURE = 5, 2, 2e-3, 0.01, 1.0, 0.02
LOSS_TOL, WEIGHT_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-4, 1e-5


def random_image(size, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


QUERIES = [
    "<|image_1|> What shape is in the image?",
    "a red circle on white",
    "Find the news photo caption.",
    "<|image_1|>\nWhich colour is the square?",
    "two dogs on a beach",
    "a city skyline at night",
    "an apple and a pear",
    "what is the capital of France",
]
QUERY_IMAGES = [random_image(56, 1), None, None, random_image(84, 2), None, None, None, None]
TARGETS = [
    "circle",
    "a red circle",
    "Storm hits the coast",
    "blue",
    "dogs playing in the sand",
    "skyline",
    "fruit",
    "Paris",
]


def make_adapter(tiny_dir, folder, kind, seed=0):
    """A PEFT folder with random non-zero adapters, written by PEFT itself."""
    wrapped = peft.get_peft_model(
        load_hf_model(tiny_dir),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=HF_TARGETS, use_dora=kind == "dora"),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else 0.05 * noise)
    wrapped.save_pretrained(folder)
    return folder


# --- the torch side ------------------------------------------------------------------------------


def torch_inputs(processor, texts, images, role):
    strings = [
        official_template(t, has_image=im is not None, role=role, system=OFFICIAL_SYSTEM, scheme="gen2embed")
        for t, im in zip(texts, images)
    ]
    present = [im for im in images if im is not None]
    batch = processor(text=strings, images=present or None, padding=True, return_tensors="pt")
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=torch.as_tensor(sequential_positions(batch["attention_mask"].numpy())),
    )
    if present:
        kwargs.update(
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
        )
    return kwargs


def torch_embed(model, inputs):
    hidden = model.base_model.model.model(**inputs).last_hidden_state
    last = inputs["attention_mask"].sum(-1) - 1
    return torch.nn.functional.normalize(hidden[torch.arange(len(last)), last], dim=-1)


def torch_trajectory(tiny_dir, folder, steps, warmup=WARMUP):
    """{PEFT key: initial weight}, [(loss, grad norm before clipping, {PEFT key: weight after the step})]."""
    model = peft.PeftModel.from_pretrained(load_hf_model(tiny_dir), folder, is_trainable=True)
    model.eval()  # dropout 0 anyway; eval() only turns off nothing else in this model
    processor = load_hf_processor(tiny_dir)
    q_in = torch_inputs(processor, QUERIES, QUERY_IMAGES, "query")
    t_in = torch_inputs(processor, TARGETS, [None] * len(TARGETS), "document")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    from transformers import get_linear_schedule_with_warmup

    schedule = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    initial = {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(model).items()}
    out = []
    for _ in range(steps):
        optimizer.zero_grad()
        q, t = torch_embed(model, q_in), torch_embed(model, t_in)
        logits = q @ t.T / TEMPERATURE
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
        schedule.step()
        weights = {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(model).items()}
        out.append((float(loss.detach()), float(norm), weights))
    return initial, out


# --- our side --------------------------------------------------------------------------------------


def peft_key(name_map, path: str) -> str:
    """Our variable path (``text.layers.0.attn.q_proj.lora_a``) -> PEFT's saved key, via the name map."""
    module, var = path.rsplit(".", 1)
    hub = name_map.to_hf(module + ".kernel")[0].removesuffix(".weight")
    name = "model.language_model." + hub.removeprefix("model.")
    suffix = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[var]
    return f"base_model.model.{name}.{suffix}"


def our_weights(params, name_map) -> dict[str, np.ndarray]:
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    return {peft_key(name_map, p): (v if p.endswith("magnitude") else v.T) for p, v in flat.items()}


def our_trajectory(tiny_dir, folder, steps, grad_cache, warmup=WARMUP):
    model = load(tiny_dir, progress=False)
    load_peft_adapter(model, folder, dropout=0.0)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    pre = Preprocessor.from_pretrained(tiny_dir, max_len=256)
    qs = pre.prepare(QUERIES, QUERY_IMAGES, role="query")
    ts = pre.prepare(TARGETS, [None] * len(TARGETS), role="document")
    pairs = [(q, t, content_id(a, None), content_id(b, None)) for q, t, a, b in zip(qs, ts, QUERIES, TARGETS)]
    # 8 pairs in the same order: one chunk of 2 cells x 4 rows, or GradCache's 2 chunks of 1 x 4.
    chunks, cells = (2, 1) if grad_cache else (1, 2)
    shape = BatchShape(
        chunks=chunks,
        cells=cells,
        rows_per_cell=4,
        users=96,
        patches_per_cell=200,
        patch_dim=pre.config.vision.patch_dim,
    )
    batch = jax.tree.map(jnp.asarray, build_batch(pairs, shape, pre.pad_id))
    consts = {
        side: (jnp.asarray(pre.system_ids(role)), jnp.asarray(pre.header_ids))
        for side, role in (("query", "query"), ("target", "document"))
    }
    cfg = StepConfig(
        temperature=TEMPERATURE,
        grad_cache=grad_cache,
        mask_same_target=False,
        mask_same_query=False,
        pad_id=pre.pad_id,
        max_patches_per_image=64,
    )
    tx = make_optimizer(
        learning_rate=LR,
        total_steps=steps,
        warmup_steps=warmup,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_NORM,
    )
    opt_state = tx.init(params)
    step = jax.jit(
        lambda p, o: train_step(graphdef, p, rest, o, batch, consts, jax.random.key(0), tx=tx, cfg=cfg)
    )
    name_map = backbone(model.config.model_type).name_map
    out = []
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state)
        out.append((float(metrics["loss"]), float(metrics["grad_norm"]), our_weights(params, name_map)))
    return out


def max_relative(ours: dict, ref: dict) -> float:
    """max over adapter tensors of max |ours - torch| / max |torch|."""
    assert sorted(ours) == sorted(ref)
    return max(float(np.abs(ours[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)


def compare(label, ours, ref):
    """Prints the table; every step within the tolerances, and the adapters moved well beyond them."""
    initial, ref = ref
    print(
        f"\n[trajectory] {label}\n"
        "| step | loss ours | loss torch | grad norm ours / torch | adapter max rel diff | moved (rel) |\n"
        "|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for i, ((lo, no, wo), (lt, nt, wt)) in enumerate(zip(ours, ref), start=1):
        rel = max_relative(wo, wt)
        moved = max_relative(wt, initial)
        print(f"| {i} | {lo:.7f} | {lt:.7f} | {no:.5f} / {nt:.5f} | {rel:.2e} | {moved:.2e} |")
        rows.append((abs(lo - lt), abs(no - nt) / nt, rel))
    for loss_diff, norm_rel, weight_rel in rows:
        assert loss_diff <= LOSS_TOL
        assert norm_rel <= GRAD_NORM_RTOL
        assert weight_rel <= WEIGHT_RTOL
    assert max_relative(ref[-1][2], initial) > 100 * WEIGHT_RTOL
    return rows


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trajectory")
    return {kind: make_adapter(tiny_dir, root / kind, kind) for kind in ("lora", "dora")}


@pytest.fixture(scope="module")
def reference(tiny_dir, folders):
    return {kind: torch_trajectory(tiny_dir, folder, STEPS) for kind, folder in folders.items()}


@pytest.mark.parametrize("grad_cache", [False, True], ids=["plain", "grad_cache"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_trajectory_matches_peft_and_torch(tiny_dir, folders, reference, kind, grad_cache):
    ours = our_trajectory(tiny_dir, folders[kind], STEPS, grad_cache)
    initial, ref = reference[kind]
    compare(f"{kind}, GradCache {'on' if grad_cache else 'off'}, tiny", ours, (initial, ref))
    # The run must actually move: the loss falls and clipping is active at least once.
    assert ref[-1][0] < ref[0][0] - 1e-3
    assert max(r[1] for r in ref) > MAX_NORM


@pytest.mark.slow
@pytest.mark.xfail(reason="known failure on the merged code (2026-11-26): adapters differ from torch+PEFT by "
                   "1.1e-2 relative after one step at 2B widths (bound 1e-4); issue 15 stays open", strict=False)
def test_one_step_at_2b_widths(tmp_path):
    """Qwen2-VL-2B's widths (2 decoder layers, 1 vision block, the tiny tokenizer's vocabulary), DoRA,
    GradCache, one step without warm-up: loss, gradient norm and updated adapters as torch's."""
    from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig
    from g2e_jax.models.qwen2_vl.config import special_token_ids
    from g2e_jax.models.qwen2_vl.tiny import make_tiny, with_token_ids

    cfg = with_token_ids(
        Qwen2VLConfig(
            text=TextConfig(
                vocab_size=special_token_ids()["vocab_size"],
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=2,
                num_attention_heads=12,
                num_key_value_heads=2,
                mrope_section=(16, 24, 24),
                rope_theta=1e6,
            ),
            vision=VisionConfig(depth=1, embed_dim=1280, num_heads=16, mlp_ratio=4, out_hidden_size=1536),
            tie_word_embeddings=True,
        )
    )
    model_dir = make_tiny(tmp_path / "qwen2vl_2b_width", seed=1, config=cfg)
    folder = make_adapter(model_dir, tmp_path / "dora", "dora", seed=1)
    ref = torch_trajectory(model_dir, folder, 1, warmup=0)
    ours = our_trajectory(model_dir, folder, 1, grad_cache=True, warmup=0)
    compare("dora, GradCache on, Qwen2-VL-2B widths (2 layers + 1 vision block), one step", ours, ref)
