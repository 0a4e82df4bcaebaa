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

`sequence_terms` is the trainer's one forward path for padded (`batching.collate`) and packed
(`packing.pack`) rows alike: counted positions (`scored_positions`) -> per-token log-probs (chunked,
or from full logits) -> per-sequence sums by segment sum, plain and LD-DPO weighted.
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
                             f"its logits are not hidden @ W^T; use full logits (dpo.chunked_logps=false)")


def _model_inputs(model, batch: dict) -> dict:
    """The forward's arguments for either layout: padded rows (`collate`) take their attention mask;
    packed rows (`packing.pack`) take restarting position ids and NO mask (see packing.py)."""
    if "seq_id" in batch:
        from dpo_lab.dpo.packing import packed_inputs
        return packed_inputs(model, batch)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _last_hidden_state(model, batch):
    """The body's output (after the final norm), (R, T, H), from a call of the ROOT module with one
    position's logits (`logits_to_keep=1` makes the head's own matmul [R, 1, V]).

    Two FSDP2 reasons to go through the root and take the tensor from its OUTPUT
    (`output_hidden_states`) rather than calling `model.get_decoder()` or hooking it: the root's
    pre-forward gathers its parameters (embedding, final norm, head), and its pre-backward hook,
    which FSDP2 registers on the root's output tensors only, gathers them again for backward when
    the root reshards after forward (`qlora.shard` asks for that). A tensor captured by a hook is
    not an output: backward through the final norm would then read a freed, resharded weight.
    """
    out = model(**_model_inputs(model, batch), use_cache=False, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1].reshape(*batch["input_ids"].shape, -1)  # flash's one packed row -> (R, L, H)


def scored_positions(batch: dict):
    """Which positions' next-token log-probs count, for either layout: (mask (R, T-1), seq (N,), n_seq).

    Position t predicts token t + 1 (the shift of `loss.sequence_logps`) and counts if token t + 1
    is a completion token of the SAME sequence: in packed rows the prediction across a seam (last
    token of one sequence -> first token of the next) is dropped. `seq` names the sequence of each
    counted position, in row-major order (so a sequence's tokens come in time order); sequences
    are [chosen_0..chosen_B, rejected_0..rejected_B] in both layouts.
    """
    mask = batch["loss_mask"][:, 1:].bool()
    if "seq_id" not in batch:
        return mask, mask.nonzero()[:, 0], mask.shape[0]
    seq_id = batch["seq_id"]
    mask = mask & (seq_id[:, 1:] == seq_id[:, :-1])
    return mask, seq_id[:, 1:][mask], 2 * batch["pairs"]


def completion_token_logps(model, batch: dict, chunk_size: int | None = CHUNK_SIZE):
    """Per counted position (see `scored_positions`): (log-probs (N,), mean logits (N,), seq, n_seq).

    `chunk_size` None is the plain path: the model's full [R, T, V] logits, upcast to fp32 (the
    reference, `dpo.chunked_logps=false`). Otherwise only the N counted hidden states reach the
    head, `chunk_size` at a time (`token_logps`)."""
    mask, seq, n_seq = scored_positions(batch)
    labels = batch["input_ids"][:, 1:][mask]
    if chunk_size is None:
        logits = model(**_model_inputs(model, batch), use_cache=False).logits
        logits = logits.reshape(*batch["input_ids"].shape, -1)[:, :-1][mask].float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
        return logp, logits.detach().mean(-1), seq, n_seq
    _check_plain_head(model)
    # PeftModel and LoraModel forward attribute lookups to the wrapped model; LoRA layers live
    # inside the body, so disable_adapter() applies here too.
    h = _last_hidden_state(model, batch)[:, :-1][mask]
    head = model.get_output_embeddings()
    weight, bias = _whole(head.weight), _whole(getattr(head, "bias", None))
    logp = token_logps(h, weight, labels, bias, chunk_size)
    mean_logit = logit_sums(h.detach(), weight.detach(), None if bias is None else bias.detach())
    return logp, mean_logit.float() / weight.shape[0], seq, n_seq


def _whole(param):
    """The head's parameter as one tensor. A root sharded with an explicit
    `reshard_after_forward=True` (as `qlora.shard` does) is sharded again once its forward returns,
    so the weight is a DTensor here: gather it, as FSDP's own pre-forward did. A trainable head
    (full fine-tuning) needs its gradient averaged over ranks, as FSDP does for the rest: the
    gathered tensor's gradient is each rank's own (Partial "avg"), reduce-scattered to the shards
    (plain `full_tensor()` would keep each rank's local gradient on its shard, unreduced)."""
    if not hasattr(param, "full_tensor"):
        return param
    from torch.distributed.tensor import Partial, Replicate
    return param.redistribute(placements=[Replicate()] * param.device_mesh.ndim).to_local(
        grad_placements=[Partial("avg")] * param.device_mesh.ndim)


def sequence_terms(model, batch: dict, chunk_size: int | None = CHUNK_SIZE, ld_alpha: float | None = None):
    """Everything the DPO step reads from one forward over a micro-batch, padded or packed:
    (chosen (B,), rejected (B,), (logit sums (2B,), completion lengths (2B,)), plain chosen (B,)).

    chosen/rejected are the SUMS of completion-token log-probs, or LD-DPO's sums with `ld_alpha`;
    plain chosen is always the plain sum (the `sft` loss averages it); the logit sums are behind
    TRL's `logits/chosen|rejected`."""
    from dpo_lab.dpo.ld import ld_token_weights
    logp, mean_logit, seq, n_seq = completion_token_logps(model, batch, chunk_size)
    plain = logp.new_zeros(n_seq).index_add(0, seq, logp)
    sums = plain
    if ld_alpha is not None:
        sums = logp.new_zeros(n_seq).index_add(0, seq, logp * ld_token_weights(seq, n_seq, ld_alpha))
    logit_total = mean_logit.new_zeros(n_seq).index_add(0, seq, mean_logit)
    lengths = torch.bincount(seq, minlength=n_seq).to(logit_total.dtype)
    chosen, rejected = sums.chunk(2)
    return chosen, rejected, (logit_total, lengths), plain.chunk(2)[0]


def sequence_logps_chunked(model, batch: dict, chunk_size: int = CHUNK_SIZE):
    """`concatenated_forward`'s (chosen, rejected) sums, plus `completion_logit_sums`, for a HF
    causal LM (also PEFT-wrapped, also under FSDP2): the body runs once over [chosen; rejected],
    then only the completion positions go through the chunked head.

    Returns (chosen_logps (B,), rejected_logps (B,), (logit_sums (2B,), n_tokens (2B,))).
    """
    return sequence_terms(model, batch, chunk_size)[:3]
