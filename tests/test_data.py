"""Data pipeline: tokenizer, corpus -> memory-mapped tokens (cached), seeded rank-aware sampling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vishwamai.config import DataConfig
from vishwamai.data import ByteTokenizer, PrefetchingSampler, SequenceSampler, load_token_data
from vishwamai.errors import ConfigError, DataError


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text


def _corpus(tmp_path, docs):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(doc)
    return folder


def test_folder_to_token_file_round_trip_and_split(tmp_path):
    docs = [f"document {i}: " + "lorem ipsum " * 40 for i in range(10)]
    cfg = DataConfig(path=str(_corpus(tmp_path, docs)), seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    data = load_token_data(cfg)
    tokens = np.concatenate([data.train, data.val])
    tok = ByteTokenizer()
    expected = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    assert tokens.tolist() == expected
    assert len(data.val) == int(len(expected) * 0.1)
    assert data.train[3:9].tolist() == expected[3:9] and data.val[:5].tolist() == expected[len(data.train):][:5]
    assert 0 < data.meta["unigram_entropy_nats"] < np.log(257)


def test_token_file_is_built_once_and_reused(tmp_path):
    cfg = DataConfig(path=str(_corpus(tmp_path, ["abc " * 500])), seq_len=16, cache_dir=str(tmp_path / "c"))
    load_token_data(cfg)
    (bin_path,) = (tmp_path / "c").rglob("tokens.bin")
    stamp = bin_path.stat().st_mtime_ns
    load_token_data(cfg)
    assert bin_path.stat().st_mtime_ns == stamp
    assert not list((tmp_path / "c").rglob("*.tmp*")), "no temporary files left behind"


def test_jsonl_source_and_bad_record_named_with_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": "hello world " * 30}) for _ in range(5)))
    data = load_token_data(DataConfig(path=str(good), seq_len=16, cache_dir=str(tmp_path / "c")))
    assert data.meta["num_documents"] == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_token_data(DataConfig(path=str(bad), seq_len=16, cache_dir=str(tmp_path / "c")))


def test_missing_path_and_tiny_corpus_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_token_data(DataConfig(path=str(tmp_path / "nope"), cache_dir=str(tmp_path)))
    small = tmp_path / "small.txt"
    small.write_text("too short")
    with pytest.raises(DataError, match="corpus too small"):
        load_token_data(DataConfig(path=str(small), seq_len=64, cache_dir=str(tmp_path)))


def test_embedded_corpus_needs_no_download(tmp_path):
    data = load_token_data(DataConfig(embedded_max_bytes=100_000, cache_dir=str(tmp_path)))
    assert data.meta["num_tokens"] > 50_000


def test_local_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 200)
    data = load_token_data(DataConfig(path=str(corpus), tokenizer=str(path), seq_len=8, cache_dir=str(tmp_path)))
    assert data.vocab_size == tok.get_vocab_size()
    assert data.tokenizer.eos_id == tok.token_to_id("</s>")
    assert data.tokenizer.decode(data.train[:4].tolist()).startswith("the quick")


def test_sampler_is_seeded_shifted_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = SequenceSampler(tokens, 10, seed=7), SequenceSampler(tokens, 10, seed=7)
    x, y = a.next_batch(4)
    torch.testing.assert_close(x, b.next_batch(4)[0])
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, SequenceSampler(tokens, 10, seed=8).next_batch(4)[0])
    # Resume mid-epoch and across the epoch boundary from the saved position.
    for _ in range(30):
        a.next_batch(3)
    resumed = SequenceSampler(tokens, 10, seed=0)
    resumed.load_state_dict(a.state_dict())
    for _ in range(40):
        torch.testing.assert_close(a.next_batch(5)[0], resumed.next_batch(5)[0])


def test_ranks_see_disjoint_data_whose_union_is_the_single_process_batch():
    tokens = np.arange(2000, dtype=np.uint16)
    single = SequenceSampler(tokens, 10, seed=3)
    ranks = [SequenceSampler(tokens, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        expected = single.window_ids(8)
        parts = [s.window_ids(4) for s in ranks]
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        assert torch.equal(torch.cat(parts), expected)


def test_each_epoch_visits_every_window_once():
    tokens = np.arange(101, dtype=np.uint16)
    sampler = SequenceSampler(tokens, 10, seed=1)
    seen = torch.cat([sampler.window_ids(2) for _ in range(5)])
    assert sorted(seen.tolist()) == list(range(10))
    assert sampler.epoch == 1


# ------------------------------------------------------------------ read ahead
def _step(sampler, batch_size: int, micro: int):
    """What the training loop does per step: take the ids, gather them micro-batch by micro-batch."""
    ids = sampler.window_ids(batch_size)
    return ids, [sampler.gather(chunk) for chunk in ids.split(micro)]


def test_read_ahead_gives_the_plain_samplers_batches_and_state_across_epochs():
    tokens = np.arange(1001, dtype=np.uint16)  # 100 windows: several epoch boundaries below
    plain = SequenceSampler(tokens, 10, seed=5)
    for depth in (1, 3):
        plain.load_state_dict({"epoch": 0, "cursor": 0, "seed": 5})
        ahead = PrefetchingSampler(SequenceSampler(tokens, 10, seed=5), depth)
        for _ in range(60):
            ids, batches = _step(ahead, 7, 3)
            assert torch.equal(ids, plain.window_ids(7))
            for (x, y), chunk in zip(batches, ids.split(3)):
                px, py = plain.gather(chunk)
                assert torch.equal(x, px) and torch.equal(y, py)
            assert ahead.state_dict() == plain.state_dict()  # the next unread window, not the next read one
        assert ahead.hits == 59 and ahead.misses == 1  # every step after the first was read ahead
        ahead.close()


def test_read_ahead_state_resumes_exactly_without_skipping_windows_read_ahead():
    tokens = np.arange(2001, dtype=np.uint16)
    ahead = PrefetchingSampler(SequenceSampler(tokens, 10, seed=2), depth=2)
    for _ in range(13):
        _step(ahead, 6, 6)
    saved = ahead.state_dict()  # two further steps have been read ahead by now
    expected = [_step(ahead, 6, 6)[0] for _ in range(40)]
    resumed = PrefetchingSampler(SequenceSampler(tokens, 10, seed=0), depth=2)
    resumed.load_state_dict(saved)
    for want in expected:
        assert torch.equal(_step(resumed, 6, 6)[0], want)
    ahead.close()
    resumed.close()


def test_a_changed_batch_size_or_a_redone_step_drops_or_reuses_the_read_ahead_correctly():
    tokens = np.arange(3001, dtype=np.uint16)
    plain = SequenceSampler(tokens, 10, seed=9)
    ahead = PrefetchingSampler(SequenceSampler(tokens, 10, seed=9), depth=1)
    for batch_size in (8, 8, 4, 4, 12, 8):  # dynamic batch sizing changes it between steps
        ids = ahead.window_ids(batch_size)
        assert torch.equal(ids, plain.window_ids(batch_size))
        for micro in (batch_size, 2):  # a step redone with a smaller micro-batch (out of memory)
            rows = [ahead.gather(chunk)[0] for chunk in ids.split(micro)]
            assert torch.equal(torch.cat(rows), plain.gather(ids)[0])
    assert ahead.misses == 4 and ahead.hits == 2  # the first step and each change of size
    ahead.close()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_reading_windows_keeps_none_of_the_token_file_resident(tmp_path):
    """RSS follows the batch, not the corpus: the token file is never mapped into the process
    (a mapping kept a readahead chunk / large folio resident per window: RSS grew with the corpus)."""
    words = " ".join(f"w{i % 997}" for i in range(400_000))  # ~2.5 MB of text, 5 MB of tokens
    corpus = tmp_path / "big.txt"
    corpus.write_text(words)
    data = load_token_data(DataConfig(path=str(corpus), seq_len=64, cache_dir=str(tmp_path / "c")))
    sampler = SequenceSampler(data.train, 64, seed=0)
    for _ in range(50):
        x, y = sampler.next_batch(16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.int64
    assert "tokens.bin" not in Path("/proc/self/smaps").read_text()


# ------------------------------------------------------------------ corpus input
def _tokens_of(path: Path, cache: Path, chunk_bytes: int) -> list[int]:
    from vishwamai.data.dataset import build_token_file

    bin_path = build_token_file([path], ByteTokenizer(), cache, chunk_bytes=chunk_bytes)
    return np.fromfile(bin_path, dtype=np.uint16).tolist()


def test_chunked_tokenization_gives_the_tokens_of_the_whole_file(tmp_path):
    # Multi-byte characters and a few invalid bytes (under the refusal threshold) fall across the
    # boundaries of 7-byte chunks; the token file equals that of one whole-file read.
    text = ("naïve café — 日本語 ✓ 🙂 " * 400).encode("utf-8")
    stray = b"\xe2\x82" + b"x" + b"\xff"  # a truncated sequence and a byte never valid in UTF-8
    data = text[:3000] + stray + text[3000:]
    corpus = tmp_path / "one.txt"
    corpus.write_bytes(data)
    whole = _tokens_of(corpus, tmp_path / "whole", chunk_bytes=1 << 30)
    for chunk_bytes in (1, 7, 4096):
        assert _tokens_of(corpus, tmp_path / f"c{chunk_bytes}", chunk_bytes) == whole
    tok = ByteTokenizer()
    assert whole == tok.encode(data.decode("utf-8", errors="replace")) + [tok.eos_id]


def _bpe_tokenizer(kind: str, text: str):
    """A small BPE tokenizer trained on `text`, pre-tokenized the way a family of HF models does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte-level (GPT-2, Llama 3, Qwen)":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "metaspace with a BOS (Llama 2, Mistral)":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    else:  # old sentencepiece conversions: a space prepended to every encode() call, no pre-tokenizer
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    if kind.startswith("metaspace"):
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.mark.parametrize("kind, in_parts", [("byte-level (GPT-2, Llama 3, Qwen)", True),
                                            ("metaspace with a BOS (Llama 2, Mistral)", True),
                                            ("prepend normalizer (old sentencepiece)", False)])
def test_a_bpe_tokenizer_encodes_a_big_file_in_parts_exactly_or_whole(tmp_path, kind, in_parts):
    pytest.importorskip("tokenizers")
    from vishwamai.data.dataset import build_token_file
    from vishwamai.data.tokenizer import HFTokenizerFile

    text = "".join(f"def f{i}(x):\n    return x  *  {i} # naïve café 日本語\n\n  The quick fox {i}, jumps. "
                   for i in range(300))
    path = tmp_path / "tokenizer.json"
    _bpe_tokenizer(kind, text).save(str(path))
    tok = HFTokenizerFile(str(path))
    corpus = tmp_path / "one.txt"
    corpus.write_text(text)
    assert tok.splits_at_spaces == in_parts  # the probe finds whether cutting at spaces is exact
    parts = list(tok.encode_stream(text[i:i + 500] for i in range(0, len(text), 500)))
    assert len(parts) > 10 if in_parts else len(parts) == 1  # memory bounded by a piece, or whole
    tokens = np.fromfile(build_token_file([corpus], tok, tmp_path / "cache", chunk_bytes=512), dtype=np.uint16)
    assert tokens.tolist() == tok.encode(text) + [tok.eos_id]  # exactly the whole document's ids


def test_a_binary_file_is_refused_naming_it(tmp_path):
    elf = Path(sys.executable).resolve()
    assert elf.read_bytes()[:4] == b"\x7fELF", "needs an ELF interpreter (Linux)"
    with pytest.raises(DataError, match=rf"{elf}: a binary file, not text \(NUL byte at offset \d+\)"):
        load_token_data(DataConfig(path=str(elf), cache_dir=str(tmp_path)))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text " * 100)
    (folder / "b.txt").write_bytes(elf.read_bytes()[:20000])
    with pytest.raises(DataError, match="b.txt: a binary file"):
        load_token_data(DataConfig(path=str(folder), cache_dir=str(tmp_path)))
    assert not list(tmp_path.rglob("tokens.bin*")), "a refused corpus leaves no partial token file"


def test_a_latin1_text_file_is_refused_and_a_few_stray_bytes_warn(tmp_path, caplog):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("café crème brûlée à la française " * 200).encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text: \d+ invalid UTF-8 bytes"):
        load_token_data(DataConfig(path=str(latin1), cache_dir=str(tmp_path)))
    stray = tmp_path / "stray.txt"
    stray.write_bytes(b"plain ascii text " * 2000 + b"\xe9" + b" more text" * 100)  # 1 bad byte in 35 KB
    with caplog.at_level("WARNING", logger="vishwamai.data.corpus"):
        data = load_token_data(DataConfig(path=str(stray), seq_len=16, cache_dir=str(tmp_path)))
    assert data.meta["num_tokens"] > 30_000
    assert "stray.txt: 1 bytes (0.003%) are not valid UTF-8" in caplog.text


@pytest.mark.parametrize("lines, message", [
    ([b'{"text": "ok"}', b'{"text": "caf\xe9"}'], r"bad.jsonl:2: not UTF-8"),
    ([b'{"text": "ok"}', b'', b'{"text": 5}'], r"bad.jsonl:3: 'text' must be a string, got int"),
    ([b'{"text": "ok"}', b'{"text": null}'], r"bad.jsonl:2: 'text' must be a string, got NoneType"),
    ([b'["text"]'], r"bad.jsonl:1: expected a JSON object with a 'text' field"),
    ([b'{"text": "ok"}', b'{"text": "unterminated'], r"bad.jsonl:2: not valid JSON"),
])
def test_bad_jsonl_lines_are_errors_naming_file_and_line(tmp_path, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=message):
        load_token_data(DataConfig(path=str(bad), cache_dir=str(tmp_path)))


def test_an_empty_or_malformed_tokenizer_file_is_a_config_error(tmp_path):
    pytest.importorskip("tokenizers")
    empty, garbage = tmp_path / "empty.json", tmp_path / "garbage.json"
    empty.write_text("")
    garbage.write_text("not json")
    with pytest.raises(ConfigError, match=r"data.tokenizer.*empty.json is not a tokenizer.json \(the file is empty\)"):
        load_token_data(DataConfig(tokenizer=str(empty), cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"garbage.json is not a tokenizer.json"):
        load_token_data(DataConfig(tokenizer=str(garbage), cache_dir=str(tmp_path)))


def test_cli_on_a_binary_corpus_exits_2_naming_the_file_without_a_traceback(tmp_path, run_module):
    elf = Path(sys.executable).resolve()
    proc = run_module("vishwamai.training_v2", f"data.path={elf}", f"data.cache_dir={tmp_path}/c",
                      "monitoring.enabled=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{elf}: a binary file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["-1", "17"])
def test_data_prefetch_out_of_range_is_a_config_error_naming_it(value):
    from vishwamai.config import validate
    from vishwamai.training_v2 import compose_config

    with pytest.raises(ConfigError) as err:
        validate(compose_config([f"data.prefetch={value}"], run_dir="/tmp/x"))
    assert err.value.key == "data.prefetch"


def test_training_with_read_ahead_is_bitwise_the_run_without(tmp_path, tiny_overrides):
    """The real loop (micro-batches, evaluation): the same loss at every step with and without read ahead."""
    from vishwamai.training_v2 import compose_config, run

    losses = {}
    for depth in (0, 2):
        run_dir = tmp_path / f"prefetch{depth}"
        run(compose_config(tiny_overrides + ["training.device=cpu", "training.num_threads=1", "training.max_steps=6",
                                             "training.gradient_accumulation_steps=2", f"data.prefetch={depth}",
                                             f"data.cache_dir={tmp_path / 'cache'}"], run_dir=str(run_dir)))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[depth] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert len(losses[0]) == 6 and losses[2] == losses[0]


def test_closing_the_read_ahead_joins_its_reader_thread():
    import threading

    before = set(threading.enumerate())  # other tests' samplers may still have theirs
    ahead = PrefetchingSampler(SequenceSampler(np.arange(1001, dtype=np.uint16), 10, seed=0), depth=2)
    ahead.window_ids(4)
    readers = [t for t in set(threading.enumerate()) - before if t.name.startswith("vishwamai-read-ahead")]
    assert len(readers) == 1
    ahead.close()
    assert not readers[0].is_alive()
    ahead.close()  # idempotent: the Trainer may close what a test already closed
