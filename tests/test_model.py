"""The transformer: shapes, extra outputs, parameter counts, safe save/load."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from importlib.resources import files

from vishwamai.checkpoint import load_model, save_model
from vishwamai.config import ModelConfig
from vishwamai.errors import InsufficientMemoryError
from vishwamai.model import Transformer, build_model, check_fits, count_parameters

SMALL = ModelConfig(vocab_size=257, d_model=32, n_layers=3, n_heads=4, max_seq_len=16)


def _preset(name: str) -> ModelConfig:
    text = files("vishwamai.configs").joinpath(f"model/{name}.yaml").read_text()
    return ModelConfig(**yaml.safe_load(text))


def test_logits_hidden_states_and_attention_shapes():
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    idx = torch.randint(0, 257, (2, 10))
    out = model(idx, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 10, 257)
    assert len(out.hidden_states) == SMALL.n_layers + 1
    assert all(h.shape == (2, 10, 32) for h in out.hidden_states)
    assert len(out.attentions) == SMALL.n_layers
    attn = out.attentions[0]
    assert attn.shape == (2, 4, 10, 10)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 10))
    assert torch.all(attn.triu(diagonal=1) == 0), "attention must be causal"


def test_explicit_attention_path_matches_sdpa_path():
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    idx = torch.randint(0, 257, (2, 12))
    plain = model(idx).logits
    with_maps = model(idx, output_attentions=True).logits
    torch.testing.assert_close(plain, with_maps, atol=1e-5, rtol=1e-5)
    assert model(idx).attentions == [] and model(idx).hidden_states == []


def test_prediction_at_t_depends_only_on_the_past():
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    idx = torch.randint(0, 257, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 257
    torch.testing.assert_close(model(idx).logits[:, :8], model(changed).logits[:, :8])


def test_grouped_query_attention_and_tied_embeddings():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=8)
    model = Transformer(cfg)
    assert model.lm_head.weight is model.embed.weight
    assert model(torch.randint(0, 100, (1, 8))).logits.shape == (1, 8, 100)
    untied = Transformer(ModelConfig(**{**cfg.__dict__, "tie_embeddings": False}))
    assert untied.num_parameters() == model.num_parameters() + 100 * 32


@pytest.mark.parametrize("name, target", [("125M", 125e6), ("1B", 1e9), ("7B", 7e9), ("10B", 10e9)])
def test_named_presets_have_parameter_counts_within_5_percent(name, target):
    n = count_parameters(_preset(name))  # meta device: no memory allocated
    assert abs(n - target) / target < 0.05, f"{name}: {n / 1e9:.3f}B"


def test_model_that_cannot_fit_fails_fast_saying_how_much_it_needs():
    with pytest.raises(InsufficientMemoryError, match=r"needs about .*GiB"):
        check_fits(_preset("10B"), torch.device("cpu"))
    with pytest.raises(InsufficientMemoryError):
        build_model(_preset("10B"), "cpu")


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    save_model(tmp_path / "ckpt", model, SMALL)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "ckpt").eval()
    idx = torch.randint(0, 257, (2, 10))
    torch.testing.assert_close(model(idx).logits, loaded(idx).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.embed.weight


def test_generate_extends_the_sequence():
    model = Transformer(SMALL).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=5, top_k=10)
    assert out.shape == (1, 8)


# ------------------------------------------------------------------ activation checkpointing
def _loss_grads_and_saved_bytes(model: Transformer, idx: torch.Tensor, **kwargs):
    """Loss, gradients, and the bytes autograd keeps for the backward (what activation checkpointing saves)."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(idx, **kwargs)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), idx.roll(-1, 1).flatten())
        if kwargs:
            loss = loss + sum(h.mean() for h in out.hidden_states) + sum(a.mean() for a in out.attentions)
    model.zero_grad()
    loss.backward()
    return loss, [p.grad.clone() for p in model.parameters()], sum(saved)


@pytest.mark.parametrize("kwargs", [{}, {"output_hidden_states": True, "output_attentions": True}])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(kwargs):
    """Bitwise on CPU: the recomputed forward is the same arithmetic (dropout included: RNG state preserved)."""
    cfg = ModelConfig(vocab_size=257, d_model=64, n_layers=4, n_heads=4, max_seq_len=32, dropout_rate=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    idx = torch.randint(0, 257, (3, 32))
    loss, grads, kept = _loss_grads_and_saved_bytes(model, idx, **kwargs)
    model.activation_checkpointing = True
    loss_ckpt, grads_ckpt, kept_ckpt = _loss_grads_and_saved_bytes(model, idx, **kwargs)
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt))
    assert kept_ckpt < 0.5 * kept, (kept_ckpt, kept)  # only block inputs kept across the forward
    with torch.no_grad():  # evaluation: nothing to recompute, the plain path
        logits = model.eval()(idx).logits
        model.activation_checkpointing = False
        assert torch.equal(logits, model(idx).logits)


@pytest.mark.parametrize("strategy", ["none", "data_parallel", "model_parallel"])
def test_training_with_activation_checkpointing_has_the_losses_without(tmp_path, tiny_overrides, monkeypatch, strategy):
    """Through the recipe: plain, DDP and FSDP2 (fully_shard per block) in a world of one."""
    from vishwamai.training_v2 import compose_config, run

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    overrides = tiny_overrides + ["training.max_steps=4", "training.device=cpu", "training.num_threads=1",
                                  "training.eval_every_n_steps=0", f"distributed.strategy={strategy}"]
    runs = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        out = run(compose_config(overrides + [f"training.activation_checkpointing={flag}"], run_dir=str(run_dir)))
        assert strategy == "none" or out["parallel"].startswith(f"{strategy} over 1 processes")
        runs[flag] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {flag: [(r["step"], r["loss"], r.get("val_loss")) for r in recs if "loss" in r]
              for flag, recs in runs.items()}
    assert len(losses["false"]) == 4 and losses["true"] == losses["false"]  # bitwise (CPU, one thread)
