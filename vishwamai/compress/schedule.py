"""Sparsity schedules for gradual magnitude pruning (distillation.pruning.pruning_schedule).

cubic (Zhu & Gupta 2017, "To prune, or not to prune"):
    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3     for t0 <= t <= t0 + n * dt
It prunes fast right after t0 and slowly near the end, when few weights are left to
remove. (Some libraries call the mirror-image curve, slow-then-fast, "cube": not this.)
linear moves from s_i to s_f at a constant rate; constant is one-shot pruning to s_f
at begin_step. Before begin_step nothing is pruned; from end_step on the sparsity is s_f.
"""

from __future__ import annotations

SCHEDULES = ("cubic", "linear", "constant")


def sparsity_at(step: int, *, target: float, initial: float = 0.0, begin: int, end: int,
                schedule: str = "cubic") -> float:
    """The sparsity the masks should have after `step` optimizer steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pruning schedule {schedule!r}, expected one of {list(SCHEDULES)}")
    if step < begin:
        return 0.0
    if step >= end or schedule == "constant" or end == begin:
        return target
    progress = (step - begin) / (end - begin)
    if schedule == "linear":
        return initial + (target - initial) * progress
    return target + (initial - target) * (1.0 - progress) ** 3


def is_update_step(step: int, *, begin: int, end: int, frequency: int) -> bool:
    """Masks are recomputed every `frequency` steps from begin_step, and always at end_step."""
    return step == end or (begin <= step < end and (step - begin) % frequency == 0)
