"""Distillation end to end: real teachers trained or saved here, real runs through training_v2.run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vishwamai.checkpoint import save_model
from vishwamai.checkpoint.layout import step_name
from vishwamai.config import ModelConfig
from vishwamai.distill import Distillation
from vishwamai.errors import ConfigError
from vishwamai.model import build_model
from vishwamai.train.events import Callback
from vishwamai.training_v2 import compose_config, run

# The student: half the teacher's width and depth (the teacher is conftest's tiny model, d=64, 2 blocks).
STUDENT = ["model.d_model=32", "model.n_layers=1", "training.optimizer.lr=3e-3", "training.eval_every_n_steps=0",
           "checkpointing.save_best=false"]
ALL_LOSSES = ["distillation.feature_distillation.enabled=true", "distillation.hidden_distillation.enabled=true",
              "distillation.embedding_distillation.enabled=true", "distillation.attention_distillation.enabled=true"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _distill(teacher: str) -> list[str]:
    return ["distillation.enabled=true", f"distillation.teacher_model.path={teacher}"]


def test_distilled_student_beats_the_same_student_trained_from_scratch(tmp_path, tiny_overrides, trained_teacher):
    student = tiny_overrides + STUDENT + ["training.max_steps=30"]
    scratch = run(compose_config(student, run_dir=str(tmp_path / "scratch")))
    # T=1, mostly KD: a teacher this young helps most through its sharp predictions (measured here:
    # 3.756 vs 3.839 nats/token after 30 steps; T=2 with alpha=0.5 gains 0.03, with alpha=0.9 nothing).
    distilled = run(compose_config(student + _distill(trained_teacher) + [
        "distillation.teacher_model.temperature=1.0", "distillation.teacher_model.alpha=0.9"],
        run_dir=str(tmp_path / "kd")))
    assert distilled["distillation_teachers"][0].startswith(trained_teacher)
    assert distilled["final_val_loss"] < scratch["final_val_loss"] - 0.04, (distilled, scratch)


class Probe(Callback):
    """Records what the distillation callback set up and whether its projections moved."""

    def on_train_start(self, trainer):
        self.distill = next(cb for cb in trainer.callbacks if isinstance(cb, Distillation))
        self.forward_kwargs = dict(trainer.forward_kwargs)
        self.start = {k: v.detach().clone() for k, v in self.distill.projections.state_dict().items()}
        in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        self.in_optimizer = all(id(p) in in_optimizer for p in self.distill.projections.parameters())
        self.clipped = all(any(p is q for q in trainer.params) for p in self.distill.projections.parameters())

    def on_train_end(self, trainer):
        self.end = {k: v.detach().clone() for k, v in self.distill.projections.state_dict().items()}


def test_every_term_is_logged_and_projections_train_when_widths_differ(tmp_path, tiny_overrides, trained_teacher):
    probe = Probe()
    run_dir = tmp_path / "all"
    cfg = compose_config(tiny_overrides + STUDENT + _distill(trained_teacher) + ALL_LOSSES + [
        "training.max_steps=3", "distillation.feature_distillation.layers=[0]",
        "distillation.teacher_model.alpha=0.3"], run_dir=str(run_dir))
    run(cfg, extra_callbacks=[probe])
    for record in _records(run_dir):
        terms = {k: v for k, v in record.items() if k.startswith("loss_")}
        assert set(terms) == {"loss_ce", "loss_kd", "loss_feature", "loss_hidden", "loss_embedding", "loss_attention"}
        assert sum(terms.values()) == pytest.approx(record["loss"], rel=1e-5)
        assert all(v > 0 for v in terms.values())
    assert probe.forward_kwargs == {"output_hidden_states": True, "output_attentions": True}
    # 32 -> 64: one projection per compared student hidden state (embedding and block 0's output).
    assert sorted(probe.start) == ["teacher0_hidden0.weight", "teacher0_hidden1.weight"]
    assert probe.start["teacher0_hidden1.weight"].shape == (64, 32)
    assert probe.in_optimizer and probe.clipped
    assert all(not torch.equal(probe.start[k], probe.end[k]) for k in probe.start), "projections must be trained"


def test_logit_only_distillation_asks_the_student_for_logits_only(tmp_path, tiny_overrides, trained_teacher):
    probe = Probe()
    run(compose_config(tiny_overrides + STUDENT + _distill(trained_teacher) + ["training.max_steps=1"],
                       run_dir=str(tmp_path / "kd")), extra_callbacks=[probe])
    assert probe.forward_kwargs == {} and probe.start == {}


def test_resume_restores_the_projections_and_continues_exactly(tmp_path, tiny_overrides, trained_teacher):
    overrides = tiny_overrides + STUDENT + _distill(trained_teacher) + [
        "distillation.feature_distillation.enabled=true", "distillation.feature_distillation.layers=[0]",
        "training.max_steps=4", "checkpointing.every_n_steps=2"]
    full = tmp_path / "full"
    run(compose_config(overrides, run_dir=str(full)))
    saved = torch.load(full / "checkpoints" / step_name(2) / "trainer_state.pt", weights_only=True)
    assert "teacher0_hidden1.weight" in saved["trainer"]["callbacks"]["distillation"]["projections"]
    assert len(saved["trainer"]["optimizer"]["param_groups"]) == 3  # the student's two + the projections
    resumed = tmp_path / "resumed"
    run(compose_config(overrides + [f"training.resume={full / 'checkpoints' / step_name(2)}"], run_dir=str(resumed)))
    after = [r for r in _records(full) if r["step"] > 2]
    assert [r["step"] for r in _records(resumed)] == [3, 4]
    for a, b in zip(after, _records(resumed)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["loss_feature"] == pytest.approx(a["loss_feature"], rel=1e-6)


def test_gradient_accumulation_matches_the_large_batch(tmp_path, tiny_overrides, trained_teacher):
    base = tiny_overrides + STUDENT + _distill(trained_teacher) + [
        "training.max_steps=3", "distillation.hidden_distillation.enabled=true"]
    run(compose_config(base + ["training.batch_size=8"], run_dir=str(tmp_path / "big")))
    run(compose_config(base + ["training.batch_size=4", "training.gradient_accumulation_steps=2"],
                       run_dir=str(tmp_path / "accum")))
    for a, b in zip(_records(tmp_path / "big"), _records(tmp_path / "accum")):
        for key in ("loss", "loss_kd", "loss_hidden", "loss_ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-4)


def test_an_ensemble_of_identical_teachers_teaches_like_one(tmp_path, tiny_overrides, trained_teacher):
    base = tiny_overrides + STUDENT + ["training.max_steps=2", "distillation.enabled=true"]
    run(compose_config(base + [f"distillation.teacher_model.path={trained_teacher}"], run_dir=str(tmp_path / "one")))
    run(compose_config(base + [f"distillation.teacher_model.paths=[{trained_teacher},{trained_teacher}]",
                               "distillation.teacher_model.weights=[1.0,3.0]"], run_dir=str(tmp_path / "two")))
    for a, b in zip(_records(tmp_path / "one"), _records(tmp_path / "two")):
        assert b["loss_kd"] == pytest.approx(a["loss_kd"], rel=1e-5)


def test_bf16_teacher_under_autocast(tmp_path, tiny_overrides, trained_teacher):
    summary = run(compose_config(tiny_overrides + STUDENT + _distill(trained_teacher) + [
        "training.max_steps=2", "amp.enabled=true", "distillation.teacher_model.dtype=bfloat16",
        "distillation.hidden_distillation.enabled=true"], run_dir=str(tmp_path / "bf16")))
    assert summary["skipped_steps"] == 0
    assert all(r["loss_kd"] > 0 for r in _records(tmp_path / "bf16"))


# ------------------------------------------------------------------ bad input
def _saved_model(directory: Path, **overrides) -> str:
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=64, **overrides)
    save_model(directory, build_model(cfg), cfg)
    return str(directory)


def _bad_teacher_cases(tmp_path: Path) -> list[tuple[list[str], str, str]]:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model_config.json").write_text("{not json")
    good = _saved_model(tmp_path / "good")
    return [
        ([f"distillation.teacher_model.path={tmp_path / 'missing'}"], "distillation.teacher_model.path", "no such"),
        ([f"distillation.teacher_model.path={empty}"], "distillation.teacher_model.path", "neither"),
        ([f"distillation.teacher_model.path={corrupt}"], "distillation.teacher_model.path", "unreadable"),
        ([f"distillation.teacher_model.paths=[{good},{_saved_model(tmp_path / 'v', vocab_size=300)}]"],
         "distillation.teacher_model.paths[1]", "vocabulary"),
        ([f"distillation.teacher_model.path={good}", "distillation.feature_distillation.enabled=true",
          "distillation.feature_distillation.layers=[0,6,11]"], "distillation.feature_distillation.layers", "range"),
        ([f"distillation.teacher_model.path={good}", "distillation.feature_distillation.enabled=true",
          "distillation.feature_distillation.teacher_layers=[3]"],
         "distillation.feature_distillation.teacher_layers", "range"),
        ([f"distillation.teacher_model.path={good}", "distillation.attention_distillation.enabled=true",
          "distillation.attention_distillation.layers=[2]"], "distillation.attention_distillation.layers", "range"),
        ([], "distillation.teacher_model.path", "needs a teacher"),
        ([f"distillation.teacher_model.path={good}", "distillation.teacher_model.weights=[1,1]"],
         "distillation.teacher_model.weights", "2 entries for 1"),
    ]


def test_bad_teacher_or_layers_fail_before_training_naming_the_key(tmp_path, tiny_overrides):
    for i, (overrides, key, words) in enumerate(_bad_teacher_cases(tmp_path)):
        run_dir = tmp_path / f"run{i}"
        cfg = compose_config(tiny_overrides + ["model.d_model=32", "model.n_layers=1", "distillation.enabled=true"]
                             + overrides, run_dir=str(run_dir))
        with pytest.raises(ConfigError) as info:
            run(cfg)
        assert info.value.key == key, (overrides, str(info.value))
        assert words in str(info.value), str(info.value)
        assert not (run_dir / "metrics.jsonl").exists(), "the error must come before any training step"


@pytest.mark.slow
def test_ddp_distillation_with_projections_matches_one_process(tmp_path, tiny_overrides, trained_teacher):
    """2 ranks x batch 2 == 1 process x batch 4: the projections' gradients are averaged over ranks."""
    from test_distributed import assert_same_trajectory, torchrun

    overrides = tiny_overrides + STUDENT + _distill(trained_teacher) + [
        "training.max_steps=4", "training.device=cpu", "distillation.feature_distillation.enabled=true",
        "distillation.feature_distillation.layers=[0]", "distillation.embedding_distillation.enabled=true"]
    run(compose_config(overrides + ["training.batch_size=4"], run_dir=str(tmp_path / "single")))
    torchrun(overrides + ["training.batch_size=2", "distributed.strategy=data_parallel",
                          f"run_dir={tmp_path / 'ddp'}"])
    assert_same_trajectory(_records(tmp_path / "single"), _records(tmp_path / "ddp"),
                           keys=("loss", "grad_norm", "loss_kd", "loss_feature", "loss_embedding", "val_loss"))


def test_cli_bad_teacher_exits_non_retryable_naming_the_key(tmp_path, tiny_overrides, run_module):
    proc = run_module("vishwamai.training_v2", *tiny_overrides, "distillation.enabled=true",
                      f"distillation.teacher_model.path={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "distillation.teacher_model.path" in proc.stderr and "nope" in proc.stderr


@pytest.mark.slow
def test_longer_distillation_with_features_beats_scratch(tmp_path, tiny_overrides):
    """A stronger teacher (150 steps) and 60 student steps, logit KD plus normalised feature MSE."""
    teacher = tmp_path / "teacher"
    run(compose_config(tiny_overrides + ["training.max_steps=150", "training.eval_every_n_steps=0",
                                         "training.optimizer.lr=3e-3", "checkpointing.save_best=false"],
                       run_dir=str(teacher)))
    student = tiny_overrides + STUDENT + ["training.max_steps=60"]
    scratch = run(compose_config(student, run_dir=str(tmp_path / "scratch")))
    distilled = run(compose_config(student + _distill(str(teacher)) + ALL_LOSSES[:1] + [
        "distillation.teacher_model.temperature=1.0", "distillation.teacher_model.alpha=0.9",
        "distillation.feature_distillation.layers=[0]"],
        run_dir=str(tmp_path / "kd")))
    assert distilled["final_val_loss"] < scratch["final_val_loss"] - 0.02, (distilled, scratch)
