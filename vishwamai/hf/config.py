"""Hugging Face `config.json` <-> vishwamai's ModelConfig, for the Llama family.

Import reads both config layouts found on disk: transformers 4's top-level `rope_theta` /
`rope_scaling` and transformers 5's `rope_parameters`.  Export writes the transformers-4
layout, which transformers 5, vLLM, TGI and the llama.cpp converters all read.
Anything the Transformer cannot reproduce exactly (a rope scaling variant other than Llama 3's, attention or MLP
biases Llama may carry, a head_dim other than hidden/heads, another activation) is refused
by name, never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vishwamai.config import ModelConfig, RopeScalingConfig
from vishwamai.errors import CheckpointError

HF_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# architecture -> model_type; these convert into vishwamai's own Transformer.
CONVERTIBLE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / HF_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else f"model_type={config.get('model_type')!r}"


def is_convertible(config: dict[str, Any]) -> bool:
    return architecture(config) in CONVERTIBLE


def _rope(config: dict[str, Any], source: Path) -> tuple[float, RopeScalingConfig]:
    """rope_theta and Llama 3's rope scaling; any other scaling variant is refused by name."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind != "llama3":
        raise CheckpointError(f"{source}: rope scaling {kind!r} is not implemented yet (plain RoPE and 'llama3' "
                              "are); this model cannot be converted")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise CheckpointError(f"{source}: rope scaling 'llama3' without {', '.join(missing)}")
    return theta, RopeScalingConfig(type="llama3", factor=float(scaling["factor"]),
                                    low_freq_factor=float(scaling["low_freq_factor"]),
                                    high_freq_factor=float(scaling["high_freq_factor"]),
                                    original_max_seq_len=int(scaling["original_max_position_embeddings"]))


def _rope_scaling_entry(scaling: RopeScalingConfig) -> dict[str, Any] | None:
    """config.json's rope_scaling for the exported model (transformers 4 layout)."""
    if scaling.type is None:
        return None
    return {"rope_type": scaling.type, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len}


def _require(config: dict[str, Any], key: str, source: Path) -> Any:
    if key not in config:
        raise CheckpointError(f"{source}: missing {key!r}")
    return config[key]


def to_model_config(config: dict[str, Any], source: str | Path) -> ModelConfig:
    """The ModelConfig that reproduces a Llama/Mistral/Qwen2 config exactly (or a CheckpointError)."""
    source = Path(source) / HF_CONFIG_FILE
    arch = architecture(config)
    if arch not in CONVERTIBLE:
        raise CheckpointError(f"{source}: architecture {arch} cannot become a vishwamai Transformer "
                              f"(supported: {', '.join(CONVERTIBLE)}); it can still be a distillation teacher")
    hidden, heads = _require(config, "hidden_size", source), _require(config, "num_attention_heads", source)
    head_dim = config.get("head_dim") or hidden // heads
    refusals = {
        "hidden_act": config.get("hidden_act", "silu") not in ("silu", "swish"),
        "head_dim": head_dim * heads != hidden,
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
    }
    refused = [f"{k}={config.get(k)!r}" for k, bad in refusals.items() if bad]
    if refused:
        raise CheckpointError(f"{source}: {', '.join(refused)} is not supported by vishwamai's Transformer")
    max_len = _require(config, "max_position_embeddings", source)
    # Sliding-window attention equals full attention up to the window: cap the sequence length there.
    window = config.get("sliding_window")
    if window and (arch != "Qwen2ForCausalLM" or config.get("use_sliding_window")):
        max_len = min(max_len, window)
    rope_theta, rope_scaling = _rope(config, source)
    return ModelConfig(
        name=f"hf-{CONVERTIBLE[arch]}",
        vocab_size=_require(config, "vocab_size", source),
        d_model=hidden,
        n_layers=_require(config, "num_hidden_layers", source),
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_hidden=_require(config, "intermediate_size", source),
        max_seq_len=max_len,
        dropout_rate=0.0,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        init_std=float(config.get("initializer_range", 0.02)),
        qkv_bias=arch == "Qwen2ForCausalLM",
    )


def from_model_config(cfg: ModelConfig, dtype: str, eos_id: int | None, bos_id: int | None) -> dict[str, Any]:
    """The config.json of the exported model: Qwen2 when q/k/v carry biases, else Llama."""
    from vishwamai.model.transformer import ffn_hidden_size

    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    config = {
        "architectures": [arch],
        "model_type": CONVERTIBLE[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling_entry(cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config

