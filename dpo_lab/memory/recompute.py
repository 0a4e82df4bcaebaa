"""Activation recomputation (Chen et al. 2016, "Training deep nets with sublinear memory cost";
Korthikanti et al. 2022, "Reducing activation recomputation in large transformer models").

Backward needs tensors that forward computed; autograd keeps them ("saved tensors") from the
forward until their backward has run. Checkpointing a region keeps only its inputs and recomputes
the rest during backward. Policies on dpo_lab's TinyTransformer:

- "none": autograd keeps everything;
- "every": every block is checkpointed (keeps each block's input: one b·s·d tensor per layer);
- "every_k": blocks 0, k, 2k, ... are checkpointed;
- "selective": only attention's core, softmax(QKᵀ/√d)V, is recomputed: the b·h·s² scores are
  the memory-heavy part and the cheapest to redo (no weights, no matmul with d×d matrices).

`saved_bytes` measures what autograd keeps (torch.autograd.graph.saved_tensors_hooks, each
storage counted once, parameters left out); `saved_bytes_formula` predicts it from the shapes.
"""
import time

import torch
from torch.utils.checkpoint import checkpoint

from dpo_lab.arch.attention import apply_rope, grouped_scaled_dot_product, rope_tables

POLICIES = ("none", "every", "every_k", "selective")


def _attention(attn, x, selective: bool):
    """dpo_lab.arch.attention.Attention.forward without a cache; with `selective`, the core
    (scores, mask, softmax, PV) runs under a checkpoint."""
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rope_tables(attn.head_dim, torch.arange(s, device=x.device), attn.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if selective:
        out = checkpoint(grouped_scaled_dot_product, q, k, v, use_reentrant=False)
    else:
        out = grouped_scaled_dot_product(q, k, v)
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def _block(block, x, selective: bool):
    if not block.prenorm:
        raise ValueError("the recomputation policies are written for pre-norm blocks (prenorm=True)")
    x = x + _attention(block.attn, block.attn_norm(x), selective)
    return x + block.mlp(block.mlp_norm(x))


def forward(model, tokens, policy: str = "none", k: int = 2):
    """TinyTransformer's forward under a recomputation policy (the same function, same weights)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; have {POLICIES}")
    if policy == "every_k" and (not isinstance(k, int) or k < 1):
        raise ValueError(f"every_k needs an int k >= 1, got k={k!r}")
    x = model.embed(tokens)
    for i, block in enumerate(model.blocks):
        whole = policy == "every" or (policy == "every_k" and i % k == 0)
        if whole:
            x = checkpoint(_block, block, x, False, use_reentrant=False)
        else:
            x = _block(block, x, policy == "selective")
    return model.head(model.norm(x))


def saved_tensor_bytes(run, params=()) -> int:
    """Bytes autograd keeps for backward while `run()` builds a graph: every saved tensor's storage
    counted once, storages of `params` excluded (they live anyway)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def saved_bytes(model, tokens, policy: str = "none", k: int = 2) -> int:
    """Bytes autograd keeps for backward after forward (and a mean, to have a scalar loss),
    parameters excluded."""
    return saved_tensor_bytes(lambda: forward(model, tokens, policy, k).mean(), model.parameters())


def block_saved_bytes(batch: int, seq: int, dim: int, n_heads: int, n_kv_heads: int,
                      mlp_ratio: int = 4, elem_bytes: int = 4) -> int:
    """Saved bytes of one pre-norm block (RMSNorm, RoPE attention, GELU MLP), no recomputation:
    16·b·s·d values for a 4× MLP (input, 2 norms' x·rsqrt and outputs, Q, attention output,
    the mid-block residual, the MLP's two b·s·4d activations), K and V (2·b·s·kv_heads·head_dim),
    the norms' rsqrt (2·b·s), RoPE's cos and sin (2·s·head_dim), the b·h·s² softmax output, and the
    s×s boolean causal mask."""
    hd = dim // n_heads
    values = ((8 + 2 * mlp_ratio) * batch * seq * dim + 2 * batch * seq * n_kv_heads * hd
              + 2 * batch * seq + 2 * seq * hd + batch * n_heads * seq * seq)
    return elem_bytes * values + seq * seq


def saved_bytes_formula(config: dict, batch: int, seq: int, policy: str = "none", k: int = 2,
                        elem_bytes: int = 4) -> int:
    """What `saved_bytes` measures, from the shapes (config: TinyTransformer.config)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; have {POLICIES}")
    d, L = config["dim"], config["n_layers"]
    full = block_saved_bytes(batch, seq, d, config["n_heads"], config["n_kv_heads"],
                             config["mlp_ratio"], elem_bytes)
    kept_input = elem_bytes * batch * seq * d  # a checkpointed block keeps only its input
    if policy == "none":
        blocks = L * full
    elif policy == "every":
        blocks = L * kept_input
    elif policy == "every_k":
        n_ckpt = len(range(0, L, k))
        blocks = n_ckpt * kept_input + (L - n_ckpt) * full
    else:  # the scores and the mask are recomputed; Q, K, V were kept anyway
        blocks = L * (full - elem_bytes * batch * config["n_heads"] * seq * seq - seq * seq)
    # the token ids (int64) for the embedding; the final norm's input, rsqrt, x·rsqrt, output
    outside = 8 * batch * seq + elem_bytes * (3 * batch * seq * d + batch * seq)
    return blocks + outside


def _sync():
    """Wait for queued GPU work, so that a timing covers it (a no-op on a CPU-only run)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def step_time(model, tokens, policy: str = "none", k: int = 2, repeats: int = 3) -> float:
    """Best seconds of a forward + backward under `policy` (best of `repeats`: shared machines)."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        _sync()
        t0 = time.perf_counter()
        forward(model, tokens, policy, k).float().logsumexp(-1).mean().backward()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best
