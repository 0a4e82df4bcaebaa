"""Where the memory of one DPO step goes at a large vocabulary: logits, padding, reference forward.

`pieces()` runs one DPO step (policy forward, reference forward, sigmoid loss, backward) of a
random Qwen2-shaped model with a 151,936-token vocabulary on a few uneven preference pairs, and
measures the peak bytes allocated above the model during the step, changing one thing at a time
from the plain path:

    fp32_logits     padded [chosen; rejected] batch, full [2B, T, V] logits, log_softmax in fp32
    chunked_logits  same batch, only completion positions through the LM head in chunks
                    (`dpo_lab.dpo.logprobs.sequence_logps_chunked`)
    packed          the sequences packed end to end (`dpo_lab.dpo.packing`), full fp32 logits
    no_reference    the reference log-probs given (precomputed), no reference forward

The peak is measured with `dpo_lab.bench.logprobs`'s functions (allocator events replayed from
`torch.profiler` on a CPU, `max_memory_allocated` on a GPU).
"""

import torch

from dpo_lab.bench.logprobs import _cpu_peak_bytes, _cuda_peak_bytes
from dpo_lab.runtime import quiet_stderr

VARIANTS = ("fp32_logits", "chunked_logits", "packed", "no_reference")
# Qwen2-0.5B's vocabulary (see dpo_lab.bench.dpo.LARGE_VOCAB); a one-layer body keeps it fast
BODY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _model(vocab: int, seed: int, device):
    from dpo_lab.models import build_tiny_model
    model = build_tiny_model("qwen2", seed=seed, vocab_size=vocab, **BODY).to(device)
    # the embedding (tied to the head) is frozen, as the base under LoRA: no [V, H] gradient
    model.get_input_embeddings().weight.requires_grad_(False)
    return model.train()


def _logps(variant: str, model, batch: dict, packed: dict):
    from dpo_lab.dpo.batching import concatenated_forward
    from dpo_lab.dpo.logprobs import sequence_logps_chunked
    from dpo_lab.dpo.packing import packed_sequence_logps
    if variant == "chunked_logits":
        return sequence_logps_chunked(model, batch)[:2]
    if variant == "packed":
        return packed_sequence_logps(model, packed)
    return concatenated_forward(model, batch)


def pieces(vocab: int = 151_936, pairs: int = 2, max_length: int = 40, seed: int = 0,
           device=None) -> dict:
    """{'peak_mib': {variant: MiB}, 'logps': {variant: Σ policy log-probs}, 'slots': {'real', 'padded', 'packed'},
    'vocab', 'pairs'} for one DPO step of each VARIANT on the same pairs and weights."""
    from dpo_lab.bench.dpo import uneven_rows
    from dpo_lab.dpo.batching import collate, encode_rows, to_device
    from dpo_lab.dpo.loss import dpo_loss
    from dpo_lab.dpo.packing import pack, padding_stats
    from dpo_lab.models import build_tokenizer
    from dpo_lab.runtime import default_device
    if pairs < 1 or vocab < 128:
        raise ValueError(f"pieces needs pairs >= 1 and vocab >= 128 (the tokenizer's ids), "
                         f"got pairs={pairs}, vocab={vocab}")
    device = torch.device(device) if device is not None else default_device()
    tok = build_tokenizer()
    enc = encode_rows(tok, uneven_rows(pairs, seed=seed, max_length=max_length))
    batch = to_device(collate(enc, tok.pad_token_id, max_length), device)
    packed = {k: v.to(device) if torch.is_tensor(v) else v
              for k, v in pack(enc, max_length=max_length, pad_id=tok.pad_token_id).items()}
    stats = padding_stats(enc, max_length=max_length)
    model = _model(vocab, seed, device)
    with torch.no_grad():  # the given reference of `no_reference`, outside the measured step
        given = tuple(t.detach() for t in _logps("fp32_logits", model, batch, packed))
    peaks, logps = {}, {}
    for variant in VARIANTS:
        def step():
            model.zero_grad(set_to_none=True)
            pc, pr = _logps(variant, model, batch, packed)
            if variant == "no_reference":
                rc, rr = given
            else:
                with torch.no_grad():
                    rc, rr = _logps(variant, model, batch, packed)
            loss = dpo_loss(pc, pr, rc, rr, beta=0.1)[0].mean()
            loss.backward()
            logps[variant] = (pc.sum() + pr.sum()).item()
        if not peaks:  # one warm-up step: lazy initialisation is not part of a step's memory
            step()
        if device.type == "cuda":
            peak = _cuda_peak_bytes(step, device)
        else:
            with quiet_stderr():
                peak = _cpu_peak_bytes(step)
        peaks[variant] = peak / 2**20
    return {"peak_mib": peaks, "logps": logps, "vocab": vocab, "pairs": pairs,
            "slots": {"real": stats["real_tokens"], "padded": stats["padded_tokens"],
                      "packed": stats["packed_tokens"]}}
