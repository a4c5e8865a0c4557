"""The language-model loss (train/loss.py): the chunked cross-entropy equals F.cross_entropy, and the
Trainer's whole-step compile (model + loss as one graph) trains like eager."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vishwamai.config import validate
from vishwamai.errors import ConfigError, NotImplementedYet
from vishwamai.train import Callback
from vishwamai.train.loss import linear_cross_entropy
from vishwamai.training_v2 import compose_config, run


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _reference_and_chunked(hidden, weight, targets, chunk_rows, autocast, reduction="mean"):
    """(loss, d hidden, d weight) of F.cross_entropy on the float32 logits, then of the chunked loss."""
    results = []
    for loss_fn in (lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction=reduction),
                    lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows, reduction)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        results.append((loss.detach(), *torch.autograd.grad(3.0 * loss, (hidden, weight))))
    return results


@pytest.mark.parametrize("chunk_rows", [1, 64, 100, 1000])  # one row, even blocks, a ragged last block, one block
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_cross_entropy_equals_f_cross_entropy_loss_and_gradients(chunk_rows, reduction):
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (300,))
    targets[[3, 77]] = -100  # ignored: neither in the sum nor in the count
    (loss, d_hidden, d_weight), (c_loss, c_hidden, c_weight) = _reference_and_chunked(
        hidden, weight, targets, chunk_rows, autocast=False, reduction=reduction)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-6)
    for chunked, reference in ((c_hidden, d_hidden), (c_weight, d_weight)):  # float32 rounding, nothing more
        torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
    assert c_hidden[[3, 77]].abs().max() == 0


def test_chunked_cross_entropy_under_bf16_autocast_matches_to_bf16_precision():
    """As lm_head under autocast: bf16 matmuls, float32 softmax; the per-block weight gradients are
    summed in float32 (the reference rounds the whole sum to bf16 once), hence bf16's tolerance."""
    torch.manual_seed(1)
    hidden = torch.randn(256, 64, requires_grad=True)
    weight = (0.1 * torch.randn(1000, 64)).requires_grad_()
    targets = torch.randint(0, 1000, (256,))
    (loss, d_hidden, d_weight), (c_loss, c_hidden, c_weight) = _reference_and_chunked(
        hidden, weight, targets, 96, autocast=True)
    assert c_loss.dtype == torch.float32
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-5)
    assert c_hidden.dtype == hidden.dtype and c_weight.dtype == weight.dtype
    torch.testing.assert_close(c_hidden, d_hidden, rtol=2e-2, atol=2e-2 * d_hidden.abs().max().item())
    torch.testing.assert_close(c_weight, d_weight, rtol=2e-2, atol=2e-2 * d_weight.abs().max().item())


def test_chunked_cross_entropy_without_grad_computes_the_loss_only():
    hidden, weight = torch.randn(50, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (50,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16, reduction="sum")
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"))


def test_chunked_loss_trains_like_the_full_logits(tmp_path, tiny_overrides):
    """training.loss_chunk_rows: the same losses, step for step, and the same validation loss."""
    base = tiny_overrides + ["training.max_steps=4", "training.eval_every_n_steps=2"]
    full = run(compose_config(base, run_dir=str(tmp_path / "full")))
    chunked = run(compose_config(base + ["training.loss_chunk_rows=100"], run_dir=str(tmp_path / "chunked")))
    for a, b in zip(_records(tmp_path / "full"), _records(tmp_path / "chunked"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert chunked["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-5)


class ModelCompiled(Callback):
    """Records whether the Trainer compiled the model itself (a torch.compile wrapper) or not."""

    def on_train_start(self, trainer):
        self.model_compiled = hasattr(trainer.model, "_orig_mod")


class ReadsOutputs(ModelCompiled):
    """A callback that reads the model's outputs (as distillation does): on_loss gets the logits."""

    def __init__(self):
        self.logits_shapes = []

    def on_loss(self, trainer, *, inputs, targets, outputs, terms):
        self.logits_shapes.append(tuple(outputs.logits.shape))


def test_a_callback_reading_the_logits_refuses_the_chunked_loss(tmp_path, tiny_overrides):
    cfg = compose_config(tiny_overrides + ["training.loss_chunk_rows=64"], run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="training.loss_chunk_rows"):
        run(cfg, extra_callbacks=[ReadsOutputs()])


def test_chunked_loss_with_sharded_model_is_not_implemented_yet():
    cfg = compose_config(["training.loss_chunk_rows=64", "distributed.strategy=model_parallel"], run_dir="/tmp/x")
    with pytest.raises(NotImplementedYet, match="training.loss_chunk_rows"):
        validate(cfg)


@pytest.mark.slow
def test_whole_step_compile_trains_like_eager_and_keeps_outputs_for_callbacks(tmp_path, tiny_overrides):
    """training.compile: without a callback reading outputs the model and its loss are one compiled graph
    (the model itself stays uncompiled); with one, the model alone is compiled and on_loss gets its logits.
    Both give eager's losses within float tolerance."""
    base = tiny_overrides + ["training.max_steps=3", "training.eval_every_n_steps=0"]
    eager = run(compose_config(base, run_dir=str(tmp_path / "eager")))
    observer = ModelCompiled()
    whole = run(compose_config(base + ["training.compile=true"], run_dir=str(tmp_path / "whole")),
                extra_callbacks=[observer])
    reader = ReadsOutputs()
    model_only = run(compose_config(base + ["training.compile=true"], run_dir=str(tmp_path / "model_only")),
                     extra_callbacks=[reader])
    assert not observer.model_compiled and reader.model_compiled
    assert reader.logits_shapes and all(len(shape) == 3 for shape in reader.logits_shapes)
    reference = _records(tmp_path / "eager")
    for name in ("whole", "model_only"):
        for a, b in zip(reference, _records(tmp_path / name), strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    for summary in (whole, model_only):
        assert summary["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-3)


def test_the_recipes_model_and_its_loss_compile_as_one_graph(tiny_overrides):
    """The recipe builds the model from an OmegaConf node; a config lookup in forward broke the graph
    (the whole forward then ran outside it). fullgraph=True fails on any graph break; graph breaks are
    Dynamo's (tracing), so the eager backend shows them without Inductor's compile time."""
    from vishwamai.model import build_model
    from vishwamai.train.loss import lm_loss

    cfg = compose_config(tiny_overrides + ["model.d_model=32", "model.n_layers=1", "model.n_heads=2"],
                         run_dir="/tmp/x").model
    model = build_model(cfg, check_memory=False)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    compiled = torch.compile(lm_loss, fullgraph=True, backend="eager")(model, tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(compiled, lm_loss(model, tokens[:, :-1], tokens[:, 1:]), rtol=1e-5, atol=1e-5)
