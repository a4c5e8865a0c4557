"""Tokenizers: byte-level by default (nothing to download), a local tokenizer.json, or a model dir holding one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

from vishwamai.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    identity: str  # changes whenever the mapping text -> ids changes (cache key)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus id 256 marking the end of a document."""

    vocab_size = 257
    eos_id = 256
    identity = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

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

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def build_tokenizer(spec: str) -> Tokenizer:
    return ByteTokenizer() if spec == "byte" else HFTokenizerFile(spec)
