"""Checks of notebook 14's exercises (the memory wall). 14.1 counts a matmul by hand here; 14.2
measures a real block's saved tensors with autograd's hooks: neither uses dpo_lab.memory."""
import torch

from dpo_lab.exercises import Wrong, exercise


def _ints(got, what, n=None):
    vals = got if n else (got,)
    if n and (not isinstance(got, (tuple, list)) or len(got) != n):
        raise Wrong(f"return {what}, got {got!r}")
    for v in vals:
        if isinstance(v, torch.Tensor):
            v = v.item()
        if not float(v).is_integer():
            raise Wrong(f"counts are whole numbers, got {v!r}")
    return tuple(int(v.item() if isinstance(v, torch.Tensor) else v) for v in vals)


@exercise("14.1", "a matmul's FLOPs and bytes")
def check_matmul_cost(fn):
    """fn(m, k, n, elem_bytes) -> (flops, bytes) of C = A @ B, A m×k, B k×n: compulsory traffic
    (A and B read once, C written once)."""
    for m, k, n, eb in [(3, 5, 7, 4), (1, 64, 256, 2), (128, 32, 16, 4)]:
        flops, nbytes = _ints(fn(m, k, n, eb), "a pair (flops, bytes)", 2)
        want_f, want_b = 2 * m * k * n, eb * (m * k + k * n + m * n)
        if (flops, nbytes) == (want_f, want_b):
            continue
        if (flops, nbytes) == (want_b, want_f):
            raise Wrong("the pair is (flops, bytes): yours is swapped")
        if flops == m * k * n:
            raise Wrong("each of the m·k·n multiply-adds is 2 FLOPs (a multiply and an add)")
        if flops != want_f:
            raise Wrong(f"flops for m={m}, k={k}, n={n}: {flops}, expected {want_f}")
        if nbytes == eb * (m * k + k * n):
            raise Wrong("the result C (m×n) must be written to memory too")
        if nbytes == m * k + k * n + m * n:
            raise Wrong(f"that counts elements: multiply by the bytes per element ({eb})")
        if nbytes in (eb * (m * k + m * k * n + m * n), eb * (m * k * n + k * n + m * n)):
            raise Wrong("compulsory traffic reads each operand once, however often the kernel reuses it")
        if nbytes != want_b:
            raise Wrong(f"bytes for m={m}, k={k}, n={n}, {eb} B/element: {nbytes}, expected {want_b}")


def _measured_block_bytes(batch, seq, dim, n_heads, n_kv_heads, mlp_ratio):
    """Saved-tensor bytes of dpo_lab's Block (fp32) on a (batch, seq, dim) input, each storage once."""
    from dpo_lab.arch.transformer import Block

    torch.manual_seed(0)
    block = Block(dim, n_heads, n_kv_heads, mlp_ratio)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randn(batch, seq, dim, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x).sum()
    return sum(seen.values())


@exercise("14.2", "the saved-activation bytes of a block")
def check_block_saved_bytes(fn):
    """fn(batch, seq, dim, n_heads, n_kv_heads, mlp_ratio) -> bytes autograd keeps for one fp32
    pre-norm Block of dpo_lab.arch (input included, parameters excluded), measured with hooks."""
    for b, s, d, h, kvh, r in [(2, 5, 32, 4, 4, 4), (3, 7, 64, 8, 2, 2)]:
        got = _ints(fn(b, s, d, h, kvh, r), "an int")[0]
        want = _measured_block_bytes(b, s, d, h, kvh, r)
        if got == want:
            continue
        hd = d // h
        scores, mask = 4 * b * h * s * s, s * s
        if got == want - scores - mask or got == want - scores:
            raise Wrong("the softmax output (b·heads·s² scores) is kept for backward: it is the "
                        "term that grows with s²")
        if got == want - scores + 4 * b * kvh * s * s:
            raise Wrong("there are scores for every query head (n_heads), not per KV head")
        if got == want - mask:
            raise Wrong("the s×s boolean causal mask (1 byte each) is saved too")
        if got == want - 4 * 2 * s * hd:
            raise Wrong("RoPE's cos and sin tables (s × head_dim each) are saved by the multiplies")
        if got == want - 4 * 2 * (r - 1) * b * s * d:
            raise Wrong(f"the MLP's two saved activations are b·s·(mlp_ratio·dim) = b·s·{r * d} each")
        if got == want + 4 * 2 * b * s * (d - kvh * hd) and kvh != h:
            raise Wrong("K and V have n_kv_heads·head_dim channels, not dim (grouped-query attention)")
        if 4 * got in (want, want - mask + 4 * mask):
            raise Wrong("that counts fp32 values: multiply by 4 bytes (the mask is 1 byte per entry)")
        raise Wrong(f"batch={b}, seq={s}, dim={d}, heads={h}/{kvh} KV, mlp_ratio={r}: {got} bytes, "
                    f"measured {want}")
