"""Padding-free DPO batches: the 2B sequences of a micro-batch packed end to end into one row.

`collate` right-pads [chosen; rejected] to (2B, T), so every pair pays for the longest sequence.
Packing lays the sequences one after another (a row per `max_tokens`, a sequence never split)
with position ids restarting at 0 for each, and keeps each sequence blind to its neighbours:

- **How the model sees it (transformers 5.x, Qwen2/Llama).** When `attention_mask` is None and
  there is no KV cache, `masking_utils.create_causal_mask` calls `find_packed_sequence_indices`,
  which starts a new sequence wherever `position_ids` does not step by +1, and builds the
  block-diagonal causal mask from it, for "sdpa" (a boolean mask for
  `F.scaled_dot_product_attention`), "eager" (an additive mask) and "flex_attention" alike. So we pass
  `position_ids`, no attention mask and `use_cache=False` (a cache would switch the detection off),
  and build no 4D mask ourselves. RoPE takes the same restarted positions, so each sequence gets the
  rotations it gets alone. On a GPU, `flash_attention_2` reads the same `position_ids` as
  cumulative sequence lengths and runs the variable-length kernel, without any (L, L) mask
  (FlashAttention-2, Dao 2023, arXiv:2307.08691); it has no CPU build, and it detects packing only
  in a batch of ONE row (`_is_packed_sequence`), so for the flash kernels the rows are laid end to
  end into one row for the forward. (Not run here: the tests fake the kernel's name to check that.)
- **Log-probs.** Token t predicts token t+1 only inside one sequence: the prediction across a seam
  (last token of one sequence -> first of the next) is dropped, and per-token log-probs are summed
  per sequence with a segment sum (`index_add`) over `seq_id`.

Row-end filler (`seq_id` -1) only fills rows to the common width; its positions restart too, so it
is a sequence of its own that nothing reads. The same idea for SFT: Krell et al. 2021,
"Efficient Sequence Packing without Cross-contamination", arXiv:2107.02027.
"""
import torch

FILLER = -1
# Attention implementations that turn restarting position_ids into per-sequence attention; any
# other kernel (a custom one registered by a user) might read the row as ONE sequence and leak.
PACKING_AWARE = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def _sequences(examples: list[dict], max_length: int | None) -> list[tuple[list, list]]:
    """(ids, loss_mask) of the 2B sequences, chosen 0..B-1 then rejected B..2B-1, as `collate`."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if not examples:
        raise ValueError("pack needs at least one encoded pair; examples is empty")
    seqs = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = ex["prompt_ids"] + ex[key]
            mask = [0] * len(ex["prompt_ids"]) + [1] * len(ex[key])
            if max_length is not None:  # keep the start, like collate
                ids, mask = ids[:max_length], mask[:max_length]
            seqs.append((ids, mask))
    return seqs


def _rows(lengths: list[int], max_tokens: int | None, B: int) -> list[list[int]]:
    """First-fit: each sequence goes into the first row with room for it, in order."""
    if max_tokens is None:
        return [list(range(len(lengths)))]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    rows, room = [], []
    for i, n in enumerate(lengths):
        if n > max_tokens:
            side, pair = ("chosen", i) if i < B else ("rejected", i - B)
            raise ValueError(f"the {side} sequence of pair {pair} has {n} tokens, more than "
                             f"max_tokens={max_tokens}; a sequence is never split: raise max_tokens "
                             f"or truncate with max_length")
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([])
            room.append(max_tokens)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


def pack(examples: list[dict], max_tokens: int | None = None, max_length: int | None = None,
         pad_id: int = 0) -> dict:
    """Encoded pairs (`encode_pair`) -> {'input_ids','position_ids','seq_id','loss_mask'}, each
    (R, L), plus 'pairs' (B) and 'real_tokens'. One row, or as many as `max_tokens` (row length)
    needs; `max_length` truncates each sequence like `collate`; `pad_id` fills row ends."""
    seqs = _sequences(examples, max_length)
    rows = _rows([len(ids) for ids, _ in seqs], max_tokens, len(examples))
    width = max(sum(len(seqs[i][0]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    seq_id = torch.full(shape, FILLER, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            ids, mask = seqs[i]
            n = len(ids)
            input_ids[r, t:t + n] = torch.tensor(ids, dtype=torch.long)
            loss_mask[r, t:t + n] = torch.tensor(mask, dtype=torch.bool)
            seq_id[r, t:t + n] = i
            position_ids[r, t:t + n] = torch.arange(n)
            t += n
        position_ids[r, t:] = torch.arange(width - t)  # the filler restarts too: its own sequence
    return {"input_ids": input_ids, "position_ids": position_ids, "seq_id": seq_id,
            "loss_mask": loss_mask, "pairs": len(examples),
            "real_tokens": sum(len(ids) for ids, _ in seqs)}


def _check_kernel(model) -> str:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in PACKING_AWARE:
        raise ValueError(f"attention implementation {impl!r} is not known to separate packed "
                         f"sequences; packing supports {PACKING_AWARE}")
    return impl


def packed_inputs(model, packed: dict) -> dict:
    """The forward's arguments for packed rows: restarting position ids and no attention mask."""
    ids, pos = packed["input_ids"], packed["position_ids"]
    # flash varlen reads packing only from a (1, N) batch: with more rows it would attend row-wide
    if _check_kernel(model).startswith("flash"):
        ids, pos = ids.reshape(1, -1), pos.reshape(1, -1)
    # attention_mask must stay None: a 2D mask switches transformers' packed-sequence detection off
    return {"input_ids": ids, "position_ids": pos}


def packed_sequence_logps(model, packed: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the packed rows -> (chosen_logps, rejected_logps), each (B,), the SUM of
    completion-token log-probs: what `concatenated_forward(model, collate(...))` returns. Full
    logits here; `logprobs.sequence_terms` is the same with the chunked head, and LD-DPO sums."""
    from dpo_lab.dpo.logprobs import sequence_terms
    return sequence_terms(model, packed, chunk_size=None)[:2]


def padding_stats(examples: list[dict], max_tokens: int | None = None,
                  max_length: int | None = None) -> dict:
    """Token slots a micro-batch occupies: real tokens, `collate`'s (2B, T) and the packed (R, L)."""
    lengths = [len(ids) for ids, _ in _sequences(examples, max_length)]
    rows = _rows(lengths, max_tokens, len(examples))
    width = max(sum(lengths[i] for i in row) for row in rows)
    real, padded, packed = sum(lengths), len(lengths) * max(lengths), len(rows) * width
    return {"real_tokens": real, "padded_tokens": padded, "packed_tokens": packed,
            "padding_padded": padded - real, "padding_packed": packed - real}
