"""Compression: pruning schedules and masks, structured compaction, int8 quantization, the report.

Real training runs (tiny model), real safetensors files, a fresh Python process for reloading.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from vishwamai.compress.pruning import GradualPruning, compact_mlp, compute_masks, apply_masks
from vishwamai.compress.schedule import is_update_step, sparsity_at
from vishwamai.config import DataConfig, ModelConfig, PruningConfig
from vishwamai.errors import CheckpointError, ConfigError
from vishwamai.model import Transformer
from vishwamai.train.events import Callback

DATA = DataConfig(seq_len=32, embedded_max_bytes=200_000)
# Documented tolerance (README "Compression"): int8 validation loss within 0.02 nats/token of fp32.
LOSS_TOLERANCE = 0.02
# The compiled torchao path against torch.ao's eager one (README "Compression"): same int8 weights, activations
# quantized per token instead of per tensor; 7e-5 apart measured on the trained test model.
EAGER_TOLERANCE = 0.002


def small_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **kw)).eval()


def pruning_overrides(**kw) -> list[str]:
    base = {"enabled": "true", "target_sparsity": 0.5, "begin_step": 2, "end_step": 10, "frequency": 2}
    base.update(kw)
    return [f"distillation.pruning.{k}={v}" for k, v in base.items()]


# ------------------------------------------------------------------ schedules
def zhu_gupta(t, s_i, s_f, t0, n_dt):
    return s_f + (s_i - s_f) * (1 - (t - t0) / n_dt) ** 3


@pytest.mark.parametrize("s_i", [0.0, 0.1])
def test_cubic_schedule_follows_zhu_gupta(s_i):
    kw = dict(target=0.8, initial=s_i, begin=100, end=1100, schedule="cubic")
    for t in (100, 150, 350, 600, 850, 1099):
        assert sparsity_at(t, **kw) == pytest.approx(zhu_gupta(t, s_i, 0.8, 100, 1000))
    assert sparsity_at(99, **kw) == 0.0
    assert sparsity_at(1100, **kw) == 0.8 and sparsity_at(5000, **kw) == 0.8
    # Fast early, slow late: a quarter of the way, more than half of the pruning is done.
    assert sparsity_at(350, **kw) - s_i > 0.5 * (0.8 - s_i)
    assert sparsity_at(1100, **kw) - sparsity_at(850, **kw) < 0.05


def test_linear_and_constant_schedules():
    assert sparsity_at(600, target=0.5, begin=100, end=1100, schedule="linear") == pytest.approx(0.25)
    assert sparsity_at(99, target=0.5, begin=100, end=1100, schedule="constant") == 0.0
    assert sparsity_at(100, target=0.5, begin=100, end=1100, schedule="constant") == 0.5
    assert sparsity_at(7, target=0.5, begin=7, end=7, schedule="cubic") == 0.5  # begin == end: one shot
    assert [s for s in range(0, 14) if is_update_step(s, begin=2, end=9, frequency=3)] == [2, 5, 8, 9]


# ----------------------------------------------------------------------- masks
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_unstructured_masks_exact_and_exclude_embeddings(scope):
    model = small_model()
    masks = compute_masks(model, 0.3, PruningConfig(scope=scope))
    assert "embed.weight" not in masks and not any("norm" in k for k in masks)
    assert set(masks) == {n for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight"}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.3 * total) if scope == "global" else all(
        int((~m).sum()) == round(0.3 * m.numel()) for m in masks.values())
    params = dict(model.named_parameters())
    smallest_kept = min(params[k].abs()[m].min() for k, m in masks.items())
    largest_pruned = max(params[k].abs()[~m].max() for k, m in masks.items())
    if scope == "global":  # one threshold over all layers
        assert largest_pruned <= smallest_kept


@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_structured_mlp_compaction_keeps_outputs(scope):
    model = small_model()
    with torch.no_grad():  # make layer 1's channels larger, so a global threshold prunes layer 0 more
        model.blocks[1].mlp.gate_up.weight.mul_(1.15)
    cfg = PruningConfig(method="structured", scope=scope, structured_targets=["mlp"])
    apply_masks(dict(model.named_parameters()), compute_masks(model, 0.5, cfg))
    idx = torch.randint(0, 257, (2, 16))
    small, small_cfg, info = compact_mlp(model, model.config)
    assert info["compacted"] and small_cfg.ffn_hidden == max(info["channels_kept_per_layer"]) < 192
    if scope == "per_layer":
        assert info["channels_kept_per_layer"] == [96, 96]
    else:
        assert info["channels_kept_per_layer"][0] < info["channels_kept_per_layer"][1]
    assert small.num_parameters() < model.num_parameters()
    torch.testing.assert_close(small(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-5)


def test_structured_heads_remove_whole_heads():
    model = small_model()
    cfg = PruningConfig(method="structured", structured_targets=["heads"])
    masks = compute_masks(model, 0.5, cfg)
    apply_masks(dict(model.named_parameters()), masks)
    for block in model.blocks:
        q = block.attn.q_proj.weight.view(4, 16, 64)
        o = block.attn.o_proj.weight.view(64, 4, 16)
        dead_q = (q == 0).all(2).all(1)
        assert dead_q.sum() == 2 and torch.equal(dead_q, (o == 0).all(2).all(0))


# ------------------------------------------------------------- during training
class Watch(Callback):
    """Records the real sparsity after each step and checks pruned weights stay zero."""

    def __init__(self, pruner: GradualPruning):
        self.pruner, self.by_step, self.leaks = pruner, {}, 0

    def on_eval_end(self, trainer, *, val_loss):  # the loop evaluates before on_step_end
        self._check(trainer)

    def on_step_end(self, trainer):
        self._check(trainer)
        params = dict(trainer.raw_model.named_parameters())
        zeros = sum(int((params[k] == 0).sum()) for k in self.pruner.masks)
        total = sum(params[k].numel() for k in self.pruner.masks)
        self.by_step[trainer.state.step] = zeros / total if total else 0.0

    def _check(self, trainer):
        params = dict(trainer.raw_model.named_parameters())
        self.leaks += sum(int((params[k][~m] != 0).sum()) for k, m in self.pruner.masks.items())


def test_training_follows_schedule_and_hits_target_at_end_step(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    cfg = compose_config(tiny_overrides + ["training.max_steps=12", "training.eval_every_n_steps=3"]
                         + pruning_overrides(), run_dir=str(tmp_path / "run"))
    pruner = GradualPruning(cfg.distillation.pruning, tmp_path / "unused")
    watch = Watch(pruner)
    import vishwamai.compress as compress

    # The recipe's own pruning callback is the one watched: swap in ours through build_compression.
    original = compress.build_compression
    compress.build_compression = lambda c, r: [pruner]
    try:
        summary = run(cfg, extra_callbacks=[watch])
    finally:
        compress.build_compression = original
    assert watch.leaks == 0
    assert watch.by_step[1] == 0.0
    for step in (2, 4, 6, 8):  # update steps: the schedule's value, to within one weight per layer
        expected = zhu_gupta(step, 0.0, 0.5, 2, 8)
        assert watch.by_step[step] == pytest.approx(expected, abs=1e-3)
        assert watch.by_step[step + 1] == watch.by_step[step]  # between updates the masks hold
    assert watch.by_step[10] == 0.5 and watch.by_step[12] == 0.5  # exactly the target from end_step on
    assert summary["sparsity"] == 0.5 and summary["sparsity_target"] == 0.5
    per_layer = summary["sparsity_per_layer"]
    assert len(per_layer) == 2 * 5 and all(v["sparsity"] == 0.5 for v in per_layer.values())
    final = load_file(str(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors"))
    assert (final["blocks.0.mlp.down.weight"] == 0).float().mean().item() == 0.5


def test_masks_survive_resume(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    common = tiny_overrides + pruning_overrides(begin_step=2, end_step=4, frequency=1) + [
        "checkpointing.every_n_steps=6", "training.eval_every_n_steps=6"]
    run_dir = str(tmp_path / "run")
    run(compose_config(common + ["training.max_steps=6"], run_dir=run_dir))
    before = load_file(str(tmp_path / "run" / "checkpoints" / "step-6" / "model.safetensors"))
    # No mask update after step 4: after resume only the saved masks keep pruned weights at zero
    # while AdamW keeps updating every other weight.
    summary = run(compose_config(common + ["training.max_steps=10", "training.resume=auto"], run_dir=run_dir))
    after = load_file(str(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors"))
    name = "blocks.1.attn.q_proj.weight"
    assert not torch.equal(before[name], after[name])  # training did continue
    assert torch.equal(before[name] == 0, after[name] == 0)  # on exactly the same support
    assert summary["steps"] == 10 and summary["sparsity"] == 0.5


def test_pruning_state_round_trip_through_trainer_state(tmp_path):
    pruner = GradualPruning(PruningConfig(enabled=True), tmp_path)
    model = small_model()
    pruner.masks = compute_masks(model, 0.4, PruningConfig())
    torch.save({"callbacks": {pruner.state_key: pruner.state_dict()}}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = GradualPruning(PruningConfig(enabled=True), tmp_path)
    fresh.load_state_dict(state["callbacks"]["pruning"])
    assert fresh.masks.keys() == pruner.masks.keys()
    assert all(torch.equal(fresh.masks[k], pruner.masks[k]) for k in pruner.masks)


def test_pruning_config_errors_name_the_key(tmp_path, tiny_overrides):
    from vishwamai.config import validate
    from vishwamai.training_v2 import compose_config

    for bad, key in (("method=blocky", "method"), ("scope=everywhere", "scope"),
                     ("structured_targets=[rows]", "structured_targets"), ("frequency=0", "frequency")):
        cfg = compose_config(tiny_overrides + pruning_overrides() + [f"distillation.pruning.{bad}"], str(tmp_path))
        with pytest.raises(ConfigError, match=f"distillation.pruning.{key}"):
            validate(cfg)
    for bad, key in (("precision=int4", "precision"), ("mode=static", "mode")):
        cfg = compose_config(tiny_overrides + ["distillation.quantization.enabled=true",
                                               f"distillation.quantization.{bad}"], str(tmp_path))
        with pytest.raises(ConfigError, match=f"distillation.quantization.{key}"):
            validate(cfg)


# ----------------------------------------------------------------- quantization
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained tiny model with structured pruning and quantization in the same run."""
    from conftest import TINY_OVERRIDES
    from vishwamai.training_v2 import compose_config, run

    run_dir = tmp_path_factory.mktemp("compress") / "run"
    cfg = compose_config(TINY_OVERRIDES + ["training.max_steps=30", "training.eval_every_n_steps=30",
                                           "training.optimizer.lr=3e-3", "distillation.quantization.enabled=true",
                                           "distillation.quantization.calibration_steps=4",
                                           "distillation.pruning.method=structured"]
                         + pruning_overrides(begin_step=5, end_step=20, target_sparsity=0.25, frequency=5),
                         run_dir=str(run_dir))
    return run_dir, run(cfg)


def test_training_run_writes_pruned_and_quantized_models(trained):
    run_dir, summary = trained
    assert summary["pruning_compaction"]["compacted"] and summary["pruning_compaction"]["ffn_hidden_after"] == 144
    assert (run_dir / "pruned" / "model_config.json").is_file()
    assert json.loads((run_dir / "pruned" / "model_config.json").read_text())["ffn_hidden"] == 144
    assert summary["quantized_size_bytes"] < 0.35 * summary["fp32_size_bytes"]
    assert abs(summary["quantized_val_loss"] - summary["fp32_val_loss"]) < LOSS_TOLERANCE
    # The quantized model is the compacted one.
    assert json.loads((run_dir / "quantized" / "model_config.json").read_text())["ffn_hidden"] == 144


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_quantize_model_dir_size_and_loss(trained, tmp_path, mode):
    from vishwamai.compress import quantize_model_dir

    run_dir, _ = trained
    report = quantize_model_dir(run_dir / "checkpoints" / "final", tmp_path / "q", mode, 4, DATA)
    assert report["quantized_size_bytes"] < 0.35 * report["fp32_size_bytes"]
    assert abs(report["quantized_val_loss"] - report["fp32_val_loss"]) < LOSS_TOLERANCE
    assert report["quantized_val_loss"] != report["fp32_val_loss"]  # really int8 arithmetic
    saved = load_file(str(tmp_path / "q" / "quantized.safetensors"))
    assert saved["blocks.0.mlp.down.weight_int8"].dtype == torch.int8
    assert "lm_head.weight_int8" not in saved  # tied head stored once, as the embedding
    assert json.loads((tmp_path / "q" / "report.json").read_text())["mode"] == mode


def test_quantized_model_reloads_in_fresh_process(trained, tmp_path):
    from vishwamai.compress.quantize import main

    run_dir, _ = trained
    out = tmp_path / "q"
    assert main(["--model", str(run_dir), "--output", str(out), "--mode", "weight_only",
                 "--calibration-steps", "2", "--seq-len", "32"]) == 0
    expected = json.loads((out / "report.json").read_text())["quantized_val_loss"]
    script = textwrap.dedent(f"""
        import pickle, json, torch
        pickle.loads = pickle.load = None  # loading must never unpickle
        from vishwamai.compress import load_quantized
        from vishwamai.compress.measure import validation_loss
        from vishwamai.compress.quantize import load_validation
        from vishwamai.config import DataConfig
        model = load_quantized({str(out)!r})
        val, seq_len = load_validation(DataConfig(seq_len=32), model.config)
        text = model.generate(torch.zeros(1, 4, dtype=torch.long), 8, top_k=1)
        print(json.dumps({{"loss": validation_loss(model, val, seq_len), "tokens": text.shape[1]}}))
    """)
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 12 and result["loss"] == pytest.approx(expected, abs=1e-6)


def test_load_quantized_rejects_unknown_format(trained, tmp_path):
    from vishwamai.compress import load_quantized
    from vishwamai.compress.quantize import quantize_state, save_quantized

    model = small_model()
    tensors, meta = quantize_state(model)
    save_quantized(tmp_path, tensors, {**meta, "mode": "dynamic", "precision": "int4"}, model.config)
    with pytest.raises(CheckpointError, match="unsupported quantization format"):
        load_quantized(tmp_path)
    with pytest.raises(CheckpointError, match="not a quantized"):
        load_quantized(tmp_path / "nowhere")


# ----------------------------------------------------- compiled int8 (torchao)
def hide_torchao(monkeypatch) -> None:
    """As if torchao were not installed: importing it, or any of its modules, raises ImportError."""
    for name in [n for n in sys.modules if n.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)


def saved_int8(trained, directory):
    """The trained model, quantized with calibration and saved in vishwamai's int8 format."""
    from vishwamai.checkpoint import find_model_dir, load_model
    from vishwamai.compress.quantize import calibration_batches, load_validation, quantize_state, save_quantized

    run_dir, _ = trained
    fp32 = load_model(find_model_dir(run_dir)).eval()
    val, seq_len = load_validation(DATA, fp32.config)
    tensors, meta = quantize_state(fp32, calibration_batches(val, seq_len, 2))
    save_quantized(directory, tensors, {**meta, "mode": "dynamic"}, fp32.config)
    return fp32, val, seq_len


def fallback_warnings(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records
                    if r.name == "vishwamai.compress.compiled" and r.levelno == logging.WARNING)


def test_compiled_int8_falls_back_to_eager_when_torchao_is_missing(trained, tmp_path, monkeypatch, caplog):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from vishwamai.compress import load_quantized, quantize_model_dir

    hide_torchao(monkeypatch)
    caplog.set_level(logging.INFO, logger="vishwamai.compress.compiled")
    run_dir, _ = trained
    report = quantize_model_dir(run_dir / "checkpoints" / "final", tmp_path / "q", "dynamic", 2, DATA, compile=True)
    assert report["int8_kernels"] == "dynamic"  # torch.ao's eager kernels ran, and the report says so
    assert "torchao is not importable" in fallback_warnings(caplog)
    assert abs(report["quantized_val_loss"] - report["fp32_val_loss"]) < LOSS_TOLERANCE
    model = load_quantized(tmp_path / "q", compile=True)
    assert isinstance(model.blocks[0].mlp.down, DynamicLinear) and model.int8_kernels == "dynamic"


def test_compiled_int8_falls_back_to_eager_without_a_cxx_compiler(tmp_path, monkeypatch, caplog):
    pytest.importorskip("torchao")
    import torch._inductor.config as inductor_config

    from vishwamai.compress import load_quantized
    from vishwamai.compress.quantize import quantize_state, save_quantized

    model = small_model()
    tensors, meta = quantize_state(model)
    save_quantized(tmp_path, tensors, {**meta, "mode": "weight_only"}, model.config)
    # Inductor's CPU backend searches this list for a C++ compiler: none of it exists.
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("vishwamai-no-such-compiler",))
    caplog.set_level(logging.WARNING, logger="vishwamai.compress.compiled")
    fallback = load_quantized(tmp_path, compile=True)  # a weight_only file: compile runs its weights as dynamic
    assert fallback.int8_kernels == "dynamic" and "InvalidCxxCompiler" in fallback_warnings(caplog)
    idx = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.equal(fallback(idx).logits, load_quantized(tmp_path, "dynamic")(idx).logits)
    with pytest.raises(ConfigError, match="compile"):
        load_quantized(tmp_path, "weight_only", compile=True)


@pytest.mark.slow  # torch.compile on 2 CPU cores: 30-90 s
def test_compiled_int8_reads_the_int8_file_and_keeps_the_loss(trained, tmp_path):
    pytest.importorskip("torchao")
    from vishwamai.compress import load_quantized
    from vishwamai.compress.measure import validation_loss

    fp32, val, seq_len = saved_int8(trained, tmp_path)
    compiled = load_quantized(tmp_path, compile=True)
    assert compiled.int8_kernels == "dynamic compiled"
    saved = load_file(str(tmp_path / "quantized.safetensors"))
    down = compiled.blocks[0].mlp.down.weight  # a torchao Int8Tensor holding the file's int8 rows and scales
    assert torch.equal(down.qdata, saved["blocks.0.mlp.down.weight_int8"])
    assert torch.equal(down.scale.flatten(), saved["blocks.0.mlp.down.weight_scale"])
    assert torch.equal(compiled.lm_head.weight.qdata, saved["embed.weight_int8"])  # the tied head, stored once
    loss = {name: validation_loss(m, val, seq_len) for name, m in
            (("fp32", fp32), ("eager", load_quantized(tmp_path)), ("compiled", compiled))}
    assert loss["compiled"] != loss["fp32"]  # really int8 arithmetic
    assert abs(loss["compiled"] - loss["fp32"]) < LOSS_TOLERANCE
    assert abs(loss["compiled"] - loss["eager"]) < EAGER_TOLERANCE


# ---------------------------------------------------------------------- report
def test_evaluate_models_compares_stages(trained, tmp_path):
    from vishwamai.evaluate import main

    run_dir, summary = trained
    out = tmp_path / "report"
    assert main(["--model", f"fp32={run_dir}", "--model", f"pruned={run_dir / 'pruned'}",
                 "--model", f"int8={run_dir / 'quantized'}", "--output", str(out), "--seq-len", "32",
                 "--eval-batches", "2"]) == 0
    report = json.loads((out / "evaluation.json").read_text())["models"]
    fp32, pruned, int8 = report["fp32"], report["pruned"], report["int8"]
    assert pruned["parameters"] < fp32["parameters"] and pruned["size_bytes"] < fp32["size_bytes"]
    assert fp32["nonzero_parameters"] < fp32["parameters"]  # final checkpoint: zeroed, not removed
    assert int8["size_bytes"] < 0.35 * pruned["size_bytes"] and int8["kind"] == "int8 dynamic"
    assert pruned["val_loss"] == pytest.approx(fp32["val_loss"], abs=1e-4)  # compaction is exact
    assert all(r["ms_per_token"] > 0 for r in report.values())
    table = (out / "evaluation.md").read_text()
    assert all(f"| {name} |" in table for name in report)
    assert (out / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--model", "broken", "--output", str(out)]) == 2


def test_calibrated_scales_lower_output_error_than_absmax():
    from vishwamai.compress.int8 import absmax_scales, calibrated_scales, quantize_rows

    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, 0] *= 20  # outliers: clipping them pays off when their input feature is small
    x = torch.randn(512, 64)
    x[:, 0] *= 0.01
    gram = x.T @ x

    def output_error(scale):
        return ((x @ (w - quantize_rows(w, scale).float() * scale[:, None]).T) ** 2).sum(0)

    calibrated, plain = output_error(calibrated_scales(w, gram)), output_error(absmax_scales(w))
    assert (calibrated <= plain + 1e-6).all() and calibrated.sum() < 0.9 * plain.sum()
    assert torch.equal(calibrated_scales(w, None), absmax_scales(w))


def test_compression_refuses_sharded_models(tmp_path, tiny_overrides):
    from vishwamai.compress import build_compression
    from vishwamai.errors import NotImplementedYet
    from vishwamai.training_v2 import compose_config

    cfg = compose_config(tiny_overrides + pruning_overrides() + ["distributed.strategy=model_parallel"], str(tmp_path))
    with pytest.raises(NotImplementedYet, match="distillation.pruning.enabled"):
        build_compression(cfg, tmp_path)


def test_pruning_and_quantization_with_distillation(trained, tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    teacher, _ = trained
    summary = run(compose_config(tiny_overrides + pruning_overrides(begin_step=2, end_step=6) + [
        "training.max_steps=8", "distillation.enabled=true", f"distillation.teacher_model.path={teacher}",
        "model.n_layers=1", "distillation.quantization.enabled=true", "distillation.quantization.calibration_steps=2"],
        run_dir=str(tmp_path / "student")))
    assert summary["distillation_teachers"] and summary["sparsity"] == 0.5
    assert abs(summary["quantized_val_loss"] - summary["fp32_val_loss"]) < LOSS_TOLERANCE
    assert json.loads((tmp_path / "student" / "quantized" / "model_config.json").read_text())["n_layers"] == 1


def test_preempted_run_leaves_end_products_to_the_resumed_run(tmp_path, tiny_overrides):
    from vishwamai.training_v2 import compose_config, run

    class Preempt(Callback):  # what CheckpointManager does on SIGTERM (tested for real in test_checkpoint.py)
        def on_step_end(self, trainer):
            if trainer.state.step == 3:
                trainer.should_stop, trainer.summary["preempted"] = True, True

    summary = run(compose_config(tiny_overrides + pruning_overrides() + ["distillation.quantization.enabled=true"],
                                 run_dir=str(tmp_path / "run")), extra_callbacks=[Preempt()])
    assert summary["steps"] == 3 and "quantized_model" not in summary and "sparsity" not in summary
    assert not (tmp_path / "run" / "pruned").exists() and not (tmp_path / "run" / "quantized").exists()
