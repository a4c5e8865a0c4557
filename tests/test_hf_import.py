"""Hugging Face model directories in: Llama/Mistral/Qwen2 become vishwamai Transformers with the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_models import VOCAB, edit_config, hf_logits, save_tiny
from vishwamai.checkpoint import find_model_dir, load_model, read_model_config
from vishwamai.errors import CheckpointError

pytest.importorskip("transformers")

TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def _ours(directory) -> torch.Tensor:
    with torch.no_grad():
        return load_model(find_model_dir(directory)).eval()(TOKENS).logits


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("mistral", {}),
    ("qwen2", {}),
])
def test_imported_model_gives_the_same_logits_as_transformers(tmp_path, kind, overrides):
    d = save_tiny(kind, tmp_path / kind, **overrides)
    cfg = read_model_config(d)
    assert (cfg.n_kv_heads, cfg.qkv_bias, cfg.tie_embeddings) == (2, kind == "qwen2", bool(overrides))
    assert torch.allclose(_ours(d), hf_logits(d, TOKENS), atol=1e-4, rtol=0)


def test_llama3_rope_scaling_is_imported_and_exported_with_the_same_logits(tmp_path):
    # An original context of 16 tokens puts every rotary frequency of this model in the scaled or the
    # blended band within the 24 test positions: a wrong formula shows in the logits.
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    d = save_tiny("llama", tmp_path / "llama3", rope_scaling=scaling)
    cfg = read_model_config(d)
    assert (cfg.rope_scaling.factor, cfg.rope_scaling.original_max_seq_len) == (4.0, 16)
    ours = _ours(d)
    error = (ours - hf_logits(d, TOKENS)).abs().max()
    assert error < 1e-4
    plain = save_tiny("llama", tmp_path / "plain")  # the same weights without the scaling: visibly other logits
    assert (ours - hf_logits(plain, TOKENS)).abs().max() > 100 * error

    from vishwamai.hf.export import export

    exported = export(d, tmp_path / "out")  # and out again: transformers reads the same scaling
    assert json.loads((exported / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    assert torch.allclose(ours, hf_logits(exported, TOKENS), atol=1e-4, rtol=0)


def test_sharded_index_and_bf16_checkpoint_load_into_float32(tmp_path):
    sharded = save_tiny("llama", tmp_path / "sharded", shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert torch.allclose(_ours(sharded), hf_logits(sharded, TOKENS), atol=1e-4, rtol=0)

    bf16 = save_tiny("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    model = load_model(bf16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.allclose(_ours(bf16), hf_logits(bf16, TOKENS), atol=1e-4, rtol=0)


def _bad_dirs(tmp_path):
    """(directory, what the error must name) for each bad input."""
    def fresh(name, kind="llama"):
        return save_tiny(kind, tmp_path / name)

    cases = []
    d = fresh("pickle")
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    cases.append((d, "convert them to safetensors"))
    d = fresh("notjson")
    (d / "config.json").write_text("{ nope")
    cases.append((d, "config.json is not valid JSON"))
    d = fresh("truncated")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    cases.append((d, "truncated weights file"))
    d = fresh("shape")
    edit_config(d, intermediate_size=96)
    cases.append((d, "'model.layers.0.mlp.down_proj.weight' has shape (32, 64)"))
    d = fresh("missing")
    edit_config(d, num_hidden_layers=3)
    cases.append((d, "missing tensor(s) ['model.layers.2."))
    d = fresh("unexpected")
    edit_config(d, num_hidden_layers=1)
    cases.append((d, "unexpected tensor 'model.layers.1."))
    d = fresh("rope")
    edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0})
    cases.append((d, "rope scaling 'yarn' is not implemented yet"))
    d = fresh("escape", "llama")
    os.rename(d / "model.safetensors", d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../x.safetensors"}}))
    cases.append((d, "names shard '../x.safetensors'"))
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    cases.append((gpt2, "architecture GPT2LMHeadModel cannot become a vishwamai Transformer"))
    return cases


def test_bad_model_directories_fail_naming_the_tensor_or_file(tmp_path):
    for directory, expected in _bad_dirs(tmp_path):
        with pytest.raises(CheckpointError) as err:
            load_model(directory)
        assert expected in str(err.value), (directory.name, str(err.value))


def test_nothing_from_the_directory_is_executed(tmp_path):
    """auto_map / custom code in config.json is never imported: the architecture is mapped by name or refused."""
    d = save_tiny("llama", tmp_path / "remote")
    edit_config(d, architectures=["EvilForCausalLM"], auto_map={"AutoModelForCausalLM": "evil.Model"})
    (d / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    with pytest.raises(CheckpointError, match="EvilForCausalLM cannot become"):
        load_model(d)
    assert not (tmp_path / "ran").exists()


def test_memory_check_runs_before_allocating_an_imported_model(tmp_path):
    """A directory whose config would need far more memory than the machine has fails before any allocation."""
    from vishwamai.distill.teachers import read_teacher
    from vishwamai.errors import InsufficientMemoryError

    llama = save_tiny("llama", tmp_path / "llama")
    edit_config(llama, hidden_size=65536, intermediate_size=262144, num_hidden_layers=8, num_attention_heads=512,
                num_key_value_heads=512, head_dim=128)
    with pytest.raises(InsufficientMemoryError, match="needs about"):
        load_model(llama)
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    edit_config(gpt2, n_embd=65536, n_layer=8, n_head=512)
    with pytest.raises(InsufficientMemoryError, match="the teacher needs about"):
        read_teacher(str(gpt2))
