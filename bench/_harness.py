"""Shared helpers for bench/ scripts: interleaved measurement, machine facts, RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def interleave(variants: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Run each variant once per round, in turn, so drift on a noisy machine hits all alike.

    The order rotates from round to round: no variant always runs right after the same other one
    (whose leftovers, e.g. a freed heap or a background thread, could favour or slow it)."""
    results: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(variants[name]())
            print(f"  round {r + 1}/{rounds} {name}: {results[name][-1]}", flush=True)
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """Median and the relative half-range: how noisy the figure is."""
    m = statistics.median(values)
    return f"{m:,.0f} (±{(max(values) - min(values)) / 2 / m:.1%})" if m else "0"


def throughput_table(results: dict[str, list[dict]], variant_header: str = "variant",
                     rss: bool = False) -> tuple[dict[str, float], list[str]]:
    """Median tokens/s per variant, and a Markdown table of tokens/s (with its spread) and step time
    (and the RSS after the last round): the table every throughput bench prints."""
    tps = {name: median([r["tokens_per_s"] for r in rs]) for name, rs in results.items()}
    rss_head, rss_rule = (" RSS MB after |", "---|") if rss else ("", "")
    lines = [f"| {variant_header} | tokens/s (median, ±half-range) | step ms (median) |{rss_head}",
             f"|---|---|---|{rss_rule}"]
    for name, rs in results.items():
        rss_cell = f" {rs[-1]['rss_mb']:.0f} |" if rss else ""
        lines.append(f"| {name} | {spread([r['tokens_per_s'] for r in rs])} | "
                     f"{median([r['step_ms'] for r in rs]):.1f} |{rss_cell}")
    return tps, lines + [""]


def record(title: str, lines: list[str]) -> None:
    """Print and append a dated block to bench/RESULTS.md."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    block = [f"### {title} — {stamp}", f"machine: {machine()}", f"command: `{command}`", "", *lines, ""]
    print("\n".join(block))
    with RESULTS.open("a") as fh:
        fh.write("\n".join(block) + "\n")
