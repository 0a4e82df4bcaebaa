"""Token log-probs without the [batch, length, vocab] log-softmax.

The naive path (`loss.sequence_logps`) projects every position onto the vocabulary, upcasts the
logits to fp32 and keeps log_softmax's output for backward: 2B·T·V·4 bytes, e.g. 8·1024·152k·4 ≈
5 GB for a Qwen2-sized vocabulary, more than the model's activations. Here only the N completion
positions reach the LM head, in chunks of `chunk_size` tokens:

    forward    per chunk: logits = h W^T (+ b) in the input dtype, upcast, lse = log Σ exp,
               log p(label) = logit[label] − lse; keep only h, W, labels and lse (N,)
    backward   per chunk: recompute the logits; ∂/∂logits = g·(onehot(label) − softmax);
               ∂h = that @ W,  ∂W += that^T @ h,  ∂b += its column sum

so the extra memory is one chunk × V in fp32 instead of N × V, for a second matmul in backward.
Prior art: Liger Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and
Cut Cross-Entropy (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models",
arXiv:2411.09009); the code here is our own, in plain torch.
"""
import torch

CHUNK_SIZE = 256  # tokens per chunk: 256 · 152k (Qwen2's V) · 4 B ≈ 156 MB of fp32 logits at a time


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h, weight, bias, acc):
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.to(acc)


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        acc = _acc_dtype(hidden.dtype)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk_size):
            e = s + chunk_size
            logits = _chunk_logits(hidden[s:e], weight, bias, acc)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            out[s:e] = logits.gather(1, labels[s:e, None]).squeeze(1) - lse[s:e]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        acc = lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulated over chunks in fp32: one rounding at the end, as one big matmul would do
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            h = hidden[s:e]
            # d log p(y) / d logits = onehot(y) − softmax, scaled by the incoming gradient
            g = _chunk_logits(h, weight, bias, acc).sub_(lse[s:e, None]).exp_().neg_()
            g.scatter_add_(1, labels[s:e, None], torch.ones_like(lse[s:e, None]))
            g.mul_(grad_out[s:e, None].to(acc))
            if need_b:
                grad_b += g.sum(0)
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[s:e] = g @ weight
            if need_w:
                grad_w += g.t() @ h
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


def token_logps(hidden, weight, labels, bias=None, chunk_size: int = CHUNK_SIZE):
    """log p(labels[i] | hidden[i]) for a linear head, never holding more than chunk_size × V logits.

    hidden (N, H): final hidden states of the scored positions only; weight (V, H): the LM head;
    labels (N,) in [0, V); bias (V,) or None. Returns (N,) in fp32 (fp64 for fp64 inputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         f"(N, H) and (V, H) with the same H")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype}, weight is {weight.dtype}: the head's matmul "
                         f"needs one dtype (cast the hidden states, as nn.Linear would fail too)")
    if labels.shape != hidden.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 of shape ({hidden.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < weight.shape[0]):
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return _TokenLogps.apply(hidden, weight, bias, labels, int(chunk_size))


@torch.no_grad()
def logit_sums(hidden, weight, bias=None):
    """Σ_v logit_v at each position, as hidden @ Σ_v W_v (+ Σ_v b_v): (N,) fp32, no [N, V] matrix.
    Divided by V it is the mean logit behind TRL's `logits/chosen|rejected`."""
    acc = _acc_dtype(hidden.dtype)
    out = hidden.to(acc) @ weight.to(acc).sum(0)
    return out + bias.to(acc).sum() if bias is not None else out


def _check_plain_head(model) -> None:
    """Models that rescale or cap logits after the head would get wrong log-probs here."""
    cfg = model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} has config.{name}={getattr(cfg, name)!r}: "
                             f"its logits are not hidden @ W^T, use concatenated_forward")


def _last_hidden_state(model, batch):
    """The body's output, (2B, T, H), from a call of the ROOT module with one position's logits.

    Calling `model.get_decoder()` directly would skip the root's forward hooks: under FSDP2 the
    root's parameters (embedding, final norm, head) stay sharded, and each decoder layer, run
    first, makes itself an FSDP root and keeps its weights gathered after forward. So the whole
    model runs as usual, a hook keeps the body's output, and `logits_to_keep=1` makes the head's
    own matmul [2B, 1, V]. FSDP2 leaves the root's parameters gathered after its forward (until
    backward), so the head's weight is whole when `token_logps` reads it.
    """
    seen = []
    hook = model.get_decoder().register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
              logits_to_keep=1)
    finally:
        hook.remove()
    if len(seen) != 1:
        raise RuntimeError(f"{type(model).__name__}: its decoder ran {len(seen)} times in one forward")
    return seen[0]


def sequence_logps_chunked(model, batch: dict, chunk_size: int = CHUNK_SIZE):
    """`concatenated_forward`'s (chosen, rejected) sums, plus `completion_logit_sums`, for a HF
    causal LM (also PEFT-wrapped, also under FSDP2): the body runs once over [chosen; rejected],
    then only the completion positions go through the chunked head.

    Returns (chosen_logps (B,), rejected_logps (B,), (logit_sums (2B,), n_tokens (2B,))), the
    triple `trainer.policy_forward` returns.
    """
    _check_plain_head(model)
    # PeftModel and LoraModel forward attribute lookups to the wrapped model; LoRA layers live
    # inside the body, so disable_adapter() applies here too.
    hidden = _last_hidden_state(model, batch)
    head = model.get_output_embeddings()
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    # position t predicts token t + 1 (the same shift as loss.sequence_logps)
    mask = loss_mask[:, 1:].bool()
    rows = mask.nonzero()[:, 0]
    h = hidden[:, :-1][mask]
    bias = getattr(head, "bias", None)
    logp = token_logps(h, head.weight, input_ids[:, 1:][mask], bias, chunk_size)
    n_seq = input_ids.shape[0]
    totals = logp.new_zeros(n_seq).index_add(0, rows, logp)
    mean_logit = logit_sums(h.detach(), head.weight.detach(), None if bias is None else bias.detach())
    mean_logit = mean_logit.float() / head.weight.shape[0]
    sums = mean_logit.new_zeros(n_seq).index_add(0, rows, mean_logit)
    chosen, rejected = totals.chunk(2)
    return chosen, rejected, (sums, mask.sum(-1).to(sums.dtype))
