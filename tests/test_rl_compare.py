"""Notebook 15's helpers: the three losses against transformers' and torch's own, REINFORCE's
baselines, pass@k against brute-force enumeration, compute accounting, on-policy pair mining."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from dpo_lab import task
from dpo_lab.models import build_tiny_model, build_tokenizer, encode_sft, _pad
from dpo_lab.rl import compare, losses
from dpo_lab.rl.rollout import exact, prefix


@pytest.fixture(scope="module")
def batch():
    tok = build_tokenizer()
    model = build_tiny_model(seed=0)
    rows = [{"prompt": "37+5=", "completion": "42"}, {"prompt": "12+3=", "completion": "15"},
            {"prompt": "9+90=", "completion": "99"}, {"prompt": "7+1=", "completion": "8"}]
    ids, masks = encode_sft(tok, rows)  # unequal lengths: left padding inside the batch
    x, m = _pad(ids, tok.pad_token_id), _pad(masks, 0)
    attn = _pad([[1] * len(i) for i in ids], 0)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=attn).logits
    return model, x, m, attn, logits


def test_pretrain_and_sft_losses_equal_transformers(batch):
    model, x, m, attn, logits = batch
    with torch.no_grad():
        # transformers' ForCausalLMLoss: labels shifted inside, -100 ignored, mean over the rest
        want_pre = model(input_ids=x, attention_mask=attn, labels=x.masked_fill(attn == 0, -100)).loss
        want_sft = model(input_ids=x, attention_mask=attn, labels=x.masked_fill(m == 0, -100)).loss
    assert losses.pretrain_loss(logits, x, attn).item() == pytest.approx(want_pre.item(), abs=1e-5)
    assert losses.sft_loss(logits, x, m).item() == pytest.approx(want_sft.item(), abs=1e-5)
    # and torch's cross-entropy on the flattened response targets
    tgt = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    assert losses.sft_loss(logits, x, m).item() == pytest.approx(ce.item(), abs=1e-5)
    assert losses.sft_loss(logits, x, m).item() != pytest.approx(losses.pretrain_loss(logits, x, attn).item(), abs=1e-3)


def test_reinforce_gradient_and_baselines():
    g = torch.Generator().manual_seed(0)
    G, n, c = 4, 3, 5
    logps = (-torch.rand(n * G, c, generator=g)).requires_grad_()
    mask = (torch.arange(c) < torch.randint(1, c + 1, (n * G, 1), generator=g)).float()
    r = torch.randint(0, 2, (n * G,), generator=g).float()
    r[:G] = 1.0  # one group all right: the group baseline gives it no push at all
    for baseline, b in [(None, torch.zeros(n * G)), ("batch", r.mean().expand(n * G)),
                        ("group", r.view(n, G).mean(1).repeat_interleave(G))]:
        (grad,) = torch.autograd.grad(losses.reinforce_loss(logps, mask, r, baseline, G=G), logps)
        # d/dlogp_t of −mean_i (r_i − b_i)·Σ_t logp_it = −(r_i − b_i)/B on active tokens
        assert torch.allclose(grad, -((r - b) / (n * G))[:, None] * mask, atol=1e-7), baseline
    (grad,) = torch.autograd.grad(losses.reinforce_loss(logps, mask, r, "group", G=G), logps)
    assert grad[:G].abs().max() == 0
    with pytest.raises(ValueError, match="baseline='mean'"):
        losses.reinforce_loss(logps, mask, r, "mean")
    with pytest.raises(ValueError, match="G=5"):
        losses.reinforce_loss(logps, mask, r, "group", G=5)


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 6, 4), (8, 8, 8), (10, 1, 8), (6, 2, 6)])
def test_pass_at_k_equals_enumeration(n, c, k):
    # the estimator's meaning: the share of the k-subsets of the n samples that hold a correct one
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    want = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert compare.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_bad_inputs():
    with pytest.raises(ValueError, match="k=9"):
        compare.pass_at_k(8, 2, 9)
    with pytest.raises(ValueError, match="c=9"):
        compare.pass_at_k(8, 9, 1)


def test_compute_accounting():
    tok = build_tokenizer()
    rows = [{"prompt": "37+5=", "chosen": "42", "rejected": "32"}]  # 5 + 2 + EOS = 8 tokens each
    c = compare.dpo_compute([rows, rows], tok)
    assert (c.forward, c.backward) == (2 * 2 * 16, 2 * 16)  # policy + reference forward, policy backward
    assert c.total == c.forward + 2 * c.backward
    hist = [{"step": -1, "test_success": 0.5}, {"step": 0, "completion_tokens": 3.0},
            {"step": 1, "completion_tokens": 2.0}]
    g = compare.grpo_compute(hist, prompts_per_step=2, G=4, prompt_tokens=5)
    # 8 samples per step of 5 + C tokens: sampled, then policy and reference forward, policy backward
    assert (g.forward, g.backward) == (3 * 8 * 8 + 3 * 8 * 7, 8 * 8 + 8 * 7)
    s = compare.sampling_compute(10, 5, 2.5)
    assert (s.forward, s.backward) == (75, 0)


def test_mine_pairs():
    prompts = ["37+5="] * 3 + ["12+3="] * 3 + ["20+1="] * 3
    comps = ["32", "42", "42 ", "15", "15", "15", "427", "2", "21\n7"]
    pairs = compare.mine_pairs(prompts, comps, 3, exact)
    # group 1: one right and one wrong; group 2: all right, no pair; group 3: "21\n7" right (first line)
    assert pairs == [{"prompt": "37+5=", "chosen": "42", "rejected": "32"},
                     {"prompt": "20+1=", "chosen": "21", "rejected": "427"}]
    # with a loose checker "427" counts as right for 42: the pair changes
    assert compare.mine_pairs(["37+5="] * 2, ["427", "32"], 2, prefix) == \
        [{"prompt": "37+5=", "chosen": "427", "rejected": "32"}]
    with pytest.raises(ValueError, match="G=4"):
        compare.mine_pairs(prompts, comps, 4, exact)
    assert task.is_correct("20+1=", "21")


def test_sft_compute_counts_what_train_sft_feeds_the_model():
    # the reference is the training loop itself: a forward pre-hook counts the real tokens of every
    # batch train_sft puts through the model (each goes forward and backward: loss.backward() per step)
    from dpo_lab.models import train_sft
    tok = build_tokenizer()
    # rows of unequal lengths (2 to 4 tokens longer than the shortest), so that which rows are drawn matters
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (5, 7), (37, 5), (63, 48), (9, 90)]]
    model = build_tiny_model(seed=0)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].sum().item()), with_kwargs=True)
    train_sft(model, tok, rows, steps=6, batch_size=4, lr=1e-3, warmup=1, seed=3, progress=False)
    want = sum(seen)
    c = compare.sft_compute(rows, tok, steps=6, batch_size=4, seed=3)
    assert (c.forward, c.backward, c.total) == (want, want, 3 * want)
    # a different seed draws other rows: the count follows the draws, not only their number
    assert compare.sft_compute(rows, tok, steps=6, batch_size=4, seed=4).forward != want


def test_dpo_lr_sweep_scores_on_the_validation_split_only(monkeypatch):
    from dpo_lab.rl import arms
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(40)]
    fit_seen, scored = [], []

    def fake_arm(r, steps, seed, tok, lr, **kw):
        fit_seen.append([x["prompt"] for x in r])
        return lr, None, None  # the "model" is its lr

    def fake_success(model, tok, r):
        scored.append([x["prompt"] for x in r])
        return {1e-4: 0.5, 1e-3: 0.9, 1e-2: 0.9}[model]  # a tie: the smaller lr wins

    monkeypatch.setattr(arms, "dpo_arm", fake_arm)
    monkeypatch.setattr(arms, "task_success", fake_success)
    monkeypatch.setattr(arms, "dpo_steps_for", lambda budget, r, bs, tok: 7)
    out = arms.dpo_lr_sweep(rows, [1e-2, 1e-4, 1e-3], 1.0, 0, None, every=8)
    assert out["best_lr"] == 1e-3 and out["steps"] == 7 and out["val_problems"] == 5
    val = [r["prompt"] for r in rows[::8]]
    assert all(s == val for s in scored) and len(scored) == 3
    # trained on the rest only: no validation problem is ever trained on
    assert all(set(f).isdisjoint(val) and len(f) == 35 for f in fit_seen)
