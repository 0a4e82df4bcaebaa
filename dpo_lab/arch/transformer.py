"""A small decoder-only transformer, the shared model of the architecture and parallelism lessons.

Block = attention + MLP, each with a residual; `prenorm=True` computes x + F(Norm(x)) (GPT-2,
Llama), `prenorm=False` computes Norm(x + F(x)) (the original Transformer).
"""
import torch
import torch.nn as nn

from dpo_lab.arch.attention import Attention, KVCache

NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; have {sorted(NORMS)}")
    return NORMS[kind](dim)


class MLP(nn.Module):
    """up-projection, GELU, down-projection (Megatron splits `up` by columns and `down` by rows)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads=None, mlp_ratio=4, norm="rms", prenorm=True,
                 layer_idx=0):
        super().__init__()
        self.prenorm = prenorm
        self.attn_norm, self.mlp_norm = make_norm(norm, dim), make_norm(norm, dim)
        self.attn = Attention(dim, n_heads, n_kv_heads, layer_idx=layer_idx)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, x, cache: KVCache | None = None):
        if self.prenorm:
            x = x + self.attn(self.attn_norm(x), cache)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, cache))
        return self.mlp_norm(x + self.mlp(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=None,
                 mlp_ratio=4, norm="rms", prenorm=True):
        super().__init__()
        # The constructor arguments, so a variant (e.g. fewer KV heads) can be rebuilt from a model.
        self.config = dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=n_kv_heads or n_heads, mlp_ratio=mlp_ratio, norm=norm,
                           prenorm=prenorm)
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads, mlp_ratio, norm, prenorm, i)
                                    for i in range(n_layers))
        # Post-norm blocks already end in a norm; pre-norm stacks need a final one.
        self.norm = make_norm(norm, dim) if prenorm else nn.Identity()
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cache)
        return self.head(self.norm(x))
