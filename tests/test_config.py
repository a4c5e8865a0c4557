"""Config validation: bad input is rejected before compute, naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from vishwamai.config import validate
from vishwamai.errors import ConfigError
from vishwamai.training_v2 import compose_config


def test_defaults_compose_and_validate():
    cfg = compose_config(run_dir="/tmp/x")
    validate(cfg)
    assert cfg.model.name == "tiny"
    assert cfg.training.optimizer.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("override, key", [
    ("model.dropout_rat=0.2", "dropout_rat"),
    ("training.optimiser.lr=0.1", "optimiser"),
    ("monitoring.tensorbord.enabled=false", "tensorbord"),
])
def test_misspelt_key_is_rejected_with_its_name(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override], run_dir="/tmp/x")
    assert key in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("training.max_steps=many", "max_steps"),
    ("amp.enabled=perhaps", "enabled"),
    ("model.dropout_rate=high", "dropout_rate"),
])
def test_wrong_type_is_rejected_with_its_name(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config([override], run_dir="/tmp/x")
    assert key in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("overrides, key", [
    (["training.optimizer.lr=0"], "training.optimizer.lr"),
    (["training.optimizer.lr=-1e-3"], "training.optimizer.lr"),
    (["model.dropout_rate=1.0"], "model.dropout_rate"),
    (["model.dropout_rate=-0.1"], "model.dropout_rate"),
    (["dynamic_batch_size.enabled=true", "dynamic_batch_size.min_batch_size=256"], "dynamic_batch_size.min_batch_size"),
    (["model.n_heads=5"], "model.n_heads"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["amp.dtype=float8"], "amp.dtype"),
    (["distributed.strategy=pipeline"], "distributed.strategy"),
    (["checkpointing.mode=sideways"], "checkpointing.mode"),
    (["training.compile=true", "training.compile_mode=fastest"], "training.compile_mode"),
    (["training.compile_mode=max-autotune"], "training.compile_mode"),  # would be ignored without compile
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.low_freq_factor=4"], "model.rope_scaling.low_freq_factor"),
    (["training.loss_chunk_rows=-1"], "training.loss_chunk_rows"),
    (["training.loss_chunk_rows=512", "distillation.enabled=true"], "training.loss_chunk_rows"),  # needs logits
    (["distillation.quantization.enabled=true", "distillation.quantization.precision=int4"],
     "distillation.quantization.precision"),
])
def test_range_and_cross_field_checks_name_the_key(overrides, key):
    cfg = compose_config(overrides, run_dir="/tmp/x")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert key in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("training.optimizer.lr=inf", "training.optimizer.lr"),
    ("training.optimizer.lr=nan", "training.optimizer.lr"),
    ("training.optimizer.weight_decay=inf", "training.optimizer.weight_decay"),
    ("training.grad_clip=inf", "training.grad_clip"),
    ("model.rope_theta=-inf", "model.rope_theta"),
    ("amp.loss_scale.init_scale=inf", "amp.loss_scale.init_scale"),
    ("distillation.teacher_model.weights=[1.0,inf]", "distillation.teacher_model.weights"),
    ("tuning.timeout_s=inf", "tuning.timeout_s"),
    ("monitoring.peak_flops_per_s=inf", "monitoring.peak_flops_per_s"),
])
def test_every_float_key_must_be_finite(override, key):
    # inf passes OmegaConf's float type and a plain `> 0` range check: one lr=inf update ruins the weights.
    with pytest.raises(ConfigError) as err:
        validate(compose_config([override], run_dir="/tmp/x"))
    assert err.value.key == key and "finite" in str(err.value)


def test_the_finite_check_covers_every_float_field_of_the_schema():
    # Driven by the dataclasses: each float field set to inf on its own is refused, naming it.
    import dataclasses
    import typing

    from vishwamai.config import VishwamaiConfig

    def float_keys(schema, prefix=""):
        for name, hint in typing.get_type_hints(schema).items():
            if dataclasses.is_dataclass(hint):
                yield from float_keys(hint, f"{prefix}{name}.")
            elif hint in (float, typing.Optional[float]):
                yield prefix + name

    keys = list(float_keys(VishwamaiConfig))
    assert len(keys) > 20 and "training.optimizer.lr" in keys
    for key in keys:
        cfg = compose_config(run_dir="/tmp/x")
        OmegaConf.update(cfg, key, float("inf"))
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        assert err.value.key == key


SEED_COMMAND_LINES = [
    ["training.optimizer.lr=3e-4", "model.dropout_rate=0.2"],
    ["model=7B"],
    ["model=10B"],
    ["training.max_steps=50000"],
    ["amp.enabled=true"],
    ["dynamic_batch_size.enabled=true"],
    ["distributed.strategy=data_parallel"],
    ["distributed.strategy=model_parallel", "distributed.world_size=16", "distributed.node_rank=0",
     "model.parallel_factor=2"],
    ["monitoring.wandb.enabled=true"],
    ["tuning.enabled=true", "tuning.framework=optuna"],
    ["tuning.enabled=true", "tuning.framework=ray"],
    ["tuning.enabled=true", "tuning.framework=optuna", "tuning.num_trials=100", "tuning.metric=validation_loss"],
    ["distillation.enabled=true", "distillation.teacher_model.path=/path/to/teacher"],
    ["distillation.enabled=true", "distillation.teacher_model.path=/t",
     "distillation.feature_distillation.enabled=true", "distillation.feature_distillation.layers=[0,6,11]"],
    ["distillation.enabled=true", "distillation.teacher_model.path=/t", "distillation.attention_distillation.enabled=true"],
]


@pytest.mark.parametrize("overrides", SEED_COMMAND_LINES, ids=lambda o: " ".join(o))
def test_seed_command_lines_parse_and_validate(overrides):
    validate(compose_config(overrides, run_dir="/tmp/x"))


def test_cli_typo_fails_before_compute_naming_the_key(tmp_path, run_module):
    proc = run_module("vishwamai.training_v2", "training.optimizer.lrr=1e-3", f"hydra.run.dir={tmp_path}/run",
                      cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]  # like every config error (Hydra's own exit code is 1)
    assert "lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_model_too_big_for_machine_fails_fast_with_memory_needed(tmp_path, run_module):
    proc = run_module("vishwamai.training_v2", "model=10B", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "needs about" in proc.stderr and "GiB" in proc.stderr and "10B" in proc.stderr


def test_a_rope_scaling_variant_not_implemented_fails_loudly_naming_it():
    from vishwamai.errors import NotImplementedYet

    with pytest.raises(NotImplementedYet, match="model.rope_scaling.type='yarn'"):
        validate(compose_config(["model.rope_scaling.type=yarn"], run_dir="/tmp/x"))
