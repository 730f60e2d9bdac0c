"""g2e_jax models in MTEB / MIEB (mteb 2.x): ``G2EEncoder`` implements mteb's ``EncoderProtocol``.

Every row goes through ``Embedder.encode`` (buckets, prefix cache, device mesh), one call per
``encode``, so mteb gets exactly the embeddings ``Embedder.encode`` gives for the same rows.

How mteb's arguments map onto our prompt (``g2e_jax.prompts``):

* ``PromptType.query`` -> the query template (system turn + role suffix); ``PromptType.document``
  and ``None`` (classification, clustering, STS, ...) -> the document template.
* The task's instruction goes where MMEB's instruction goes: into the user segment, joined to the
  content by the prompt's ``instruction_format``. It is looked up by task name, then task type, in
  ``instructions``; then the task's own ``metadata.prompt``; then mteb's default for the task's
  kind. A plain string instructs queries, not documents, as in MMEB where the candidates carry no
  task instruction; ``{"query": ..., "document": ...}`` sets each side; ``""`` turns it off. Rows
  without a type (classification, clustering, STS) get the query side's instruction under the
  document template, as mteb's instruction-following wrappers do. A row's own instruction (mteb's instruction-retrieval tasks) follows the task's.
* Similarity is cosine (the embeddings are L2-normalised).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

try:
    from mteb.abstasks.abstask import get_abstask_prompt
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as e:  # mteb is an optional extra
    raise ImportError(
        "g2e_jax.integrations.mteb needs the 'mteb' package: install the extra with "
        '`pip install -e ".[mteb]"` (or `pip install "g2e_jax[mteb]"`)'
    ) from e

from g2e_jax.embed import Embedder

__all__ = ["G2EEncoder", "model_meta"]

Instruction = str | Mapping[str, str]


class G2EEncoder(AbsEncoder):
    """mteb encoder over an ``Embedder``.

    ``model_name``: a Hugging Face model directory, a ``g2e-jax train`` workdir, or an ``Embedder``
    to wrap. ``adapter`` and ``embedder_kwargs`` (``prompt``, ``dtype``, ``max_len``,
    ``batch_size``, ...) go to ``Embedder.from_pretrained``. ``instructions``: per task name or task
    type (e.g. ``{"Any2AnyRetrieval": "Find an image that matches the caption"}``), see the module
    docstring. ``name`` / ``revision`` name the model in mteb's results (default: ``g2e_jax/<folder>``
    and the weights' fingerprint). ``device`` is accepted for mteb's CLI and ignored: JAX places the
    work on its default devices.
    """

    def __init__(
        self,
        model_name: str | Path | Embedder,
        revision: str | None = None,
        *,
        device: str | None = None,
        adapter: str | Path | None = None,
        instructions: Mapping[str, Instruction] | None = None,
        name: str | None = None,
        **embedder_kwargs: Any,
    ) -> None:
        if isinstance(model_name, Embedder):
            if adapter is not None or embedder_kwargs:
                raise ValueError(
                    "G2EEncoder(embedder): adapter/loading options apply only when building from a path; "
                    f"got {sorted(embedder_kwargs) + (['adapter'] if adapter is not None else [])}"
                )
            self.embedder = model_name
        else:
            self.embedder = Embedder.from_pretrained(model_name, adapter=adapter, **embedder_kwargs)
        self.model = self.embedder
        self.instructions = dict(instructions or {})
        for key, value in self.instructions.items():
            if isinstance(value, Mapping) and set(value) - {"query", "document"}:
                raise ValueError(
                    f"instructions[{key!r}]: keys must be 'query' and/or 'document', got {sorted(value)}"
                )
        self.mteb_model_meta = model_meta(self.embedder, name=name, revision=revision, adapter=adapter)

    # --- prompt ---------------------------------------------------------------------------------

    @staticmethod
    def role(prompt_type: PromptType | None) -> str:
        """The template: the query one for queries, the document one otherwise."""
        return "query" if prompt_type == PromptType.query else "document"

    def task_instruction(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """The instruction for this task and side (None: none)."""
        value: Instruction | None = None
        for key in (task_metadata.name, task_metadata.type):
            if key in self.instructions:
                value = self.instructions[key]
                break
        else:
            value = task_metadata.prompt or get_abstask_prompt(task_metadata.name)
        if isinstance(value, Mapping):
            side = "document" if prompt_type == PromptType.document else "query"
            return value.get(side) or None
        if prompt_type == PromptType.document:
            return None
        return value or None

    # --- mteb's EncoderProtocol -----------------------------------------------------------------

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """``[N, D]`` float32 embeddings of every row of ``inputs`` (mteb's DataLoader of
        ``BatchedInput``: ``text`` and/or ``image``; queries may bring ``query`` + ``instruction``).

        The rows are gathered and encoded in one ``Embedder.encode`` call: its own batches and shape
        buckets then match a direct call (mteb's ``batch_size`` only sizes its DataLoader)."""
        task = self.task_instruction(task_metadata, prompt_type)
        texts, images, instructions = [], [], []
        for batch in inputs:
            batch_texts, batch_images, batch_instructions = _rows(batch, task_metadata.name)
            texts += batch_texts
            images += batch_images
            instructions += [" ".join(p for p in (task, own) if p) or None for own in batch_instructions]
        progress = kwargs.get("show_progress_bar")
        return self.embedder.encode(
            texts, images, role=self.role(prompt_type), instruction=instructions, progress=progress
        )


def _rows(batch: Mapping[str, Any], task: str) -> tuple[list[str], list[Any], list[str | None]]:
    """One collated mteb batch -> texts, images (PIL or None) and each row's own instruction."""
    if "text" not in batch and "image" not in batch:
        raise ValueError(
            f"mteb task {task}: G2EEncoder encodes text and/or image inputs; got columns {sorted(batch)}"
        )
    images = list(batch["image"]) if "image" in batch else None
    if "instruction" in batch and "query" in batch:  # text = query + " " + instruction; keep them apart
        texts, own = list(batch["query"]), list(batch["instruction"])
    else:
        texts = list(batch["text"]) if "text" in batch else [""] * len(images)
        own = [None] * len(texts)
    if images is None:
        images = [None] * len(texts)
    if len(images) != len(texts):
        raise ValueError(f"mteb task {task}: a batch has {len(texts)} texts but {len(images)} images")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"mteb task {task}: row text must be a string, got {type(text).__name__} ({i})")
    return texts, images, own


def model_meta(
    embedder: Embedder, *, name: str | None = None, revision: str | None = None, adapter=None
) -> ModelMeta:
    """What mteb records about the model: result files go under ``<name>/<revision>/``."""
    path = embedder.model_path
    if name is None:
        folder = "embedder" if path is None else Path(path).resolve().name
        if adapter is not None:
            folder += "+" + Path(adapter).resolve().name
        name = f"g2e_jax/{folder}"
    if revision is None and embedder.weights_id is not None:
        revision = embedder.weights_id[:16]
    return ModelMeta(
        loader=None,
        name=name,
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=int(sum(np.size(leaf) for leaf in jax.tree.leaves(embedder.state))),
        memory_usage_mb=None,
        max_tokens=embedder.max_len,
        embed_dim=embedder.dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["JAX"],
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True,
        training_datasets=None,
        modalities=["text", "image"],
    )
