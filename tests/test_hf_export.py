"""Export to the Hugging Face layout: transformers loads it and gives vishwamai's logits."""

from __future__ import annotations

import json

import pytest
import torch

from hf_models import VOCAB, hf_logits, save_tiny
from vishwamai.checkpoint import load_model, save_model
from vishwamai.config import ModelConfig
from vishwamai.export import main as export_main
from vishwamai.hf.export import export
from vishwamai.model import Transformer

pytest.importorskip("transformers")

TOKENS = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(2))


def _ours(directory, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return load_model(directory).eval()(tokens).logits


def _random_checkpoint(directory, **fields):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **fields)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases: a mix-up of either changes the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return save_model(directory, model, cfg)


@pytest.mark.parametrize("fields,arch", [
    ({}, "LlamaForCausalLM"),
    ({"n_kv_heads": 2, "tie_embeddings": False, "ffn_hidden": 48, "rope_theta": 500.0}, "LlamaForCausalLM"),
    ({"qkv_bias": True, "n_kv_heads": 2}, "Qwen2ForCausalLM"),
])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, fields, arch):
    src = _random_checkpoint(tmp_path / "ckpt", **fields)
    out = export(src, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
    assert torch.allclose(hf_logits(out, TOKENS), _ours(src), atol=1e-4, rtol=0)


def test_hf_to_vishwamai_to_hf_round_trip_keeps_the_logits(tmp_path):
    original = save_tiny("qwen2", tmp_path / "qwen2")
    tokens = TOKENS % VOCAB
    model = load_model(original)
    save_model(tmp_path / "ours", model, model.config)
    out = export(tmp_path / "ours", tmp_path / "back")
    assert torch.allclose(hf_logits(out, tokens), hf_logits(original, tokens), atol=1e-4, rtol=0)


def test_bf16_export_and_cli_refuses_a_non_empty_output(tmp_path, capsys):
    src = _random_checkpoint(tmp_path / "ckpt")
    assert export_main([str(src), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert export_main([str(src), "--output", str(tmp_path / "bf16")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2
    assert "no such checkpoint or run directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
