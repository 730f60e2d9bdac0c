"""Host-side preprocessing of rows for the embedder and for training: no model needed.

Once per row: the user segment (instruction + content + role suffix, see ``g2e_jax.prompts``, in the
backbone's chat format) is tokenised (cached by its text, so another system prompt re-tokenises
nothing), the image is preprocessed in numpy by the backbone's image processor (Qwen2-VL: patches and
``grid_thw``; LLaVA-NeXT: tiles and the anyres layout), its placeholder is expanded to the image's
token count, over-long content is truncated inside the content, and M-RoPE offsets are computed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from g2e_jax.data.images import ImageError
from g2e_jax.data.rows import PreparedRow
from g2e_jax.models import backbone_of, read_config
from g2e_jax.models.qwen2_vl import Qwen2VLConfig, rope_index
from g2e_jax.models.qwen2_vl.images import ImageConfig
from g2e_jax.prompts import IMAGE_MARKER, PromptConfig, get_prompt, plural
from g2e_jax.tokenization import Tokenizer


class InputError(ValueError):
    """A bad input row; ``row`` and ``field`` say where, so callers can name the file line or id."""

    def __init__(self, row: int, field: str, reason: str):
        super().__init__(f"row {row}, field {field!r}: {reason}")
        self.row, self.field, self.reason = row, field, reason


class Preprocessor:
    """Tokenizer + image processor + prompt + length budget of one backbone."""

    def __init__(
        self,
        config: Qwen2VLConfig,
        tokenizer: Tokenizer,
        image_config: ImageConfig,
        *,
        prompt: str | PromptConfig = "hierarchical",
        scheme: str | None = None,
        max_len: int = 1024,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.prompt = get_prompt(prompt, **({"scheme": scheme} if scheme else {}))
        self.max_len = max_len
        self.backbone = backbone_of(config.model_type)
        self.chat = self.backbone.chat
        self.chat.image_placeholder(self.prompt.scheme)  # the scheme exists for this backbone
        if self.prompt.instruction_mode:
            self.chat.check_instruction_format()
        self.image_pad_id = tokenizer.token_id(self.chat.image_token)
        if self.image_pad_id != config.image_token_id:
            raise ValueError(
                f"{tokenizer.path}: {self.chat.image_token} is id {self.image_pad_id}, but config.json says "
                f"image_token_id {config.image_token_id}"
            )
        self.pad_id = tokenizer.token_id(self.chat.pad_token)
        self.header_ids = tokenizer.encode(self.chat.assistant_header)
        self._user_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._user_cache_size = 200_000

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        prompt: str | PromptConfig = "hierarchical",
        scheme: str | None = None,
        max_len: int = 1024,
        image_resolution: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> "Preprocessor":
        """From a local Hugging Face directory: config.json, tokenizer.json, preprocessor_config.json.
        ``min_pixels`` / ``max_pixels``: the image processor's pixel bounds in place of the file's
        (``with_pixel_bounds``)."""
        path = Path(path)
        config = read_config(path)
        image_config = backbone_of(config.model_type).images.config(path, image_resolution)
        image_config = with_pixel_bounds(image_config, min_pixels, max_pixels, config.model_type)
        return cls(config, Tokenizer(path), image_config, prompt=prompt, scheme=scheme,
                   max_len=max_len)  # fmt: skip

    def with_prompt(self, prompt: str | PromptConfig | None = None, **changes) -> "Preprocessor":
        """The same tokenizer and tokenisation cache under another prompt."""
        other = object.__new__(Preprocessor)
        other.__dict__.update(self.__dict__)
        other.prompt = get_prompt(prompt if prompt is not None else self.prompt, **changes)
        other.chat.image_placeholder(other.prompt.scheme)
        if other.prompt.instruction_mode:
            other.chat.check_instruction_format()
        return other

    def prepare(
        self,
        texts,
        images=None,
        *,
        role: str = "query",
        instruction=None,
        subset: str | None = None,
        errors: str = "raise",
        progress: bool | None = None,
    ) -> list[PreparedRow | InputError]:
        """Host preprocessing of every row. ``errors="collect"`` returns an InputError in place of
        each bad row instead of raising, so a caller can skip it and keep ids aligned."""
        texts, images, instructions = self.columns(texts, images, instruction)
        role = self.prompt.template_role(role, subset)
        system_len = len(self.system_ids(role))
        rows: list[PreparedRow | InputError] = []
        truncated = []
        bar = tqdm(
            total=len(texts),
            desc=f"preparing {plural(role)}",
            unit="row",
            disable=not (len(texts) > 64 if progress is None else progress),
        )
        for i, (text, image, inst) in enumerate(zip(texts, images, instructions)):
            try:
                row = self._prepare_row(i, text, image, role, inst, system_len)
            except InputError as e:
                if errors == "raise":
                    raise
                row = e
            if isinstance(row, PreparedRow) and row.truncated_from:
                truncated.append(row.truncated_from)
            rows.append(row)
            bar.update()
        bar.close()
        if truncated:
            warnings.warn(
                f"{len(truncated)} of {len(texts)} {role} rows exceeded max_len={self.max_len} and were truncated "
                f"inside their content (longest user segment: {max(truncated)} tokens)",
                stacklevel=2,
            )
        return rows

    @staticmethod
    def columns(texts, images=None, instruction=None) -> tuple[list, list, list]:
        """texts, images and instructions as three lists of one length (one text: a list of one)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} images")
        if instruction is None or isinstance(instruction, str):
            instructions = [instruction] * len(texts)
        else:
            instructions = list(instruction)
            if len(instructions) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(instructions)} instructions")
        return texts, images, instructions

    def system_ids(self, role: str) -> np.ndarray:
        return self._tokenize(self.prompt.system_segment(role, self.chat))

    def _tokenize(self, text: str) -> np.ndarray:
        ids = self._user_cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text)
            self._user_cache[text] = ids
            if len(self._user_cache) > self._user_cache_size:
                self._user_cache.popitem(last=False)
        else:
            self._user_cache.move_to_end(text)
        return ids

    def image_features(self, i: int, image) -> tuple[np.ndarray, np.ndarray]:
        """Decode, resize and patchify row ``i``'s image: ``(patches, grid_thw)``. Thread-safe (the
        image work of ``g2e_jax.pipeline``'s worker pool)."""
        try:
            return self.backbone.images.preprocess(image, self.image_config, source="image")
        except ImageError as e:
            raise InputError(i, "image", str(e)) from None

    def _prepare_row(self, i, text, image, role, instruction, system_len, features=None) -> PreparedRow:
        """``features``: the image's ``image_features`` when already computed (by a worker)."""
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InputError(i, "text", f"expected a string, got {type(text).__name__}")
        if instruction is not None and not isinstance(instruction, str):
            raise InputError(i, "instruction", f"expected a string, got {type(instruction).__name__}")
        patches = grid = None
        if image is not None:
            patches, grid = self.image_features(i, image) if features is None else features
        elif not text.strip() and not self.prompt.instruction_mode:  # that format embeds "NULL"
            raise InputError(i, "text", "empty text and no image: nothing to embed")
        n_image = 0 if grid is None else self.backbone.images.num_tokens(grid, self.config)
        budget = self.max_len - system_len - len(self.header_ids)

        def user_ids_for(content: str) -> np.ndarray:
            try:
                user = self.prompt.user_text(
                    role, content, has_image=grid is not None, instruction=instruction, chat=self.chat
                )
            except ValueError as e:
                raise InputError(i, "text", str(e)) from None
            ids = self._tokenize(self.prompt.user_segment(role, user, self.chat, instruction=instruction))
            if n_image:
                (at,) = np.flatnonzero(ids == self.image_pad_id)
                ids = np.concatenate([ids[:at], np.full(n_image, self.image_pad_id, np.int32), ids[at + 1 :]])
            return ids

        ids = user_ids_for(text)
        truncated_from = 0
        if len(ids) > budget:
            truncated_from = len(ids)
            ids = self._truncate(i, text, user_ids_for, budget, n_image)
        user_pos, next_pos = None, len(ids)
        if self.prompt.scheme == "mrope":
            user_pos = rope_index(
                ids[None], None, None if grid is None else grid[None], self.config, "mrope"
            )[:, 0]
            next_pos = int(user_pos.max()) + 1 if len(ids) else 0
        return PreparedRow(ids, user_pos, next_pos, patches, grid, truncated_from)

    def _truncate(self, i, text, user_ids_for, budget, n_image) -> np.ndarray:
        """Longest cut of the content's text (the image marker is kept) whose segment fits."""
        marker = IMAGE_MARKER
        head, sep, tail = text.partition(marker) if marker in text else (text, "", "")
        pieces = len(head) + len(tail)

        def cut(keep: int) -> str:  # keep the first `keep` characters of head + tail
            return (
                head[:keep] + sep + tail[: max(0, keep - len(head))]
                if keep < len(head)
                else (head + sep + tail[: keep - len(head)])
            )

        if len(user_ids_for(cut(0))) > budget:
            raise InputError(
                i, "image" if n_image else "text",
                f"does not fit in max_len={self.max_len} even with its content removed "
                f"({n_image} image tokens); lower the image resolution (max_pixels) or raise max_len",
            )  # fmt: skip
        lo, hi = 0, pieces  # invariant: cut(lo) fits, cut(hi + 1..) may not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(user_ids_for(cut(mid))) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return user_ids_for(cut(lo))


def with_pixel_bounds(image_config, min_pixels: int | None, max_pixels: int | None, model_type: str = "this"):
    """The image settings with the pixel bounds replaced where given, as a caller of the processor that
    resizes images itself does (Qwen3-VL-Embedding: 4,096 to 1,843,200 pixels, then the processor
    with do_resize=False; the same size as one resize within those bounds). Qwen-family processors only."""
    changes = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if not changes:
        return image_config
    if not {"min_pixels", "max_pixels"} <= {f.name for f in dataclasses.fields(image_config)}:
        raise ValueError(f"min_pixels/max_pixels: the {model_type} image processor has no pixel bounds")
    for name, value in changes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r}: expected a positive number of pixels")
    return dataclasses.replace(image_config, **{k: int(v) for k, v in changes.items()})


class PreparedInputs:
    """The sides of a prepared dataset's records (``g2e_jax.data.prepared``) as ``Preprocessor.prepare``
    makes them: the stored uint8 rows expanded by the image processor of the backbone that stored them
    (``images.expand``), with the settings in the dataset's metadata (bit for bit)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.images = backbone_of(dataset.model_type, f"{dataset.path}: model_type").images
        self.image_config = self.images.settings(**dataset.meta["image_config"])

    def check_model(self, model_type: str, image_config=None) -> None:
        """Refuses a dataset prepared for another backbone than ``model_type``'s (other token ids, other
        image rows): the message names the dataset folder and both model types. A version-1 dataset
        names none: any Qwen2-VL-family model whose patch arithmetic (``image_config``, when given)
        is the dataset's passes."""
        have = self.dataset.model_type
        if "model_type" not in self.dataset.meta:  # version 1: some Qwen2-VL-family model's patches
            if backbone_of(model_type).images.settings is self.images.settings:
                keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
                have, want = self.image_config, image_config or self.image_config
                differ = [f"{k}={getattr(have, k)} (model: {getattr(want, k)})" for k in keys
                          if getattr(want, k) != getattr(have, k)]  # fmt: skip
                if not differ:
                    return
                raise ValueError(
                    f"{self.dataset.path}: prepared with other image settings than the {model_type} model's: "
                    f"{', '.join(differ)}; re-run `g2e-jax prepare` with this model"
                )
            have = "a Qwen2-VL-family model (version 1, no model_type recorded)"
        elif have == model_type:
            return
        raise ValueError(
            f"{self.dataset.path}: prepared for {have}, but the model is {model_type}; "
            "re-run `g2e-jax prepare` with this model"
        )

    def __call__(self, i_or_record: int | dict, side: str) -> PreparedRow:
        """One side of record ``i`` (or of a record from ``dataset[i]``), for ``encode_prepared``."""
        row = self.dataset.prepared_row(i_or_record, side)
        if row.patches is not None:
            row.patches = self.images.expand(row.patches, self.image_config)
        return row


def bucket(n: int, base: int, *, per_octave: int | None = None) -> int:
    """Smallest bucket that holds n.

    Default: base * 2**k, with 1.5x steps in between from 16 * base on (long rows, e.g. an image's
    282 tokens, would otherwise pad up to 2x). Rows are sorted by size first, so a batch wastes
    little, and a whole corpus compiles a handful of programs.

    ``per_octave=s``: the sizes base * 2**k * (1 + j / s), j < s, so padding adds under 1 / s. For
    training, whose batches are not sorted by size: a 2B-width step padded 39 -> 64 query and
    18 -> 32 target tokens ran 1.5x slower than at 40 and 20 (issue 23), and a step runs every
    batch while each shape compiles once per machine (the compilation cache)."""
    if per_octave is None:
        size = base
        while size < n:
            if size >= 16 * base and size * 3 // 2 >= n:
                return size * 3 // 2
            size *= 2
        return size
    if per_octave < 1:
        raise ValueError(f"per_octave must be >= 1, got {per_octave}")
    octave = base
    while octave * 2 < n:
        octave *= 2
    if n <= octave:
        return octave
    step = -(-octave // per_octave)  # a bucket is a multiple of the octave's step
    return min(octave * 2, octave + -(-(n - octave) // step) * step)


def collate(rows, *, batch_size: int, users: int, patches: int | None, pad_id: int, patch_dim: int,
            images: int | None = None, pixel_dtype="float32") -> dict:  # fmt: skip
    """Fixed-shape arrays for ``embed_batch``: ``batch_size`` rows (the rest padding), user segments
    padded to ``users`` tokens, images packed into ``patches`` patch rows and ``images`` image slots
    (default ``batch_size``; ``patches=None``: no images in these rows, so no vision arrays at all)."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    user_ids = np.full((batch_size, users), pad_id, np.int32)
    user_len = np.zeros((batch_size,), np.int32)
    user_pos = np.zeros((3, batch_size, users), np.int32)
    next_pos = np.zeros((batch_size,), np.int32)
    for j, r in enumerate(rows):
        n = len(r.user_ids)
        if n > users:
            raise ValueError(f"row {j}: {n} user tokens do not fit {users}")
        user_ids[j, :n] = r.user_ids
        user_len[j] = n
        next_pos[j] = r.next_pos
        if r.user_pos is not None:
            user_pos[:, j, :n] = r.user_pos
    arrays = dict(user_ids=user_ids, user_len=user_len, user_pos=user_pos, next_pos=next_pos,
                  pixel_values=None, image_grid_thw=None)  # fmt: skip
    with_image = [r for r in rows if r.patches is not None]
    if patches is None:
        if with_image:
            raise ValueError("rows with images need a patch budget")
        return arrays
    pixels = np.zeros((patches, patch_dim), jnp.dtype(pixel_dtype))
    images = batch_size if images is None else images
    if len(with_image) > images:
        raise ValueError(f"{len(with_image)} images do not fit {images} image slots")
    grid = np.zeros((images, 3), np.int32)  # padding images have grid [0, 0, 0]
    offset = 0
    for k, r in enumerate(with_image):
        if offset + len(r.patches) > patches:
            raise ValueError(f"images need more than {patches} patches")
        pixels[offset : offset + len(r.patches)] = r.patches
        grid[k] = r.grid_thw
        offset += len(r.patches)
    arrays.update(pixel_values=pixels, image_grid_thw=grid)
    return arrays
