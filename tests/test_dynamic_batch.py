"""Dynamic batch size: growth, out-of-memory recovery, gradient trouble, bounds, equivalence, resume.

Failures are injected for real: a forward pre-hook makes a genuine CPU allocator failure
(torch.empty of a petabyte -> "DefaultCPUAllocator: can't allocate memory") or raises
torch.OutOfMemoryError (the CUDA error type; no GPU here) when a forward exceeds a size cap;
NaN and spiking gradients are written into the real gradients after backward.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from vishwamai.batching import BatchSizeMemoryError, DynamicBatchSize, is_out_of_memory, requested_memory
from vishwamai.checkpoint.state import read_trainer_state
from vishwamai.config import validate
from vishwamai.errors import ConfigError, VishwamaiError
from vishwamai.train.events import Callback
from vishwamai.train.optim import lr_factor
from vishwamai.training_v2 import compose_config, run


def dynamic(**keys) -> list[str]:
    return ["dynamic_batch_size.enabled=true"] + [f"dynamic_batch_size.{k}={v}" for k, v in keys.items()]


def train(tmp_path, overrides, callbacks=(), name="run"):
    cfg = compose_config(overrides, run_dir=str(tmp_path / name))
    summary = run(cfg, extra_callbacks=list(callbacks))
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, records, cfg


def column(records, key):
    return [r[key] for r in records if key in r]


def changes(summary):
    return [(c["step"], c["reason"]) for c in summary["dynamic_batch_size"]["changes"]]


class MemoryCap(Callback):
    """Forwards over `cap(step)` sequences fail with a real allocation error (or torch.OutOfMemoryError)."""

    def __init__(self, cap, eval_cap=None, cuda_error=False):
        self.cap, self.eval_cap, self.cuda_error = cap, eval_cap, cuda_error
        self.train_inputs: list[tuple[int, torch.Tensor, bool]] = []  # (step, inputs, failed)
        self.eval_failures = 0

    def on_train_start(self, trainer):
        trainer.raw_model.register_forward_pre_hook(lambda module, args: self._check(trainer, module, args[0]))

    def _check(self, trainer, module, inputs):
        step = trainer.state.step + 1
        limit = self.cap(step) if module.training else self.eval_cap
        failed = limit is not None and len(inputs) > limit
        if module.training:
            self.train_inputs.append((step, inputs.clone(), failed))
        elif failed:
            self.eval_failures += 1
        if failed:
            if self.cuda_error:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB (injected)")
            torch.empty(1 << 50, dtype=torch.uint8)  # a real CPU allocator failure


class GradientTrouble(Callback):
    """At `step` (to `last`), makes the gradients NaN ('nan') or 1e4 times larger ('spike')."""

    def __init__(self, step, kind, last=None):
        self.step, self.kind, self.last = step, kind, last or step
        self.before = self.after = None

    def on_step_start(self, trainer):
        if trainer.state.step + 1 == self.step:
            self.before = [p.detach().clone() for p in trainer.params]

    def on_after_backward(self, trainer):
        if self.step <= trainer.state.step + 1 <= self.last:
            for p in trainer.params:
                p.grad.mul_(1e4) if self.kind == "spike" else p.grad.fill_(math.nan)

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            self.after = [p.detach().clone() for p in trainer.params]


# ---------------------------------------------------------------------- detection
def test_recognises_real_allocation_failures_and_reads_the_request():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(1 << 50, dtype=torch.uint8)
    assert is_out_of_memory(cpu.value)
    assert requested_memory(cpu.value) == f"{(1 << 50) / 2**30:.2f} GiB"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
    assert is_out_of_memory(cuda) and requested_memory(cuda) == "2.00 GiB"
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("overrides, key", [
    (dynamic(constant_global_batch="true", initial_batch_size=2, target_batch_size=8, min_batch_size=1),
     "dynamic_batch_size.target_batch_size"),
    (dynamic(constant_global_batch="true", initial_batch_size=2, target_batch_size=4, min_batch_size=1,
             lr_scaling="sqrt"), "dynamic_batch_size.lr_scaling"),
    (dynamic(grad_spike_factor=0.5), "dynamic_batch_size.grad_spike_factor"),
])
def test_invalid_combinations_name_the_key(tiny_overrides, overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(tiny_overrides + overrides, run_dir="/tmp/x"))
    assert err.value.key == key


# ------------------------------------------------------------------------- growth
def test_grows_after_stable_steps_up_to_target_and_scales_lr(tmp_path, tiny_overrides):
    summary, records, cfg = train(tmp_path, tiny_overrides + dynamic(
        initial_batch_size=2, target_batch_size=8, min_batch_size=1, stable_steps=2, lr_scaling="linear"))
    assert column(records, "batch_size") == [2, 2, 4, 4, 8, 8, 8, 8, 8, 8]
    assert column(records, "micro_batch_size") == column(records, "batch_size")
    assert changes(summary) == [(2, "growth"), (4, "growth")]
    assert summary["tokens"] == sum(column(records, "batch_size")) * cfg.data.seq_len
    t = cfg.training
    for r in records:  # lr logged at step k = peak * schedule(k) * batch/initial (the next step's lr)
        expected = t.optimizer.lr * lr_factor(r["step"], t.scheduler, t.max_steps)
        factor = column(records, "batch_size")[r["step"] - 1] / 2
        assert r["lr"] == pytest.approx(expected * factor)


def test_plain_mode_keeps_gradient_accumulation(tmp_path, tiny_overrides):
    summary, records, _ = train(tmp_path, tiny_overrides + ["training.gradient_accumulation_steps=2",
                                                            "training.max_steps=4"] + dynamic(
        initial_batch_size=2, target_batch_size=4, min_batch_size=1, stable_steps=2))
    assert column(records, "batch_size") == [4, 4, 8, 8]  # size x 2 accumulation steps
    assert column(records, "micro_batch_size") == [2, 2, 4, 4]


# ------------------------------------------------------------------ out of memory
def test_oom_shrinks_and_redoes_the_same_samples(tmp_path, tiny_overrides):
    cap = MemoryCap(lambda step: 4)  # a real "DefaultCPUAllocator: can't allocate memory" above 4
    summary, records, cfg = train(tmp_path, tiny_overrides + dynamic(
        initial_batch_size=8, target_batch_size=8, min_batch_size=2, stable_steps=100), [cap])
    sizes = column(records, "batch_size")
    assert sizes == [8] + [4] * 9  # step 1 kept all 8 samples; later steps use the new size
    assert column(records, "micro_batch_size") == [4] * 10
    assert changes(summary) == [(1, "oom")]
    failed = [x for step, x, bad in cap.train_inputs if bad]
    redone = [x for step, x, bad in cap.train_inputs if step == 1 and not bad]
    assert len(failed) == 1 and torch.equal(torch.cat(redone), failed[0])
    assert summary["tokens"] == sum(sizes) * cfg.data.seq_len
    assert math.isfinite(summary["final_val_loss"])


def test_regrowth_after_oom_backs_off(tmp_path, tiny_overrides):
    # Size 8 never fits: each failure doubles the stable steps needed before trying it again.
    cap = MemoryCap(lambda step: 4, cuda_error=True)
    summary, records, _ = train(tmp_path, tiny_overrides + dynamic(
        initial_batch_size=4, target_batch_size=8, min_batch_size=2, stable_steps=2), [cap])
    assert changes(summary) == [(2, "growth"), (3, "oom"), (7, "growth"), (8, "oom")]
    assert column(records, "batch_size") == [4, 4, 8, 4, 4, 4, 4, 8, 4, 4]


def test_oom_at_min_batch_saves_a_checkpoint_and_stops_with_clear_error(tmp_path, tiny_overrides):
    cap = MemoryCap(lambda step: 1 if step >= 3 else None)
    with pytest.raises(BatchSizeMemoryError) as err:
        train(tmp_path, tiny_overrides + dynamic(initial_batch_size=4, target_batch_size=4, min_batch_size=2), [cap])
    message = str(err.value)
    assert isinstance(err.value, VishwamaiError)
    assert "dynamic_batch_size.min_batch_size=2" in message and "micro-batch of 2" in message
    assert f"asked for {(1 << 50) / 2**30:.2f} GiB" in message
    assert [len(x) for _, x, bad in cap.train_inputs if bad] == [4, 2]  # shrank once, then gave up
    saved = tmp_path / "run" / "checkpoints" / "step-2"  # the last completed step
    assert f"saved in {saved}" in message
    state = read_trainer_state(saved)["trainer"]
    assert state["trainer"]["step"] == 2 and state["callbacks"]["dynamic_batch_size"]["size"] == 4


def test_eval_oom_shrinks_only_the_eval_batch(tmp_path, tiny_overrides):
    base = tiny_overrides + dynamic(initial_batch_size=4, target_batch_size=4, min_batch_size=2)
    reference, _, _ = train(tmp_path, base, name="reference")
    cap = MemoryCap(lambda step: None, eval_cap=1)
    summary, records, _ = train(tmp_path, base, [cap])
    assert cap.eval_failures == 2  # 4 -> 2 -> 1, once
    assert set(column(records, "batch_size")) == {4} and set(column(records, "micro_batch_size")) == {4}
    assert changes(summary) == [(5, "eval_oom"), (5, "eval_oom")]  # at the first evaluation (step 5)
    assert summary["dynamic_batch_size"]["eval_batch_size"] == 1
    # The same validation windows are evaluated whatever the eval batch: identical val loss.
    assert summary["final_val_loss"] == pytest.approx(reference["final_val_loss"], rel=1e-6)


# --------------------------------------------------------------- gradient trouble
@pytest.mark.parametrize("kind, reason", [("nan", "non_finite"), ("spike", "grad_spike")])
def test_gradient_trouble_skips_the_update_and_shrinks(tmp_path, tiny_overrides, kind, reason):
    trouble = GradientTrouble(step=12, kind=kind)
    summary, records, _ = train(tmp_path, tiny_overrides + ["training.max_steps=14"] + dynamic(
        initial_batch_size=4, target_batch_size=4, min_batch_size=1, stable_steps=100), [trouble])
    assert changes(summary) == [(12, reason)]
    assert column(records, "batch_size") == [4] * 12 + [2] * 2
    assert all(torch.equal(a, b) for a, b in zip(trouble.before, trouble.after))  # update skipped


def test_a_lasting_rise_of_the_grad_norm_is_not_skipped_forever(tmp_path, tiny_overrides):
    trouble = GradientTrouble(step=12, kind="spike", last=17)  # six large steps in a row
    summary, records, _ = train(tmp_path, tiny_overrides + ["training.max_steps=17"] + dynamic(
        initial_batch_size=4, target_batch_size=4, min_batch_size=1, stable_steps=100), [trouble])
    skipped = [r["step"] for r in records if r.get("skipped_grad_spike")]
    assert skipped == [12, 13, 14]  # the 4th step in a row is accepted as the new normal
    assert changes(summary) == [(12, "grad_spike"), (13, "grad_spike")]  # 4 -> 2 -> 1 (the bound)


# ------------------------------------------------------- constant global batch
def test_constant_global_batch_matches_a_fixed_batch_run(tmp_path, tiny_overrides):
    base = tiny_overrides + ["training.batch_size=8", "training.max_steps=6", "training.eval_every_n_steps=0"]
    fixed, fixed_records, _ = train(tmp_path, base, name="fixed")
    # From step 3 the memory holds only 3 sequences: 8 -> 3, so steps split 3 + 3 + 2 (uneven weights).
    cap = MemoryCap(lambda step: 3 if step >= 3 else None)
    summary, records, _ = train(tmp_path, base + dynamic(
        constant_global_batch="true", initial_batch_size=8, target_batch_size=8, min_batch_size=1,
        shrink_factor=0.4, stable_steps=100), [cap], name="dynamic")
    assert column(records, "batch_size") == [8] * 6
    assert column(records, "micro_batch_size") == [8, 8, 3, 3, 3, 3]
    assert changes(summary) == [(3, "oom")]
    assert column(records, "loss") == pytest.approx(column(fixed_records, "loss"), rel=1e-5)
    assert summary["final_val_loss"] == pytest.approx(fixed["final_val_loss"], rel=1e-5)


# ---------------------------------------------------------------------- resume
class Snapshot(Callback):
    """Copies the weights and Trainer.state_dict() after `step`."""

    def __init__(self, step):
        self.step, self.state, self.weights = step, None, None

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            self.state = copy.deepcopy(trainer.state_dict())
            self.weights = copy.deepcopy(trainer.raw_model.state_dict())


class Restore(Callback):
    def __init__(self, snapshot):
        self.snapshot = snapshot

    def on_train_start(self, trainer):
        trainer.raw_model.load_state_dict(self.snapshot.weights)
        trainer.load_state_dict(copy.deepcopy(self.snapshot.state))


def test_batch_state_survives_a_resume(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["training.max_steps=8", "training.eval_every_n_steps=0"] + dynamic(
        initial_batch_size=2, target_batch_size=8, min_batch_size=1, stable_steps=3, lr_scaling="sqrt")
    snapshot = Snapshot(step=4)
    full, full_records, _ = train(tmp_path, overrides, [snapshot], name="full")
    saved = json.loads(json.dumps(snapshot.state["callbacks"]["dynamic_batch_size"]))  # JSON-safe
    assert saved["size"] == 4 and saved["stable"] == 1 and saved["lr_factor"] == pytest.approx(math.sqrt(2))
    resumed, records, _ = train(tmp_path, overrides, [Restore(snapshot)], name="resumed")
    assert column(records, "step") == [5, 6, 7, 8]
    for key in ("batch_size", "lr", "loss"):
        assert column(records, key) == pytest.approx(column(full_records, key)[4:], rel=1e-6), key
    assert changes(resumed) == changes(full) == [(3, "growth"), (6, "growth")]


def test_batch_state_resumes_from_a_checkpoint(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["training.max_steps=8", "training.eval_every_n_steps=0",
                                  "checkpointing.every_n_steps=4"] + dynamic(
        initial_batch_size=2, target_batch_size=8, min_batch_size=1, stable_steps=3, lr_scaling="linear")
    full, full_records, _ = train(tmp_path, overrides, name="full")
    step4 = tmp_path / "full" / "checkpoints" / "step-4"
    resumed, records, _ = train(tmp_path, overrides + [f"training.resume={step4}"], name="resumed")
    assert column(records, "step") == [5, 6, 7, 8]
    for key in ("batch_size", "lr", "loss"):
        assert column(records, key) == pytest.approx(column(full_records, key)[4:], rel=1e-6), key
    assert changes(resumed) == changes(full) == [(3, "growth"), (6, "growth")]


def test_resuming_in_the_other_mode_is_refused():
    cfg = compose_config(dynamic(), run_dir="/tmp/x").dynamic_batch_size
    saved = DynamicBatchSize(cfg).state_dict()
    cfg.constant_global_batch = True
    with pytest.raises(ConfigError) as err:
        DynamicBatchSize(cfg).load_state_dict(saved)
    assert err.value.key == "dynamic_batch_size.constant_global_batch"


def test_state_dict_round_trips_through_json():
    cfg = compose_config(dynamic(), run_dir="/tmp/x").dynamic_batch_size
    a = DynamicBatchSize(cfg)
    a.size, a.stable, a.lr_factor, a.failures = 16, 7, 0.5, {64: 2}
    a.grad_norms.extend([1.0, 2.0])
    b = DynamicBatchSize(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict() and b.failures == {64: 2}
