"""`g2e-jax compare`: live mode against transformers, offline mode on official-format files, clusters."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from backbones import archs

from g2e_jax.cli import main

# The paper's system prompt, written out here: a reference never borrows constants from the code under test.
SYSTEM = "Given an image, summarize the provided image in one word. Given only text, describe the text in one word."
# The backbones whose transformers reference compare knows (tests/backbones.py).
ARCHS = archs("compare")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from g2e_jax.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), eval_queries=4, num_candidates=4)


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, tiny_models):
    return tiny_models(request.param, seed=3)


def _image(path, size, seed):
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    _image(folder / "a.png", (56, 84), 1)
    _image(folder / "b.png", (112, 56), 2)
    rows = [
        {"id": "t1", "text": "a red car parked by the sea"},
        {
            "id": "i1",
            "text": "<|image_1|> Represent the given image with the following question: what is it?",
            "image": "a.png",
        },
        {"id": "t2", "text": "unicodé 日本語 🙂\ttabs"},
        {"id": "i2", "text": "a photo of a dog", "image": "b.png"},  # no marker: the image goes first
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(args, capsys=None) -> tuple[int, dict | None]:
    rc = main(args)
    out = Path(args[args.index("--output") + 1]) / "compare.json"
    return rc, json.loads(out.read_text()) if out.exists() else None


# --- live mode ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_live_mmeb_subsets_match_pytorch(model_dir, synthetic, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    rc, r = _run(
        [
            "compare",
            f"--config.model.path={model_dir}",
            "--config.model.dtype=float32",
            f"--config.data.root={synthetic / 'eval'}",
            f"--config.data.image_dir={synthetic / 'images'}",
            "--config.data.subsets=('SynI2T', 'SynGround-Matching')",
            "--config.limit=3",
            "--config.timing_repeats=1",
            "--output",
            str(out),
            "--fail-below",
            "0.99999",
        ]
    )
    assert rc == 0
    print(f"\n[compare] {Path(model_dir).parent.name}: min cosine {r['min_cosine']!r} over {r['rows']} rows")
    assert r["mode"] == "live" and r["min_cosine"] >= 0.99999 and r["passed"]
    # image queries and text candidates, both templates (Matching candidates use the query one)
    assert set(r["subsets"]) == {"SynI2T", "SynGround-Matching"}
    for s in r["subsets"].values():
        assert s["queries"] == 3 and s["top1_disagreements"] == 0
        assert s["official_precision_at_1"] == s["g2e_jax_precision_at_1"]
    assert r["rows"] == sum(s["rows"] for s in r["subsets"].values()) > 6
    for side in ("official", "g2e_jax"):
        info = r["sides"][side]
        assert info["dtype"] == "float32" and info["device"].startswith("cpu") and info["rows_per_s"] > 0
    assert (out / "compare.png").stat().st_size > 0
    md = (out / "compare.md").read_text()
    assert "| SynGround-Matching |" in md and "PASS" in md


@pytest.mark.slow
def test_live_jsonl_rows_and_the_fail_below_gate(tiny_dir, rows_file, tmp_path, monkeypatch, capsys):
    """Text and image rows agree; weights that differ from what g2e_jax loads are caught."""
    pytest.importorskip("torch")
    args = [
        "compare",
        f"--config.model.path={tiny_dir}",
        "--config.model.dtype=float32",
        "--input",
        str(rows_file),
        "--role",
        "query",
        "--fail-below",
        "0.99999",
    ]
    rc, r = _run([*args, "--output", str(tmp_path / "same")])
    assert rc == 0 and r["rows"] == 4 and r["min_cosine"] >= 0.99999
    assert {w["id"] for w in r["worst"]} == {"t1", "t2", "i1", "i2"}
    per_row = [json.loads(line) for line in (tmp_path / "same" / "rows.jsonl").read_text().splitlines()]
    assert [p["id"] for p in per_row] == ["t1", "i1", "t2", "i2"] and min(
        p["cosine"] for p in per_row
    ) >= 0.99999

    # g2e_jax now holds one edited tensor (the final norm), transformers the file's
    from g2e_jax.embed import Embedder

    original = Embedder.__init__

    def edited(self, model, *a, **kw):
        model.text.norm.scale[...] = model.text.norm.scale[...].at[0].multiply(4.0)
        original(self, model, *a, **kw)

    monkeypatch.setattr(Embedder, "__init__", edited)
    rc, r = _run([*args, "--output", str(tmp_path / "edited")])
    assert rc == 1 and not r["passed"] and r["failed_rows"] == 4 and r["min_cosine"] < 0.999
    assert "rows below --fail-below 0.99999" in capsys.readouterr().err
    assert "FAIL" in (tmp_path / "edited" / "compare.md").read_text()


def test_live_mode_without_torch_names_the_install_command(
    tiny_dir, rows_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    rc = main(
        [
            "compare",
            f"--config.model.path={tiny_dir}",
            "--input",
            str(rows_file),
            "--role",
            "query",
            "--output",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert 'pip install -e ".[torch]"' in capsys.readouterr().err


def test_reference_strings_are_the_official_ones():
    """The compare reference and the tests' reference build the same strings, independently."""
    from hf_reference import official_template

    from g2e_jax.compare.reference import OfficialPrompt

    prompt = OfficialPrompt()
    for text, image in [("a cat", False), ("<|image_1|> Represent the image.", True), ("x\ny", False)]:
        for role in ("query", "document"):
            for scheme in ("gen2embed", "mrope"):
                ours = OfficialPrompt(scheme=scheme).string(text, image, query_template=role == "query")
                assert ours == official_template(
                    text, has_image=image, role=role, system=SYSTEM, scheme=scheme
                )
    assert prompt.uses_query_template("document", "RefCOCO-Matching")
    assert not prompt.uses_query_template("document", "RefCOCO")


# --- offline mode ---------------------------------------------------------------------------------------


def _write_official(model_dir, root, image_dir, subsets, out: Path) -> dict:
    """What cli/evaluate.py writes, computed with the transformers reference (float32 here)."""
    from hf_reference import load_hf_model, official_embeddings, official_template
    from PIL import Image

    from g2e_jax.data.mmeb import load_split
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    hf, processor = load_hf_model(model_dir), load_hf_processor(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    accs = {}
    for subset in subsets:
        ds, _ = load_split(root, subset, "test")
        pairs = {"qry": {}, "tgt": {}}
        for row in ds:
            pairs["qry"].setdefault((row["qry_text"], row["qry_img_path"]), None)
            for key in zip(row["tgt_text"], row["tgt_img_path"]):
                pairs["tgt"].setdefault(key, None)
        vecs = {}
        for side, keys in pairs.items():
            keys = list(keys)[::-1]  # any order: the official one is a set's
            role = "query" if side == "qry" or "matching" in subset.lower() else "document"
            strings = [
                official_template(t, has_image=bool(p), role=role, system=SYSTEM, scheme="gen2embed")
                for t, p in keys
            ]
            images = [Image.open(Path(image_dir) / p).convert("RGB") if p else None for t, p in keys]
            emb = official_embeddings(hf, processor, strings, images, scheme="gen2embed")
            with open(out / f"{subset}_{side}", "wb") as f:
                pickle.dump((emb.astype(np.float32), [{"text": t, "img_path": p} for t, p in keys]), f)
            vecs[side] = dict(zip(keys, emb))
        correct = 0
        for row in ds:
            q = vecs["qry"][(row["qry_text"], row["qry_img_path"])]
            scores = [vecs["tgt"][k] @ q for k in zip(row["tgt_text"], row["tgt_img_path"])]
            correct += int(np.argmax(scores) == 0)
        accs[subset] = correct / len(ds)
        (out / f"{subset}_score.json").write_text(
            json.dumps({"acc": accs[subset], "num_correct": correct, "num_pred": len(ds)}, indent=4)
        )
    return accs


# Runs the command in a fresh interpreter where torch cannot be found (as if it were not installed).
NO_TORCH = """
import importlib.util, sys

class NoTorch:
    def __init__(self, finder):
        self.finder = finder

    def __getattr__(self, name):
        return getattr(self.finder, name)

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return self.finder.find_spec(name, path, target)

sys.meta_path = [NoTorch(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
assert importlib.util.find_spec("torch") is None
from g2e_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_without_torch(args) -> tuple[int, dict | None, str]:
    import os
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parents[1]), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = Path(args[args.index("--output") + 1]) / "compare.json"
    return proc.returncode, json.loads(out.read_text()) if out.exists() else None, proc.stderr


@pytest.mark.slow
def test_offline_mode_on_official_files_needs_no_torch(model_dir, synthetic, tmp_path):
    pytest.importorskip("torch")
    subsets = ["SynShape", "SynGround-Matching"]
    root, images = synthetic / "eval", synthetic / "images"
    accs = _write_official(model_dir, root, images, subsets, tmp_path / "official")
    rc, r, err = _run_without_torch(
        [
            "compare",
            f"--config.model.path={model_dir}",
            "--config.model.dtype=float32",
            f"--config.data.root={root}",
            f"--config.data.image_dir={images}",
            "--official-dir",
            str(tmp_path / "official"),
            "--output",
            str(tmp_path / "out"),
            "--fail-below",
            "0.99999",
        ]
    )
    assert rc == 0, err[-3000:]
    assert r["mode"] == "offline"
    print(
        f"\n[compare offline] {Path(model_dir).parent.name}: min cosine {r['min_cosine']!r} over {r['rows']} rows"
    )
    assert r["min_cosine"] >= 0.99999
    for subset in subsets:
        s = r["subsets"][subset]
        assert s["official_precision_at_1"] == pytest.approx(accs[subset]) == s["official_score_json_acc"]
        assert s["g2e_jax_precision_at_1"] == s["official_precision_at_1"] and s["top1_disagreements"] == 0
    assert r["sides"]["g2e_jax"]["rows_per_s"] > 0
    # The same flags as `g2e-jax eval`: data.groups_file names the subsets when data.subsets is empty.
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"SynShape": {"category": "Classification", "split": "IND"}}))
    rc, r, err = _run_without_torch(
        ["compare", f"--config.model.path={model_dir}", "--config.model.dtype=float32",
         f"--config.data.root={root}", f"--config.data.image_dir={images}", f"--config.data.groups_file={groups}",
         "--official-dir", str(tmp_path / "official"), "--output", str(tmp_path / "out_groups")]
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    assert list(r["subsets"]) == ["SynShape"]


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_offline_files_with_problems_are_named(tiny_dir, tmp_path):
    d = tmp_path / "official"
    d.mkdir()
    emb = np.eye(2, 8, dtype=np.float32)
    _pickle(d / "S_qry", (emb, [{"text": "a", "img_path": ""}, {"text": "b"}]))
    _pickle(d / "S_tgt", (emb, [{"text": "a", "img_path": ""}, {"text": "b", "img_path": ""}]))
    args = [
        "compare",
        f"--config.model.path={tiny_dir}",
        "--official-dir",
        str(d),
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(ValueError, match=r"S_qry: row 1 must be a dict with string fields"):
        from g2e_jax.compare import compare_config, run_compare

        run_compare(compare_config(), tmp_path / "o", official_dir=d)
    assert main(args) == 2  # the CLI prints it as an error
    _pickle(d / "S_qry", (emb, [{"text": "a", "img_path": "missing.png"}, {"text": "b", "img_path": ""}]))
    with pytest.raises(ValueError, match=r"S_qry row 0: image 'missing.png' is relative"):
        run_compare(compare_config(), tmp_path / "o", official_dir=d)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    _pickle(d / "S_qry", (emb, [Evil(), {"text": "b", "img_path": ""}]))
    with pytest.raises(ValueError, match=r"refusing to load builtins.print"):
        run_compare(compare_config(), tmp_path / "o", official_dir=d)


# --- SaHa clusters ----------------------------------------------------------------------------------------


def _row(q):
    return {"qry": q, "qry_image_path": f"{q}.png", "pos_text": f"pos {q}", "pos_image_path": ""}


def test_clusters_against_sample_mmeb_output(tmp_path):
    official, ours = tmp_path / "official", tmp_path / "mine"
    official.mkdir()
    (ours / "S").mkdir(parents=True)
    anchors = [
        {**_row("a"), "neg_samples": [_row("b"), _row("c")]},
        {**_row("d"), "neg_samples": [_row("e")]},
    ]
    (official / "S_hard_negatives.json").write_text(json.dumps(anchors, indent=4))
    mine = [
        {**_row("a"), "neg_samples": [_row("c"), _row("b")], "phase": 1},  # same set, other order
        {**_row("d"), "neg_samples": [_row("f")], "phase": 1},  # {d,e} vs {d,f}: Jaccard 1/3
        {**_row("g"), "neg_samples": [], "phase": 2},
    ]
    (ours / "S" / "original.jsonl").write_text("".join(json.dumps(m) + "\n" for m in mine))
    rc, r = _run(
        [
            "compare",
            "--official-clusters",
            str(official),
            "--clusters",
            str(ours),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0 and r["mode"] == "clusters"
    assert r["clusters"]["S"] == {
        "official_clusters": 2,
        "g2e_jax_clusters": 3,
        "identical_clusters": 1,
        "same_anchor": 2,
        "mean_jaccard_same_anchor": pytest.approx((1 + 1 / 3) / 2),
        "mean_best_jaccard": pytest.approx((1 + 1 / 3) / 2),
    }
    assert "| S | 2 | 3 | 1 | 2 | 0.667 | 0.667 |" in (tmp_path / "out" / "compare.md").read_text()


# --- PEFT adapters ------------------------------------------------------------------------------------------


def _peft_adapter(model_dir, out):
    """A LoRA adapter with non-zero weights on the language model's q/v projections, PEFT format."""
    import torch
    from hf_reference import load_hf_model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(
        load_hf_model(model_dir),
        LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False, target_modules=r".*language_model.*\.(q_proj|v_proj)"
        ),
    )
    peft.save_pretrained(out)
    return out


@pytest.mark.slow
def test_adapter_is_passed_to_g2e_jax_and_applied_by_the_reference(
    tiny_dir, rows_file, tmp_path, monkeypatch
):
    """Wiring: model.adapter reaches Embedder.from_pretrained(adapter=...) and the PyTorch side merges it
    (here g2e_jax is made to ignore it, so the two must disagree)."""
    pytest.importorskip("peft")
    from g2e_jax.embed import Embedder

    adapter = _peft_adapter(tiny_dir, tmp_path / "adapter")
    seen = {}
    original = Embedder.from_pretrained.__func__

    def from_pretrained(cls, path, *, adapter=None, **kw):
        seen["adapter"] = adapter
        return original(cls, path, **kw)

    monkeypatch.setattr(Embedder, "from_pretrained", classmethod(from_pretrained))
    rc, r = _run(
        [
            "compare",
            f"--config.model.path={tiny_dir}",
            "--config.model.dtype=float32",
            f"--config.model.adapter={adapter}",
            "--input",
            str(rows_file),
            "--role",
            "document",
            "--output",
            str(tmp_path / "out"),
            "--fail-below",
            "0.99999",
        ]
    )
    assert seen["adapter"] == str(adapter)
    assert rc == 1 and r["min_cosine"] < 0.9999


@pytest.mark.slow
def test_adapter_parity(tiny_dir, rows_file, tmp_path):
    pytest.importorskip("peft")
    adapter = _peft_adapter(tiny_dir, tmp_path / "adapter")
    rc, r = _run(
        [
            "compare",
            f"--config.model.path={tiny_dir}",
            "--config.model.dtype=float32",
            f"--config.model.adapter={adapter}",
            "--input",
            str(rows_file),
            "--role",
            "query",
            "--output",
            str(tmp_path / "out"),
            "--fail-below",
            "0.99999",
        ]
    )
    assert rc == 0 and r["min_cosine"] >= 0.99999
