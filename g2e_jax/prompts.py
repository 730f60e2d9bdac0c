"""The hierarchical embedding prompt (DESIGN.md §1) as data, and its split into segments.

A row is rendered in the backbone's chat template::

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n{USER}<|im_end|>\\n<|im_start|>assistant\\n

and split into three segments so that only the middle one depends on the row:

    system segment   ``<|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user``   (constant per role)
    user segment     ``\\n{USER}``                        (tokenised once per row on the host)
    assistant header ``<|im_end|>\\n<|im_start|>assistant\\n``                (constant)

Every cut falls on a special token or right after ``user`` (a pre-token of its own), so the
concatenated token ids equal those of the whole string. ``{USER}`` is the task instruction, the
content (with the image placeholder) and, on the query side, the role suffix.

That template is Qwen2-VL's ``ChatFormat``; another backbone brings its own with its own cuts
(LLaVA-NeXT's ``<s>[INST] {SYSTEM}\n{USER} [/INST]``, ``g2e_jax.models.llava_next.chat``, cuts after
``[INST]``, since its system text ends in punctuation that a byte-level BPE joins with the ``\n``).
The hierarchical prompt itself (system texts, suffixes, Matching rule) is defined once, here.

Next to it, on the same weights, the instruction format of Qwen3-VL-Embedding (``mode=
"qwen3_vl_embedding"``, preset ``"qwen3_vl_embedding"``), read from QwenLM/Qwen3-VL-Embedding's
``src/models/qwen3_vl_embedding.py`` (``Qwen3VLEmbedder.format_model_input``; read in the forks
robustonian/Qwen3-VL-Embedding@e24041072814b3809773321a4843db90414c24c1 and
yujieli001/Qwen3-VL-Embedding@514078cd87854823775b5cfd8fa912301ad1063d, whose copies agree; the
upstream repository's README@7f1303885ed65b4d7bfae2b85fc458a7577c811d documents the same API):

- the system turn is the row's instruction, stripped, with a "." appended when its last character is
  not Unicode punctuation (category P*); no instruction (or an empty one): the role's system text,
  "Represent the user's input." in the preset (``DEFAULT_INSTRUCTION``);
- the user turn is the image (tagged ``<|vision_start|><|image_pad|><|vision_end|>``, the chat
  template's rendering) then the text; a row with neither becomes the text "NULL";
- no suffix, no instruction in the user turn; positions are the model's own M-RoPE (``scheme="mrope"``).

The per-row system text cannot sit in the constant system segment, so this format cuts the template
after ``<|im_start|>system\\n`` (``ChatFormat.instruction_segment``) and tokenises the instruction with
the row; its first character is never whitespace (it is stripped), so the cut is a token boundary.
MMEB rows' ``<|image_1|>`` marker is dropped (with the whitespace around the rest of the text): the
reference knows no markers and always puts the image before the text. Rows over ``max_len`` differ by
design: the reference's processor cuts the token sequence's end (assistant header included), this
library cuts inside the content and keeps the pooled header (the reference's limit is 8192 tokens).
Its technical report pools an appended ``<|endoftext|>``; the code, which the released scores come
from, pools the ``\\n`` after ``assistant``, and so does this format.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import Any, Mapping

IMAGE_MARKER = "<|image_1|>"  # how MMEB text marks its image
IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
SCHEMES = ("gen2embed", "mrope")
ROLES = ("query", "document")
MODES = ("hierarchical", "qwen3_vl_embedding")
# Qwen3-VL-Embedding's default instruction and the text of an empty row (its Qwen3VLEmbedder).
DEFAULT_INSTRUCTION = "Represent the user's input."
EMPTY_ROW = "NULL"
ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A backbone's chat template around ``{SYSTEM}`` and ``{USER}``, cut into the three segments.

    Each cut must fall where the tokenizer starts a new token whatever the text around it (after a
    special token, before a space or a newline after a letter): then the segments' ids concatenated
    equal the whole string's (the tests check it against the HF processor)."""

    name: str
    system_segment_format: str  # may hold "{system}": constant per role, run once (prefix cache)
    no_system_segment: str  # the same when the prompt has no system text
    user_segment_format: str  # "{user}" and maybe "{system}": tokenised per row
    no_system_user_segment: str
    assistant_header: str  # after the user segment; the last token is pooled
    image_token: str  # the placeholder the processor expands into the image's tokens
    pad_token: str  # fills padded positions (masked out)
    tagged_image: str | None = None  # the "mrope" scheme's placeholder; None: only "gen2embed" exists
    # The instruction format's cut (mode "qwen3_vl_embedding"): the constant start of the system turn,
    # then per row "{system}" (the instruction) and "{user}". None: this backbone has no such format.
    instruction_segment: str | None = None
    instruction_user_segment_format: str | None = None

    def system_segment(self, system: str | None) -> str:
        return self.no_system_segment if system is None else self.system_segment_format.format(system=system)

    def user_segment(self, system: str | None, user: str) -> str:
        if system is None:
            return self.no_system_user_segment.format(user=user)
        return self.user_segment_format.format(system=system, user=user)

    def image_placeholder(self, scheme: str) -> str:
        if scheme == "gen2embed":
            return self.image_token
        if self.tagged_image is None:
            raise ValueError(f"the {self.name} chat format has no {scheme!r} scheme; use 'gen2embed'")
        return self.tagged_image

    def check_instruction_format(self) -> None:
        if self.instruction_segment is None or self.instruction_user_segment_format is None:
            raise ValueError(
                f"the {self.name} chat format has no per-row system turn: the 'qwen3_vl_embedding' prompt "
                "needs a Qwen chat format (qwen2_vl, qwen2_5_vl, qwen3_vl)"
            )


QWEN2_VL_CHAT = ChatFormat(
    name="qwen2_vl",
    system_segment_format="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user",
    no_system_segment="<|im_start|>user",
    user_segment_format="\n{user}",
    no_system_user_segment="\n{user}",
    assistant_header=ASSISTANT_HEADER,
    image_token=IMAGE_PAD,
    pad_token="<|endoftext|>",
    tagged_image=VISION_START + IMAGE_PAD + VISION_END,
    instruction_segment="<|im_start|>system\n",
    instruction_user_segment_format="{system}<|im_end|>\n<|im_start|>user\n{user}",
)

PAPER_SYSTEM = "Given an image, summarize the provided image in one word. Given only text, describe the text in one word."


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Everything that decides the text around a row's content."""

    name: str = "custom"
    query_system: str | None = PAPER_SYSTEM  # None: no system turn at all
    document_system: str | None = PAPER_SYSTEM
    query_suffix_image: str = "\nRepresent the given text/image in one word."
    query_suffix_text: str = "\nRepresent the given text in one word."
    document_suffix: str = ""
    instruction_format: str = "{instruction}\n{content}"  # how a task instruction joins the content
    scheme: str = "gen2embed"  # image placeholder and positions: bare pads + 1-D, or tagged + M-RoPE
    matching_marker: str = "Matching"  # subsets named so encode their candidates with the query template
    # "hierarchical": the instruction joins the user turn (instruction_format); "qwen3_vl_embedding":
    # it replaces the system turn (the role's system text is the default), see the module docstring.
    mode: str = "hierarchical"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"prompt {self.name!r}: unknown scheme {self.scheme!r}; expected one of {SCHEMES}"
            )
        if "{content}" not in self.instruction_format:
            raise ValueError(f"prompt {self.name!r}: instruction_format must contain '{{content}}'")
        if self.mode not in MODES:
            raise ValueError(f"prompt {self.name!r}: unknown mode {self.mode!r}; expected one of {MODES}")
        if self.mode == "qwen3_vl_embedding":
            if self.scheme != "mrope":
                raise ValueError(
                    f"prompt {self.name!r}: the qwen3_vl_embedding format runs the model's own M-RoPE "
                    f"positions over tagged images: scheme must be 'mrope' (prompt.scheme=mrope), got {self.scheme!r}"
                )
            suffixes = {
                k: getattr(self, k) for k in ("query_suffix_image", "query_suffix_text", "document_suffix")
            }
            if any(suffixes.values()):
                raise ValueError(
                    f"prompt {self.name!r}: the qwen3_vl_embedding format has no role suffixes, got {suffixes}"
                )

    @property
    def instruction_mode(self) -> bool:
        """True in the Qwen3-VL-Embedding format: the instruction is the system turn."""
        return self.mode == "qwen3_vl_embedding"

    def replace(self, **changes) -> "PromptConfig":
        return dataclasses.replace(self, **changes)

    # --- per role --------------------------------------------------------------------------

    def template_role(self, role: str, subset: str | None = None) -> str:
        """The template a row is encoded with: Matching subsets' candidates use the query one."""
        check_role(role)
        if subset is not None and self.matching_marker and self.matching_marker in subset:
            return "query"
        return role

    def system(self, role: str) -> str | None:
        return self.query_system if check_role(role) == "query" else self.document_system

    def row_system(self, role: str, instruction: str | None) -> str:
        """The instruction format's system text of one row: its instruction (punctuated), else the
        role's system text (punctuated the same way: it is the instruction of every row of the role)."""
        return punctuate(instruction) or punctuate(self.system(role)) or DEFAULT_INSTRUCTION

    def suffix(self, role: str, has_image: bool) -> str:
        if check_role(role) == "document":
            return self.document_suffix
        return self.query_suffix_image if has_image else self.query_suffix_text

    def image_placeholder(self, chat: ChatFormat = QWEN2_VL_CHAT) -> str:
        return chat.image_placeholder(self.scheme)

    # --- text --------------------------------------------------------------------------------

    def user_text(self, role: str, content: str, *, has_image: bool, instruction: str | None = None,
                  chat: ChatFormat = QWEN2_VL_CHAT) -> str:  # fmt: skip
        """``{USER}``: instruction + content (image marker -> placeholder) + role suffix.

        An image without a marker in the content goes first, as MMEB's image-first rows do. In the
        instruction format: the image, then the text (marker dropped), or "NULL"; the instruction is
        not part of it (see ``row_system``).
        """
        markers = content.count(IMAGE_MARKER)
        if markers > 1:
            raise ValueError(f"content has {markers} {IMAGE_MARKER} markers; one image per row is supported")
        if markers and not has_image:
            raise ValueError(f"content has an {IMAGE_MARKER} marker but no image was given")
        if self.instruction_mode:
            chat.check_instruction_format()
            if markers:
                content = content.replace(IMAGE_MARKER, "").strip()
            if has_image:
                return self.image_placeholder(chat) + content
            return content if content else EMPTY_ROW
        if has_image:
            placeholder = self.image_placeholder(chat)
            content = content.replace(IMAGE_MARKER, placeholder) if markers else placeholder + content
        if instruction:
            content = self.instruction_format.format(instruction=instruction, content=content)
        return content + self.suffix(role, has_image)

    def system_segment(self, role: str, chat: ChatFormat = QWEN2_VL_CHAT) -> str:
        if self.instruction_mode:
            chat.check_instruction_format()
            return chat.instruction_segment
        return chat.system_segment(self.system(role))

    def render(
        self, role: str, user: str, chat: ChatFormat = QWEN2_VL_CHAT, instruction: str | None = None
    ) -> str:
        """The whole template string: what the reference pipeline tokenises in one go."""
        return (
            self.system_segment(role, chat)
            + self.user_segment(role, user, chat, instruction=instruction)
            + chat.assistant_header
        )

    def user_segment(
        self, role: str, user: str, chat: ChatFormat = QWEN2_VL_CHAT, instruction: str | None = None
    ) -> str:
        """The row's tokenised segment: ``{USER}`` (``user_text``) in the chat format's cut; in the
        instruction format also the row's system text (``row_system``)."""
        if self.instruction_mode:
            chat.check_instruction_format()
            return chat.instruction_user_segment_format.format(
                system=self.row_system(role, instruction), user=user
            )
        return chat.user_segment(self.system(role), user)


def punctuate(instruction: str | None) -> str:
    """Qwen3-VL-Embedding's instruction rule: stripped, and "." appended unless it ends in Unicode
    punctuation; "" for None or blank."""
    text = (instruction or "").strip()
    if text and not unicodedata.category(text[-1]).startswith("P"):
        text += "."
    return text


def plural(role: str) -> str:
    return {"query": "queries", "document": "documents"}.get(role, role + "s")


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    return role


# The backbone chat template's own system turn, used when a conversation brings none (Qwen2-VL's).
CHAT_DEFAULT_SYSTEM = "You are a helpful assistant."

_HIERARCHICAL = PromptConfig(name="hierarchical")  # the one definition; the ablations below derive from it
_NO_SUFFIX = {"query_suffix_image": "", "query_suffix_text": ""}
_NO_SYSTEM = {"query_system": None, "document_system": None}


def _without_one_word(text: str) -> str:
    return text.replace(" in one word", "")


PRESETS: dict[str, PromptConfig] = {
    # The paper's zero-shot prompt: task-agnostic system level + task-specific user level.
    "hierarchical": _HIERARCHICAL,
    # The baseline it is compared against: no system turn, no suffix.
    "plain": _HIERARCHICAL.replace(name="plain", **_NO_SYSTEM, **_NO_SUFFIX),
    # Ablations of the two levels (``g2e-jax eval-prompts`` runs them side by side):
    # the system level alone (no "Represent ... in one word." suffix on queries);
    "system_only": _HIERARCHICAL.replace(name="system_only", **_NO_SUFFIX),
    # the query suffix alone, i.e. the hierarchical prompt without its system level ("no_system");
    "suffix_only": _HIERARCHICAL.replace(name="suffix_only", **_NO_SYSTEM),
    # the suffix under the chat template's default system turn instead of the task-agnostic one;
    "default_system": _HIERARCHICAL.replace(
        name="default_system", query_system=CHAT_DEFAULT_SYSTEM, document_system=CHAT_DEFAULT_SYSTEM
    ),
    # both levels without the one-word constraint.
    "no_one_word": _HIERARCHICAL.replace(
        name="no_one_word",
        query_system=_without_one_word(_HIERARCHICAL.query_system),
        document_system=_without_one_word(_HIERARCHICAL.document_system),
        query_suffix_image=_without_one_word(_HIERARCHICAL.query_suffix_image),
        query_suffix_text=_without_one_word(_HIERARCHICAL.query_suffix_text),
    ),
    # Qwen3-VL-Embedding's own format (module docstring): the instruction as the system turn, the
    # default instruction on both sides; MMEB-style evaluation sets query_system to the task's. Its
    # MMEB evaluation gives every candidate the default instruction: no Matching rule.
    "qwen3_vl_embedding": PromptConfig(
        name="qwen3_vl_embedding",
        query_system=DEFAULT_INSTRUCTION,
        document_system=DEFAULT_INSTRUCTION,
        query_suffix_image="",
        query_suffix_text="",
        scheme="mrope",
        matching_marker="",
        mode="qwen3_vl_embedding",
    ),
}
# Other names for the same prompt (the name the paper's ablation uses).
PRESET_ALIASES = {"no_system": "suffix_only"}
# The paper's ablation rows, in table order.
ABLATION = ("plain", "system_only", "suffix_only", "hierarchical")


def get_prompt(prompt: str | PromptConfig | Mapping[str, Any] = "hierarchical", **overrides) -> PromptConfig:
    """A preset by name, a PromptConfig, or a mapping of fields (e.g. from an ml-collections config)."""
    if isinstance(prompt, PromptConfig):
        base = prompt
    elif isinstance(prompt, str):
        name = PRESET_ALIASES.get(prompt, prompt)
        if name not in PRESETS:
            raise ValueError(
                f"unknown prompt preset {prompt!r}; available: {sorted(PRESETS)} (aliases: {PRESET_ALIASES})"
            )
        base = PRESETS[name]
    else:
        fields = dict(prompt)
        preset = fields.pop("preset", None)
        base = get_prompt(preset) if preset else PromptConfig()
        overrides = {**fields, **overrides}
    known = {f.name for f in dataclasses.fields(PromptConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown prompt field(s) {unknown}; known: {sorted(known)}")
    return base.replace(**overrides) if overrides else base
