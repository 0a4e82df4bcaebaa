"""Sequence parallelism (Korthikanti et al., 2022): shard the parts tensor parallelism replicates.

Under tensor parallelism the norms, residuals and dropouts run on the whole (b, s, h) tensor on
every rank. Sequence parallelism keeps those regions sharded along the sequence, (b, s/t, h), and
swaps the communication at the borders of each tensor-parallel region:

    f (identity / all-reduce)  ->  all-gather along s  forward, reduce-scatter backward
    g (all-reduce / identity)  ->  reduce-scatter along s forward, all-gather backward

An all-reduce is a reduce-scatter followed by an all-gather, so the bytes moved are the same,
while the activations outside the TP regions shrink by t. Parameters used on a sequence shard
(the norms, the MLP's output bias) get partial gradients: `sync_sequence_parallel_grads` sums them.
"""
import torch
import torch.distributed as dist

from dpo_lab.parallel.tensor import record

SEQ_DIM = 1  # activations are (batch, seq, hidden)


def _gather(x, group, direction):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    record("all_gather", direction)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter(x, group, direction):
    size = dist.get_world_size(group)
    if x.shape[SEQ_DIM] % size:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by {size} ranks")
    chunks = [c.contiguous() for c in x.chunk(size, dim=SEQ_DIM)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    record("reduce_scatter", direction)
    return out


def _split(x, group):
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[SEQ_DIM] % size:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by {size} ranks")
    return x.chunk(size, dim=SEQ_DIM)[rank].contiguous()


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, "backward"), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, "backward"), None


def gather_from_sequence(x, group=None):
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x, group=None):
    return _ReduceScatterToSequence.apply(x, group)


def sync_sequence_parallel_grads(module, group=None) -> int:
    """All-reduce the gradients of parameters marked `sequence_parallel`; returns how many."""
    n = 0
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            n += 1
    return n


# --- activation memory ------------------------------------------------------------------

class SavedActivations:
    """Bytes autograd keeps for backward, counted with saved-tensor hooks.

    Each distinct storage is counted once (q, k and v all save the same normed input), and
    parameters are skipped: they are weights, not activations.

        with SavedActivations(model) as mem:
            loss = model(x).sum()
        mem.bytes, mem.by_shape
    """

    def __init__(self, *modules):
        self.skip = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.seen, self.bytes, self.by_shape = set(), 0, {}

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.skip and key not in self.seen and storage.nbytes() > 0:
            self.seen.add(key)
            self.bytes += storage.nbytes()
            shape = tuple(t.shape)
            self.by_shape[shape] = self.by_shape.get(shape, 0) + storage.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def block_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                           n_kv_heads: int | None = None, bytes_per_elem: int = 4) -> int:
    """Saved-for-backward bytes of one dpo_lab Block (pre-norm RMSNorm, RoPE, GQA, GELU MLP 4h,
    no dropout), derived by listing what autograd keeps, per op (k = n_kv_heads):

      each RMSNorm: input, normalised x̂ (sbh each) and 1/rms (sb)     -> 2 norms: 4sbh + 2sb
      linear inputs: q/k/v (shared), o_proj, up, down (4h)            -> sbh + sbh + sbh + 4sbh
      attention: q after RoPE (sbh), k and v (sbh·k/a each: grouped
        attention reads each KV head without copying it), softmax      -> sbh(1 + 2k/a) + as²b
      GELU input (4h)                                                  -> 4sbh
      = sbh(16 + 2k/a + as/h) + 2sb elements, plus RoPE cos/sin (2·s·d_head) and the causal
      mask (s² bytes).

    With TP, everything between f and g is split by t: sbh(6 + (10 + 2k/a + as/h)/t) + 2sb.
    With SP the norms shard too, but the all-gathered inputs of q/k/v and up are kept whole:
    sbh(2 + (14 + 2k/a + as/h)/t) + 2sb/t. (Megatron keeps the shard and re-gathers in backward.)
    """
    n_kv_heads = n_kv_heads or a
    head_dim = h // a
    sbh, attn, kv = s * b * h, a * s * s * b, 2 * s * b * head_dim * n_kv_heads
    if t == 1:
        elems = 16 * sbh + kv + attn + 2 * s * b
    elif not sequence_parallel:
        elems = 6 * sbh + (10 * sbh + kv + attn) // t + 2 * s * b
    else:
        elems = 2 * sbh + (14 * sbh + kv + attn + 2 * s * b) // t
    return elems * bytes_per_elem + 2 * s * head_dim * bytes_per_elem + s * s


def korthikanti_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                      selective_recompute: bool = False) -> float:
    """Megatron's per-layer activation bytes (bf16, dropout, LayerNorm): Korthikanti et al. 2022.

    The 5as/h term is the attention scores, softmax and its dropout; selective recomputation (or a
    fused attention kernel) recomputes them in backward instead of storing them, removing it."""
    scores = 0.0 if selective_recompute else 5 * a * s / h
    if t == 1:
        return s * b * h * (34 + scores)
    if not sequence_parallel:
        return s * b * h * (10 + 24 / t + scores / t)
    return s * b * h / t * (34 + scores)


# --- the check run on every rank: unsplit vs TP vs TP+SP ----------------------------------

def _max_err(a, b) -> float:
    return (a - b).abs().max().item()


def tp_sp_check_rank(seed: int = 0, vocab: int = 64, dim: int = 32, n_heads: int = 4,
                     n_kv_heads: int = 2, batch: int = 2, seq: int = 8, n_layers: int = 2) -> dict:
    """Rank function: build the same TinyTransformer on every rank, then compare its forward and
    gradients with (1) a parallel MLP, (2) a parallel attention, (3) the whole model under TP
    and under TP+SP. Returns max abs errors, collective counts and saved-activation bytes."""
    import torch.nn.functional as F

    from dpo_lab.arch.transformer import TinyTransformer
    from dpo_lab.parallel.tensor import (ParallelAttention, ParallelBlock, ParallelMLP,
                                         TensorParallelLM, count_collectives, max_grad_error)
    torch.manual_seed(seed)
    model = TinyTransformer(vocab, dim, n_layers, n_heads, n_kv_heads)
    tokens = torch.randint(0, vocab, (batch, seq))
    targets = torch.randint(0, vocab, (batch, seq))
    x = torch.randn(batch, seq, dim)
    out = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}

    for name, ref_mod, par_mod in [("mlp", model.blocks[0].mlp, ParallelMLP(model.blocks[0].mlp)),
                                   ("attn", model.blocks[0].attn, ParallelAttention(model.blocks[0].attn))]:
        x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref = ref_mod(x_ref)
        (y_ref * y_ref).sum().backward()
        with count_collectives() as fwd:
            y_par = par_mod(x_par)
        with count_collectives() as bwd:
            (y_par * y_par).sum().backward()
        out[f"{name}_forward_err"] = _max_err(y_ref, y_par)
        out[f"{name}_input_grad_err"] = _max_err(x_ref.grad, x_par.grad)
        out[f"{name}_weight_grad_err"] = max_grad_error(ref_mod, par_mod)
        out[f"{name}_collectives_forward"] = dict(fwd)
        out[f"{name}_collectives_backward"] = dict(bwd)
        model.zero_grad()

    # Vocabulary-parallel embedding and cross-entropy against torch's unsplit versions.
    from dpo_lab.parallel.tensor import VocabParallelEmbedding, vocab_parallel_cross_entropy, vocab_range
    lo, hi = vocab_range(vocab)
    emb = VocabParallelEmbedding(model.embed)
    e_ref, e_par = model.embed(tokens), emb(tokens)
    (e_ref * e_ref).sum().backward()
    (e_par * e_par).sum().backward()
    out["vocab_embed_err"] = _max_err(e_ref, e_par)
    out["vocab_embed_grad_err"] = _max_err(model.embed.weight.grad[lo:hi], emb.weight.grad)
    logits = torch.randn(batch * seq, vocab, requires_grad=True)
    shard = logits.detach()[:, lo:hi].clone().requires_grad_()
    ce_ref = F.cross_entropy(logits, targets.flatten())
    ce_par = vocab_parallel_cross_entropy(shard, targets.flatten())
    ce_ref.backward()
    ce_par.backward()
    out["vocab_ce_err"] = abs(ce_ref.item() - ce_par.item())
    out["vocab_ce_grad_err"] = _max_err(logits.grad[:, lo:hi], shard.grad)
    model.zero_grad()

    ref_loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    ref_loss.backward()
    for tag, sp in [("tp", False), ("sp", True)]:
        lm = TensorParallelLM(model, sequence_parallel=sp)
        with count_collectives() as fwd:
            loss = lm.loss(tokens, targets)
        with count_collectives() as bwd:
            loss.backward()
        if sp:
            sync_sequence_parallel_grads(lm)
        out[f"{tag}_loss_err"] = abs(loss.item() - ref_loss.item())
        out[f"{tag}_grad_err"] = max_grad_error(model, lm)
        out[f"{tag}_collectives_forward"] = dict(fwd)
        out[f"{tag}_collectives_backward"] = dict(bwd)
    out["loss"] = ref_loss.item()

    # Activation memory of one block: input (b, s, h) replicated for TP, (b, s/t, h) for SP.
    block = model.blocks[0]
    for tag, mod, inp in [("none", block, x), ("tp", ParallelBlock(block), x),
                          ("sp", ParallelBlock(block, sequence_parallel=True), _split(x, None))]:
        inp = inp.clone().requires_grad_()
        with SavedActivations(mod) as mem:
            y = mod(inp)
        out[f"act_bytes_{tag}"] = mem.bytes
        out[f"act_shapes_{tag}"] = {str(k): v for k, v in mem.by_shape.items()}
        del y
    return out
