"""Padding-free DPO batches (dpo_lab.dpo.packing) against the padded path they replace:
`concatenated_forward(model, collate(...))` in dpo_lab.dpo.batching, which shares no code with it."""
import copy
import warnings

import pytest
import torch

from dpo_lab.dpo.batching import collate, concatenated_forward, encode_pair
from dpo_lab.dpo.packing import pack, packed_sequence_logps, padding_stats
from dpo_lab.models import build_tiny_model, build_tokenizer

TOK = build_tokenizer()
ROWS = [  # very different lengths, chosen longer or shorter than rejected
    {"prompt": "37+5=", "chosen": "42", "rejected": "32"},
    {"prompt": "<|user|>Explain the carry in 37+5, step by step.\n<|assistant|>",
     "chosen": "7+5=12: write 2, carry 1; 3+1=4. So 42.", "rejected": "32"},
    {"prompt": "Hi", "chosen": "!", "rejected": "Hello there, how can I help you today? Ask away."},
]


def _examples():
    exs = [encode_pair(TOK, r) for r in ROWS]
    # An empty prompt: the first token is a completion token, which no forward can predict. Packed
    # after other sequences, the previous sequence's last logit "predicts" it across the seam.
    exs.append({"prompt_ids": [], "chosen_ids": TOK("abc<eos>")["input_ids"],
                "rejected_ids": TOK("zz<eos>")["input_ids"]})
    return exs


def _model(arch, impl, seed=0):
    model = build_tiny_model(arch, seed=seed, num_hidden_layers=2).eval()  # 2 layers: layer 2 reads mixed states
    model.set_attn_implementation(impl)
    return model


# layouts: one row; rows capped by max_tokens (first-fit, filler at row ends); truncation too
LAYOUTS = {"one_row": {}, "rows": {"max_tokens": 90}, "truncated": {"max_length": 48, "max_tokens": 60}}


def test_layout_positions_restart_and_tokens_are_the_sequences():
    exs = _examples()
    for kw in LAYOUTS.values():
        p = pack(exs, pad_id=TOK.pad_token_id, **kw)
        B, L = len(exs), p["input_ids"].shape[1]
        seqs = [ex["prompt_ids"] + ex[k] for k in ("chosen_ids", "rejected_ids") for ex in exs]
        masks = [[0] * len(ex["prompt_ids"]) + [1] * len(ex[k]) for k in ("chosen_ids", "rejected_ids")
                 for ex in exs]
        cut = kw.get("max_length", 10**9)
        for i in range(2 * B):
            r, cols = (p["seq_id"] == i).nonzero(as_tuple=True)
            assert len(set(r.tolist())) == 1, f"sequence {i} split across rows"
            assert cols.tolist() == list(range(cols[0], cols[0] + len(cols))), f"sequence {i} not contiguous"
            assert p["position_ids"][r, cols].tolist() == list(range(len(cols)))
            assert p["input_ids"][r, cols].tolist() == seqs[i][:cut]
            assert p["loss_mask"][r, cols].tolist() == [bool(m) for m in masks[i][:cut]]
        filler = p["seq_id"] == -1
        assert not p["loss_mask"][filler].any()
        if "max_tokens" in kw:
            assert L <= kw["max_tokens"]
        for row, f in zip(p["seq_id"], filler):  # filler only at a row's end
            n = int((~f).sum())
            assert (row[:n] >= 0).all() and (row[n:] == -1).all()
        assert p["real_tokens"] == int((~filler).sum())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_same_logps_and_gradients_as_padded_batch(arch, impl, layout):
    kw = LAYOUTS[layout]
    exs = _examples()
    padded = collate(exs, TOK.pad_token_id, max_length=kw.get("max_length"))
    packed = pack(exs, pad_id=TOK.pad_token_id, **kw)
    if layout != "one_row":  # the cases must be what they claim
        assert packed["input_ids"].shape[0] >= 2 and (packed["seq_id"] == -1).any()
    if "max_length" in kw:
        assert padded["input_ids"].shape[1] == kw["max_length"]
    model = _model(arch, impl)
    twin = copy.deepcopy(model)
    w = torch.linspace(-1.0, 2.0, 2 * len(exs))  # unequal weights: a swapped sequence shows up
    got = torch.cat(packed_sequence_logps(model, packed))
    want = torch.cat(concatenated_forward(twin, padded))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    (w * got).sum().backward()
    (w * want).sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _lora(model):
    from peft import LoraConfig, get_peft_model
    with warnings.catch_warnings():  # transformers' deprecation notice, raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking adapters (B != 0), so policy and reference differ
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return peft


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lora_policy_and_disabled_adapter_reference_match_padded(arch):
    exs = _examples()
    padded = collate(exs, TOK.pad_token_id)
    packed = pack(exs, pad_id=TOK.pad_token_id, max_tokens=90)
    model = _lora(_model(arch, "sdpa"))
    twin = copy.deepcopy(model)
    w = torch.linspace(-1.0, 2.0, 2 * len(exs))
    got = torch.cat(packed_sequence_logps(model, packed))
    want = torch.cat(concatenated_forward(twin, padded))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    (w * got).sum().backward()
    (w * want).sum().backward()
    lora = [(n, a, b) for (n, a), b in zip(model.named_parameters(), twin.parameters()) if a.requires_grad]
    assert lora and all("lora_" in n for n, _, _ in lora)
    for name, a, b in lora:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    with torch.no_grad(), model.disable_adapter(), twin.disable_adapter():
        ref_got = torch.cat(packed_sequence_logps(model, packed))
        ref_want = torch.cat(concatenated_forward(twin, padded))
    torch.testing.assert_close(ref_got, ref_want, rtol=1e-5, atol=2e-5)
    assert (ref_got - got).abs().max() > 1e-3  # the adapters were really switched off


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_no_token_attends_across_sequences(arch, impl):
    # Change one sequence's tokens: only its own log-prob may move. Every sequence in turn, so a
    # leak towards later sequences (causal) and towards earlier ones (a broken mask) both show.
    exs = _examples()
    packed = pack(exs, pad_id=TOK.pad_token_id)
    model = _model(arch, impl)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = torch.cat(packed_sequence_logps(model, packed))
        for i in range(2 * len(exs)):
            other = dict(packed, input_ids=packed["input_ids"].clone())
            where = packed["seq_id"] == i
            other["input_ids"][where] = torch.randint(10, len(TOK), (int(where.sum()),), generator=g)
            moved = torch.cat(packed_sequence_logps(model, other))
            keep = torch.arange(2 * len(exs)) != i
            assert (moved[i] - base[i]).abs() > 1e-3, f"perturbing sequence {i} did not change it"
            torch.testing.assert_close(moved[keep], base[keep], rtol=0, atol=1e-5,
                                       msg=lambda m: f"changing sequence {i} moved others: {m}")


def test_flash_kernels_get_one_row():
    # transformers' flash varlen path detects packing only in a batch of one row; no CPU flash
    # kernel exists, so a model that only NAMES flash_attention_2 records what it is given.
    exs = _examples()
    packed = pack(exs, pad_id=TOK.pad_token_id, max_tokens=90)
    assert packed["input_ids"].shape[0] >= 2
    model = _model("qwen2", "sdpa")
    seen = []

    class NamedFlash(torch.nn.Module):
        config = copy.copy(model.config)

        def forward(self, input_ids, position_ids, **kw):
            seen.append(tuple(input_ids.shape))
            return model(input_ids=input_ids, position_ids=position_ids, **kw)

    NamedFlash.config._attn_implementation_internal = "flash_attention_2"
    assert NamedFlash.config._attn_implementation == "flash_attention_2"
    with torch.no_grad():
        got = torch.cat(packed_sequence_logps(NamedFlash(), packed))
        want = torch.cat(packed_sequence_logps(model, packed))
    assert seen == [(1, packed["input_ids"].numel())]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_padding_stats_count_collate_and_pack_slots():
    exs = _examples()
    for kw in LAYOUTS.values():
        s = padding_stats(exs, **kw)
        padded = collate(exs, TOK.pad_token_id, max_length=kw.get("max_length"))
        packed = pack(exs, pad_id=TOK.pad_token_id, **kw)
        assert s["padded_tokens"] == padded["input_ids"].numel()
        assert s["packed_tokens"] == packed["input_ids"].numel()
        assert s["real_tokens"] == int(padded["attention_mask"].sum()) == packed["real_tokens"]
        assert s["padding_padded"] == s["padded_tokens"] - s["real_tokens"]
    one = padding_stats(exs)
    assert one["padding_packed"] == 0 and one["padding_padded"] > one["real_tokens"] // 2


def test_errors_name_the_bad_input():
    exs = _examples()
    with pytest.raises(ValueError, match="examples is empty"):
        pack([])
    n = len(exs[1]["prompt_ids"] + exs[1]["chosen_ids"])
    with pytest.raises(ValueError, match=f"chosen sequence of pair 1 has {n} tokens, more than max_tokens=60"):
        pack(exs, max_tokens=60)
    n = len(exs[2]["prompt_ids"] + exs[2]["rejected_ids"])
    with pytest.raises(ValueError, match=f"rejected sequence of pair 0 has {n} tokens, more than max_tokens=30"):
        pack(exs[2:3], max_tokens=30)
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        pack(exs, max_tokens=0)
    with pytest.raises(ValueError, match="max_length must be at least 1, got 0"):
        padding_stats(exs, max_length=0)
    model = _model("llama", "sdpa")
    model.config._attn_implementation_internal = "my_kernel"
    with pytest.raises(ValueError, match="'my_kernel' is not known to separate packed sequences"):
        packed_sequence_logps(model, pack(exs))
