"""Training against PyTorch, step by step: from the same PEFT LoRA/DoRA folder (non-zero A, B and
magnitude), N AdamW steps (linear schedule with warm-up, weight decay, gradient clipping, dropout 0,
filters off) on a fixed batch give the losses, gradient norms and adapter weights of
transformers + PEFT + torch.optim.AdamW + get_linear_schedule_with_warmup + clip_grad_norm_ with an
InfoNCE written here in torch. Nothing on the torch side is computed by g2e_jax.

Gradients are compared leaf by leaf before the optimizer. Adam's first step is lr * g / (|g| + eps): the
sign of g, unless |g| is near eps. An element whose clipped gradient has stayed below 100 eps (where
float32 rounding, in torch as in ours, decides its steps) is compared with the bound Adam's steps have (2
lr a step), not 1e-4; its gradient is compared like all others. The table counts such elements: at 2B
widths 197 of 172032; the largest difference, 1.1e-2 relative, is at a clipped gradient of 9e-9 (torch)
vs -1.6e-8 (ours) in a tensor whose largest is 1.6e-2. Over all tensors, torch's float32 gradients and
ours are within 8.7e-6 and 1.6e-5 (of each tensor's largest) of torch's in float64. At tiny widths one
such element, in steps 1 and 2 (2.5e-6 apart).

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
from hf_reference import (  # noqa: E402
    OFFICIAL_SYSTEM,
    load_hf_model,
    official_template,
    perturb_adapters,
    sequential_positions,
)

from g2e_jax.adapters.lora import find_stacks  # noqa: E402
from g2e_jax.adapters.peft import load_peft_adapter  # noqa: E402
from g2e_jax.data.prepared import content_id  # noqa: E402
from g2e_jax.models import backbone_of, load  # noqa: E402
from g2e_jax.models.name_map import unstacked_path  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402
from g2e_jax.preprocess import Preprocessor  # noqa: E402
from g2e_jax.train.batch import BatchShape, build_batch  # noqa: E402
from g2e_jax.train.step import StepConfig, loss_and_grads, make_optimizer, train_step  # noqa: E402

HF_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
STEPS, WARMUP, LR, WEIGHT_DECAY, MAX_NORM, TEMPERATURE = 5, 2, 2e-3, 0.01, 1.0, 0.02
LOSS_TOL, WEIGHT_RTOL, GRAD_NORM_RTOL, GRAD_RTOL = 1e-5, 1e-4, 1e-5, 1e-4
ADAM_EPS = 1e-8  # torch.optim.AdamW's and optax.adamw's default


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
    perturb_adapters(wrapped, seed)
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
    """{PEFT key: initial weight}, [(loss, grad norm before clipping, {PEFT key: weight after the step},
    {PEFT key: gradient before clipping})]."""
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
        grads = {_state_key(n): p.grad.numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
        schedule.step()
        weights = {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(model).items()}
        out.append((float(loss.detach()), float(norm), weights, grads))
    return initial, out


def _state_key(name: str) -> str:
    """A trainable parameter's name -> its key in PEFT's saved state dict (no adapter name)."""
    name = name.replace(".default", "")
    return name.removesuffix(".weight") if "lora_magnitude_vector" in name else name


# --- our side --------------------------------------------------------------------------------------


def peft_key(name_map, path: str) -> str:
    """Our variable path (``text.layers.0.attn.q_proj.lora_a``) -> PEFT's saved key, via the name map."""
    module, var = path.rsplit(".", 1)
    hub = name_map.to_hf(module + ".kernel")[0].removesuffix(".weight")
    if not hub.startswith("model.language_model."):  # Qwen2-VL's hub names (``model.layers``); Qwen3-VL's are in-memory
        hub = "model.language_model." + hub.removeprefix("model.")
    name = hub
    suffix = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[var]
    return f"base_model.model.{name}.{suffix}"


def our_weights(params, name_map, stacks) -> dict[str, np.ndarray]:
    """PEFT key -> our tensor in PEFT's layout, one per layer (slice ``i`` of a stack's variables)."""
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    per_layer = {}
    for p, v in flat.items():
        stack = next((s for s in stacks if p.startswith(s + ".")), None)
        if stack is None:
            per_layer[p] = v
        else:
            per_layer.update((unstacked_path(p, stack, i), v[i]) for i in range(stacks[stack]))
    return {peft_key(name_map, p): (v if p.endswith("magnitude") else v.T) for p, v in per_layer.items()}


def our_trajectory(tiny_dir, folder, steps, grad_cache, warmup=WARMUP):
    model = load(tiny_dir, progress=False)
    load_peft_adapter(model, folder, dropout=0.0)
    stacks = find_stacks(model)
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
    key = jax.random.key(0)

    def step_and_grads(p, r, o):  # the step, and the gradients it was given (for the table)
        grads = loss_and_grads(graphdef, p, r, batch, consts, cfg, key)[1]
        return *train_step(graphdef, p, r, o, batch, consts, key, tx=tx, cfg=cfg), grads

    step = jax.jit(step_and_grads)  # rest as an argument: as a constant, XLA folds its transposes slowly
    name_map = backbone_of(model.config.model_type).name_map
    out = []
    for _ in range(steps):
        params, opt_state, metrics, grads = step(params, rest, opt_state)
        out.append((float(metrics["loss"]), float(metrics["grad_norm"]), our_weights(params, name_map, stacks),
                    our_weights(grads, name_map, stacks)))  # fmt: skip
    return out


def max_relative(ours: dict, ref: dict, where: dict | None = None) -> float:
    """max over adapter tensors of max |ours - torch| / max |torch| (over the elements ``where`` is true)."""
    assert sorted(ours) == sorted(ref)
    diff = {k: np.abs(ours[k] - ref[k]) if where is None else np.abs(ours[k] - ref[k])[where[k]] for k in ref}
    return max(float(diff[k].max(initial=0.0) / np.abs(ref[k]).max()) for k in ref)


def clipped_peak(peak: dict | None, grads: dict, norm: float) -> dict:
    """The largest |gradient| of each element so far, clipped as clip_grad_norm_ clips it. Where it is
    below 100 eps, Adam's step (~ lr * m / (sqrt(v) + eps), with v of the order of that peak squared)
    is set by float32 rounding; elsewhere a gradient error dg moves it by at most ~ lr * eps * dg / g^2."""
    scale = min(1.0, MAX_NORM / (norm + 1e-6))
    now = {k: np.abs(g) * scale for k, g in grads.items()}
    return now if peak is None else {k: np.maximum(peak[k], v) for k, v in now.items()}


def compare(label, ours, ref):
    """Prints the table; every step within the tolerances, and the adapters moved well beyond them."""
    initial, ref = ref
    print(
        f"\n[trajectory] {label}\n"
        "| step | loss ours | loss torch | grad norm ours / torch | grad max rel diff | adapter max rel diff "
        "| sign set by rounding | moved (rel) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows, peak = [], None
    for i, ((lo, no, wo, go), (lt, nt, wt, gt)) in enumerate(zip(ours, ref), start=1):
        grad_rel = max_relative(go, gt)
        peak = clipped_peak(peak, gt, nt)
        unset = {k: v < 100 * ADAM_EPS for k, v in peak.items()}
        rel = max_relative(wo, wt, {k: ~m for k, m in unset.items()})
        unset_diff = max(float(np.abs(wo[k] - wt[k])[m].max(initial=0.0)) for k, m in unset.items())
        n_unset, n_all = sum(int(m.sum()) for m in unset.values()), sum(m.size for m in unset.values())
        moved = max_relative(wt, initial)
        print(f"| {i} | {lo:.7f} | {lt:.7f} | {no:.5f} / {nt:.5f} | {grad_rel:.2e} | {rel:.2e} "
              f"| {n_unset} of {n_all} | {moved:.2e} |")  # fmt: skip
        rows.append((abs(lo - lt), abs(no - nt) / nt, grad_rel, rel, unset_diff / i, n_unset / n_all))
    for loss_diff, norm_rel, grad_rel, weight_rel, unset_diff_per_step, unset_share in rows:
        assert loss_diff <= LOSS_TOL
        assert norm_rel <= GRAD_NORM_RTOL
        assert grad_rel <= GRAD_RTOL
        assert weight_rel <= WEIGHT_RTOL
        # Few elements (their gradients are checked above like all others), at most 2 lr a step apart.
        assert unset_share <= 1e-2 and unset_diff_per_step <= 2 * LR
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
def test_one_step_at_2b_widths(tmp_path):
    """Qwen2-VL-2B's widths (2 decoder layers, 1 vision block, the tiny tokenizer's vocabulary), DoRA,
    GradCache, one step without warm-up: loss, gradient norm and updated adapters as torch's."""
    from g2e_jax.models.common.hf_files import special_token_ids
    from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig
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
