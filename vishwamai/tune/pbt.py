"""Population-based training (tuning.pruner=pbt, Ray Tune's PopulationBasedTraining).

Every `tuning.pbt.perturbation_interval` steps a trial reports its metric together with its
checkpoint (checkpointing.every_n_steps is set to the interval).  Ray then lets a trial in the
bottom quantile continue from a top trial's checkpoint with perturbed values: the trial restarts
with `training.resume=<donor checkpoint>` and the new values, which `ApplyHyperparameters` puts
into the restored optimizer and lr scheduler (the checkpoint holds the donor's).  Keys that
change the architecture or the data are copied from the donor, never perturbed.

Each exploit is appended to RUN_DIR/pbt_exploits.jsonl by the trial that continues, and listed
in tuning_summary.json under `exploits`: {"step", "trial", "from_trial", "params"}.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from vishwamai.errors import ConfigError
from vishwamai.train.events import Callback
from vishwamai.tune.space import Param
from vishwamai.tune.trial import METRICS

# What PBT may change in a running trial: values the restored optimizer or model takes as they are.
PERTURBABLE = ("training.optimizer.lr", "training.optimizer.weight_decay", "model.dropout_rate")
EXPLOITS_FILE = "pbt_exploits.jsonl"
META_FILE = "pbt.json"  # beside the checkpoint handed to Ray: whose it is and from which step
CHECKPOINT_DIR = "checkpoint"


def perturbed(params: list[Param]) -> list[Param]:
    keys = [p for p in params if p.key in PERTURBABLE]
    if not keys:
        raise ConfigError("tuning.search_space", f"tuning.pruner=pbt perturbs only {list(PERTURBABLE)}; "
                                                 "the search space has none of them")
    return keys


def scheduler(cfg: DictConfig, params: list[Param], domain: Callable[[Param], Any]):
    from ray.tune.schedulers import PopulationBasedTraining

    pbt = cfg.tuning.pbt
    return PopulationBasedTraining(
        time_attr="step", perturbation_interval=pbt.perturbation_interval,
        hyperparam_mutations={p.key: domain(p) for p in perturbed(params)},
        quantile_fraction=pbt.quantile_fraction, resample_probability=pbt.resample_probability, synch=pbt.synch)


def check_sampler(tu: DictConfig) -> None:
    if tu.sampler != "random":
        raise ConfigError("tuning.sampler", f"tuning.pruner=pbt samples its first population at random "
                                            f"(PBT does the search); use tuning.sampler=random, not {tu.sampler}")


class ApplyHyperparameters(Callback):
    """After a restore, the trial's own lr and weight decay replace the checkpoint's, in the optimizer
    and as the scheduler's base lr, so the schedule continues at the same point with the new peak."""

    def on_train_start(self, trainer) -> None:
        opt = trainer.cfg.training.optimizer
        trainer.scale_lr(opt.lr / trainer.scheduler.base_lrs[0])  # every group follows the first's schedule
        trainer.optimizer.param_groups[0]["weight_decay"] = opt.weight_decay  # build_optimizer: group 0 decays


class PbtReporter(Callback):
    """Reports the metric with the step's checkpoint every `interval` steps (and at the end): PBT's
    perturbation interval, or the evaluation interval for schedulers that pause trials (HyperBand, BOHB).

    At on_step_end, after the checkpoint manager saved the step; `send(step, value, checkpoint_dir)`
    hands both to Ray (which copies the checkpoint before it returns).
    """

    def __init__(self, metric: str, trial_id: str, interval: int,
                 send: Callable[[int, float, Optional[Path]], None]):
        self.key, self.trial_id, self.interval, self.send = METRICS[metric], trial_id, interval, send

    def on_step_end(self, trainer) -> None:
        step = trainer.state.step
        value = trainer.metrics.get(self.key)
        if value is None or not (step % self.interval == 0 or step == trainer.cfg.training.max_steps):
            return
        from vishwamai.checkpoint.layout import checkpoints_root, step_name
        from vishwamai.checkpoint.manager import link_tree

        trainer.wait_for_checkpoints()  # the step's checkpoint is written in the background
        saved = checkpoints_root(trainer.cfg.run_dir) / step_name(step)
        if not saved.is_dir():
            self.send(step, float(value), None)
            return
        staging = Path(tempfile.mkdtemp(prefix="pbt-", dir=trainer.cfg.run_dir))
        try:
            link_tree(saved, staging / CHECKPOINT_DIR)
            (staging / META_FILE).write_text(json.dumps({"trial": self.trial_id, "step": step}))
            self.send(step, float(value), staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def restore_from(restored: Path, trial_cfg: DictConfig, trial_id: str, values: dict[str, Any],
                 study_dir: Path) -> None:
    """A trial (re)started by Ray with a checkpoint: resume from it; a donor's checkpoint is an exploit
    (recorded with Ray's trial ids; the study's summary turns them into trial numbers)."""
    meta = json.loads((restored / META_FILE).read_text())
    trial_cfg.training.resume = str(restored / CHECKPOINT_DIR)
    if meta["trial"] != trial_id:
        record = {"step": meta["step"], "trial": trial_id, "from_trial": meta["trial"], "params": values}
        with open(study_dir / EXPLOITS_FILE, "a") as fh:  # one short line per write: appends do not interleave
            fh.write(json.dumps(record, default=float) + "\n")


def read_exploits(study_dir: Path) -> list[dict[str, Any]]:
    """Each exploit once: Ray may start a trial from the same donor checkpoint more than once (a
    paused trial resumed, synch=true), which writes the same record again."""
    path = study_dir / EXPLOITS_FILE
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return list({(r["step"], r["trial"], r["from_trial"]): r for r in records}.values())
