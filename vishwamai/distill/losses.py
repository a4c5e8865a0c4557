"""Distillation losses on plain tensors (no model, no config): each is checked by hand in tests.

  kd_loss            T^2 * KL(teacher || student) of temperature-softened next-token distributions,
                     mean over positions; teachers of an ensemble are mixed as weighted probabilities
  representation_loss  MSE (optionally of RMS-normalised vectors) or (1 - cosine similarity) between
                     two (batch, seq, width) tensors
  attention_loss     KL or MSE between attention maps; different head counts are averaged over heads
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Attention probabilities are exactly 0 above the causal diagonal: clamp before the log
# so 0 * log(0) contributes 0 and has a finite gradient.
_PROB_FLOOR = 1e-12


def _kd_chunk_sum(student: torch.Tensor, *teachers: torch.Tensor, weights: tuple[float, ...],
                  temperature: float) -> torch.Tensor:
    """Sum over the chunk's positions of KL(p_teacher || p_student), at temperature T."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    p_teacher = sum(w * F.softmax(t.float() / temperature, dim=-1) for w, t in zip(weights, teachers))
    # xlogy: a teacher probability that underflows to 0 contributes 0, not nan.
    return (torch.xlogy(p_teacher, p_teacher) - p_teacher * log_p_student).sum()


def kd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], temperature: float,
            weights: Sequence[float] | None = None, chunk_size: int = 128) -> torch.Tensor:
    """T^2 * mean over (batch, position) of KL(sum_k w_k softmax(t_k / T) || softmax(s / T)).

    Chunked over the sequence; under autograd each chunk is recomputed in backward
    (activation checkpointing), so only one chunk's softmax of student and teacher is ever
    held at once instead of two full (batch, seq, vocab) probability tensors.
    The T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    weights = tuple(weights) if weights is not None else (1.0 / len(teacher_logits),) * len(teacher_logits)
    fn = functools.partial(_kd_chunk_sum, weights=weights, temperature=temperature)
    total = student_logits.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and student_logits.requires_grad
    for start in range(0, student_logits.size(1), chunk_size):
        chunk = [x[:, start:start + chunk_size] for x in (student_logits, *teacher_logits)]
        total = total + (checkpoint(fn, *chunk, use_reentrant=False) if recompute else fn(*chunk))
    n_positions = student_logits.size(0) * student_logits.size(1)
    return temperature ** 2 * total / n_positions


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / RMS(x) over the width: each position's vector rescaled to unit mean square."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def representation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                        normalize: bool = False) -> torch.Tensor:
    """mse: mean squared difference over all elements; cosine: mean over positions of 1 - cos(s, t).

    normalize: compare RMS-normalised vectors (MSE only; cosine is scale-free already). The
    residual stream of a pre-norm transformer grows with depth and training, so a raw MSE would
    be dominated by the teacher's scale rather than by where its representation points.
    """
    student, teacher = student.float(), teacher.float()
    if normalize:
        student, teacher = rms_normalize(student), rms_normalize(teacher)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"unknown representation loss {kind!r}")


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Between (batch, heads, seq, seq) attention probabilities.

    Equal head counts compare head by head; otherwise both maps are first averaged over
    their heads (a head-count-free summary: where each position looks, on average).
    kl: KL(teacher || student) of each query's distribution over keys, mean over queries
    (and heads); mse: mean squared difference of the probabilities.
    """
    student, teacher = student.float(), teacher.float()
    if student.size(1) != teacher.size(1):
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "kl":
        log_ratio = teacher.clamp_min(_PROB_FLOOR).log() - student.clamp_min(_PROB_FLOOR).log()
        return (teacher * log_ratio).sum(-1).mean()
    raise ValueError(f"unknown attention loss {kind!r}")
