"""A training workdir written before the layers were stacked (per-layer, "v1" checkpoint layout) still
loads: ``Embedder.from_pretrained(workdir)``, its trainable parameters, ``export-hf`` (merged and peft)
and a resume to step 5 give what they gave on the code that wrote it.

The fixture, ``tests/fixtures/workdir_v1/`` (its README says how it was made and how to use it): a
3-step DoRA run on the tiny Qwen2-VL whose checkpoint names every decoder layer by index
(``text.layers.0.attn.q_proj.lora_a``, in ``params`` and in Adam's moments), and the outputs the old
code produced from it (``expected.npz``, ``expected.json``). ``g2e_jax.checkpoints`` converts such a
checkpoint on restore; these tests hold it to the old outputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import report, run_cli

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests/fixtures/workdir_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
STEP, RESUMED_STEP = EXPECTED["steps"], EXPECTED["resumed_steps"]
# Metrics floats as metrics.jsonl rounds them (6 decimals); the resumed steps run the scanned forward,
# whose float32 sums are ordered differently from the per-layer code's: a few units of the last digit.
METRIC_ATOL = 1e-5
# The resumed parameters (2 Adam steps at lr <= 0.004): the same float32 reordering, about 1 ulp.
# Layers or moments swapped between layers would move them by ~lr.
RESUMED_PARAM_ATOL = 1e-6
# Merged DoRA kernels: the merge runs over the stacked layers (vmapped), rounding some elements
# differently from the per-layer merge (each within ~1 ulp of a float64 merge, checked below); the
# checksums of a [32, 64] tensor then differ by ~1e-6. A misplaced adapter changes them by > 1.
CHECKSUM_ATOL = 1e-5


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The base model the fixture was trained on, remade: ``make-tiny --seed 0``, byte-identical."""
    from g2e_jax.models import make_tiny

    path = make_tiny(tmp_path_factory.mktemp("workdir_v1") / "tiny", seed=0)
    assert _tree_hashes(path) == EXPECTED["tiny_model_sha256"], (
        "make-tiny --seed 0 no longer writes the fixture's base model"
    )
    return path


def _copy(tiny: Path, dest: Path) -> Path:
    """A copy of the fixture's workdir (a resume writes into it) pointed at ``tiny``."""
    shutil.copytree(FIXTURE / "workdir", dest)
    config = json.loads((dest / "config.json").read_text())
    config["model"]["path"] = str(tiny.resolve())
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


@pytest.fixture(scope="module")
def workdir(tiny, tmp_path_factory) -> Path:
    return _copy(tiny, tmp_path_factory.mktemp("workdir_v1") / "workdir")


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURE / "expected.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _rows():
    rows = [json.loads(x) for x in (FIXTURE / "rows/rows.jsonl").read_text().splitlines()]
    return {
        role: ([r["text"] for r in rows if r["role"] == role],
               [None if r["image"] is None else str(FIXTURE / "rows" / r["image"]) for r in rows if r["role"] == role])
        for role in ("query", "document")
    }  # fmt: skip


def _leaf_names(tree) -> list[str]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in leaves]


def _layer_slices(model, prefix: str, expected: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{per-layer name: (expected, the model's slice)} for every ``<prefix>/<per-layer name>`` array."""
    from flax import nnx

    from g2e_jax.adapters.lora import find_stacks
    from g2e_jax.models.name_map import stacked_path

    stacks = find_stacks(model)
    state = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    }
    out = {}
    for key, want in expected.items():
        if key.startswith(prefix + "/"):
            name = key[len(prefix) + 1 :]
            path, stack, layer = stacked_path(name, stacks)
            assert stack is not None, f"{name}: expected a parameter of a stack of layers"
            out[name] = (want, state[path][layer])
    # Every adapter parameter of the model is accounted for: L slices of each stacked one.
    assert len(out) == sum(v.shape[0] for v in state.values()), (sorted(out), sorted(state))
    return out


def test_embedder_matches_the_old_code(workdir, expected):
    from g2e_jax.embed import Embedder

    embedder = Embedder.from_pretrained(workdir, progress=False, **EXPECTED["embed_settings"])
    for role, (texts, images) in _rows().items():
        got = np.asarray(embedder.encode(texts, images, role=role, progress=False))
        want = expected[f"embeddings/{role}"]
        diff = float(np.abs(got - want).max())
        moved = float(np.abs(want - expected[f"base_embeddings/{role}"]).max())
        report(
            f"workdir v1: Embedder {role} embeddings vs the old code's",
            max_abs_diff=diff,
            adapters_moved=moved,
        )
        assert got.shape == want.shape
        assert diff <= 1e-6
        assert moved > 0.05  # the adapters matter: dropping or misplacing them cannot pass


def test_trainable_parameters_are_the_checkpoints_layers(workdir, expected):
    """Each per-layer DoRA parameter of the checkpoint is exactly layer i's slice of the stacked one."""
    from g2e_jax.checkpoints import load_trained

    model, _, _ = load_trained(workdir, merge=False)
    pairs = _layer_slices(model, "trainable", expected)
    assert len(pairs) == 30  # 5 adapted linears x (lora_a, lora_b, magnitude) x 2 layers
    for name, (want, got) in pairs.items():
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def _tensor_checksums(path: Path) -> dict[str, dict]:
    from safetensors.numpy import load_file

    out = {}
    for name, x in sorted(load_file(str(path)).items()):
        flat = x.reshape(-1).astype(np.float64)
        probe = np.random.default_rng(0).standard_normal(flat.size)
        out[name] = {"sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(), "dtype": str(x.dtype),
                     "shape": list(x.shape), "sum": float(flat.sum()), "abs_sum": float(np.abs(flat).sum()),
                     "probe": float(flat @ probe)}  # fmt: skip
    return out


def _export(workdir: Path, out: Path, fmt: str) -> Path:
    proc = run_cli(ROOT, "export-hf", "--checkpoint", str(workdir), "--output", str(out), "--format", fmt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow  # export-hf in a subprocess: the quick tier leaves it out
def test_export_hf_merged_matches_the_old_code(workdir, tiny, expected, tmp_path):
    want = EXPECTED["export_hf"]["merged"]
    out = _export(workdir, tmp_path / "merged", "merged")
    files = _tree_hashes(out)
    assert sorted(files) == sorted(want["files"])
    for name in files:
        if name != "model.safetensors":  # config, tokenizer, ...: copied
            assert files[name] == want["files"][name], name
    got = _tensor_checksums(out / "model.safetensors")
    assert sorted(got) == sorted(want["tensors"])
    base = _tensor_checksums(tiny / "model.safetensors")
    rounded, worst = [], 0.0
    for name, w in want["tensors"].items():
        g = got[name]
        assert (g["dtype"], g["shape"]) == (w["dtype"], w["shape"]), name
        if g["sha256"] == w["sha256"]:
            continue
        # Only a merged DoRA kernel may differ in its bytes (the merge's rounding), never the base weights.
        assert g["sha256"] != base[name]["sha256"] and w["sha256"] != base[name]["sha256"], name
        rounded.append(name)
        for key in ("sum", "abs_sum", "probe"):
            worst = max(worst, abs(g[key] - w[key]))
            assert abs(g[key] - w[key]) <= CHECKSUM_ATOL, (name, key, g[key], w[key])
    report("workdir v1: export-hf merged vs the old code's", tensors=len(got), rounded_differently=len(rounded),
           max_checksum_diff=worst)  # fmt: skip
    # The merged kernels against a float64 merge of the base weights and the checkpoint's adapters.
    from safetensors.numpy import load_file

    merged, base_w = load_file(str(out / "model.safetensors")), load_file(str(tiny / "model.safetensors"))
    scaling = 64.0 / 8  # alpha / rank (expected.json's train flags: DoRA, configs/tiny.py's rank and alpha)
    for name in [k for k in expected if k.startswith("trainable/") and k.endswith(".lora_a")]:
        layer = name[len("trainable/") : -len(".lora_a")]  # text.layers.<i>.attn.q_proj
        a, b, m = (
            expected[f"trainable/{layer}.{x}"].astype(np.float64) for x in ("lora_a", "lora_b", "magnitude")
        )
        hf = layer.replace("text.layers.", "model.layers.").replace(".attn.", ".self_attn.") + ".weight"
        w = base_w[hf].T.astype(np.float64) + scaling * a @ b
        w = w * (m / np.sqrt((w * w).sum(0)))
        np.testing.assert_allclose(merged[hf].T, w, rtol=0, atol=2e-7, err_msg=hf)


@pytest.mark.slow  # export-hf in a subprocess: the quick tier leaves it out
def test_export_hf_peft_matches_the_old_code(workdir, tiny, tmp_path):
    want = EXPECTED["export_hf"]["peft"]
    out = _export(workdir, tmp_path / "peft", "peft")
    files = _tree_hashes(out)
    assert sorted(files) == sorted(want["files"])
    assert files["adapter_model.safetensors"] == want["files"]["adapter_model.safetensors"]
    assert _tensor_checksums(out / "adapter_model.safetensors") == want["tensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config.pop("base_model_name_or_path")).resolve() == tiny.resolve()
    assert config == {k: v for k, v in want["adapter_config"].items() if k != "base_model_name_or_path"}


@pytest.mark.slow  # make-synthetic + a training run in a subprocess (compiles the step): 15-40 s
def test_resume_matches_the_old_code(tiny, expected, tmp_path):
    from g2e_jax.checkpoints import load_trained, open_manager

    data = tmp_path / "synthetic"
    proc = run_cli(ROOT, "make-synthetic", "--output", str(data), "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = _copy(tiny, tmp_path / "workdir")
    old = _tree_hashes(workdir / "checkpoints" / str(STEP))
    proc = run_cli(
        ROOT, "train", "--config", str(ROOT / "configs/tiny.py"), "--workdir", str(workdir),
        f"--config.model.path={tiny}", f"--config.data.root={data / 'train'}",
        f"--config.data.image_dir={data / 'images'}", *EXPECTED["train_flags"], f"--config.train.steps={RESUMED_STEP}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from the checkpoint at step {STEP}" in proc.stdout + proc.stderr

    # metrics.jsonl: steps 1-3 kept, 4-5 recomputed as the old code did.
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    want_lines = EXPECTED["resumed_metrics"]
    assert [x["step"] for x in lines] == [x["step"] for x in want_lines] == list(range(1, RESUMED_STEP + 1))
    worst = 0.0
    for got, want in zip(lines, want_lines):
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            if isinstance(value, float) and key not in ("lr", "accuracy"):
                worst = max(worst, abs(got[key] - value))
                assert abs(got[key] - value) <= METRIC_ATOL, (got["step"], key, got[key], value)
            else:
                assert got[key] == value, (got["step"], key, got[key], value)

    # The resumed parameters (the converted optimizer moments decide them).
    model, _, _ = load_trained(workdir, merge=False)
    pairs = _layer_slices(model, "resumed_trainable", expected)
    diff = max(float(np.abs(got - want).max()) for want, got in pairs.values())
    moved = max(
        float(np.abs(expected[f"resumed_trainable/{n}"] - expected[f"trainable/{n}"]).max()) for n in pairs
    )
    report("workdir v1: resumed to step 5 vs the old code's", max_param_diff=diff, moved_by_resume=moved,
           max_metric_diff=worst)  # fmt: skip
    for name, (want, got) in pairs.items():
        np.testing.assert_allclose(got, want, rtol=0, atol=RESUMED_PARAM_ATOL, err_msg=name)

    # The old checkpoint is left as it was; the resumed run writes the stacked layout.
    assert _tree_hashes(workdir / "checkpoints" / str(STEP)) == old
    with open_manager(workdir, create=False) as manager:
        assert sorted(manager.all_steps()) == [STEP, RESUMED_STEP]
        names = _leaf_names(manager.item_metadata(RESUMED_STEP)["params"])
    assert "text.layers.attn.q_proj.lora_a" in names and not any(".layers.0." in n for n in names), names


def test_per_layer_names_are_recognised_and_checked():
    """The layout is told from the checkpoint's leaf names: per-layer names of the model's stacked
    leaves (also under an optimizer prefix) are v1, stacked names are not, and a v1 tree with other
    layers than the model's is an error (reported, not taken for an unreadable checkpoint)."""
    from g2e_jax.checkpoints import CheckpointLayoutError, _per_layer_plan

    stacks = {"text.layers": 2}
    target = {"1.0.count": None, "1.0.mu.text.layers.attn.q_proj.lora_a.value": None, "embed.kernel": None}
    v1 = {"1.0.count": None, "1.0.mu.text.layers.0.attn.q_proj.lora_a.value": None,
          "1.0.mu.text.layers.1.attn.q_proj.lora_a.value": None, "embed.kernel": None}  # fmt: skip
    assert _per_layer_plan(v1, target, stacks) == {
        "1.0.count": None,
        "1.0.mu.text.layers.attn.q_proj.lora_a.value": [
            "1.0.mu.text.layers.0.attn.q_proj.lora_a.value", "1.0.mu.text.layers.1.attn.q_proj.lora_a.value"],
        "embed.kernel": None,
    }  # fmt: skip
    assert _per_layer_plan(target, target, stacks) is None  # the stacked layout: restored as it is
    with pytest.raises(CheckpointLayoutError, match="not in the model"):
        _per_layer_plan(v1 | {"1.0.mu.text.layers.2.attn.q_proj.lora_a.value": None}, target, stacks)
    with pytest.raises(CheckpointLayoutError, match="missing"):
        _per_layer_plan({k: v for k, v in v1.items() if ".1." not in k}, target, stacks)
