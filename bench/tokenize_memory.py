"""Peak RSS while tokenizing: a 3 MB vs a 600 MB single-file corpus (target: within 10%).

    python bench/tokenize_memory.py [--big-mb 600] [--rounds 1] [--tokenizer byte|bpe]

Both files are built in a temporary folder from the embedded corpus (the 3 MB of standard-library
sources, repeated for the big one) and deleted afterwards.  Each tokenization (byte tokenizer, a fresh
cache) runs in its own process, which reports its peak RSS; the process's RSS right after the imports
(torch, numpy) is printed too, so the part tokenizing adds is visible.  Before chunked tokenization
the byte tokenizer held the whole file as a Python list: 1.60 GB peak for 60 MB against 1.05 GB for
3 MB (issue 16, item 7).

With --tokenizer bpe, a byte-level BPE tokenizer (vocabulary 8,000, GPT-2/Llama 3 style) is trained on the
small corpus first, and the big file is also tokenized as one whole document ("big, whole": what every BPE
tokenizer did before HFTokenizerFile.encode_stream, and what one that fails its cut-at-spaces check still does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import interleave, median, record  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from vishwamai.config import DataConfig
from vishwamai.data import load_token_data
import vishwamai.data.tokenizer as tokenizer
if sys.argv[4] == "whole":  # the tokenizer is told it cannot be cut: the document is encoded at once
    tokenizer._splits_exactly_at_spaces = lambda *args: False

after_import_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
data = load_token_data(DataConfig(path=sys.argv[1], cache_dir=sys.argv[2], tokenizer=sys.argv[3]))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "after_import_mb": after_import_mb, "seconds": time.perf_counter() - start,
                  "tokens": data.meta["num_tokens"]}))
"""


def write_corpora(folder: Path, small_bytes: int, big_bytes: int) -> tuple[Path, Path]:
    """A small and a big single-file corpus of real text (the big one repeats the small one)."""
    from vishwamai.data.corpus import embedded_corpus_files

    text = b"".join(f.read_bytes() for f in embedded_corpus_files(small_bytes))
    small, big = folder / "small.txt", folder / "big.txt"
    small.write_bytes(text)
    with big.open("wb") as fh:  # written a copy at a time: this process never holds the big file
        for _ in range(max(1, big_bytes // len(text))):
            fh.write(text)
    return small, big


def train_bpe(corpus: Path, folder: Path) -> str:
    """A byte-level BPE tokenizer.json trained on `corpus` (the small one): its path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"]))
    tok.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


def tokenize(corpus: Path, folder: Path, tokenizer: str = "byte", how: str = "parts") -> dict:
    """Tokenize `corpus` into a fresh cache in a new process; that process's figures."""
    with tempfile.TemporaryDirectory(dir=folder) as cache:
        out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), cache, tokenizer, how], check=True,
                             capture_output=True, text=True)
    return {k: round(v, 1) for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=float, default=3)
    parser.add_argument("--big-mb", type=float, default=600)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vishwamai-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        small, big = write_corpora(folder, int(args.small_mb * 1e6), int(args.big_mb * 1e6))
        print(f"wrote {small.stat().st_size / 1e6:.1f} MB and {big.stat().st_size / 1e6:.1f} MB "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        spec = train_bpe(small, folder) if args.tokenizer == "bpe" else "byte"
        variants = {"small": lambda: tokenize(small, folder, spec), "big": lambda: tokenize(big, folder, spec)}
        if args.tokenizer == "bpe":
            variants["big, whole"] = lambda: tokenize(big, folder, spec, how="whole")
        results = interleave(variants, args.rounds)
        sizes = {"small": small.stat().st_size, "big": big.stat().st_size, "big, whole": big.stat().st_size}
    lines = ["| corpus (one file) | peak RSS MB | RSS after imports MB | tokenizing adds MB | seconds | tokens |",
             "|---|---|---|---|---|---|"]
    peak = {}
    for name, runs in results.items():
        peak[name] = median([r["peak_rss_mb"] for r in runs])
        base = median([r["after_import_mb"] for r in runs])
        lines.append(f"| {name} ({sizes[name] / 1e6:,.0f} MB) | {peak[name]:,.0f} | {base:,.0f} | "
                     f"{peak[name] - base:,.0f} | {median([r['seconds'] for r in runs]):.1f} | "
                     f"{runs[0]['tokens']:,} |")
    ratio = peak["big"] / peak["small"]
    lines += ["", f"- peak RSS {sizes['big'] / 1e6:,.0f} MB file / {sizes['small'] / 1e6:,.0f} MB file: "
                  f"**{ratio:.3f}** (target <= 1.10)"]
    if "big, whole" in peak:
        lines.append(f"- the big file encoded as one whole document / in parts: {peak['big, whole'] / peak['big']:.2f}x "
                     "peak RSS")
    record(f"tokenize_memory ({args.tokenizer} tokenizer)", lines)


if __name__ == "__main__":
    main()
