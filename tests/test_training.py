"""The training loop end to end: loss goes down, outputs follow the run-directory contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vishwamai.checkpoint import load_model
from vishwamai.config import AmpConfig, SchedulerConfig
from vishwamai.train import Callback
from vishwamai.train.optim import build_optimizer, lr_factor
from vishwamai.train.precision import Precision
from vishwamai.training_v2 import compose_config, run


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_loss_and_writes_the_run_directory(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    cfg = compose_config(tiny_overrides + ["training.max_steps=40", "training.eval_every_n_steps=20",
                                           "training.optimizer.lr=3e-3"], run_dir=str(run_dir))
    summary = run(cfg)
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("step", "loss", "lr", "tokens_per_s", "batch_size", "grad_norm"):
        assert key in records[0]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2
    first_train = sum(r["loss"] for r in records[:3]) / 3
    assert val[-1] < first_train - 1.0, "validation loss should fall well below the initial loss"
    assert summary["final_val_loss"] == pytest.approx(val[-1])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_val_loss", "best_val_loss", "steps", "tokens", "wall_time_s", "num_parameters"):
        assert key in on_disk
    assert on_disk["steps"] == 40 and on_disk["tokens"] == 40 * 4 * 32
    assert (run_dir / "config.yaml").is_file()
    model = load_model(run_dir / "checkpoints" / "final")  # no training config needed
    assert model.num_parameters() == on_disk["num_parameters"]


def test_same_seed_same_losses(tmp_path, tiny_overrides):
    losses = []
    for name in ("a", "b"):
        run(compose_config(tiny_overrides + ["training.max_steps=4"], run_dir=str(tmp_path / name)))
        losses.append([r["loss"] for r in _records(tmp_path / name)])
    assert losses[0] == losses[1]


def test_gradient_accumulation_matches_the_large_batch(tmp_path, tiny_overrides):
    base = tiny_overrides + ["training.max_steps=4", "training.eval_every_n_steps=0"]
    run(compose_config(base + ["training.batch_size=8"], run_dir=str(tmp_path / "big")))
    run(compose_config(base + ["training.batch_size=4", "training.gradient_accumulation_steps=2"],
                       run_dir=str(tmp_path / "accum")))
    big, accum = _records(tmp_path / "big"), _records(tmp_path / "accum")
    assert [(r["micro_batch_size"], r["batch_size"], r["global_batch_size"]) for r in accum] == [(4, 8, 8)] * 4
    for a, b in zip(big, accum):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compiled_training_follows_eager(tmp_path, tiny_overrides, mode):
    """training.compile (inductor's C++ kernels on CPU) trains the same model as eager, step for step."""
    base = tiny_overrides + ["training.max_steps=3", "training.eval_every_n_steps=0"]
    run(compose_config(base, run_dir=str(tmp_path / "eager")))
    run(compose_config(base + ["training.compile=true", f"training.compile_mode={mode}"],
                       run_dir=str(tmp_path / "compiled")))
    eager, compiled = _records(tmp_path / "eager"), _records(tmp_path / "compiled")
    assert len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


def test_bf16_autocast_on_cpu_trains(tmp_path, tiny_overrides):
    precision = Precision(AmpConfig(enabled=True, dtype="bfloat16"), torch.device("cpu"))
    with precision.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    assert not precision.uses_loss_scaling
    summary = run(compose_config(tiny_overrides + ["amp.enabled=true", "training.max_steps=6"],
                                 run_dir=str(tmp_path / "bf16")))
    assert summary["skipped_steps"] == 0 and summary["final_val_loss"] < 6


def test_fp16_uses_a_grad_scaler_driven_by_loss_scale_config():
    cfg = AmpConfig(enabled=True, dtype="float16")
    cfg.loss_scale.init_scale, cfg.loss_scale.growth_interval = 1024.0, 7
    precision = Precision(cfg, torch.device("cpu"))
    assert precision.uses_loss_scaling
    assert precision.scaler.get_scale() == 1024.0 and precision.scaler.get_growth_interval() == 7


AMP = ["amp.enabled=true", "training.optimizer.lr=2e-3"]
# O2 against O1 over 10 steps of the tiny model: measured at most 0.06% apart (bf16 weights round
# each update's result; the float32 masters keep the updates themselves); tolerance 1% per step.
O2_TOLERANCE = 1e-2


def test_o2_follows_o1_with_bf16_weights_and_float32_masters(tmp_path, tiny_overrides):
    from safetensors.torch import load_file

    class LastMasters(Callback):
        def on_step_end(self, trainer) -> None:
            self.masters = {n: m.clone() for n, m in trainer.precision.masters().items()}

    losses, last = {}, LastMasters()
    for level in ("O1", "O2"):
        run_dir = tmp_path / level
        run(compose_config(tiny_overrides + AMP + [f"amp.opt_level={level}"], run_dir=str(run_dir)),
            extra_callbacks=[last])
        losses[level] = [r["loss"] for r in _records(run_dir) if "loss" in r]
    assert len(losses["O2"]) == 10
    assert losses["O2"] == pytest.approx(losses["O1"], rel=O2_TOLERANCE)
    assert losses["O2"] != losses["O1"]  # O2 really computed with bf16 weights
    # final/ holds the float32 masters: the weights training holds, not the bf16 copies the model computes
    # with (export, int8 and distillation read this file); they round to what the model last computed with.
    weights = load_file(str(tmp_path / "O2" / "checkpoints" / "final" / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}
    assert last.masters and all(torch.equal(weights[name], m) for name, m in last.masters.items())


def test_o2_optimizer_updates_float32_masters_and_the_model_follows():
    cfg = AmpConfig(enabled=True, opt_level="O2")
    precision = Precision(cfg, torch.device("cpu"))
    model = precision.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
    params = precision.optimizer_params(model.parameters())
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert [p.dtype for p in params] == [torch.float32] * 4 and params[0] is not model[0].weight
    optimizer = torch.optim.SGD(params, lr=1e-4)
    before = params[0].detach().clone()
    with precision.autocast():
        model(torch.randn(2, 4)).float().square().sum().backward()
    precision.unscale_(optimizer)
    assert model[0].weight.grad is None and params[0].grad.dtype == torch.float32
    precision.step(optimizer)
    # An update of 1e-4 x grad survives in the master (lost in a bf16 weight) and reaches the model.
    assert not torch.equal(params[0], before)
    assert torch.equal(model[0].weight, params[0].to(torch.bfloat16))


def test_o2_resumes_bitwise(tmp_path, tiny_overrides):
    from safetensors.torch import load_file

    overrides = tiny_overrides + AMP + ["amp.opt_level=O2", "checkpointing.every_n_steps=5"]
    run(compose_config(overrides, run_dir=str(tmp_path / "clean")))
    step5 = tmp_path / "clean" / "checkpoints" / "step-5"
    # The masters are the checkpoint's float32 weights, stored once (not again in the trainer state).
    assert "master_weights" not in torch.load(step5 / "trainer_state.pt", weights_only=True)["trainer"]["precision"]
    assert {w.dtype for w in load_file(str(step5 / "model.safetensors")).values()} == {torch.float32}
    run(compose_config(overrides + [f"training.resume={step5}"], run_dir=str(tmp_path / "resumed")))
    clean = {r["step"]: r["loss"] for r in _records(tmp_path / "clean") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in _records(tmp_path / "resumed") if "loss" in r}
    assert resumed == {step: clean[step] for step in range(6, 11)}
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "final" / "model.safetensors")) for d in ("clean", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("saved, resumed", [("O2", "O1"), ("O1", "O2")])
def test_a_checkpoint_resumes_under_the_other_opt_level_with_its_float32_weights(tmp_path, tiny_overrides,
                                                                                  saved, resumed):
    from safetensors.torch import load_file

    class StartWeights(Callback):  # what training resumes from: the O2 masters, or the O1 model's weights
        def on_train_start(self, trainer) -> None:
            live = trainer.precision.masters() or dict(trainer.raw_model.named_parameters())
            self.weights = {name: w.detach().clone() for name, w in live.items()}

    steps = ["checkpointing.every_n_steps=3", "training.max_steps=3"]
    run(compose_config(tiny_overrides + AMP + steps + [f"amp.opt_level={saved}"], run_dir=str(tmp_path / "a")))
    step3 = tmp_path / "a" / "checkpoints" / "step-3"
    start = StartWeights()
    run(compose_config(tiny_overrides + AMP + ["training.max_steps=4", f"training.resume={step3}",
                                               f"amp.opt_level={resumed}"], run_dir=str(tmp_path / "b")),
        extra_callbacks=[start])
    saved_weights = load_file(str(step3 / "model.safetensors"))
    assert start.weights and all(torch.equal(w, saved_weights[n]) for n, w in start.weights.items())


def test_loss_scale_enabled_switches_the_fp16_grad_scaler(caplog):
    import logging

    off = AmpConfig(enabled=True, dtype="float16")
    off.loss_scale.enabled = False
    assert not Precision(off, torch.device("cpu")).uses_loss_scaling
    with caplog.at_level(logging.INFO, logger="vishwamai.train.precision"):
        bf16 = Precision(AmpConfig(enabled=True, dtype="bfloat16"), torch.device("cpu"))
    assert not bf16.uses_loss_scaling and "no effect with bfloat16" in caplog.text


def test_fp16_steps_the_scaler_skips_are_counted_and_stop_the_run(tmp_path, tiny_overrides):
    from vishwamai.train import NonFiniteLossError

    # A scale of 2^24 overflows float16 gradients (max 65504) for the first 7 steps of this model.
    fp16 = tiny_overrides + ["amp.enabled=true", "amp.dtype=float16", "amp.loss_scale.init_scale=16777216"]
    summary = run(compose_config(fp16 + ["training.max_steps=8", "training.max_consecutive_bad_steps=20"],
                                 run_dir=str(tmp_path / "long")))
    records = [r for r in _records(tmp_path / "long") if "loss" in r]
    skipped = [r["step"] for r in records if r.get("skipped_non_finite")]
    assert skipped and summary["skipped_steps"] == len(skipped) == json.loads(
        (tmp_path / "long" / "summary.json").read_text())["skipped_steps"]
    with pytest.raises(NonFiniteLossError, match="loss scale.*amp.loss_scale.init_scale"):
        run(compose_config(fp16 + ["training.max_consecutive_bad_steps=3"], run_dir=str(tmp_path / "stop")))


@pytest.mark.parametrize("scale", ["0.5", "1e9", "inf"])
def test_loss_scale_init_scale_out_of_range_is_refused(tmp_path, scale):
    from vishwamai.config import validate
    from vishwamai.errors import ConfigError

    with pytest.raises(ConfigError, match="amp.loss_scale.init_scale"):
        validate(compose_config([f"amp.loss_scale.init_scale={scale}"], run_dir=str(tmp_path)))


class ZeroGradients(Callback):
    """What an fp16 gradient underflow looks like to the loop: every gradient exactly zero."""

    def on_after_backward(self, trainer):
        for p in trainer.model.parameters():
            if p.grad is not None:
                p.grad.zero_()


def test_a_gradient_norm_stuck_at_zero_warns(tmp_path, tiny_overrides, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="vishwamai.train.loop"):
        run(compose_config(tiny_overrides + ["training.max_steps=4"], run_dir=str(tmp_path / "zero")),
            extra_callbacks=[ZeroGradients()])
    assert "gradient norm has been exactly 0 for 3 steps" in caplog.text


def test_warmup_then_cosine_schedule():
    cfg = SchedulerConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(1 / 11)
    assert lr_factor(9, cfg, 100) == pytest.approx(10 / 11)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(55, cfg, 100) == pytest.approx(0.55)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_only():
    from vishwamai.config import OptimizerConfig
    from vishwamai.model import Transformer
    from vishwamai.config import ModelConfig

    model = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=8))
    decay, no_decay = build_optimizer(model, OptimizerConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_cli_runs_and_prints_where_outputs_are(tmp_path, tiny_overrides, run_module):
    proc = run_module("vishwamai.training_v2", *tiny_overrides, "training.max_steps=3",
                      f"hydra.run.dir={tmp_path}/cli", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "run directory" in proc.stdout and "checkpoint" in proc.stdout
    assert (tmp_path / "cli" / "summary.json").is_file()


def test_import_is_lean():
    code = ("import sys, vishwamai; heavy = ['torch', 'hydra', 'mlflow', 'optuna', 'kfp', 'ray', 'wandb', "
            "'tensorboard']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_init_from_adopts_the_architecture_and_starts_from_its_weights(tmp_path, tiny_overrides):
    source = tmp_path / "source"
    run(compose_config(tiny_overrides + ["training.max_steps=3", "model.n_layers=3"], run_dir=str(source)))
    from vishwamai.model import build_model
    from vishwamai.training_v2 import adopt_architecture, load_weights_into

    cfg = compose_config(tiny_overrides + [f"training.init_from={source}"], run_dir=str(tmp_path / "ft"))
    adopt_architecture(cfg)
    assert cfg.model.n_layers == 3
    model = build_model(cfg.model)
    load_weights_into(model, cfg.training.init_from)
    expected = load_model(source / "checkpoints" / "final")
    for (name, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name


def test_sample_prompt_ends_the_run_with_a_sample_from_the_trained_model(tmp_path, tiny_overrides):
    from vishwamai.data.tokenizer import ByteTokenizer
    from vishwamai.generate import generate_text

    run_dir = tmp_path / "run"
    summary = run(compose_config(tiny_overrides + [
        "training.sample_prompt='def '", "training.sample_tokens=40", "monitoring.enabled=true",
        "monitoring.tensorboard.enabled=false", "monitoring.mlflow.enabled=false"], run_dir=str(run_dir)))
    assert summary["sample_prompt"] == "def " and summary["sample"]
    # The text is the final model's own (seeded sampling from the saved weights gives it back).
    final = load_model(run_dir / "checkpoints" / "final")
    assert generate_text(final, ByteTokenizer(), "def ", 40, seed=1337) == summary["sample"]
    assert json.loads((run_dir / "summary.json").read_text())["sample"] == summary["sample"]
    report = (run_dir / "report.md").read_text()
    assert "## Sample" in report and summary["sample"] in report


def test_o2_with_pruning_fails_loudly(tmp_path):
    """A config check: refused by validate() (so also by the pipeline's and the study's checks before
    any pod or trial starts) and by run() before anything is built."""
    from vishwamai.config import validate
    from vishwamai.errors import NotImplementedYet

    cfg = compose_config(["amp.enabled=true", "amp.opt_level=O2", "distillation.pruning.enabled=true"],
                         run_dir=str(tmp_path))
    with pytest.raises(NotImplementedYet, match="amp.opt_level=O2 with distillation.pruning"):
        validate(cfg)
    with pytest.raises(NotImplementedYet, match="amp.opt_level=O2 with distillation.pruning"):
        run(cfg)
    assert not any(tmp_path.iterdir())


def test_demo_ends_by_printing_a_sample(tmp_path, tiny_overrides, run_module):
    # `make demo` = +experiment=demo (sample_prompt "def "), here at the tiny size for 3 steps.
    proc = run_module("vishwamai.training_v2", "+experiment=demo", *tiny_overrides, "training.max_steps=3",
                      f"hydra.run.dir={tmp_path}/demo", timeout=180)
    assert proc.returncode == 0, proc.stderr
    sample = json.loads((tmp_path / "demo" / "summary.json").read_text())["sample"]
    assert "sample (training.sample_prompt='def '):\ndef " + sample in proc.stdout


# ------------------------------------------------------- the run's owner, callback order, services
class Recorder(Callback):
    """Appends (name, event) to a shared log; optionally fails at a step's end."""

    def __init__(self, name: str, log: list, order=None, fail_at: int = 0):
        self.name, self.log, self.fail_at = name, log, fail_at
        if order is not None:
            self.order = order

    def on_step_end(self, trainer) -> None:
        self.log.append((self.name, "on_step_end"))
        if trainer.state.step == self.fail_at:
            raise RuntimeError("callback failure")

    def on_exception(self, trainer, *, error) -> None:
        self.log.append((self.name, "on_exception"))

    def close(self) -> None:
        self.log.append((self.name, "close"))


def test_callbacks_run_by_declared_phase_releases_in_reverse_and_the_group_is_left(tmp_path, tiny_overrides,
                                                                                   monkeypatch):
    """Given in the wrong order, callbacks still run feature -> checkpoint -> observers; on a failure
    on_exception and close() run in reverse; the Trainer's close() leaves the process group."""
    import torch.distributed as dist

    from vishwamai.train.events import ORDER_CHECKPOINT, ORDER_FEATURE

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    log: list = []
    given = [Recorder("observer", log, fail_at=2), Recorder("checkpoint-like", log, ORDER_CHECKPOINT),
             Recorder("feature", log, ORDER_FEATURE)]
    cfg = compose_config(tiny_overrides + ["training.max_steps=3", "training.device=cpu",
                                           "distributed.strategy=data_parallel"], run_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="callback failure"):
        run(cfg, extra_callbacks=given)
    forward = ["feature", "checkpoint-like", "observer"]
    assert log == ([(n, "on_step_end") for n in forward] * 2 + [(n, "on_exception") for n in reversed(forward)]
                   + [(n, "close") for n in reversed(forward)])
    assert not dist.is_initialized()  # the failed run's close() destroyed its process group


def test_services_scale_lr_and_add_param_group_follow_the_schedule(tiny_cfg):
    """scale_lr scales the schedule from now on (not just this step's lr); a group joined with
    add_param_group follows the first group's schedule and is clipped with the model's parameters."""
    from vishwamai.data import load_token_data
    from vishwamai.distributed import Parallelism
    from vishwamai.training_v2 import build_trainer

    t = tiny_cfg.training
    data = load_token_data(tiny_cfg.data)
    with build_trainer(tiny_cfg, Parallelism(), data, torch.device("cpu"), Path(tiny_cfg.run_dir)) as trainer:
        extra = torch.nn.Parameter(torch.zeros(3))
        trainer.add_param_group([extra], weight_decay=0.0)
        assert trainer.params[-1] is extra
        for _ in range(3):
            trainer.scheduler.step()
        trainer.scale_lr(0.5)
        trainer.scheduler.step()  # step 4
        expected = 0.5 * t.optimizer.lr * lr_factor(4, t.scheduler, t.max_steps)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([expected] * 3)
    assert trainer.model is None and trainer.callbacks == []  # close() released them
