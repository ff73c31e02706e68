"""A small decoder-only transformer language model (torch.nn only) for the demo.

Pre-norm blocks, learned positions, tied input/output embeddings. The parameter count is
dominated by ``12 * n_layer * d_model**2``; the defaults (2 layers, d=128) give ~0.44M parameters,
which a CPU core trains at a few steps per second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "TinyLM", "lm_loss"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of :class:`TinyLM`.

    Attributes:
        vocab_size: number of token ids (256 for byte-level text).
        seq_len: context length in tokens.
        n_layer: transformer blocks.
        d_model: width of the residual stream; must be divisible by ``n_head``.
        n_head: attention heads.
    """

    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "d_model", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig `{name}` must be an int >= 1, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"ModelConfig `d_model` ({self.d_model}) must be divisible by `n_head` ({self.n_head})")


class Block(nn.Module):
    """``x + attn(ln(x))`` then ``x + mlp(ln(x))``, causal self-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """Next-token model: ``logits = W_emb @ blocks(emb(tokens) + pos)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2-style small init keeps the initial loss near ln(vocab_size).
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        # Tied output embedding: F.linear reuses the embedding matrix, no second parameter.
        return F.linear(self.ln_f(x), self.tok.weight)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per token)."""
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (batch, seq, vocab) against ``targets`` (batch, seq)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
