"""Train the tiny offline tokenizer shipped as ``g2e_jax/assets/tiny_tokenizer.json``.

Why this exists: tests and the "make-tiny" random model need a real Qwen2-style tokenizer, but the
project machines cannot download the Qwen2-VL one. So we train a ~1000-token byte-level BPE with
exactly Qwen2's pipeline (NFC, Qwen2 split regex, byte-level without regex, no post-processor) on
text that every Python install carries: stdlib docstrings, plus a few sentences in the style of our
prompts so those prompts tokenise into a handful of tokens, like they would with the real vocab.

Run once by a developer, from the repository root::

    python tools/train_tiny_tokenizer.py            # writes g2e_jax/assets/tiny_tokenizer.json
    python tools/train_tiny_tokenizer.py --check    # retrains and fails if the asset differs

The byte alphabet is seeded into the vocab, so any unicode string encodes without unknown tokens.
The Qwen2-VL special tokens are appended last, in a fixed order, so they take consecutive ids right
after the BPE vocab (see ``g2e_jax.models.common.hf_files.special_token_ids``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

# Rayon thread scheduling must not be able to influence the result.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from tokenizers.trainers import BpeTrainer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_PATH = REPO_ROOT / "g2e_jax" / "assets" / "tiny_tokenizer.json"

# Size of the BPE vocab (byte alphabet + merges) before the special tokens: 992 + 8 specials = 1000.
BPE_VOCAB_SIZE = 992

QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Order matters: it fixes the ids (consecutive, right after the BPE vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Fixed list, sorted traversal below: the corpus must not depend on import order or dict order.
STDLIB_MODULES = [
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "html",
    "inspect",
    "itertools",
    "json",
    "logging",
    "math",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "unittest",
    "zipfile",
]

PROMPT_SENTENCES = [
    "Given an image, summarize the provided image in one word. Given only text, describe the text in one word.",
    "Represent the given text/image in one word.",
    "Represent the given image in one word.",
    "Represent the given text in one word.",
    "Find me an everyday image that matches the given caption:",
    "Retrieve an image that matches the given caption.",
    "Find a caption for the given image.",
    "Represent the given image with the following question:",
    "Answer the question based on the given image.",
    "Represent the given question in one word.",
    "Represent the given answer in one word.",
    "Identify the object shown in the image.",
    "Select the portion of the image that isolates the object described.",
    "Given a news image, find the caption that describes the event.",
    "Given a Wikipedia image, find the passage that describes it.",
    "Given a document screenshot, retrieve the question it answers.",
    "What is shown in this picture? Describe it in a single word.",
    "How many people are in the photo?",
    "What color is the car parked next to the building?",
    "Is the man holding an umbrella or a bag?",
    "A photo of a dog playing with a ball in the park.",
    "A close-up photo of a red apple on a wooden table.",
    "Two children are riding bicycles down a quiet street.",
    "A woman is reading a book on a bench near the river.",
    "An airplane is flying over snowy mountains at sunset.",
    "A plate of pasta with tomato sauce and fresh basil.",
    "The cat is sleeping on a blue sofa next to a window.",
    "A group of friends sitting around a campfire at night.",
    "A street market with fruit, vegetables and colorful flowers.",
    "A train arriving at a crowded station in the city.",
    "You are a helpful assistant.",
    "The user asks a question about the image and the assistant answers it.",
    "system",
    "user",
    "assistant",
    "image",
    "text",
    "question",
    "caption",
    "query",
    "document",
    "positive",
    "negative",
    "embedding",
]


def _module_docstrings(name: str) -> list[str]:
    module = importlib.import_module(name)
    docs = []
    if module.__doc__:
        docs.append(inspect.cleandoc(module.__doc__))
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr)
        if getattr(obj, "__module__", None) != name:
            continue  # re-exports would make the corpus depend on other modules' versions
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = obj.__doc__
            if doc:
                docs.append(inspect.cleandoc(doc))
    return docs


def build_corpus() -> list[str]:
    corpus: list[str] = []
    for name in STDLIB_MODULES:
        corpus.extend(_module_docstrings(name))
    # Repeat the prompt sentences so their words win merges over rarer docstring words.
    corpus.extend(PROMPT_SENTENCES * 20)
    return corpus


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    # The trainer resets these to None; Qwen2's tokenizer.json has "" (same behaviour, same file shape).
    tok.model.continuing_subword_prefix = ""
    tok.model.end_of_word_suffix = ""
    got = tok.get_vocab_size(with_added_tokens=False)
    if got != BPE_VOCAB_SIZE:
        raise RuntimeError(f"corpus too small: BPE vocab has {got} tokens, wanted {BPE_VOCAB_SIZE}")
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for t in SPECIAL_TOKENS
        ]
    )
    for offset, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == BPE_VOCAB_SIZE + offset, t
    return tok


def serialize(tok: Tokenizer) -> str:
    # Compact, with fixed separators, so the committed file is small and byte-stable.
    data = json.loads(tok.to_str())
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    parser.add_argument("--check", action="store_true", help="retrain and compare with --out; write nothing")
    args = parser.parse_args(argv)

    text = serialize(build_tokenizer())
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=args.out.parent, delete=False) as f:
        f.write(text)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(f.name, args.out)
    print(
        f"wrote {args.out} ({len(text.encode('utf-8'))} bytes, {BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)} tokens)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
