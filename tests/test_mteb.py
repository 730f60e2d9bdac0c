"""G2EEncoder under mteb: two local tasks from the synthetic set, evaluated end to end on the tiny
model; the encoder's output against Embedder.encode; a missing mteb as a clear error."""

from __future__ import annotations

import importlib
import io
import json
import re
import sys

import numpy as np
import pytest

from g2e_jax.data.synthetic import caption, generate_synthetic

mteb = pytest.importorskip("mteb")  # the `mteb` extra; .ci/run installs it, so CI runs these

from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType
from PIL import Image

from g2e_jax.embed import Embedder
from g2e_jax.integrations.mteb import G2EEncoder

T2I_INSTRUCTION = "Find me an everyday image that matches the given caption: "


def _synthetic():
    return generate_synthetic(seed=0, train_rows=1, eval_queries=4, num_candidates=3, image_size=56)


def _eval_rows(data, subset):
    return [json.loads(line) for line in data.files[f"eval/{subset}/test.jsonl"].decode().splitlines()]


def _image(data, rel):
    return Image.open(io.BytesIO(data.files[f"images/{rel}"])).convert("RGB")


_COMMON = {
    "description": "Local test task built from g2e_jax.data.synthetic (no download).",
    "reference": None,
    "dataset": {"path": "g2e_jax/synthetic", "revision": "seed0"},
    "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"],
    "main_score": "ndcg_at_10",
    "date": None,
    "domains": None,
    "task_subtypes": None,
    "license": None,
    "annotations_creators": None,
    "dialect": None,
    "sample_creation": None,
    "bibtex_citation": None,
}


class SynCaptionRetrieval(AbsTaskRetrieval):
    """Text to text: a SynT2I caption -> descriptions of the candidate scenes."""

    metadata = TaskMetadata(
        name="G2ESynCaptionRetrieval",
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        prompt="Retrieve the description of the scene in the caption",
        **_COMMON,
    )

    def load_data(self, num_proc=None, **kwargs):
        data = _synthetic()
        queries, corpus, relevant = [], {}, {}
        for i, row in enumerate(_eval_rows(data, "SynT2I")):
            queries.append({"id": f"q{i}", "text": row["qry_text"].removeprefix(T2I_INSTRUCTION)})
            for k, rel in enumerate(row["tgt_img_path"]):
                corpus[rel] = f"A picture showing {caption(data.truth[rel])}."
            relevant[f"q{i}"] = {row["tgt_img_path"][0]: 1}
        docs = Dataset.from_list([{"id": k, "text": v, "title": ""} for k, v in corpus.items()])
        split = RetrievalSplitData(
            queries=Dataset.from_list(queries), corpus=docs, relevant_docs=relevant, top_ranked=None
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class SynImageToCaption(AbsTaskRetrieval):
    """Image to text (MIEB's Any2AnyRetrieval): a SynI2T image -> its caption among the candidates."""

    metadata = TaskMetadata(
        name="G2ESynImageToCaption",
        type="Any2AnyRetrieval",
        category="i2t",
        modalities=["image", "text"],
        prompt={"query": "Find an image caption describing the given everyday image."},
        **_COMMON,
    )

    def load_data(self, num_proc=None, **kwargs):
        data = _synthetic()
        rows = _eval_rows(data, "SynI2T")
        texts = sorted({t for row in rows for t in row["tgt_text"]})
        ids = {t: f"d{j}" for j, t in enumerate(texts)}
        queries = Dataset.from_dict(
            {
                "id": [f"q{i}" for i in range(len(rows))],
                "image": [_image(data, r["qry_img_path"]) for r in rows],
            }
        )
        corpus = Dataset.from_dict({"id": [ids[t] for t in texts], "text": texts})
        relevant = {f"q{i}": {ids[r["tgt_text"][0]]: 1} for i, r in enumerate(rows)}
        split = RetrievalSplitData(queries=queries, corpus=corpus, relevant_docs=relevant, top_ranked=None)
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


@pytest.fixture(scope="module")
def embedder(tiny_dir):
    return Embedder.from_pretrained(tiny_dir, progress=False, batch_size=4)


@pytest.fixture(scope="module")
def encoder(embedder):
    return G2EEncoder(embedder)


def test_model_meta_names_the_model(tiny_dir, embedder, encoder):
    meta = encoder.mteb_model_meta
    assert meta.name == f"g2e_jax/{tiny_dir.name}"
    assert meta.revision == embedder.weights_id[:16]
    assert meta.embed_dim == embedder.dim == embedder.config.text.hidden_size
    assert meta.max_tokens == embedder.max_len
    assert set(meta.modalities) == {"text", "image"}
    assert meta.similarity_fn_name.value == "cosine"
    # From a path, like Embedder.from_pretrained, with its options passed through.
    built = G2EEncoder(tiny_dir, max_len=256, progress=False)
    assert built.mteb_model_meta.name == meta.name and built.mteb_model_meta.max_tokens == 256
    assert built.mteb_model_meta.revision == meta.revision
    with pytest.raises(ValueError, match="apply only when building from a path"):
        G2EEncoder(embedder, max_len=256)


@pytest.mark.slow
def test_evaluate_local_tasks_end_to_end(encoder, embedder, tmp_path):
    tasks = [SynCaptionRetrieval(), SynImageToCaption()]
    result = mteb.evaluate(encoder, tasks, cache=mteb.ResultCache(tmp_path), show_progress_bar=False)
    meta = encoder.mteb_model_meta
    folder = tmp_path / "results" / meta.name.replace("/", "__") / meta.revision
    for task in tasks:
        file = folder / f"{task.metadata.name}.json"
        saved = json.loads(file.read_text())
        print(f"mteb result {file.name}:", json.dumps(saved["scores"], indent=1))
        scores = saved["scores"]["test"][0]
        assert saved["task_name"] == task.metadata.name
        assert 0.0 <= scores["main_score"] <= 1.0 and scores["main_score"] == scores["ndcg_at_10"]

        # The ranking mteb scored is the one our embeddings give: recompute the MRR@10 from
        # Embedder.encode directly (one relevant document per query, so MRR = mean 1/rank).
        task.load_data()  # mteb unloads a task's data after evaluating it
        split = task.dataset["default"]["test"]
        instruction = encoder.task_instruction(task.metadata, PromptType.query)
        queries, corpus = split["queries"], split["corpus"]
        q = embedder.encode(
            queries["text"] if "text" in queries.column_names else [""] * len(queries),
            queries["image"] if "image" in queries.column_names else None,
            role="query",
            instruction=instruction,
            progress=False,
        )
        d = embedder.encode(corpus["text"], role="document", progress=False)
        sims = q @ d.T
        ranks = []
        for i, qid in enumerate(queries["id"]):
            (gold,) = split["relevant_docs"][qid]
            gold_sim = sims[i, corpus["id"].index(gold)]
            ranks.append(1 + int((sims[i] > gold_sim).sum()))
        mrr = float(np.mean([1.0 / r if r <= 10 else 0.0 for r in ranks]))
        assert scores["mrr_at_10"] == pytest.approx(mrr, abs=1e-5)
    assert {r.task_name for r in result.task_results} == {t.metadata.name for t in tasks}


def _loader(rows):
    from mteb._create_dataloaders import _custom_collate_fn
    from torch.utils.data import DataLoader

    return DataLoader(rows, batch_size=2, collate_fn=_custom_collate_fn)


@pytest.mark.parametrize("prompt_type", [PromptType.query, PromptType.document, None])
def test_encoder_equals_embedder_encode(encoder, embedder, prompt_type):
    data = _synthetic()
    rows = _eval_rows(data, "SynI2T")
    images = [_image(data, r["qry_img_path"]) for r in rows]
    texts = ["a red circle", "two blue squares and a star", "three", "a short caption"]
    # Text only, image only, text + image; a loader whose batches do not align with the Embedder's.
    batches = [{"text": t} for t in texts] + [{"image": im} for im in images[:3]]
    both = [{"text": t, "image": im} for t, im in zip(texts, images)]
    task = SynImageToCaption.metadata
    role = "query" if prompt_type == PromptType.query else "document"
    # Rows without a type (classification, STS, ...) use the document template but, as in mteb's
    # instruction-following wrappers, the task's (query) instruction.
    instruct = prompt_type != PromptType.document
    instruction = "Find an image caption describing the given everyday image." if instruct else None
    for inputs, want_texts, want_images in (
        (batches[:4], texts, None),
        (batches[4:], [""] * 3, images[:3]),
        (both, texts, images),
    ):
        out = encoder.encode(
            _loader(inputs), task_metadata=task, hf_split="test", hf_subset="default", prompt_type=prompt_type
        )
        want = embedder.encode(want_texts, want_images, role=role, instruction=instruction, progress=False)
        np.testing.assert_array_equal(out, want)  # bit for bit
    # The two templates differ (the role suffix and the instruction are really applied).
    q = encoder.encode(
        _loader(batches[:4]),
        task_metadata=task,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.query,
    )
    d = encoder.encode(
        _loader(batches[:4]),
        task_metadata=task,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.document,
    )
    assert not np.allclose(q, d)


def test_instructions_per_task_type(embedder):
    enc = G2EEncoder(
        embedder,
        instructions={
            "Any2AnyRetrieval": {"query": "Q instr", "document": "D instr"},
            "Retrieval": "T instr",
            "G2ESynCaptionRetrieval": "",
        },
    )
    i2t, t2t = SynImageToCaption.metadata, SynCaptionRetrieval.metadata
    assert enc.task_instruction(i2t, PromptType.query) == "Q instr"
    assert enc.task_instruction(i2t, PromptType.document) == "D instr"
    assert enc.task_instruction(t2t, PromptType.query) is None  # by name, before the type
    other = t2t.model_copy(update={"name": "SomeOtherRetrieval"})
    assert enc.task_instruction(other, PromptType.query) == "T instr"
    assert enc.task_instruction(other, PromptType.document) is None  # a plain string: queries only
    # Default: the task's own prompt.
    plain = G2EEncoder(embedder)
    assert plain.task_instruction(t2t, PromptType.query) == t2t.prompt
    assert plain.task_instruction(t2t, PromptType.document) is None
    # A row's own instruction (mteb's instruction retrieval) follows the task's.
    rows = [{"text": "q text", "query": "q text", "instruction": "row instr"}]
    out = enc.encode(
        _loader(rows), task_metadata=i2t, hf_split="test", hf_subset="default", prompt_type=PromptType.query
    )
    want = embedder.encode(["q text"], role="query", instruction="Q instr row instr", progress=False)
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="'query' and/or 'document'"):
        G2EEncoder(embedder, instructions={"Retrieval": {"queries": "x"}})


def test_missing_mteb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mteb", None)  # `import mteb` now raises ImportError
    for name in [m for m in sys.modules if m.startswith("mteb.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "g2e_jax.integrations.mteb")
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[mteb]"')):
        importlib.import_module("g2e_jax.integrations.mteb")
    monkeypatch.undo()
    assert importlib.import_module("g2e_jax.integrations.mteb").G2EEncoder is G2EEncoder


@pytest.mark.slow
def test_from_a_peft_adapter_like_embedder(tiny_dir, tmp_path, embedder):
    """``G2EEncoder(base, adapter=DIR)`` loads as ``Embedder.from_pretrained(base, adapter=DIR)`` does
    and is named after both folders, with the merged weights' fingerprint as its revision."""
    from test_peft_io import peft_model

    peft_model(tiny_dir, "lora", seed=5).save_pretrained(tmp_path / "adapter")
    enc = G2EEncoder(tiny_dir, adapter=tmp_path / "adapter", progress=False, batch_size=4)
    want_embedder = Embedder.from_pretrained(
        tiny_dir, adapter=tmp_path / "adapter", progress=False, batch_size=4
    )
    assert enc.mteb_model_meta.name == f"g2e_jax/{tiny_dir.name}+adapter"
    assert enc.mteb_model_meta.revision == want_embedder.weights_id[:16] != embedder.weights_id[:16]
    rows = [{"text": "a red circle"}, {"text": "two blue squares"}]
    out = enc.encode(
        _loader(rows),
        task_metadata=SynCaptionRetrieval.metadata,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.document,
    )
    texts = [r["text"] for r in rows]
    np.testing.assert_array_equal(out, want_embedder.encode(texts, role="document", progress=False))
    assert not np.allclose(
        out, embedder.encode(texts, role="document", progress=False)
    )  # the adapter applies
