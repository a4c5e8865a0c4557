"""Tokenizers: byte-level by default (nothing to download), a local tokenizer.json, or a model dir holding one."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from vishwamai.errors import ConfigError

log = logging.getLogger(__name__)

# A document longer than this that must be encoded whole (see HFTokenizerFile.encode_stream) is named in a warning.
WHOLE_DOCUMENT_WARN_CHARS = 64 << 20


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    identity: str  # changes whenever the mapping text -> ids changes (cache key)

    def encode(self, text: str) -> list[int]: ...

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[Sequence[int]]:
        """The ids encode("".join(pieces)) gives, yielded a part at a time: memory bounded by the pieces."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus id 256 marking the end of a document."""

    vocab_size = 257
    eos_id = 256
    identity = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[np.ndarray]:
        # Exact piece by piece: the UTF-8 bytes of a + b are those of a then b. An array, not an int per byte.
        for piece in pieces:
            yield np.frombuffer(piece.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _declared_eos(model_dir: Path) -> str | None:
    """The end-of-sequence token a model directory's tokenizer_config.json declares."""
    try:
        eos = json.loads((model_dir / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos


class HFTokenizerFile:
    """A local `tokenizer.json` (Hugging Face `tokenizers` format), or a model directory holding one."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ConfigError("data.tokenizer", "a tokenizer file needs `pip install tokenizers`") from e
        file = Path(path).expanduser()
        declared = None
        if file.is_dir():  # a (Hugging Face) model directory: its tokenizer and declared eos token
            declared, file = _declared_eos(file), file / "tokenizer.json"
        if not file.is_file():
            raise ConfigError("data.tokenizer", f"tokenizer file not found: {file}")
        try:
            self._tok = _Tok.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for an empty or malformed file
            reason = "the file is empty" if file.stat().st_size == 0 else str(e)
            raise ConfigError("data.tokenizer", f"{file} is not a tokenizer.json ({reason})") from None
        self.vocab_size = self._tok.get_vocab_size()
        candidates = ([declared] if declared else []) + ["</s>", "<|endoftext|>", "<eos>"]
        eos = next((t for t in candidates if self._tok.token_to_id(t) is not None), None)
        self.eos_id = self._tok.token_to_id(eos) if eos else self.vocab_size - 1
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        self.identity = f"hf-{digest}" + (f"-eos{self.eos_id}" if declared else "")  # the cache key
        self.name = str(file)
        self._specials = _special_tokens_around(self._tok)
        self.splits_at_spaces = self._specials is not None and _splits_exactly_at_spaces(self._tok, self._specials)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_stream(self, pieces: Iterable[str]) -> Iterator[list[int]]:
        """A document's ids, encoded up to its last space (between two non-spaces) of every piece read so far.

        A BPE tokenizer may merge across any cut, so the text is cut only where this tokenizer was
        checked to give the whole text's ids (at construction: _splits_exactly_at_spaces) - between
        pre-tokens at a single space, the cut every byte-level (GPT-2, Llama 3, Qwen) and Metaspace
        (Llama 2, Mistral) pre-tokenizer makes itself.  Special tokens the tokenizer adds around a text
        (a BOS) are added once, around the document.  A tokenizer that fails the check gets the whole
        document at once, as encode() does: then a huge single file is better split into JSONL records.
        """
        if not self.splits_at_spaces:
            text = "".join(pieces)
            if len(text) > WHOLE_DOCUMENT_WARN_CHARS:
                log.warning("%s cannot encode a document in parts (its pre-tokenizer may merge across spaces): "
                            "a %d-character document was encoded whole; split it into JSONL records to bound "
                            "the memory", self.name, len(text))
            yield self.encode(text)
            return
        before, after = self._specials
        pending, head = "", list(before)
        for piece in pieces:
            pending += piece
            cut = _last_space_cut(pending)
            if cut > 0:
                yield head + self._tok.encode(pending[:cut], add_special_tokens=False).ids
                pending, head = pending[cut:], []
        yield head + self._tok.encode(pending, add_special_tokens=False).ids + after

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _is_space_cut(text: str, i: int) -> bool:
    """Whether `text` may be cut before index i: a single space with a non-space on both sides."""
    return 0 < i < len(text) - 1 and text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()


def _last_space_cut(text: str) -> int:
    """The index of the last _is_space_cut position (0: none); the text is cut before it."""
    i = text.rfind(" ", 0, len(text) - 1)
    while i > 0 and not _is_space_cut(text, i):
        i = text.rfind(" ", 0, i)
    return max(i, 0)


def _special_tokens_around(tok) -> tuple[list[int], list[int]] | None:
    """The ids encode() adds before and after a text (e.g. a BOS), or None if they are not just around it."""
    plain = tok.encode(_PROBE, add_special_tokens=False).ids
    full = tok.encode(_PROBE).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return None


def _splits_exactly_at_spaces(tok, specials: tuple[list[int], list[int]]) -> bool:
    """Whether encoding a text in two parts, cut before any single space, gives the whole text's ids
    (checked on a probe text of words, numbers, punctuation, code, indentation and non-ASCII; a
    normalizer that prepends a space to every call fails it, and then documents are encoded whole)."""
    whole = tok.encode(_PROBE).ids
    before, after = specials
    cuts = [i for i in range(len(_PROBE)) if _is_space_cut(_PROBE, i)]
    for cut in cuts:
        parts = (tok.encode(_PROBE[:cut], add_special_tokens=False).ids
                 + tok.encode(_PROBE[cut:], add_special_tokens=False).ids)
        if before + parts + after != whole:
            return False
    return True


_PROBE = ("The quick brown fox, it's 3.14159 or 2,718 - \"quoted\" (yes)!\n\n    def f(x): return x ** 2  # ok\n"
          "\tTab\tend. Ünïcödé naïve café, 日本語 テキスト, emoji 🙂 ok.  Two  spaces; a/b c:d e_f g.h 10% $5\r\nEnd")


def build_tokenizer(spec: str) -> Tokenizer:
    return ByteTokenizer() if spec == "byte" else HFTokenizerFile(spec)
