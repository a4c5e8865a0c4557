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


def test_pruned_and_int8_models_export(tmp_path):
    """Structured pruning's smaller MLP exports as is; int8 exports its dequantized weights (int8 x scale)."""
    from safetensors import safe_open

    from vishwamai.compress.pruning import apply_masks, compact_mlp, compute_masks
    from vishwamai.compress.quantize import quantize_state, save_quantized
    from vishwamai.config import PruningConfig

    model = load_model(_random_checkpoint(tmp_path / "ckpt", tie_embeddings=False))
    masks = compute_masks(model, 0.5, PruningConfig(method="structured", structured_targets=["mlp"]))
    apply_masks(dict(model.named_parameters()), masks)
    small, small_cfg, _ = compact_mlp(model, model.config)
    out = export(save_model(tmp_path / "pruned", small, small_cfg), tmp_path / "hf_pruned")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == small_cfg.ffn_hidden < 64 * 2
    assert torch.allclose(hf_logits(out, TOKENS), _ours(tmp_path / "pruned"), atol=1e-4, rtol=0)

    tensors, meta = quantize_state(small)
    save_quantized(tmp_path / "int8", tensors, meta, small_cfg)
    out = export(tmp_path / "int8", tmp_path / "hf_int8")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    expected = tensors["blocks.1.mlp.down.weight_int8"].float() * tensors["blocks.1.mlp.down.weight_scale"][:, None]
    assert torch.equal(down, expected)
    assert (hf_logits(out, TOKENS) - _ours(tmp_path / "pruned")).abs().max() < 0.05


def test_a_mistral_directory_exports_as_llama_with_its_tokenizer(tmp_path):
    """HF in, HF out: the source's tokenizer travels along."""
    src = save_tiny("mistral", tmp_path / "mistral")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "def": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    out = export(src, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1
    tokens = TOKENS % VOCAB
    assert torch.allclose(hf_logits(out, tokens), hf_logits(src, tokens), atol=1e-4, rtol=0)
