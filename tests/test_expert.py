"""Mixture of experts: routing by hand, the layer against a per-token loop, expert parallel on ranks."""
import math

import pytest
import torch

from dpo_lab.parallel import launch
from dpo_lab.parallel.expert import MoE, capacity, ep_check_rank, expert_load, load_balancing_loss, route


def test_capacity_drops_the_late_tokens_first_choices_first():
    # 4 tokens, 2 experts, top-1, capacity factor 1 -> C = 2; three tokens want expert 0.
    logits = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 3.0], [6.0, 0.0]])
    r = route(logits, k=1, capacity_factor=1.0)
    assert r.capacity == 2
    assert r.expert[:, 0].tolist() == [0, 0, 1, 0]
    assert r.slot[:, 0].tolist() == [0, 1, 0, 2]
    assert r.keep[:, 0].tolist() == [True, True, True, False]  # token 3 came last
    # top-2: every token's first choice is placed before any second choice (GShard order)
    r2 = route(logits, k=2, capacity_factor=1.0)  # C = 4
    assert r2.slot[:, 1].tolist() == [1, 2, 3, 3]  # expert 1 had 1 first choice, expert 0 had 3


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_skewed():
    uniform = route(torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 4), k=1, capacity_factor=2.0)
    uniform.probs = torch.full_like(uniform.probs, 0.5)
    assert load_balancing_loss(uniform).item() == pytest.approx(1.0)
    skewed = route(torch.tensor([[3.0, 0.0]] * 8), k=1, capacity_factor=2.0)
    assert load_balancing_loss(skewed).item() > 1.5


@pytest.mark.parametrize("k", [1, 2])
def test_moe_equals_per_token_loop(k):
    torch.manual_seed(0)
    moe = MoE(dim=8, hidden=16, n_experts=4, k=k, capacity_factor=0.75)
    x = torch.randn(3, 8, 8)
    y, _, r = moe(x)
    tokens = x.reshape(-1, 8)
    expected = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):  # hand-written: each kept choice adds gate · expert(x_t)
        for j in range(k):
            if r.keep[t, j]:
                e = r.expert[t, j].item()
                expected[t] += r.gate[t, j] * moe.experts[e](tokens[t])
    torch.testing.assert_close(y.reshape(-1, 8), expected, atol=1e-6, rtol=1e-5)
    assert (~r.keep).any(), "capacity 0.75 should drop something"
    dropped_tokens = (~r.keep).all(-1)
    assert torch.all(y.reshape(-1, 8)[dropped_tokens] == 0)


def test_larger_capacity_factor_drops_fewer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(256, 8) + torch.linspace(0, 2, 8)  # a skewed router
    dropped = [(~route(logits, 2, cf).keep).float().mean().item() for cf in (0.5, 1.0, 1.5, 4.0)]
    assert dropped == sorted(dropped, reverse=True) and dropped[0] > 0.3 and dropped[-1] == 0.0
    assert expert_load(route(logits, 2, 1.0)).sum().item() == 512
    assert capacity(256, 8, 2, 1.25) == 80


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world):
    for r in launch(ep_check_rank, world, kwargs=dict(n_experts=4, k=2, capacity_factor=1.0),
                    timeout=240):
        assert r["out_err"] < 1e-5 and r["input_grad_err"] < 1e-5 and r["grad_err"] < 1e-5
        assert r["same_dropped"] and r["dropped"] > 0  # the same tokens are dropped
        assert r["collectives_forward"] == {("all_to_all", "forward"): 2}
        assert r["collectives_backward"] == {("all_to_all", "backward"): 2}


def test_gates_are_the_top_k_probabilities_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    r2 = route(logits, k=2, capacity_factor=4.0)
    assert r2.expert.tolist() == [[0, 1], [1, 2]]
    want = [[p[0][0] / (p[0][0] + p[0][1]), p[0][1] / (p[0][0] + p[0][1])],
            [p[1][1] / (p[1][1] + p[1][2]), p[1][2] / (p[1][1] + p[1][2])]]
    torch.testing.assert_close(r2.gate, torch.tensor(want), rtol=1e-6, atol=1e-7)
    r1 = route(logits, k=1, capacity_factor=4.0)  # Switch: top-1 keeps its probability
    torch.testing.assert_close(r1.gate[:, 0], torch.tensor([p[0][0], p[1][1]]), rtol=1e-6, atol=1e-7)


def test_capacity_rounds_up():
    assert capacity(10, 4, 1, 1.0) == 3  # 2.5 slots -> 3
    assert capacity(9, 4, 2, 1.0) == 5   # 4.5 -> 5
    assert capacity(1, 8, 1, 1.0) == 1


def test_load_balancing_loss_by_hand_with_two_choices():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 0.0, 1.0]])
    r = route(logits, k=2, capacity_factor=4.0)
    # assignments: token0 -> 0,1; token1 -> 1,2; token2 -> 2,0; token3 -> 0,2: f = (3, 2, 3) / 8
    f = torch.tensor([3, 2, 3]) / 8
    P = logits.softmax(-1).mean(0)
    assert load_balancing_loss(r).item() == pytest.approx(3 * (f * P).sum().item(), rel=1e-6)
