"""MHA → GQA "uptraining" (Ainslie et al., 2023): pool the key and value heads, then train briefly.

The query heads of group j (heads j·g … j·g+g−1, g = heads / kv_heads) will all read KV head j,
so its K and V projections start as the mean of the g original heads' projections.
"""
import torch

from dpo_lab.arch.transformer import TinyTransformer


def pool_heads(weight: torch.Tensor, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """(heads·head_dim, …) → (n_kv_heads·head_dim, …): mean over each group of consecutive heads."""
    heads = weight.shape[0] // head_dim
    if heads % n_kv_heads:
        raise ValueError(f"{heads} heads cannot be pooled into {n_kv_heads} KV heads evenly")
    grouped = weight.reshape(n_kv_heads, heads // n_kv_heads, head_dim, *weight.shape[1:])
    return grouped.mean(dim=1).reshape(n_kv_heads * head_dim, *weight.shape[1:])


@torch.no_grad()
def mha_to_gqa(model: TinyTransformer, n_kv_heads: int) -> TinyTransformer:
    """A new TinyTransformer with `n_kv_heads` KV heads: every weight copied, K/V mean-pooled."""
    config = {**model.config, "n_kv_heads": n_kv_heads}
    new = TinyTransformer(**config)
    state = {}
    for name, value in model.state_dict().items():
        if ".attn.k_proj." in name or ".attn.v_proj." in name:
            head_dim = model.config["dim"] // model.config["n_heads"]
            value = pool_heads(value, n_kv_heads, head_dim)
        state[name] = value.clone()
    new.load_state_dict(state)
    return new
