"""Checks of notebook 14's exercises (the memory wall). 14.1 counts a matmul by hand here; 14.2
measures a real block's saved tensors with autograd's hooks (dpo_lab.memory.recompute.saved_tensor_bytes,
not its formula)."""
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
    from dpo_lab.memory.recompute import saved_tensor_bytes

    torch.manual_seed(0)
    block = Block(dim, n_heads, n_kv_heads, mlp_ratio)
    x = torch.randn(batch, seq, dim, requires_grad=True)
    # the measurement (autograd's hooks), not the package's formula that the student re-derives
    return saved_tensor_bytes(lambda: block(x).sum(), block.parameters())


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


_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _measured_adapter_optimizer_bytes(hidden, intermediate, heads, kv_heads, layers, r, targets, param_bytes):
    """Bytes of torch AdamW's state after one step on PEFT LoRA adapters of a tiny Llama built from
    its config (no download): counted from opt.state, not from a formula."""
    import logging

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = {2: torch.bfloat16, 4: torch.float32}[param_bytes]
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=32)
    model = get_peft_model(LlamaForCausalLM(cfg).to(dtype),
                           LoraConfig(r=r, target_modules=list(targets), lora_dropout=0.0),
                           autocast_adapter_dtype=False)  # keep the adapters in `dtype`, as our trainer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())


@exercise("14.3", "the bytes of the adapters' optimizer state")
def check_adapter_optimizer_bytes(fn):
    """fn(hidden, intermediate, heads, kv_heads, layers, r, targets, param_bytes) -> bytes torch's
    AdamW keeps for LoRA adapters of rank r on the `targets` linears of a Llama (one rank, no sharding),
    adapters stored in param_bytes per entry; measured on a PEFT model."""
    for args in [(64, 160, 4, 2, 2, 4, _TARGETS, 2), (32, 96, 4, 4, 3, 8, ("q_proj", "v_proj"), 4)]:
        hidden, inter, heads, kvh, layers, r, targets, pb = args
        got = _ints(fn(*args), "an int")[0]
        want = _measured_adapter_optimizer_bytes(*args)
        if got == want:
            continue
        hd = hidden // heads
        shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kvh * hd), "v_proj": (hidden, kvh * hd),
                  "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                  "down_proj": (inter, hidden)}
        params = layers * sum(r * sum(shapes[t]) for t in targets)
        steps = 4 * 2 * len(targets) * layers
        if got == 2 * pb * params:
            raise Wrong("AdamW also keeps a step count per parameter tensor: an fp32 scalar for each "
                        "of A and B of every adapted linear")
        if got == pb * params + steps:
            raise Wrong("Adam keeps two moments per parameter, m and v")
        if got == 2 * 4 * params + steps and pb != 4:
            raise Wrong(f"torch's AdamW keeps m and v in the parameter's dtype ({pb} bytes here), not fp32")
        wide = dict(shapes, k_proj=(hidden, hidden), v_proj=(hidden, hidden))
        full = layers * sum(r * sum(wide[t]) for t in targets)
        if got == 2 * pb * full + steps and kvh != heads:
            raise Wrong("k_proj and v_proj have kv_heads·head_dim outputs, not hidden (grouped-query attention)")
        if got == 2 * pb * layers * sum(shapes[t][0] * shapes[t][1] for t in targets) + steps:
            raise Wrong("LoRA's adapters of an in→out matrix are A (r×in) and B (out×r): r·(in+out) "
                        "parameters, not in·out")
        if got == 2 * pb * params // layers + steps // layers:
            raise Wrong(f"every one of the {layers} layers has its own adapters")
        raise Wrong(f"hidden={hidden}, intermediate={inter}, heads={heads}/{kvh} KV, {layers} layers, r={r}, "
                    f"targets={list(targets)}, {pb} bytes: {got}, measured {want}")
