"""GRPO training (dpo_lab.rl.train): the per-group loss shares add up to the batch loss, and a run on
2 ranks equals the 1-rank run for the same seed and global batch."""
import pytest
import torch

from dpo_lab import task
from dpo_lab.rl import grpo
from dpo_lab.rl.train import GRPOSettings, group_loss, train_grpo, ws2_vs_ws1_max_abs_diff


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_group_shares_add_up_to_the_batch_loss(loss_type):
    g = torch.Generator().manual_seed(0)
    G, n, c = 4, 3, 6
    logps = (-torch.rand(n * G, c, generator=g) * 2).requires_grad_()
    ref = logps.detach() + 0.3 * torch.randn(n * G, c, generator=g)
    mask = (torch.arange(c) < torch.randint(1, c + 1, (n * G, 1), generator=g)).float()
    adv = grpo.group_advantages(torch.randint(0, 2, (n * G,), generator=g).float(), G)
    s = GRPOSettings(loss_type=loss_type, G=G, max_new_tokens=c + 2)
    shares = sum(group_loss(logps[i * G:(i + 1) * G], ref[i * G:(i + 1) * G], adv[i * G:(i + 1) * G],
                            mask[i * G:(i + 1) * G], s, n * G, mask.sum().item())[0] for i in range(n))
    whole, _ = grpo.grpo_loss(logps, logps.detach(), ref, adv, mask, loss_type=loss_type, beta=s.beta,
                              epsilon_low=s.epsilon_low, epsilon_high=s.epsilon_high,
                              max_completion_length=s.max_new_tokens)
    assert abs(shares.item() - whole.item()) <= 1e-6


# Tolerances. Samples and each group's forward/backward are bit-identical on both layouts (per-prompt
# generators, one group per micro-batch); only the order of the gradient sum differs (1 rank: groups
# in turn; 2 ranks: two partial sums, then all-reduce), ~1e-7 relative. Metrics are sums of the same
# numbers in another order: 1e-5. Parameters: Adam divides by √v, so where a gradient cancels to
# ~0 the rounding shows in the step; it stays far below lr = 1e-3 per step: 1e-4 after 2 steps
# (seen: ~4e-6). A layout bug (advantages from one rank's rewards, gradients not all-reduced, a
# rank's prompts sampled with another's seeds) moves parameters by ~lr and metrics by > 1e-2.
# the second also evaluates greedy success every 2 steps and stops on it (threshold 0: at step 1)
SETTINGS = [dict(loss_type="dapo", scale="batch", steps=2),
            dict(loss_type="grpo", scale="group", steps=3, eval_every=2, stop_at_success=0.0)]


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
