"""A decoder-only transformer language model, readable top to bottom.

Design (LLaMA-style): pre-norm RMSNorm blocks, rotary position embeddings (RoPE,
so there is no learned position table and sequences shorter than max_seq_len cost
nothing extra), causal self-attention through `F.scaled_dot_product_attention`
(flash / memory-efficient kernels on CUDA), optional grouped-query attention,
SwiGLU MLP, optionally tied input/output embeddings, optional q/k/v biases (Qwen2).
Rotary embeddings rotate the two halves of each head (HF Llama's rotate_half), so Hugging
Face Llama/Mistral/Qwen2 weights load without permuting q/k (vishwamai/hf).

Activation checkpointing (`activation_checkpointing=True`, from training.activation_checkpointing):
each block's activations are dropped after its forward and recomputed in the backward
(`torch.utils.checkpoint`, non-reentrant, RNG state preserved: the same losses and gradients),
so only the blocks' inputs are kept - less memory for about one more forward.  The block is
called whole inside the checkpoint, so an FSDP2 `fully_shard(block)` gathers its weights again
for the recomputation, as torchtitan's per-block checkpointing does.

`forward` returns logits only by default.  Distillation asks for per-layer hidden
states and attention maps with `output_hidden_states` / `output_attentions`; only
then is the attention computed explicitly (SDPA never materialises the map), so the
default path is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vishwamai.config import ModelConfig, RopeScalingConfig


def ffn_hidden_size(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    hidden = int(8 * cfg.d_model / 3)
    return 64 * math.ceil(hidden / 64)


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]
    # hidden_states[0] is the embedding output, hidden_states[i] the output of block i-1.
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    # attentions[i]: (batch, heads, seq, seq) attention probabilities of block i.
    attentions: list[torch.Tensor] = field(default_factory=list)
    # forward(logits=False): the final norm's output, for a loss that projects it itself (train/loss.py).
    last_hidden: Optional[torch.Tensor] = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for stability under bf16/fp16 autocast.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float,
                  scaling: Optional[RopeScalingConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None and scaling.type == "llama3":  # the one variant config validation admits
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_scaled_frequencies(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Llama 3's long-context RoPE: slow rotations (wavelength beyond the original context / low_freq_factor)
    are slowed `factor` times more, fast ones (under original context / high_freq_factor) are kept, and the
    band between blends the two linearly in original_context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = s.original_max_seq_len / wavelength  # rotations per original context
    blend = ((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of a (batch, heads, seq, head_dim) tensor."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[: x.size(-2)].to(x.dtype), sin[: x.size(-2)].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        # Rows: all key heads, then all value heads (see vishwamai/hf/weights.py for the HF layout).
        self.kv_proj = nn.Linear(cfg.d_model, 2 * self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout_rate

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, t, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout = self.dropout if self.training else 0.0
        if return_attention:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            attn = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = F.dropout(attn, dropout, self.training) @ v
        else:
            attn = None
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(y), attn


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, cos, sin, return_attention: bool = False):
        a, attn = self.attn(self.attn_norm(x), cos, sin, return_attention)
        x = x + self.resid_dropout(a)
        x = x + self.mlp(self.mlp_norm(x))
        return x, attn


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        # A plain int for forward: the config may be an OmegaConf node, whose attribute lookup torch.compile
        # cannot trace (a graph break at the top of forward ran the whole model outside the compiled graph).
        self.max_seq_len = int(cfg.max_seq_len)
        # A training choice, not part of the architecture (not in ModelConfig, not saved): set freely.
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # Not persistent: rebuilt from the config, so checkpoints hold weights only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # GPT-2 style: residual projections scaled down by depth.
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            if p.dim() < 2:
                continue
            is_residual_out = name.endswith("o_proj.weight") or name.endswith("down.weight")
            nn.init.normal_(p, mean=0.0, std=resid_std if is_residual_out else std)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits: bool = True,
    ) -> ModelOutput:
        t = idx.size(1)
        if t > self.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.max_seq_len}")
        x = self.dropout(self.embed(idx))
        out = ModelOutput(logits=x)  # logits filled in below
        if output_hidden_states:
            out.hidden_states.append(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x, attn = checkpoint(block, x, self.rope_cos, self.rope_sin, output_attentions, use_reentrant=False)
            else:
                x, attn = block(x, self.rope_cos, self.rope_sin, output_attentions)
            if output_hidden_states:
                out.hidden_states.append(x)
            if output_attentions:
                out.attentions.append(attn)
        x = self.norm(x)
        if not logits:  # the loss projects the rows itself, a block at a time (train/loss.py)
            out.logits, out.last_hidden = None, x
            return out
        out.logits = self.lm_head(x)
        return out

    def num_parameters(self) -> int:
        # parameters() yields a tied weight once.
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.max_seq_len:]).logits[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat((idx, torch.multinomial(logits.softmax(-1), 1)), dim=1)
        return idx
