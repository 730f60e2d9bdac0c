"""Embedder: prompt segments, jitted templating + pooling, buckets, truncation, official-pipeline parity."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import report
from g2e_jax import Embedder
from g2e_jax.embed import InputError
from g2e_jax.prompts import get_prompt


def random_image(height, width, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def embedder(tiny_dir):
    return Embedder.from_pretrained(tiny_dir, dtype="float32", batch_size=4, max_len=256, progress=False)


QUERIES = [
    "<|image_1|> Represent the given image with the following question: What is in the image?",
    "Find a caption for the news in the given photo.",
    "  leading and trailing spaces \n",
    "unicodé 日本語 🙂\ttabs",
    '<|image_1|>\nSelect the portion of the image that isolates the object labeled as "dog"',
]
IMAGES = [random_image(56, 84, 1), None, None, None, random_image(112, 56, 2)]


@pytest.mark.parametrize("scheme", ["gen2embed", "mrope"])
@pytest.mark.parametrize("role", ["query", "document"])
def test_matches_official_pipeline(tiny_dir, embedder, scheme, role):
    torch = pytest.importorskip("torch")
    from hf_reference import OFFICIAL_SYSTEM, load_hf_model, official_embeddings, official_template

    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    hf_model, processor = load_hf_model(tiny_dir), load_hf_processor(tiny_dir)
    strings = [
        official_template(t, has_image=im is not None, role=role, system=OFFICIAL_SYSTEM, scheme=scheme)
        for t, im in zip(QUERIES, IMAGES)
    ]
    ref = official_embeddings(hf_model, processor, strings, IMAGES, scheme=scheme)
    ours = embedder.with_prompt(scheme=scheme).encode(QUERIES, IMAGES, role=role)
    cosine = (ref * ours).sum(-1)
    report(f"Embedder vs official pipeline ({role}, {scheme}, text + image rows)", min_cosine=float(cosine.min()),
           one_minus_min_cosine=float(1 - cosine.min()))  # fmt: skip
    assert ours.dtype == np.float32 and ours.shape == (len(QUERIES), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert cosine.min() >= 0.99999
    del torch


@pytest.mark.parametrize("role", ["query", "document"])
@pytest.mark.parametrize("scheme", ["gen2embed", "mrope"])
def test_segments_equal_whole_string_tokenisation(tiny_dir, embedder, role, scheme):
    pytest.importorskip("transformers")
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    processor = load_hf_processor(tiny_dir)
    emb = embedder.with_prompt(scheme=scheme)
    cases = QUERIES + ["", " ", "\n\nstarts with newlines", "ends with newlines\n\n", "x" * 50 + " y"]
    images = IMAGES + [random_image(28, 28, 3), random_image(28, 56, 4), None, None, None]
    instructions = [None, "Retrieve the news photo", "", None, "Instruction: ", None, None, None, None, "Q"]
    for text, image, inst in zip(cases, images, instructions):
        (row,) = emb.preprocessor.prepare([text], [image], role=role, instruction=inst)
        ids = np.concatenate([emb.preprocessor.system_ids(role), row.user_ids, emb.preprocessor.header_ids])
        user = emb.prompt.user_text(role, text, has_image=image is not None, instruction=inst)
        whole = processor(
            text=[emb.prompt.render(role, user)], images=[image] if image else None, return_tensors="np"
        )
        np.testing.assert_array_equal(ids, whole["input_ids"][0], err_msg=repr((text, inst)))


def test_hierarchical_template_string():
    p = get_prompt("hierarchical")
    user = p.user_text("query", "<|image_1|> What is it?", has_image=True, instruction=None)
    assert p.render("query", user) == (
        "<|im_start|>system\nGiven an image, summarize the provided image in one word. "
        "Given only text, describe the text in one word.<|im_end|>\n<|im_start|>user\n"
        "<|image_pad|> What is it?\nRepresent the given text/image in one word.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert p.render("document", p.user_text("document", "a dog", has_image=False)).endswith(
        "user\na dog<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = get_prompt("plain")
    assert plain.render("query", plain.user_text("query", "a dog", has_image=False)) == (
        "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n"
    )
    assert p.template_role("document", subset="RefCOCO-Matching") == "query"
    assert p.template_role("document", subset="RefCOCO") == "document"
    mrope = p.replace(scheme="mrope").user_text("document", "x", has_image=True)
    assert mrope == "<|vision_start|><|image_pad|><|vision_end|>x"


def test_input_order_and_batching_do_not_change_embeddings(embedder):
    texts = [f"row {i} " + "word " * (i * 7 % 40) for i in range(11)]
    images = [random_image(28 * (1 + i % 3), 56, i) if i % 4 == 0 else None for i in range(11)]
    together = embedder.encode(texts, images, role="query")
    alone = np.concatenate([embedder.encode([t], [im], role="query") for t, im in zip(texts, images)])
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_mixed_lengths_compile_a_handful_of_programs(tiny_dir):
    emb = Embedder.from_pretrained(tiny_dir, batch_size=8, max_len=512, progress=False)
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.integers(1, 300, 200)]
    out = emb.encode(texts, role="document")
    report("compiled programs for 200 mixed-length rows", programs=len(emb.traces))
    assert out.shape == (200, emb.dim) and np.isfinite(out).all()
    # Log-spaced buckets: rows of 4..~310 user tokens use 7 of 8, 16, 32, 64, 128, 192, 256, 384.
    assert len(emb.traces) <= 7


def test_changing_the_system_prompt_does_not_retokenise(embedder):
    texts = [f"document number {i}" for i in range(6)]
    embedder.encode(texts, role="document")
    calls = []
    original = embedder.preprocessor.tokenizer.encode
    embedder.preprocessor.tokenizer.encode = lambda text: calls.append(text) or original(text)
    try:
        other = embedder.with_prompt(document_system="Describe the text in one word.")
        a = embedder.encode(texts, role="document")
        b = other.encode(texts, role="document")
    finally:
        del embedder.preprocessor.tokenizer.encode
    assert calls == [other.prompt.system_segment("document")]
    assert not np.allclose(a, b)


def test_truncation_keeps_the_template_tail_and_the_image(embedder):
    long_text = "<|image_1|> " + "many words here " * 200
    image = random_image(56, 56, 5)
    with pytest.warns(UserWarning, match=r"1 of 2 query rows exceeded max_len=256 and were truncated"):
        rows = embedder.preprocessor.prepare([long_text, "short"], [image, None], role="query")
    row = rows[0]
    total = (
        len(embedder.preprocessor.system_ids("query"))
        + len(row.user_ids)
        + len(embedder.preprocessor.header_ids)
    )
    assert total <= 256 and row.truncated_from > 256
    suffix = embedder.preprocessor.tokenizer.encode("\nRepresent the given text/image in one word.")
    assert (row.user_ids[-len(suffix) :] == suffix).all()
    assert (row.user_ids == embedder.preprocessor.image_pad_id).sum() == 4  # 56x56 -> 2x2 merged tokens
    with pytest.warns(UserWarning, match="1 of 1 query rows"):
        emb = embedder.encode([long_text], [image], role="query")
    assert np.isfinite(emb).all()


def test_image_that_cannot_fit_is_a_clear_error(tiny_dir):
    small = Embedder.from_pretrained(tiny_dir, max_len=60, progress=False)
    with pytest.raises(InputError, match=r"row 0, field 'image': .*does not fit in max_len=60"):
        small.encode(["<|image_1|>"], [random_image(224, 224, 0)])


def test_bad_rows_name_row_and_field(embedder):
    with pytest.raises(InputError, match=r"row 1, field 'text': empty text and no image"):
        embedder.encode(["fine", "   "])
    with pytest.raises(InputError, match=r"row 0, field 'text': expected a string, got int"):
        embedder.encode([3])
    with pytest.raises(InputError, match=r"row 0, field 'text': .*marker but no image"):
        embedder.encode(["<|image_1|> what?"])
    with pytest.raises(InputError, match=r"row 1, field 'image': .*"):
        embedder.encode(["a", "b"], [None, "/nonexistent/image.png"])
    rows = embedder.preprocessor.prepare(["ok", ""], errors="collect")
    assert isinstance(rows[1], InputError) and rows[1].row == 1
    with pytest.raises(ValueError, match="unknown role"):
        embedder.encode(["a"], role="candidate")


@pytest.mark.parametrize("scheme", ["gen2embed", "mrope"])
def test_prefix_cache_gives_the_same_embeddings(embedder, scheme):
    """The system segment's keys and values computed once equal running it in every row (DESIGN.md: 1e-5)."""
    cached = embedder.with_prompt(scheme=scheme)
    assert cached.prefix_cache
    uncached = cached.with_prompt()
    uncached.prefix_cache = False
    texts = QUERIES + ["a dog", "word " * 30]
    images = IMAGES + [None, random_image(56, 28, 7)]
    for prompt in ("hierarchical", "plain"):
        for role in ("query", "document"):
            on = cached.with_prompt(prompt, scheme=scheme)
            off = uncached.with_prompt(prompt, scheme=scheme)
            assert (on.system_prefix(role) is None) == (len(on.preprocessor.system_ids(role)) == 0)
            a, b = on.encode(texts, images, role=role), off.encode(texts, images, role=role)
            diff = float(np.abs(a - b).max())
            report(f"prefix cache vs none ({prompt}, {role}, {scheme})", max_abs_diff=diff)
            assert diff <= 1e-5
    assert len(cached._prefixes) >= 2  # one per distinct system segment, reused across calls


def test_bfloat16_embedder_sends_bf16_pixels_and_stays_close(tiny_dir, embedder):
    import jax.numpy as jnp

    from g2e_jax.models.dtypes import resolve_dtype

    assert Embedder.from_pretrained(tiny_dir, progress=False).dtype == resolve_dtype("auto")  # float32 on CPU
    emb16 = Embedder.from_pretrained(tiny_dir, dtype="bfloat16", batch_size=4, max_len=256, progress=False)
    rows = emb16.preprocessor.prepare(QUERIES, IMAGES, role="query")
    with_image = [r for r in rows if r.patches is not None]
    arrays = {k: v[0] for k, v in emb16._collate(with_image, 200)["arrays"].items() if v is not None}
    assert arrays["pixel_values"].dtype == jnp.bfloat16  # half the host->device bytes
    assert arrays["image_grid_thw"].shape[0] == len(with_image) <= 2  # slots: images rounded up to 2**k
    cosine = (emb16.encode(QUERIES, IMAGES) * embedder.encode(QUERIES, IMAGES)).sum(-1)
    report("bfloat16 Embedder vs float32 (tiny, CPU)", min_cosine=float(cosine.min()))
    assert cosine.min() > 0.99


def test_a_single_row_runs_one_row_not_a_full_batch(tiny_dir):
    emb = Embedder.from_pretrained(tiny_dir, batch_size=8, max_len=256, progress=False)
    one = emb.encode(["a single query"], role="query")
    three = emb.encode(["a single query", "b", "c"], role="query")
    assert [t[1][0] for t in emb.traces] == [1, 4]  # rows of each compiled program: 1, then 3 -> 4
    np.testing.assert_allclose(one[0], three[0], atol=2e-6)


def test_the_encode_program_is_compiled_and_checked_before_the_first_batch(tiny_dir, embedder, capsys):
    """With a device limit known, the program of a full batch of the longest text rows is compiled and
    its memory checked before any row is encoded: a device too small is an error naming what the
    program needs and the mesh change, raised before the first batch (whose missing image would
    otherwise be the error); a device big enough reports the program and encodes as before."""
    small = Embedder.from_pretrained(
        tiny_dir, dtype="float32", batch_size=4, max_len=64, progress=False, device_memory_gb=1e-6
    )
    needs = r"the encode program needs [\d.]+ [KM]iB per device \(arguments "
    with pytest.raises(ValueError, match=needs) as e:
        small.encode(["a", "b"], [None, "/nonexistent/image.png"])
    advice = (
        "one device holds the whole program" if small.mesh.size == 1 else "shard the weights over the devices"
    )
    assert f"but a device holds 1.05 KiB (device_memory_gb): {advice}" in str(e.value)
    n_sys = len(small.preprocessor.system_ids("query"))
    largest = 64 - n_sys - len(small.preprocessor.header_ids)
    assert small.traces == [((n_sys,), (4, largest), None)]  # the largest text program, no batch's

    big = Embedder.from_pretrained(
        tiny_dir, dtype="float32", batch_size=4, max_len=256, progress=False, device_memory_gb=100
    )
    texts = ["Find a caption for the news in the given photo.", "a"]
    np.testing.assert_allclose(big.encode(texts), embedder.encode(texts), atol=1e-6)
    said = capsys.readouterr().err
    assert "encode program: " in said and "per device of 100.00 GiB (device_memory_gb)" in said
    assert "(a full batch of 256-token text rows)" in said
    assert len(big.traces) == 2  # the largest text program ahead, then the batch's bucket


MIXED_IMAGES = [random_image(112, 112, 10), random_image(28, 28, 11), random_image(56, 168, 12),
                random_image(84, 56, 13), random_image(168, 112, 14)]  # fmt: skip


@pytest.mark.parametrize("block", [None, 8])
def test_mixed_image_sizes_equal_each_image_alone(tiny_dir, monkeypatch, block):
    """One batch of five images of 4 to 96 patches gives each image's embedding alone (1e-5), and
    the official pipeline's (transformers, cosine >= 0.99999); with 8-row query blocks every image
    but the smallest spans several blocks, and blocks end inside images (4, 24, 48, 64, 96 patches)."""
    pytest.importorskip("torch")
    from hf_reference import OFFICIAL_SYSTEM, load_hf_model, official_embeddings, official_template

    from g2e_jax.models.qwen2_vl import vision
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    if block is not None:
        monkeypatch.setattr(vision, "VISION_QUERY_BLOCK", block)
    emb = Embedder.from_pretrained(tiny_dir, dtype="float32", batch_size=8, max_len=256, progress=False)
    texts = ["<|image_1|> what is shown?"] * len(MIXED_IMAGES)
    together = emb.encode(texts, MIXED_IMAGES, role="query")
    alone = np.concatenate([emb.encode([t], [im], role="query") for t, im in zip(texts, MIXED_IMAGES)])
    strings = [official_template(t, has_image=True, role="query", system=OFFICIAL_SYSTEM, scheme="gen2embed")
               for t in texts]  # fmt: skip
    ref = official_embeddings(load_hf_model(tiny_dir), load_hf_processor(tiny_dir), strings, MIXED_IMAGES,
                              scheme="gen2embed")  # fmt: skip
    cosine = (ref * together).sum(-1)
    report(f"mixed image sizes together vs alone and vs transformers (block {block})",
           max_abs=float(np.abs(together - alone).max()), min_cosine=float(cosine.min()))  # fmt: skip
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert cosine.min() >= 0.99999


def _host_of(monkeypatch, nbytes: int) -> None:
    from g2e_jax import aot

    monkeypatch.setattr(aot, "host_memory_bytes", lambda: nbytes)


def test_a_batch_too_large_for_the_host_is_split_before_it_runs(tiny_dir, monkeypatch):
    """On CPU the host's memory is the limit: a batch whose program would not fit is compiled, refused
    and encoded as two halves, with the embeddings of an unlimited run."""
    texts = ["<|image_1|> what is shown?"] * 4
    images = [random_image(224, 224, 20), random_image(56, 84, 21), random_image(112, 112, 22),
              random_image(28, 56, 23)]  # fmt: skip
    free = Embedder.from_pretrained(tiny_dir, dtype="float32", batch_size=4, max_len=256, progress=False)
    assert free._encode.limit_source.startswith("this host's memory")
    want = free.encode(texts, images, role="query")
    (need,) = [m["total"] for m in free._encode.memory.values()]
    _host_of(monkeypatch, need - 1)
    tight = Embedder.from_pretrained(tiny_dir, dtype="float32", batch_size=4, max_len=256, progress=False)
    got = tight.encode(texts, images, role="query")
    np.testing.assert_allclose(got, want, atol=2e-6)
    kept = [tight._encode.memory[k]["total"] for k in tight._encode.executables]
    assert len(kept) == 2 and max(kept) < need  # one program per half (their patch buckets differ)
    assert [t[1][0] for t in tight.traces] == [4, 2, 2]  # the refused 4-row program, then two halves


def test_an_image_too_large_for_the_host_fails_before_it_runs(tiny_dir, monkeypatch):
    """A single row whose program cannot fit is an error naming the row, its image and the setting to
    change (not an allocation failure from inside the device program)."""
    _host_of(monkeypatch, 2 << 20)
    emb = Embedder.from_pretrained(tiny_dir, dtype="float32", batch_size=4, max_len=256, progress=False)
    with pytest.raises(ValueError) as e:
        emb.encode(["a text row", "<|image_1|> what is shown?"], [None, random_image(224, 224, 30)])
    said = str(e.value)
    assert said.startswith("row 1: its image (224x224 pixels after resizing, 256 patches) makes a one-row ")
    assert "more than the 2.00 MiB a device holds (this host's memory; set device_memory_gb to change)" in said
    assert "image_resolution" in said
