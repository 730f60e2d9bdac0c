"""What every backbone of ``models.BACKBONES`` must do, written once (its spec: tests/backbones.py):
make-tiny, dispatch, forward parity with transformers on text and images, checkpoints both ways,
the Embedder against the official Gen2Embed path, parity at a released model's real widths, and a
training run exported to transformers (merged) and PEFT (adapters). Each backbone's own cases
(window attention, tile grids, M-RoPE positions, name maps) stay in its own test files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from backbones import SPECS, archs, encode, random_image
from conftest import assert_parity, real_token_diff, report

from g2e_jax import models
from g2e_jax.cli import main

MIN_COSINE = 0.99999
ATOL = 1e-4


def test_every_backbone_has_a_spec():
    """A backbone added to models.BACKBONES without an entry in tests/backbones.py (or an entry left
    for one removed) fails here instead of silently skipping every test below."""
    assert set(SPECS) == set(models.BACKBONES)


@pytest.fixture(scope="module", params=archs())
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def spec(arch):
    return SPECS[arch]


@pytest.fixture(scope="module")
def model_dir(arch, tiny_models):
    return tiny_models(arch)


@pytest.fixture(scope="module")
def model(model_dir, spec):
    loaded = models.load(model_dir, progress=False)  # dispatched on config.json's model_type
    assert type(loaded).__name__ == spec.model_class
    return loaded


@pytest.fixture(scope="module")
def hf_model(model_dir):
    pytest.importorskip("torch")
    from hf_reference import load_hf_model

    return load_hf_model(model_dir)


@pytest.fixture(scope="module")
def processor(model_dir, spec):
    return spec.load_processor(model_dir)


def test_make_tiny_command_writes_the_shared_model(arch, model_dir, tmp_path):
    """``g2e-jax make-tiny --arch ARCH`` writes, file for file and byte for byte, the model the tests
    share (conftest ``tiny_models``)."""
    assert main(["make-tiny", "--arch", arch, "--output", str(tmp_path / "m")]) == 0
    files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "m") for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert "config.json" in map(str, files)
    for f in files:
        assert (model_dir / f).read_bytes() == (tmp_path / "m" / f).read_bytes(), f


def test_forward_matches_transformers(spec, processor, hf_model, model):
    """Text-only rows (right padding); then a batch of one image, a text-only row, and two images of
    different sizes: final hidden states against transformers' (eager), row by row."""
    text = encode(
        processor, [spec.prompt("a cat"), spec.prompt("Represent the given text in one word. " * 3)]
    )
    assert (text["attention_mask"][0] == 0).any()  # right padding in the first row
    assert_parity(f"{spec.name} text-only, right padding", spec.hf_forward(hf_model, text),
                  spec.forward(model, text), text["attention_mask"])  # fmt: skip
    images = [random_image(56, 56, 1), random_image(84, 112, 2), random_image(140, 84, 3)]
    texts = [spec.prompt(f"{spec.image}first"), spec.prompt("text only row"),
             spec.prompt(f"two: {spec.image} and {spec.image} end")]  # fmt: skip
    batch = encode(processor, texts, images)
    ref, out, mask = spec.hf_forward(hf_model, batch), spec.forward(model, batch), batch["attention_mask"]
    for row, case in enumerate(
        ["one image", "text-only row in an image batch", "two images of different sizes"]
    ):
        assert_parity(f"{spec.name} {case}", ref[row : row + 1], out[row : row + 1], mask[row : row + 1])


def test_transformers_reads_our_save_and_we_read_its_save_exactly(arch, spec, processor, tmp_path):
    """transformers writes a random untied model of the tiny config; we load it (its class, the same
    config), save it sharded, and transformers reads every tensor back bit for bit and computes what we
    compute."""
    torch = pytest.importorskip("torch")
    import transformers

    cls = getattr(transformers, spec.hf_class)
    cfg = models.BACKBONES[arch].tiny_config().replace(tie_word_embeddings=False)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.manual_seed(0)
    hf = cls(transformers.AutoConfig.from_pretrained(tmp_path / "cfg")).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = models.load(tmp_path / "hf", progress=False)
    assert type(ours).__name__ == spec.model_class and ours.config == cfg
    models.save(ours, tmp_path / "ours", max_shard_bytes=200_000, progress=False)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = cls.from_pretrained(tmp_path / "ours", local_files_only=True).eval()
    original, reloaded = hf.state_dict(), back.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name
    batch = encode(
        processor, [spec.prompt(f"{spec.image}round trip"), spec.prompt("text")], [random_image(40, 60, 10)]
    )
    assert_parity(f"{spec.name} saved by g2e_jax, run by transformers", spec.hf_forward(back, batch),
                  spec.forward(ours, batch), batch["attention_mask"])  # fmt: skip


@pytest.fixture(scope="module")
def embedder(model_dir):
    from g2e_jax import Embedder

    return Embedder.from_pretrained(model_dir, dtype="float32", batch_size=4, max_len=512, progress=False)


@pytest.mark.parametrize("role", ["query", "document"])
def test_embedder_matches_official_pipeline(spec, embedder, hf_model, processor, role):
    """``Embedder.from_pretrained`` on the model directory against the official Gen2Embed path (its
    template, the HF processor, transformers, the last real token, L2 normalisation)."""
    texts = ["<|image_1|> What is in the image?", "a red car", "<|image_1|>\nFind the dog.", "two words"]
    images = [random_image(37, 90, 11), None, random_image(50, 50, 12), None]
    ours = embedder.encode(texts, images, role=role)
    ref = spec.official(hf_model, processor, texts, images, role)
    cosine = float((ref * ours).sum(-1).min())
    report(f"{spec.name} Embedder vs official pipeline ({role})", one_minus_min_cosine=1.0 - cosine)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert cosine >= MIN_COSINE


@pytest.mark.slow  # a released model's widths: seconds to minutes on 2 cores
def test_released_widths(arch, spec, tmp_path):
    """One case (an image row and a text row) at a released model's real widths, random weights."""
    pytest.importorskip("torch")
    from hf_reference import load_hf_model

    case = spec.released
    cfg = case.config()
    path = models.make_tiny(tmp_path / "model", arch=arch, seed=1, config=cfg)
    image = random_image(*case.image, 7)
    batch = encode(spec.load_processor(path), [spec.prompt(f"{spec.image}\nRepresent the given image in one word."),
                                               spec.prompt("text only")], [image])  # fmt: skip
    case.check(batch, cfg)
    hf = load_hf_model(path)
    ref = spec.hf_forward(hf, batch)
    del hf
    ours = models.load(path, progress=False)
    assert ours.config == cfg
    assert_parity(case.name, ref, spec.forward(ours, batch), batch["attention_mask"])


@pytest.mark.slow  # a training run (2 steps) and two exports: about a minute on 2 cores
def test_train_then_export_hf(arch, spec, model_dir, processor, synthetic_sets, tmp_path):
    """``train`` (the spec's adapter on the decoder's projections) and ``export-hf``: transformers
    loads the merged export (with the processor files it wrote) and agrees with the trained workdir
    through the official path; the PEFT export, applied by PEFT on transformers' base model, gives the
    merged export's hidden states."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_reference import load_hf_model

    from g2e_jax import Embedder
    from g2e_jax.demo import tiny_training_config
    from g2e_jax.train.trainer import train

    data = synthetic_sets(train_rows=8, eval_queries=1)
    cfg = tiny_training_config()
    cfg.model.path, cfg.data.source = str(model_dir), "mmeb"
    cfg.data.root, cfg.data.image_dir, cfg.data.subsets = (
        str(data / "train"),
        str(data / "images"),
        ("SynShape",),
    )
    cfg.adapter.kind, cfg.train.learning_rate = spec.adapter, 1e-2
    cfg.train.update(steps=2, checkpoint_every=2, log_every=1, warmup_steps=1)
    run = tmp_path / "run"
    last = train(cfg.lock(), run, progress=False)
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert main(["export-hf", "--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 0
    hf = load_hf_model(tmp_path / "hf")
    assert type(hf).__name__ == spec.hf_class
    texts, images = ["<|image_1|> What shape is it?", "a red circle"], [random_image(84, 84, 13), None]
    ref = spec.official(hf, spec.load_processor(tmp_path / "hf"), texts, images, "query")
    ours = Embedder.from_pretrained(run, dtype="float32", progress=False).encode(texts, images, role="query")
    base = Embedder.from_pretrained(model_dir, dtype="float32", progress=False).encode(
        texts, images, role="query"
    )
    cosine = float((ref * ours).sum(-1).min())
    report(
        f"{spec.name} trained run ({spec.adapter}) exported: transformers vs g2e_jax", one_minus_min_cosine=1.0 - cosine
    )
    assert cosine >= MIN_COSINE
    assert not np.allclose(base, ours, atol=1e-3)  # training changed the model
    # The same run as a PEFT folder, applied by PEFT on transformers' base model.
    assert (
        main(["export-hf", "--checkpoint", str(run), "--output", str(tmp_path / "peft"), "--format", "peft"])
        == 0
    )
    adapted = peft.PeftModel.from_pretrained(load_hf_model(model_dir), tmp_path / "peft").eval()
    assert adapted.peft_config["default"].use_dora == (spec.adapter == "dora")
    batch = encode(processor, [spec.prompt(f"{spec.image}\nWhat shape is it?"), spec.prompt("a red circle")],
                   [images[0]])  # fmt: skip
    diff = real_token_diff(spec.hf_forward(hf, batch), spec.hf_forward(adapted.base_model.model, batch),
                           batch["attention_mask"])  # fmt: skip
    report(f"{spec.name} PEFT export applied by PEFT vs merged export", max_abs_diff=diff)
    assert diff <= ATOL
