"""The backbone's tokenizer, read straight from ``tokenizer.json`` with the `tokenizers` library.

No transformers object on the hot path: the embedder tokenises user segments on the host once,
and only needs ids. Special tokens written in text (``<|image_pad|>``) map to their ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json (expected next to the model's config.json)")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.path = file

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` with no BOS/EOS added (Qwen2 adds none)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.path}: the tokenizer has no token {token!r}")
        return token_id

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
