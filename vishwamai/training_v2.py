"""The Hydra entry point: build everything from the config, then train.

    python -m vishwamai.training_v2 [key=value ...]

Reads top to bottom as the recipe: validate -> distributed -> data -> model ->
optimizer -> callbacks (one per configured feature) -> Trainer.fit -> summary.json.
`run(cfg)` is the same recipe for Python callers (tuning trials, KFP components).  The command
line chooses: `tuning.enabled=true` runs a study of such runs (vishwamai.tune.run_tuning(cfg, run)),
anything else one run.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vishwamai.config import check_device, register_schema, validate
from vishwamai.config import compose_config  # noqa: F401 - public here too (tests, components, notebooks)
from vishwamai.errors import EXIT_NON_RETRYABLE, EXIT_PREEMPTED, ConfigError, VishwamaiError
from vishwamai.run_files import CONFIG_FILE, SUMMARY_FILE

register_schema()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def adopt_architecture(cfg: DictConfig) -> None:
    """training.init_from: the model block becomes the checkpoint's own architecture."""
    import dataclasses

    from vishwamai.checkpoint import find_model_dir, read_model_config
    from vishwamai.errors import CheckpointError

    try:
        source = read_model_config(find_model_dir(cfg.training.init_from))
    except CheckpointError as e:
        raise ConfigError("training.init_from", str(e)) from e
    for field in dataclasses.fields(source):
        if field.name != "parallel_factor":
            cfg.model[field.name] = getattr(source, field.name)  # a nested group stays a dataclass


def load_weights_into(model: torch.nn.Module, path: str) -> None:
    """training.init_from: read the checkpoint's weights straight into `model` (no second model built)."""
    from vishwamai.checkpoint import find_model_dir
    from vishwamai.checkpoint.io import WEIGHTS_FILE, apply_weights, as_model_config, read_weights
    from vishwamai.hf import is_hf_model_dir
    from vishwamai.hf.weights import load_hf_weights

    source = find_model_dir(path)
    if is_hf_model_dir(source):  # shard by shard, straight into `model`
        load_hf_weights(model, as_model_config(model.config), source)
    else:
        apply_weights(model, read_weights(source), as_model_config(model.config), source / WEIGHTS_FILE)


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    """One entry per feature; each lives in the module its config key names."""
    from vishwamai.batching import build_dynamic_batch
    from vishwamai.checkpoint import build_checkpointing
    from vishwamai.distill import build_distillation
    from vishwamai.compress import build_compression
    from vishwamai.distributed.report import DistributedReport
    from vishwamai.generate import build_sampling
    from vishwamai.monitoring import build_monitoring
    from vishwamai.tune import build_tuning_callbacks

    # The Trainer runs them by their declared phase (Callback.order: features, checkpoint, then
    # loggers and reports); within a phase, in this order.
    callbacks = []
    callbacks += build_dynamic_batch(cfg)
    callbacks += build_distillation(cfg)  # loads and checks the teacher(s) before training starts
    callbacks += build_compression(cfg, run_dir)  # pruning, then quantization of its result
    callbacks += build_checkpointing(cfg, run_dir)
    callbacks += build_monitoring(cfg, run_dir)
    callbacks.append(DistributedReport())
    callbacks += build_tuning_callbacks(cfg)  # Katib's name=value lines
    callbacks += build_sampling(cfg)  # training.sample_prompt: a sample of the trained model's text
    return callbacks


def run(cfg: DictConfig, extra_callbacks: list = ()) -> dict[str, Any]:
    """Train one model as `cfg` says; returns the summary also written to summary.json."""
    if cfg.tuning.enabled:  # never silently one run where a study was asked for
        raise ConfigError("tuning.enabled", "run(cfg) trains one model; run a study with study(cfg), "
                                            "as the command line does")
    validate(cfg)
    check_device(cfg)
    return recipe(cfg, extra_callbacks)


def recipe(cfg: DictConfig, extra_callbacks: list = ()) -> dict[str, Any]:
    """The recipe itself, on a validated config."""
    from vishwamai.data import load_token_data
    from vishwamai.distributed import build_parallelism
    from vishwamai.model import check_fits
    from vishwamai.distill.student_init import adopt_teacher_shape
    from vishwamai.hf import adopt_model_tokenizer

    wall_start = time.time()
    if cfg.training.init_from:
        adopt_architecture(cfg)
    adopt_teacher_shape(cfg)  # distillation.student_init=teacher_layers
    adopt_model_tokenizer(cfg)  # a Hugging Face model directory's own tokenizer
    t = cfg.training
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    parallel = build_parallelism(cfg)
    run_dir = Path(cfg.run_dir)  # after joining the process group: all ranks agree on it
    from vishwamai.checkpoint.rundir import claim_run_dir

    claim_run_dir(cfg, run_dir, parallel.is_main)  # an earlier run's checkpoints: resume or overwrite, never lost
    device = parallel.device(t.device)
    check_fits(cfg.model, device, parallel.shard_size)
    with parallel.main_first():  # rank 0 builds the token cache, the others then read it
        data = load_token_data(cfg.data)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                                              f"vocabulary ({data.vocab_size}, data.tokenizer={cfg.data.tokenizer})")
    if parallel.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)

    with build_trainer(cfg, parallel, data, device, run_dir, extra_callbacks) as trainer:  # close()s the run
        if t.resume:  # before on_train_start: every callback starts from the restored state
            from vishwamai.checkpoint import resume

            resume(trainer, t.resume, run_dir)
        trainer.fit()
        summary = run_summary(trainer, data, run_dir, wall_start)
        if parallel.is_main:
            from vishwamai.monitoring import finish_monitoring

            summary.update(finish_monitoring(cfg, run_dir, summary))  # report.png/.md, summary into MLflow
            (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def build_trainer(cfg: DictConfig, parallel, data, device: torch.device, run_dir: Path,
                  extra_callbacks: list = ()):
    """Model -> precision -> wrapping -> optimizer -> schedule -> sampler -> callbacks, owned by one Trainer
    (nothing else keeps the wrapped model: Trainer.close() releases it before the process group)."""
    from vishwamai.data import train_sampler
    from vishwamai.model import build_model
    from vishwamai.train import Trainer
    from vishwamai.train.optim import build_optimizer, build_scheduler
    from vishwamai.train.precision import Precision

    t = cfg.training
    seed_everything(t.seed)
    model = build_model(cfg.model, device, check_memory=False, activation_checkpointing=t.activation_checkpointing)
    if t.init_from:
        load_weights_into(model, t.init_from)
    precision = Precision(cfg.amp, device)
    model = parallel.wrap(precision.prepare(model, parallel))  # amp O2: weights cast, float32 masters kept
    # training.compile: the Trainer compiles, once it knows whether callbacks read the model's outputs.
    optimizer = parallel.wrap_optimizer(build_optimizer(precision.optimizer_params(model.parameters()),
                                                        t.optimizer))
    scheduler = build_scheduler(optimizer, t.scheduler, t.max_steps)
    sampler = train_sampler(data.train, cfg.data, t.seed, parallel.rank, parallel.world_size, device)
    return Trainer(cfg, model, optimizer, scheduler, sampler, data.val, precision,
                   parallel, device, build_callbacks(cfg, run_dir) + list(extra_callbacks))


def run_summary(trainer, data, run_dir: Path, wall_start: float) -> dict[str, Any]:
    s = trainer.state
    return {
        "final_val_loss": s.last_val_loss,
        "best_val_loss": s.best_val_loss,
        "final_train_loss": s.last_train_loss,
        "steps": s.step,
        "tokens": s.tokens_seen,
        "skipped_steps": s.skipped_steps,
        "train_time_s": s.train_time_s,
        "wall_time_s": time.time() - wall_start,
        "tokens_per_s": s.tokens_seen / max(s.train_time_s, 1e-9),
        "num_parameters": trainer.raw_model.num_parameters(),
        "unigram_entropy_nats": data.meta["unigram_entropy_nats"],
        "world_size": trainer.parallel.world_size,
        # The final sizes: per forward on a rank, per optimizer step on a rank, per step over all ranks.
        "micro_batch_size": trainer.micro_batch_size,
        "batch_size": trainer.batch_size,
        "global_batch_size": trainer.global_batch_size,
        "run_dir": str(run_dir),
        **trainer.summary,
    }


def study(cfg: DictConfig) -> dict[str, Any]:
    """tuning.enabled=true: a study whose trials each run this recipe (vishwamai/tune)."""
    from vishwamai.tune import run_tuning

    return run_tuning(cfg, run)


def print_outcome(summary: dict[str, Any]) -> None:
    run_dir = Path(summary["run_dir"])
    print(f"\nvalidation loss {summary['final_val_loss']:.4f} nats/token "
          f"(corpus unigram entropy {summary['unigram_entropy_nats']:.4f}) after {summary['steps']} steps, "
          f"{summary['tokens_per_s']:,.0f} tokens/s")
    print(f"run directory: {run_dir}")
    for label, key in (("checkpoint", "final_checkpoint"), ("tensorboard", "tensorboard_dir"),
                       ("mlflow", "mlflow_run"), ("report", "report")):
        if key in summary:
            print(f"  {label}: {summary[key]}")
    if "sample" in summary:
        prompt = summary["sample_prompt"]
        print(f"sample (training.sample_prompt={prompt!r}):\n{prompt}{summary['sample']}")


@hydra.main(version_base="1.3", config_path="configs", config_name="default_config")
def _hydra_main(cfg: DictConfig) -> None:
    from vishwamai.distributed import bound_failing_exit
    from vishwamai.distributed.launch import launch_workers

    _run_started()
    try:
        if launch_workers(cfg):  # distributed.world_size given without torchrun: workers ran
            return
        summary = study(cfg) if cfg.tuning.enabled else run(cfg)
    except VishwamaiError as e:
        print(f"error: {e}", file=sys.stderr)
        bound_failing_exit()
        sys.exit(EXIT_NON_RETRYABLE)
    except BaseException:
        bound_failing_exit()
        raise
    if summary.get("run_dir") and (summary.get("world_size", 1) == 1 or summary.get("rank", 0) == 0):
        print_outcome(summary)
    if summary.get("preempted"):
        sys.exit(EXIT_PREEMPTED)


# Hydra reports its own errors (a misspelt key, a wrong type, a run directory it cannot create) with
# exit code 1, like a crash.  With HYDRA_FULL_ERROR set it raises them instead, so main() can give
# them the exit code of every other config error; once the run starts Hydra's usual reporting returns.
_FULL_ERROR = "HYDRA_FULL_ERROR"
_cli = {"started": False, "set_full_error": False}


def _run_started() -> None:
    _cli["started"] = True
    if _cli["set_full_error"]:
        os.environ.pop(_FULL_ERROR, None)  # a crash in the run: Hydra's trimmed traceback, exit code 1


def startup_error(e: Exception) -> Optional[str]:
    """The message for an error Hydra raised before the run started, or None if it is not the user's."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, (HydraException, OmegaConfBaseException)):  # composition: unknown key, wrong type, ...
        cause = e.__cause__
        return str(e) + (f"\n{cause}" if isinstance(cause, OmegaConfBaseException) and str(cause) not in str(e) else "")
    if isinstance(e, OSError) and e.filename:  # Hydra creating the run directory or writing .hydra/ in it
        path = Path(str(e.filename))
        why = "exists and is not a directory" if path.exists() and not path.is_dir() else e.strerror
        return f"hydra.run.dir: cannot create or write {path}: {why}"
    return None


def main() -> None:
    """`python -m vishwamai.training_v2` / `vishwamai-train`: exit 0 done, 2 for a config or input error
    (no traceback: the message names the key or file), 75 preempted (checkpoint saved, rerun with
    training.resume=auto), 1 for a crash."""
    _cli["set_full_error"] = _FULL_ERROR not in os.environ
    if _cli["set_full_error"]:
        os.environ[_FULL_ERROR] = "1"
    try:
        _hydra_main()
    except Exception as e:
        message = None if _cli["started"] else startup_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_NON_RETRYABLE)


if __name__ == "__main__":
    main()
