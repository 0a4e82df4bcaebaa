"""GRPO training (dpo_lab.rl.train): the per-group loss shares add up to the batch loss, and a run on
2 ranks equals the 1-rank run for the same seed and global batch."""
import pytest
import torch

from dpo_lab import task
from dpo_lab.rl import grpo
from dpo_lab.rl.train import GRPOSettings, group_loss, train_grpo, ws2_vs_ws1_max_abs_diff


# Every loss type; the second set adds GSPO's sequence ratio where allowed, the entropy bonus and the top-30 %
# entropy tokens, whose threshold and kept-token count are the whole batch's, not a group's.
SHARE_OPTIONS = [dict(), dict(entropy_coef=0.1, top_entropy_quantile=0.3)]


@pytest.mark.parametrize("options", range(len(SHARE_OPTIONS)))
@pytest.mark.parametrize("loss_type", grpo.TRL_LOSS_TYPES)
def test_group_shares_add_up_to_the_batch_loss(loss_type, options):
    g = torch.Generator().manual_seed(0)
    G, n, c = 4, 3, 6
    logps = (-torch.rand(n * G, c, generator=g) * 2).requires_grad_()
    ref = logps.detach() + 0.3 * torch.randn(n * G, c, generator=g)
    mask = (torch.arange(c) < torch.randint(1, c + 1, (n * G, 1), generator=g)).float()
    adv = grpo.group_advantages(torch.randint(0, 2, (n * G,), generator=g).float(), G)
    ent = (torch.rand(n * G, c, generator=g) * 2).requires_grad_()  # the bonus has a gradient through them
    level = "sequence" if options and loss_type in grpo.SEQUENCE_OK else "token"
    s = GRPOSettings(loss_type=loss_type, G=G, max_new_tokens=c + 2, importance_sampling_level=level,
                     **SHARE_OPTIONS[options])
    thr = grpo.entropy_threshold(ent, mask, s.top_entropy_quantile)
    kept = (grpo.high_entropy_mask(ent, mask, thr) if options else mask).sum().item()
    rows = [slice(i * G, (i + 1) * G) for i in range(n)]
    shares = sum(group_loss(logps[r], ref[r], adv[r], mask[r], s, n * G, mask.sum().item(), entropies=ent[r],
                            entropy_threshold=thr, n_entropy_tokens=kept)[0] for r in rows)
    whole, _ = grpo.grpo_loss(logps, logps.detach(), ref, adv, mask, loss_type=loss_type, beta=s.beta,
                              epsilon_low=s.epsilon_low, epsilon_high=s.epsilon_high,
                              max_completion_length=s.max_new_tokens, importance_sampling_level=level,
                              entropies=ent, entropy_coef=s.entropy_coef, top_entropy_quantile=s.top_entropy_quantile)
    # fp32 sums of ≤ 72 O(1) terms in another order: ~1e-7
    assert abs(shares.item() - whole.item()) <= 1e-6
    grads = torch.autograd.grad(shares, (logps, ent), allow_unused=True)
    whole_grads = torch.autograd.grad(whole, (logps, ent), allow_unused=True)
    for a, b in zip(grads, whole_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max().item() <= 1e-6
    assert (grads[1] is not None) == bool(options)  # the bonus's gradient is compared where there is one
    if options:  # a group's own threshold would keep other tokens: the case tests the batch's
        assert any(grpo.entropy_threshold(ent[r], mask[r], 0.3) != thr for r in rows)


# Tolerances. Samples and each group's forward/backward are bit-identical on both layouts (per-prompt
# generators, one group per micro-batch); only the order of the gradient sum differs (1 rank: groups
# in turn; 2 ranks: two partial sums, then all-reduce), ~1e-7 relative. Metrics are sums of the same
# numbers in another order: 1e-5. Parameters: Adam divides by √v, so where a gradient cancels to
# ~0 the rounding shows in the step; it stays far below lr = 1e-3 per step: 1e-4 after 2 steps
# (seen: ~4e-6). A layout bug (advantages from one rank's rewards, gradients not all-reduced, a
# rank's prompts sampled with another's seeds) moves parameters by ~lr and metrics by > 1e-2.
# the second also evaluates greedy success every 2 steps and stops on it (threshold 0: at step 1); the third
# keeps the top half of the batch's entropy tokens (threshold over both ranks' tokens) and adds the adaptive
# entropy bonus (target above any entropy here: off at step 0, no measurement yet; on at step 1), and drops
# completions cut at max_new_tokens (their tokens leave the global token count on both layouts alike)
SETTINGS = [dict(loss_type="dapo", scale="batch", steps=2),
            dict(loss_type="grpo", scale="group", steps=3, eval_every=2, stop_at_success=0.0),
            dict(loss_type="cispo", scale="group", steps=2, epsilon_high=5.0, top_entropy_quantile=0.5,
                 entropy_coef=0.05, use_adaptive_entropy=True, entropy_target=20.0, entropy_coef_delta=0.01,
                 mask_truncated_completions=True, max_new_tokens=3)]


@pytest.fixture(scope="module")
def rows():
    return task.read_jsonl(task.TASK_DIR / "train.jsonl")


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: f"{kw['loss_type']}-{kw['scale']}")
def test_two_ranks_equal_one_rank(rows, kw):
    s = GRPOSettings(prompts_per_step=4, G=4, lr=1e-3, temperature=1.5, beta=0.04, **kw)
    test_rows = task.read_jsonl(task.TASK_DIR / "test.jsonl")[:9]  # odd: the ranks' shares differ
    d = ws2_vs_ws1_max_abs_diff(rows, s, eval_rows=test_rows if s.eval_every else None)
    one, two = d["ws1"], d["ws2"]
    # records: 2 steps; or the evaluation before training, step 0, step 1 (evaluated, then stop)
    assert [r["step"] for r in one["history"]] == [r["step"] for r in two["history"]] == \
        ([0, 1] if not s.eval_every else [-1, 0, 1])
    assert [r.keys() for r in one["history"]] == [r.keys() for r in two["history"]]
    if s.eval_every:
        assert 0 < one["history"][-1]["test_success"] <= 1
    if s.use_adaptive_entropy:  # raised after each step (entropy ≤ target), logged per step
        assert [r["entropy_coef"] for r in one["history"]] == pytest.approx([0.06, 0.07])
    assert d["metrics"] <= 1e-5
    assert d["params"] <= 1e-4
    # a real run: rewards spread within groups (non-zero advantages) and the policy moved off the SFT model
    trained = [r for r in one["history"] if r["step"] >= 0]
    assert 0 < trained[0]["success"] < 1 and trained[1]["kl"] > 0 and trained[0]["grad_norm"] > 0


def test_bad_settings_are_named(rows):
    with pytest.raises(ValueError, match="checker='loose'"):
        train_grpo(rows, GRPOSettings(checker="loose"), progress=False)
    with pytest.raises(ValueError, match="eval_every=2 needs eval_rows"):
        train_grpo(rows, GRPOSettings(eval_every=2), progress=False)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        train_grpo(rows, GRPOSettings(loss_type="ppo"), progress=False)
    with pytest.raises(ValueError, match="needs loss_type in .*, not 'dapo'"):
        train_grpo(rows, GRPOSettings(importance_sampling_level="sequence"), progress=False)
    with pytest.raises(ValueError, match="top_entropy_quantile=-0.1"):
        train_grpo(rows, GRPOSettings(top_entropy_quantile=-0.1), progress=False)


@pytest.mark.parametrize("loss_type", ["vespo", "luspo"])
def test_a_training_step_loss_is_the_whole_batch_loss(rows, loss_type, monkeypatch):
    """train_grpo's wiring of the batch statistics (the threshold and kept tokens over every group, the
    bonus's coefficient): the step's group shares add up to grpo_loss on the step's whole batch."""
    from dpo_lab.rl import train as T
    seen = []

    def spy(logps, ref_logps, adv, mask, s, *a, **kw):
        loss, m = group_loss(logps, ref_logps, adv, mask, s, *a, **kw)
        seen.append((logps.detach(), ref_logps, adv, mask, kw["entropies"].detach(), loss.detach()))
        return loss, m

    monkeypatch.setattr(T, "group_loss", spy)
    s = GRPOSettings(prompts_per_step=3, G=4, steps=1, temperature=1.5, loss_type=loss_type, entropy_coef=0.05,
                     top_entropy_quantile=0.4, importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    train_grpo(rows, s, progress=False)
    logps, ref, adv, mask, ent = (torch.cat([x[i] for x in seen]) for i in range(5))
    whole, _ = grpo.grpo_loss(logps, logps, ref, adv, mask, loss_type=loss_type, beta=s.beta,
                              epsilon_low=s.epsilon_low, epsilon_high=s.epsilon_high,
                              max_completion_length=s.max_new_tokens, entropies=ent, entropy_coef=s.entropy_coef,
                              top_entropy_quantile=s.top_entropy_quantile,
                              importance_sampling_level=s.importance_sampling_level)
    assert len(seen) == 3 and abs(sum(x[5] for x in seen).item() - whole.item()) <= 1e-6
