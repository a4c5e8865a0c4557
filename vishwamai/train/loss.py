"""The language-model loss: the forward and its cross-entropy, in one function the Trainer may compile.

Two ways to the same number:
  full     logits = lm_head(h) for every token, then F.cross_entropy on their float32 copy
           (the only way when a callback reads outputs.logits, e.g. distillation);
  chunked  `linear_cross_entropy`: the lm_head projection and the cross-entropy together, a block
           of `chunk_rows` tokens at a time, the gradients of h and of the lm_head weight computed
           in the forward (Liger's fused linear cross-entropy idea, written here).  The (tokens x vocab)
           float32 logits, their softmax and their gradient never exist whole: one block's do.  With a
           32k vocabulary at 8 x 256 tokens that is ~0.8 GB less at the peak (bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: such targets count neither in the sum nor in the mean


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T) over rows, with both gradients made block by block in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                reduction: str) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        # mean: every row's share of the gradient is 1/count; sum: 1.
        scale = 1.0 / count.clamp(min=1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
        for start in range(0, hidden.size(0), chunk_rows):
            h, t, ok = (x[start:start + chunk_rows] for x in (hidden, targets, valid))
            # As lm_head under autocast: the matmul in the autocast dtype, the softmax in float32.
            logits = (h @ weight.t()).float()
            lse = logits.logsumexp(-1)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(ok, lse - picked, 0.0).sum()
            if not want_grads:
                continue
            # d loss / d logits = softmax - one_hot(target), per row times its share; in place on the block.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -torch.ones_like(picked).unsqueeze(1))
            grad.mul_((ok.float() * scale).unsqueeze(1))
            grad = grad.to(h.dtype if not torch.is_autocast_enabled(h.device.type) else
                           torch.get_autocast_dtype(h.device.type))
            grad_hidden[start:start + chunk_rows] = grad @ weight.to(grad.dtype)
            grad_weight += (grad.t() @ h.to(grad.dtype)).float()
        if want_grads:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, (grad_weight * grad_output).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 1024, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight).float(), targets) without the whole logits.

    hidden (..., d) and targets (...) are flattened to rows; weight is (vocab, d)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: mean or sum")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1),
                                     chunk_rows, reduction)


def forward_and_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     forward_kwargs: Optional[dict[str, Any]] = None, chunk_rows: int = 0,
                     reduction: str = "mean") -> tuple[Any, torch.Tensor]:
    """The model's outputs and the cross-entropy of `targets` (float32, like the logits' softmax).

    chunk_rows > 0: the chunked loss; the outputs then hold no logits (model(..., logits=False))."""
    if chunk_rows:
        outputs = model(inputs, logits=False, **(forward_kwargs or {}))
        weight = lm_head_weight(model)
        return outputs, linear_cross_entropy(outputs.last_hidden, weight, targets, chunk_rows, reduction)
    outputs = model(inputs, **(forward_kwargs or {}))
    return outputs, F.cross_entropy(outputs.logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 0,
            reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy alone: what the Trainer compiles, model and loss in one graph, when nothing reads
    the outputs (a compiled region that returned them would have to keep the logits alive)."""
    return forward_and_loss(model, inputs, targets, None, chunk_rows, reduction)[1]


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output projection's weight through DDP's and torch.compile's wrappers."""
    for attr in ("module", "_orig_mod"):
        model = getattr(model, attr, model)
    return model.lm_head.weight
