"""Automatic mixed precision: autocast, fp16 loss scaling, and O2's float32 master weights.

amp.opt_level:
  O1  autocast: weights, gradients and optimizer state stay float32; matmuls and
      other autocast-listed ops run in amp.dtype.
  O2  the classic "almost fp16" contract: the model's matrices (linear and embedding
      weights) are stored in amp.dtype, so the forward/backward reads half the bytes and
      activations/gradients are half precision; the optimizer holds float32 master copies
      and updates those (an update of 1e-4 x the weight is below bf16's resolution and
      would be lost on a bf16 weight), then the model's copies are refreshed from them.
      Vectors (norm gains) stay float32 in the model; RMSNorm and the loss compute in float32.
      The masters are the weights training really holds: a checkpoint's model.safetensors (and
      final/, what export, quantization and distillation read) stores them in float32, not the
      model's amp.dtype copies, and a resume restores them from there bitwise (masters_from).
Loss scaling (float16 only; bfloat16 has float32's exponent range and needs none):
  a GradScaler driven by amp.loss_scale.{enabled,init_scale,growth_interval}.  A step whose
  unscaled gradients hold inf/NaN is skipped by the loop and counted like any non-finite step
  (metrics.jsonl, summary.json, training.max_consecutive_bad_steps), so an fp16 run whose scale
  overflows every step fails instead of reporting success with an untrained model.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Optional

import torch

from vishwamai.config import AmpConfig

log = logging.getLogger(__name__)


class Precision:
    def __init__(self, cfg: AmpConfig, device: torch.device):
        self.enabled = cfg.enabled
        self.device_type = device.type
        self.dtype = getattr(torch, cfg.dtype)
        self.master_weights = cfg.enabled and cfg.opt_level == "O2"
        use_scaler = cfg.enabled and cfg.dtype == "float16" and cfg.loss_scale.enabled
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=cfg.loss_scale.init_scale,
            growth_interval=cfg.loss_scale.growth_interval, enabled=use_scaler,
        )
        # O2: (model parameter in amp.dtype, its float32 master) pairs; names for checkpoints.
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self._names: list[str] = []
        self._model_params: dict[str, torch.nn.Parameter] = {}
        if cfg.enabled:
            log.info("%s", self.describe(cfg))

    @staticmethod
    def describe(cfg: AmpConfig) -> str:
        what = (f"amp {cfg.opt_level} {cfg.dtype}: " +
                ("autocast, float32 weights" if cfg.opt_level == "O1"
                 else f"{cfg.dtype} weights, float32 master weights in the optimizer"))
        if cfg.dtype == "bfloat16":
            return what + "; amp.loss_scale has no effect with bfloat16 (float32's range: nothing to scale)"
        scaling = f"loss scaling from {cfg.loss_scale.init_scale:g}" if cfg.loss_scale.enabled else "no loss scaling"
        return f"{what}; {scaling}"

    # ------------------------------------------------------------------ model
    def prepare(self, model: torch.nn.Module, parallel=None) -> torch.nn.Module:
        """Before the model is wrapped (DDP) or compiled: O2 casts it and keeps float32 masters.

        A strategy that keeps the masters itself (parallel.keeps_master_weights: FSDP) gets the model as is."""
        self._model_params = dict(model.named_parameters())
        if not self.master_weights or getattr(parallel, "keeps_master_weights", False):
            return model
        for name, p in self._model_params.items():
            if not p.requires_grad or p.dim() < 2:
                continue  # vectors (norm gains) stay float32 in the model and are their own master
            master = torch.nn.Parameter(p.detach().clone().float())
            p.data = p.data.to(self.dtype)
            self._pairs.append((p, master))
            self._names.append(name)
        return model

    def optimizer_params(self, params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """What the optimizer updates and the loop clips: `params`, under O2 with their float32 masters."""
        masters = {id(p): m for p, m in self._pairs}
        return [masters.get(id(p), p) for p in params if p.requires_grad]

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    # ------------------------------------------------------------------- step
    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients where the optimizer reads them, unscaled: then they can be measured and clipped."""
        for p, master in self._pairs:  # O2: the half-precision gradient moves to the float32 master
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        # The loop skips a step whose unscaled gradient norm is not finite (and counts it), so the
        # scaler only sees finite gradients here; its update() still backs the scale off after such
        # a step (unscale_ recorded the inf).
        self.scaler.step(optimizer)
        self.copy_masters_to_model()

    def update(self) -> None:
        self.scaler.update()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        for p, _ in self._pairs:
            p.grad = None

    @torch.no_grad()
    def copy_masters_to_model(self) -> None:
        if self._pairs:
            torch._foreach_copy_([p.data for p, _ in self._pairs], [m.data for _, m in self._pairs])

    def masters(self) -> dict[str, torch.Tensor]:
        """O2: the float32 masters by parameter name (live tensors; {} otherwise)."""
        return {name: m.detach() for name, (_, m) in zip(self._names, self._pairs)}

    def masters_from(self, weights: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        """O2: the masters to restore from a saved model's weights, or None (no masters kept here)."""
        return {name: weights[name].float() for name in self._names} if self._pairs else None

    @property
    def uses_loss_scaling(self) -> bool:
        return self.scaler.is_enabled()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = dict(self.scaler.state_dict())
        if self._pairs:  # clones: the optimizer changes the masters in place while a save may still run
            state["master_weights"] = {name: m.clone() for name, m in self.masters().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        masters: Optional[dict[str, torch.Tensor]] = state.pop("master_weights", None)
        if state:
            self.scaler.load_state_dict(state)
        with torch.no_grad():
            if masters is None:
                if self._pairs:  # an O1 checkpoint resumed under O2: its weights were read into the model
                    log.warning("the checkpoint has no float32 master weights (saved without amp O2): they are "
                                "rebuilt from the model's %s weights", self.dtype)
                    for p, m in self._pairs:
                        m.copy_(p)
                return
            if self._pairs:
                for name, (_, m) in zip(self._names, self._pairs):
                    m.copy_(masters[name])
                self.copy_masters_to_model()
            else:  # an O2 checkpoint resumed under O1 (or without amp): float32 weights from the masters
                for name, tensor in masters.items():
                    if name in self._model_params:
                        self._model_params[name].copy_(tensor)
