"""Automatic mixed precision: autocast + (for float16) a GradScaler.

amp.opt_level:
  O1  autocast: weights, gradients and optimizer state stay float32; matmuls and
      other autocast-listed ops run in amp.dtype.  bfloat16 needs no loss scaling;
      float16 uses a GradScaler driven by amp.loss_scale.{init_scale,growth_interval}.
  O2  (apex's "almost fp16": half-precision weights with fp32 master copies) is not
      implemented yet and fails loudly.
"""

from __future__ import annotations

import contextlib

import torch

from vishwamai.config import AmpConfig
from vishwamai.errors import NotImplementedYet


class Precision:
    def __init__(self, cfg: AmpConfig, device: torch.device):
        if cfg.enabled and cfg.opt_level == "O2":
            raise NotImplementedYet("amp.opt_level=O2", "use O1 (autocast)")
        self.enabled = cfg.enabled
        self.device_type = device.type
        self.dtype = getattr(torch, cfg.dtype)
        use_scaler = cfg.enabled and cfg.dtype == "float16"
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=cfg.loss_scale.init_scale,
            growth_interval=cfg.loss_scale.growth_interval, enabled=use_scaler,
        )

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)

    def update(self) -> None:
        self.scaler.update()

    @property
    def uses_loss_scaling(self) -> bool:
        return self.scaler.is_enabled()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
