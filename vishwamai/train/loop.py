"""The training loop: fetch -> forward -> loss -> backward (accumulate) -> clip -> step.

Everything else subscribes to events (vishwamai/train/events.py).  Attributes that
callbacks may read or change:
  state              TrainState: step, tokens, best validation loss... (saved in checkpoints)
  micro_batch_size   sequences per forward/backward on this rank (dynamic batch sizing changes it;
                     config: training.batch_size)
  batch_size         sequences per optimizer step on this rank (config: training.batch_size x
                     training.gradient_accumulation_steps); a step is split into
                     ceil(batch_size / micro_batch_size) micro-batches, each weighted by
                     its share of the batch, so the gradient does not depend on the split
  global_batch_size  sequences per optimizer step over all ranks (batch_size x world size; read-only)
  eval_batch_size    sequences per forward during evaluation (own back-off); the evaluated
                     windows do not depend on it (batches of training.batch_size are split)
  grad_norm          this step's gradient norm before clipping (read in on_before_optimizer_step)
  forward_kwargs     extra model outputs wanted (distillation: hidden states, attentions)
  outputs_read       whether a callback reads the model's outputs (forward_kwargs or an on_loss): decided
                     after on_init; then on_loss gets them, else the forward and loss may be one compiled graph
  metrics            this step's figures; loggers write them at on_step_end
  skip_update        set in on_before_optimizer_step to drop this step's update
  should_stop        set to end training after this step (agreed over ranks at the next step's agreement)
  agreement          StepAgreement: register a vote (on_init) to agree on a per-step decision over ranks,
                     read it in `agreement.agreed` after the step's agreement (before on_before_optimizer_step)
  summary            figures for summary.json; features add theirs at on_train_end
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from vishwamai.config import VishwamaiConfig
from vishwamai.data import SequenceSampler, eval_batches
from vishwamai.distributed import Parallelism
from vishwamai.errors import ConfigError, VishwamaiError
from vishwamai.train.agreement import StepAgreement
from vishwamai.train.events import REVERSED_EVENTS, Callback
from vishwamai.train.loss import forward_and_loss, lm_loss
from vishwamai.train.precision import Precision

log = logging.getLogger(__name__)


class NonFiniteLossError(VishwamaiError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (including skipped ones)
    tokens_seen: int = 0  # over all ranks
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_bad_steps: int = 0
    consecutive_zero_grad_steps: int = 0
    best_val_loss: float = math.inf
    last_val_loss: Optional[float] = None
    last_train_loss: Optional[float] = None
    train_time_s: float = 0.0  # accumulated over resumes

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Trainer:
    def __init__(
        self,
        cfg: VishwamaiConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sampler: SequenceSampler,
        val_tokens: np.ndarray,
        precision: Precision,
        parallel: Parallelism,
        device: torch.device,
        callbacks: list[Callback] = (),
    ):
        self.cfg = cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.sampler, self.val_tokens = sampler, val_tokens
        self.precision, self.parallel, self.device = precision, parallel, device
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)  # stable: equal phases keep their order
        self.checkpointer: Optional[Any] = None  # set by the checkpoint callback: serves save_checkpoint()
        self._closed = False
        self.state = TrainState()
        t = cfg.training
        self.batch_size = t.batch_size * t.gradient_accumulation_steps
        self.micro_batch_size = t.batch_size
        self.eval_batch_size = t.batch_size
        self.forward_kwargs: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.skip_update = False
        self.should_stop = False
        self.grad_norm = math.nan
        # Clipped together: the parameters the optimizer updates (amp O2: the float32 masters).
        self.params = precision.optimizer_params(model.parameters())
        self.agreement = StepAgreement(parallel, device)
        # A stop asked for during step N (on_eval_end, on_step_end) is agreed at step N+1's agreement,
        # which then undoes that step: every rank ends after step N, as the rank that asked meant.
        self.agreement.register("stop", lambda: self.should_stop)
        self.fire("on_init")  # before any resume restores the optimizer (callbacks may add param groups)
        self.outputs_read = bool(self.forward_kwargs) or any(type(cb).on_loss is not Callback.on_loss
                                                             for cb in self.callbacks)
        self._lm_loss = self._loss_function()

    # ------------------------------------------------------------------ events
    @property
    def is_main(self) -> bool:
        return self.parallel.is_main

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.parallel.world_size

    @property
    def raw_model(self) -> torch.nn.Module:
        """The model without DDP/FSDP/compile wrappers (for saving, teachers, masks)."""
        model = self.parallel.unwrap(self.model)
        return getattr(model, "_orig_mod", model)

    def fire(self, event: str, **kwargs) -> None:
        for cb in reversed(self.callbacks) if event in REVERSED_EVENTS else self.callbacks:
            getattr(cb, event)(self, **kwargs)

    def _handled_by_callback(self, error: BaseException) -> bool:
        return any(cb.on_step_error(self, error=error) for cb in self.callbacks)

    # ---------------------------------------------------------------- services
    def save_checkpoint(self) -> Optional[Path]:
        """Save a resumable checkpoint of the last completed step now; where it went, or None when this
        run has no checkpointing.  Every rank calls it (a save may be collective)."""
        return None if self.checkpointer is None else self.checkpointer.save_step(self)

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint saved so far is written and published (saves run in the
        background): for a callback that hands a just-saved checkpoint to someone else (PBT)."""
        if self.checkpointer is not None:
            self.checkpointer.wait_until_written()

    def add_param_group(self, params: list[torch.nn.Parameter], **options: Any) -> None:
        """Train `params` too (e.g. distillation projections) with the optimizer's lr schedule and the
        gradient clipping; call in on_init, before a resume restores the optimizer's state."""
        first = self.optimizer.param_groups[0]
        initial_lr = first.get("initial_lr", first["lr"])
        self.optimizer.add_param_group({"params": params, "lr": first["lr"], "initial_lr": initial_lr, **options})
        # LambdaLR keeps one base lr and lambda per group: the new group follows the first one's schedule.
        self.scheduler.base_lrs.append(initial_lr)
        self.scheduler.lr_lambdas.append(self.scheduler.lr_lambdas[0])
        self.params.extend(params)

    def scale_lr(self, ratio: float) -> None:
        """Multiply the learning rate by `ratio` from now on: the schedule's base lrs and the next step's lr."""
        if ratio == 1.0:
            return
        self.scheduler.base_lrs = [lr * ratio for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio  # the next step's lr, already computed by scheduler.step()
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # --------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Release the run's resources, in torchtitan's order: the wrapped model (and with it DDP's
        reference to the process group), then the callbacks in reverse, the data reader, then the process group
        (after a barrier, unless `failed`: a peer may never reach it)."""
        if self._closed:
            return
        self._closed = True
        # The wrapped model, and what else may hold the process group (ZeRO's optimizer, FSDP's DTensors).
        self.model = self.optimizer = self.scheduler = None  # type: ignore[assignment]
        self.params = []
        errors = []
        for cb in reversed(self.callbacks):
            try:
                cb.close()
            except Exception as error:  # noqa: BLE001 - every callback gets to release its part
                errors.append(error)
        self.callbacks = []  # no callback keeps the run alive through the trainer (or vice versa)
        close_sampler = getattr(self.sampler, "close", None)  # the read-ahead thread (data.prefetch)
        if close_sampler is not None:
            close_sampler()
        self.parallel.shutdown(failed=failed)
        for error in errors:
            log.error("a callback failed to close: %r", error)
        if errors and not failed:  # after a failure, the error that ended the run is the one to see
            raise errors[0]

    def _loss_function(self) -> Callable[..., torch.Tensor]:
        """lm_loss, and what training.compile compiles: the model and its loss as one graph (the
        log-softmax, its float32 cast and the loss weighting fused with the lm_head: at a 32k vocabulary
        ~1.7x the tokens/s of the model-only compile on CPU, bench/RESULTS.md) where nothing reads the
        outputs and the model is not wrapped; else the model alone (distillation reads the logits;
        DDP/FSDP bring their own compile support for the wrapped model), as before."""
        t = self.cfg.training
        if self.outputs_read and t.loss_chunk_rows:
            raise ConfigError("training.loss_chunk_rows", "a callback reads the model's logits, which the chunked "
                                                          "loss never makes whole: set it to 0")
        if not t.compile:
            return lm_loss
        mode = None if t.compile_mode == "default" else t.compile_mode
        unwrapped = self.parallel.unwrap(self.model) is self.model and not self.parallel.keeps_master_weights
        if unwrapped and not self.outputs_read:
            return torch.compile(lm_loss, mode=mode)
        self.model = torch.compile(self.model, mode=mode)
        return lm_loss

    # -------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        except BaseException as error:
            self.fire("on_exception", error=error)
            raise

    def _fit(self) -> dict[str, Any]:
        t = self.cfg.training
        self.fire("on_train_start")
        while self.state.step < t.max_steps:
            last_metrics, self.metrics = self.metrics, {}
            self.fire("on_step_start")
            if not self._train_step_with_recovery():
                self.metrics = last_metrics  # the stopped step left nothing: the last step's figures stand
                break
            every = t.eval_every_n_steps
            if (every and self.state.step % every == 0) or self.state.step == t.max_steps:
                self.evaluate()
            self.fire("on_step_end")
        if self.state.last_val_loss is None:
            self.evaluate()
        self.fire("on_train_end")
        return self.summary

    def _train_step_with_recovery(self) -> bool:
        """One step; False if every rank agreed to stop before its update (the step is then undone)."""
        # The step's samples are drawn once: a step redone after a handled error
        # (e.g. out-of-memory -> smaller micro-batch) trains on the same samples.
        before = self.sampler.state_dict(), self.batch_size, self.micro_batch_size
        window_ids = self.sampler.window_ids(self.batch_size)
        while True:
            try:
                if self.train_step(window_ids):
                    return True
                self.sampler.load_state_dict(before[0])  # not drawn: a resume starts from these samples
                self.batch_size, self.micro_batch_size = before[1:]
                return False
            except Exception as error:  # noqa: BLE001 - callbacks decide what is recoverable
                self.precision.zero_grad(self.optimizer)
                if not self._handled_by_callback(error):
                    raise

    def train_step(self, window_ids: torch.Tensor) -> bool:
        """Forward/backward over the micro-batches, the step's agreement, then the update.
        Returns False (nothing updated) when the agreement is to stop."""
        start = time.perf_counter()
        self.model.train()
        self.skip_update = False
        chunks = window_ids.split(self.micro_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            weight = len(chunk) / len(window_ids)
            # Contiguous: windows read ahead are, a step read directly is a view (stride seq_len + 1); a
            # compiled step guards on strides, so mixing them would compile the step twice.
            inputs, targets = (t.to(self.device, non_blocking=True).contiguous() for t in self.sampler.gather(chunk))
            with self.parallel.accumulation_context(self.model, is_last_micro_batch=i == len(chunks) - 1):
                with self.precision.autocast():
                    terms = self.compute_loss(inputs, targets)
                    loss = sum(terms.values())
                self.precision.backward(loss * weight)
            loss_sum += loss.detach() * weight
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.detach() * weight
        self.fire("on_after_backward")
        self.precision.unscale_(self.optimizer)
        self.grad_norm = grad_norm = self._clip_gradients()
        # The step's one collective of its own: loss, loss terms and every registered vote (stop...).
        means = {"loss": loss_sum, **({f"loss_{k}": v for k, v in term_sums.items()} if len(term_sums) > 1 else {})}
        agreed = self.agreement.reduce(means)
        if agreed["stop"]:
            self.precision.zero_grad(self.optimizer)
            return False
        self._guard_non_finite(agreed["loss"], grad_norm)
        self.fire("on_before_optimizer_step")
        if not self.skip_update:
            self.precision.step(self.optimizer)
        self.precision.update()
        self.precision.zero_grad(self.optimizer)
        self.scheduler.step()
        terms = {k: v for k, v in agreed.items() if k.startswith("loss_")}
        self._account(len(window_ids), agreed["loss"], grad_norm, terms, time.perf_counter() - start)
        return True

    def compute_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy, plus whatever terms callbacks add in on_loss (e.g. distillation)."""
        if self.outputs_read:
            outputs, ce = forward_and_loss(self.model, inputs, targets, self.forward_kwargs)
        else:  # nothing reads the outputs: with training.compile, the forward and its loss are one graph
            outputs, ce = None, self._lm_loss(self.model, inputs, targets, self.cfg.training.loss_chunk_rows)
        terms = {"ce": ce}
        self.fire("on_loss", inputs=inputs, targets=targets, outputs=outputs, terms=terms)
        return terms

    def _clip_gradients(self) -> float:
        max_norm = self.cfg.training.grad_clip or math.inf
        return self.parallel.clip_grad_norm_(self.params, max_norm)  # sharded params: global norm

    def _guard_non_finite(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient never reaches the weights: skip, count, stop after K.

        Every rank decides alike without a collective of its own: the loss is the agreed mean (a
        non-finite loss on any rank makes it non-finite) and the gradient norm is global (DDP's
        gradients are averaged, FSDP's norm is reduced).  With fp16 loss scaling, inf gradients are
        the steps the GradScaler skips (it then lowers the scale): counted too, so a scale that
        overflows every step stops the run instead of a "successful" run that never trained."""
        bad = not math.isfinite(loss) or not math.isfinite(grad_norm)
        if not bad:
            self.state.consecutive_bad_steps = 0
            self._watch_zero_gradient(grad_norm)
            return
        self.skip_update = True
        self.state.skipped_steps += 1
        self.state.consecutive_bad_steps += 1
        self.metrics["skipped_non_finite"] = 1
        limit = self.cfg.training.max_consecutive_bad_steps
        if self.state.consecutive_bad_steps >= limit:
            hint = "Lower training.optimizer.lr, enable gradient clipping, or check the data."
            if self.precision.uses_loss_scaling:
                hint = (f"The float16 loss scale ({self.precision.scaler.get_scale():g} now) overflowed: lower "
                        "amp.loss_scale.init_scale, or use amp.dtype=bfloat16 (no loss scaling needed). " + hint)
            raise NonFiniteLossError(
                f"{limit} consecutive steps had a non-finite loss or gradient (step {self.state.step}); "
                f"stopping. {hint}"
            )

    def _watch_zero_gradient(self, grad_norm: float) -> None:
        """A gradient norm of exactly zero, step after step, means nothing trains (e.g. fp16 underflow)."""
        s = self.state
        s.consecutive_zero_grad_steps = s.consecutive_zero_grad_steps + 1 if grad_norm == 0.0 else 0
        if s.consecutive_zero_grad_steps == self.cfg.training.zero_grad_warn_steps and self.is_main:
            scale = (f" (float16 loss scale {self.precision.scaler.get_scale():g}: raise amp.loss_scale.init_scale "
                     "or use amp.dtype=bfloat16)" if self.precision.uses_loss_scaling else "")
            log.warning("the gradient norm has been exactly 0 for %d steps (step %d): the model is not "
                        "training%s", s.consecutive_zero_grad_steps, s.step + 1, scale)

    def _account(self, n_samples: int, loss: float, grad_norm: float, terms: dict, seconds: float) -> None:
        world = self.parallel.world_size
        tokens = n_samples * self.sampler.seq_len * world
        s = self.state
        s.step += 1
        s.tokens_seen += tokens
        s.samples_seen += n_samples * world
        s.last_train_loss = loss
        s.train_time_s += seconds
        self.metrics.update(
            step=s.step,
            loss=loss,
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            micro_batch_size=self.micro_batch_size,
            batch_size=n_samples,
            global_batch_size=n_samples * world,
            tokens=tokens,
            step_time_s=seconds,
            tokens_per_s=tokens / seconds,
        )
        self.metrics.update(terms)  # loss_<term>, agreed with the loss

    # --------------------------------------------------------------- evaluation
    def evaluate(self) -> float:
        # An error before the (only) collective can be handled by a callback (on_eval_error,
        # e.g. out-of-memory -> smaller eval_batch_size) and the evaluation redone.
        while True:
            try:
                total = self._evaluation_sums()
                break
            except Exception as error:  # noqa: BLE001 - callbacks decide what is recoverable
                if not any(cb.on_eval_error(self, error=error) for cb in self.callbacks):
                    raise
        total = self.parallel.all_reduce_mean(total)
        val_loss = (total[0] / total[1]).item()
        self.state.last_val_loss = val_loss
        self.state.best_val_loss = min(self.state.best_val_loss, val_loss)
        self.metrics["val_loss"] = val_loss
        self.metrics["val_perplexity"] = math.exp(min(val_loss, 50.0))
        self.fire("on_eval_end", val_loss=val_loss)
        return val_loss

    @torch.no_grad()
    def _evaluation_sums(self) -> torch.Tensor:
        """Summed validation loss and token count on this rank."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        p = self.parallel
        for inputs, targets in eval_batches(self.val_tokens, self.sampler.seq_len, self.cfg.training.batch_size,
                                            self.cfg.training.eval_batches, p.rank, p.world_size):
            for x, y in zip(inputs.split(self.eval_batch_size), targets.split(self.eval_batch_size)):
                x, y = x.to(self.device), y.to(self.device)
                with self.precision.autocast():
                    loss = self._lm_loss(self.model, x, y, self.cfg.training.loss_chunk_rows, reduction="sum")
                total += torch.stack([loss.double(), torch.tensor(y.numel(), dtype=torch.float64,
                                                                    device=self.device)])
        return total

    # -------------------------------------------------------------------- state
    def state_dict(self, include_optimizer: bool = True) -> dict[str, Any]:
        """Everything needed for exact resume except the model weights."""
        state = {
            "trainer": self.state.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "sampler": self.sampler.state_dict(),
            "batch": {"batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                      "eval_batch_size": self.eval_batch_size},
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_key},
        }
        if include_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["trainer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        self.sampler.load_state_dict(state["sampler"])
        for key, value in state["batch"].items():
            setattr(self, key, value)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.state_key and cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
