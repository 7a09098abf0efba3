"""Offline loading of the T5 tokenizer shipped beside the encoder weights.

The release loads its tokenizer with ``AutoTokenizer.from_pretrained(folder, legacy=True)``, which uses the folder's
``tokenizer.json`` (a `tokenizers` serialisation) when present. We read that file with the `tokenizers` library, or
fall back to ``spiece.model`` through `sentencepiece`. Nothing is downloaded.

T5 conventions: no BOS, ``</s>`` appended to every text, pad id 0, and truncation to ``max_length`` tokens *including*
the ``</s>`` (Hugging Face keeps the first ``max_length - 1`` pieces, then appends ``</s>``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from infstar_jax.text import prompts

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_LENGTH = 512
T5_PAD_ID = 0
T5_EOS_ID = 1


class T5Tokenizer:
    """Text -> T5 token ids, with ``</s>`` appended and truncation at ``max_length`` (EOS included)."""

    def __init__(self, encode_fn, *, pad_id: int, eos_id: int, max_length: int, source: str):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self._encode_fn = encode_fn
        self.pad_id = int(pad_id)
        self.eos_id = int(eos_id)
        self.max_length = int(max_length)
        self.source = source

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, each ending with ``eos_id`` and at most ``max_length`` long."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got a single str")
        return [list(self._encode_fn(t))[: self.max_length - 1] + [self.eos_id] for t in texts]

    def __call__(self, texts: Sequence[str], buckets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokenises and pads to one length.

        Args:
          texts: B strings.
          buckets: padded lengths to choose from (the smallest that fits the longest text); ``None`` pads to
            ``max_length`` like the release (``padding='max_length'``).
        Returns:
          ``ids [B, Lb] int32`` (``pad_id`` after the end) and ``mask [B, Lb] int32`` (1 on real tokens incl. EOS).
        """
        return prompts.pad_to_bucket(self.tokenize(texts), buckets or (self.max_length,), self.pad_id)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} as JSON: {e}") from e


def _max_length_from_config(folder: Path) -> int:
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        value = _read_json(cfg).get("model_max_length")
        # transformers writes a huge sentinel (int(1e30)) when no limit was set.
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return DEFAULT_MAX_LENGTH


def _from_tokenizer_json(path: Path, max_length: int) -> T5Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    # Truncation, padding and the post-processor's </s> are applied by T5Tokenizer itself, the same way for both
    # backends; the file's own settings (if any) must not apply a second time.
    tok.no_truncation()
    tok.no_padding()
    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    if eos is None:
        raise ValueError(f"{path}: no '</s>' token in the vocabulary; is this a T5 tokenizer?")
    return T5Tokenizer(
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        pad_id=T5_PAD_ID if pad is None else pad,
        eos_id=eos,
        max_length=max_length,
        source=str(path),
    )


def _from_spiece(path: Path, max_length: int) -> T5Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot load {path} as a sentencepiece model: {e}") from e
    eos = sp.eos_id()
    if eos < 0:
        raise ValueError(f"{path}: the sentencepiece model defines no EOS piece; is this a T5 tokenizer?")
    pad = sp.pad_id()
    return T5Tokenizer(
        lambda text: sp.encode(text, out_type=int),
        pad_id=T5_PAD_ID if pad < 0 else pad,
        eos_id=eos,
        max_length=max_length,
        source=str(path),
    )


def has_tokenizer(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").exists() or (folder / "spiece.model").exists()


def load_tokenizer(folder: str | os.PathLike, *, backend: str = "auto", max_length: int | None = None) -> T5Tokenizer:
    """Loads the T5 tokenizer from a Hugging Face folder or a converted checkpoint directory (offline).

    Args:
      folder: holds ``tokenizer.json`` and/or ``spiece.model`` (+ optional ``tokenizer_config.json``).
      backend: ``"auto"`` (``tokenizer.json`` if present, as ``AutoTokenizer`` does, else ``spiece.model``),
        ``"tokenizers"`` or ``"sentencepiece"``.
      max_length: truncation length incl. ``</s>``; default ``model_max_length`` of tokenizer_config.json, else 512.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if max_length is None:
        max_length = _max_length_from_config(folder)
    tj, sp = folder / "tokenizer.json", folder / "spiece.model"
    if backend == "auto":
        backend = "tokenizers" if tj.exists() else "sentencepiece"
    if backend == "tokenizers":
        if not tj.exists():
            raise FileNotFoundError(f"{tj} not found (needed for backend='tokenizers')")
        return _from_tokenizer_json(tj, max_length)
    if backend == "sentencepiece":
        if not sp.exists():
            if not tj.exists():
                raise FileNotFoundError(f"{folder} holds neither tokenizer.json nor spiece.model (no T5 tokenizer)")
            raise FileNotFoundError(f"{sp} not found (needed for backend='sentencepiece')")
        return _from_spiece(sp, max_length)
    raise ValueError(f"unknown tokenizer backend {backend!r}; expected 'auto', 'tokenizers' or 'sentencepiece'")
