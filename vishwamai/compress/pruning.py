"""Gradual magnitude pruning (distillation.pruning.*) as a training callback.

Masks are boolean tensors shaped like the weights they prune. They are recomputed
from weight magnitudes on the schedule's update steps (schedule.py) and enforced
three ways, because each alone leaks:
  - gradients of pruned weights are zeroed before the optimizer step (on_before_optimizer_step);
  - an optimizer step post-hook re-zeroes pruned weights right after every step, since
    AdamW's moments and weight decay still move a weight whose gradient is zero, and the
    loop evaluates before on_step_end;
  - the masks are the callback's saved state (state_key "pruning"), so a resumed run
    keeps exactly the same weights pruned.
Pruned weights are zero, so they stay pruned when masks are recomputed (sparsity only grows).

Unstructured pruning removes single weights of Linear layers (per layer, or by one global
threshold); structured pruning removes whole SwiGLU channels (a gate row, an up row and a
down column) and/or whole attention heads (q_proj rows and o_proj columns of a head).
Parameters whose name contains a `pruning.exclude` pattern are never pruned (embeddings,
the output head and norms by default).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from vishwamai.compress.schedule import is_update_step, sparsity_at
from vishwamai.train.events import ORDER_FEATURE, Callback

log = logging.getLogger(__name__)

PRUNED_DIR = "pruned"
Masks = dict[str, torch.Tensor]


# ------------------------------------------------------------------ candidates
def _excluded(name: str, exclude: list[str]) -> bool:
    return any(pattern in name for pattern in exclude)


def linear_weights(model: nn.Module, exclude: list[str]) -> dict[str, nn.Parameter]:
    """Weights of the Linear layers that may be pruned, by parameter name (a tied weight once)."""
    found, seen = {}, set()
    for mod_name, module in model.named_modules():
        name = f"{mod_name}.weight"
        if isinstance(module, nn.Linear) and not _excluded(name, exclude) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found[name] = module.weight
    return found


@dataclasses.dataclass
class UnitGroup:
    """Prunable units of one layer (SwiGLU channels or attention heads) and the weights they own."""

    kind: str  # "mlp" | "heads"
    scores: torch.Tensor  # one L2 norm per unit
    to_masks: Callable[[torch.Tensor], Masks]  # keep (bool per unit) -> elementwise masks


def _mlp_group(prefix: str, mlp: nn.Module) -> UnitGroup:
    gate_up, down = mlp.gate_up.weight, mlp.down.weight
    hidden = down.shape[1]
    gate, up = gate_up[:hidden], gate_up[hidden:]
    scores = (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()

    def to_masks(keep: torch.Tensor) -> Masks:
        return {f"{prefix}.gate_up.weight": keep.repeat(2)[:, None].expand_as(gate_up).clone(),
                f"{prefix}.down.weight": keep[None, :].expand_as(down).clone()}

    return UnitGroup("mlp", scores.detach(), to_masks)


def _head_group(prefix: str, attn: nn.Module) -> UnitGroup:
    q, o = attn.q_proj.weight, attn.o_proj.weight
    n, hd = attn.n_heads, attn.head_dim
    scores = (q.view(n, hd, -1).pow(2).sum((1, 2)) + o.view(o.shape[0], n, hd).pow(2).sum((0, 2))).sqrt()

    def to_masks(keep: torch.Tensor) -> Masks:
        per_row = keep.repeat_interleave(hd)
        return {f"{prefix}.q_proj.weight": per_row[:, None].expand_as(q).clone(),
                f"{prefix}.o_proj.weight": per_row[None, :].expand_as(o).clone()}

    return UnitGroup("heads", scores.detach(), to_masks)


def unit_groups(model: nn.Module, targets: list[str], exclude: list[str]) -> Iterator[UnitGroup]:
    for i, block in enumerate(model.blocks):
        if "mlp" in targets and not _excluded(f"blocks.{i}.mlp.", exclude):
            yield _mlp_group(f"blocks.{i}.mlp", block.mlp)
        if "heads" in targets and not _excluded(f"blocks.{i}.attn.", exclude):
            yield _head_group(f"blocks.{i}.attn", block.attn)


# ------------------------------------------------------------------------ masks
def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping all but the round(sparsity * n) smallest entries (ties: lowest index pruned)."""
    flat = scores.flatten()
    n_prune = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.argsort(flat, stable=True)[:n_prune]] = False
    return keep.view_as(scores)


def unstructured_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> Masks:
    if scope == "per_layer":
        return {name: _keep_largest(w.detach().abs(), sparsity) for name, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_largest(flat, sparsity).split([w.numel() for w in weights.values()])
    return {name: k.view_as(w) for (name, w), k in zip(weights.items(), keep)}


def structured_masks(groups: list[UnitGroup], sparsity: float, scope: str) -> Masks:
    masks: Masks = {}
    for kind in ("mlp", "heads"):
        same = [g for g in groups if g.kind == kind]
        if not same:
            continue
        if scope == "per_layer":
            keeps = [_keep_largest(g.scores, sparsity) for g in same]
        else:
            keeps = list(_keep_largest(torch.cat([g.scores for g in same]), sparsity)
                         .split([g.scores.numel() for g in same]))
        for group, keep in zip(same, keeps):
            if not keep.any():  # a layer with no unit left would cut the residual stream's branch to zero
                keep[group.scores.argmax()] = True
            masks.update(group.to_masks(keep))
    return masks


def compute_masks(model: nn.Module, sparsity: float, cfg) -> Masks:
    """Masks giving `sparsity` under pruning config `cfg` (method, scope, structured_targets, exclude)."""
    exclude = list(cfg.exclude)
    if cfg.method == "unstructured":
        return unstructured_masks(linear_weights(model, exclude), sparsity, cfg.scope)
    return structured_masks(list(unit_groups(model, list(cfg.structured_targets), exclude)), sparsity, cfg.scope)


@torch.no_grad()
def apply_masks(params: dict[str, torch.Tensor], masks: Masks) -> None:
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device))


def sparsity_report(params: dict[str, torch.Tensor], names: list[str]) -> dict:
    """Real sparsity (weights == 0) of the pruned tensors, overall and per layer."""
    per_layer, zeros, total = {}, 0, 0
    for name in names:
        w = params[name]
        z = int((w == 0).sum())
        per_layer[name] = {"numel": w.numel(), "zeros": z, "sparsity": z / w.numel()}
        zeros, total = zeros + z, total + w.numel()
    return {"sparsity": zeros / max(total, 1), "sparsity_per_layer": per_layer,
            "pruned_weights": zeros, "prunable_weights": total}


# ------------------------------------------------------------------- compaction
@torch.no_grad()
def compact_mlp(model: nn.Module, model_cfg) -> tuple[nn.Module, object, dict]:
    """A smaller model without the all-zero SwiGLU channels, and what was done.

    The Transformer has one ffn_hidden for every layer, so each layer keeps the same
    number of channels: the largest number any layer still uses. A layer that kept fewer
    carries some of its pruned (all-zero) channels along, which changes nothing it computes.
    """
    from vishwamai.model import Transformer

    kept = []
    for block in model.blocks:
        hidden = block.mlp.down.weight.shape[1]
        w = block.mlp.gate_up.weight
        alive = (w[:hidden] != 0).any(1) | (w[hidden:] != 0).any(1) | (block.mlp.down.weight != 0).any(0)
        kept.append(alive)
    hidden = kept[0].numel()
    width = max(1, max(int(k.sum()) for k in kept))
    info = {"ffn_hidden_before": hidden, "ffn_hidden_after": width,
            "channels_kept_per_layer": [int(k.sum()) for k in kept]}
    if width == hidden:
        return model, model_cfg, {**info, "compacted": False, "note": "no SwiGLU channel is entirely zero"}
    new_cfg = dataclasses.replace(model_cfg, ffn_hidden=width)
    state = dict(model.state_dict())
    for i, alive in enumerate(kept):
        # Surviving channels first, then pruned ones to fill the common width (stable order).
        index = torch.argsort((~alive).to(torch.int8), stable=True)[:width]
        p = f"blocks.{i}.mlp"
        gate_up = state[f"{p}.gate_up.weight"]
        state[f"{p}.gate_up.weight"] = torch.cat([gate_up[:hidden][index], gate_up[hidden:][index]])
        state[f"{p}.down.weight"] = state[f"{p}.down.weight"][:, index]
    small = Transformer(new_cfg).to(next(model.parameters()).device)
    small.load_state_dict(state)
    return small, new_cfg, {**info, "compacted": True}


# --------------------------------------------------------------------- callback
class GradualPruning(Callback):
    """Prunes trainer.raw_model on the configured schedule; makes it permanent and small at the end."""
    order = ORDER_FEATURE  # changes the model: before the checkpoint saves it

    state_key = "pruning"

    def __init__(self, pruning_cfg, run_dir: str | Path):
        self.cfg = pruning_cfg
        self.run_dir = Path(run_dir)
        self.masks: Masks = {}
        self.scheduled = 0.0  # the schedule's sparsity at the last mask update
        self._params: dict[str, torch.Tensor] = {}
        self._hook = None
        # Set at on_train_end for the quantization callback: the final (possibly compacted) model.
        self.final_model: nn.Module | None = None
        self.final_model_cfg = None

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"masks": {k: v.cpu() for k, v in self.masks.items()}, "scheduled": self.scheduled}

    def load_state_dict(self, state: dict) -> None:
        self.masks = dict(state.get("masks", {}))
        self.scheduled = float(state.get("scheduled", 0.0))

    # ----------------------------------------------------------- events
    def on_train_start(self, trainer) -> None:
        self._params = dict(trainer.raw_model.named_parameters())
        unknown = set(self.masks) - set(self._params)
        if unknown:
            from vishwamai.errors import CheckpointError

            raise CheckpointError(f"pruning masks in the resumed checkpoint name unknown weights: {sorted(unknown)}")
        apply_masks(self._params, self.masks)  # resumed: the checkpoint's masks hold from the first step
        # Re-zero pruned weights right after each optimizer step, before anything evaluates the model.
        self._hook = trainer.optimizer.register_step_post_hook(lambda *_: apply_masks(self._params, self.masks))

    def on_before_optimizer_step(self, trainer) -> None:
        for name, mask in self.masks.items():
            grad = self._params[name].grad
            if grad is not None:
                grad.mul_(mask.to(grad.device))

    def on_step_end(self, trainer) -> None:
        step, c = trainer.state.step, self.cfg
        if not is_update_step(step, begin=c.begin_step, end=c.end_step, frequency=c.frequency):
            apply_masks(self._params, self.masks)  # cheap; covers optimizer wrappers that skip step hooks
            return
        self.scheduled = sparsity_at(step, target=c.target_sparsity, initial=c.initial_sparsity,
                                     begin=c.begin_step, end=c.end_step, schedule=c.pruning_schedule)
        with torch.no_grad():
            self.masks = {k: v.to(self._params[k].device)
                          for k, v in compute_masks(trainer.raw_model, self.scheduled, c).items()}
        apply_masks(self._params, self.masks)
        trainer.metrics["sparsity_target"] = self.scheduled
        trainer.metrics["sparsity"] = sparsity_report(self._params, list(self.masks))["sparsity"]

    def on_train_end(self, trainer) -> None:
        self._remove_hook()
        if trainer.summary.get("preempted"):  # the run resumes later: no end products in the grace period
            return
        apply_masks(self._params, self.masks)  # permanent: the weights themselves are zero
        report = sparsity_report(self._params, list(self.masks))
        report["sparsity_target"] = self.scheduled
        trainer.summary.update(report)
        self._save_small(trainer)

    def on_exception(self, trainer, *, error: BaseException) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _save_small(self, trainer) -> None:
        """RUN_DIR/pruned/: the pruned model, without its all-zero MLP channels where structured."""
        from vishwamai.checkpoint.io import as_model_config, save_model

        model, model_cfg = trainer.raw_model, as_model_config(trainer.cfg.model)
        info: dict = {"compacted": False}
        if self.cfg.method == "structured" and "mlp" in self.cfg.structured_targets:
            model, model_cfg, info = compact_mlp(model, model_cfg)
        if self.cfg.method == "structured" and "heads" in self.cfg.structured_targets:
            # head_dim = d_model / n_heads: fewer heads of the same width is not representable.
            info["heads_note"] = "pruned heads are zeroed, not removed (the model ties head_dim to d_model/n_heads)"
        self.final_model, self.final_model_cfg = model, model_cfg
        if trainer.is_main:
            out = save_model(self.run_dir / PRUNED_DIR, model, model_cfg)
            trainer.summary["pruned_model"] = str(out)
        trainer.summary["pruned_num_parameters"] = sum(p.numel() for p in model.parameters())
        trainer.summary["pruning_compaction"] = info
