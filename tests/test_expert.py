"""Mixture of experts: routing by hand, the layer against a per-token loop, expert parallel on ranks."""
import copy
import math
import re

import pytest
import torch

from dpo_lab.paths import LESSON_DIR
from dpo_lab.parallel import launch
from dpo_lab.parallel.expert import (MoE, capacity, ep_check_rank, expert_load, load_balancing_loss, route,
                                     train_moe)


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


def _one_expert_logits(n_tokens, n_experts):
    """A router that sends every token to expert 0 with probability exactly 1 (exp(-1e4) = 0)."""
    logits = torch.zeros(n_tokens, n_experts)
    logits[:, 0] = 1e4
    return logits


def test_lesson_exercise_3_answer_is_what_the_package_loss_returns():
    # The lesson's answer must follow the package's f_e (all k choices), not the top-1 intuition "E".
    text = (LESSON_DIR / "09_expert_parallel.md").read_text(encoding="utf-8")
    item = text[text.index("\n3. "):text.index("\n4. ")]
    n_experts, k = map(int, re.search(r"\$E = (\d+)\$ experts and top-(\d) routing", item).groups())
    ours = int(re.search(r"E/k = (\d+)\$", item).group(1))
    hf = int(re.search(r"reports \$k\$ times ours: (\d+)", item).group(1))
    logits = _one_expert_logits(16, n_experts)
    r = route(logits, k, capacity_factor=float(n_experts))  # no drops: the loss sees routing only
    assert r.probs[:, 0].eq(1).all() and r.expert[:, 1].ne(0).all()  # second choices go elsewhere
    assert load_balancing_loss(r).item() == pytest.approx(ours)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    assert load_balancing_loss_func((logits,), n_experts, k).item() == pytest.approx(hf)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balancing_loss_is_transformers_mixtral_over_k(k):
    # transformers divides the counts by T (tokens), we by T·k (assignments, Switch's f_e for k = 1).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(64, 6, generator=g) + torch.linspace(0, 2, 6)
    ours = load_balancing_loss(route(logits, k, capacity_factor=1.0)).item()
    assert ours * k == pytest.approx(load_balancing_loss_func((logits,), 6, k).item(), rel=1e-5)


@pytest.mark.distributed
def test_all_to_all_bytes_match_the_formula():
    # Per rank and all-to-all: T·k slots of d float32 values, (n-1)/n of them leave (and arrive);
    # dispatch + combine forward, the same two backward. E·C = T·k exactly: 6 experts, C = 8.
    n, tokens, k, dim, n_experts = 3, 24, 2, 16, 6
    per_a2a = tokens * k * dim * 4 * (n - 1) // n
    res = launch(ep_check_rank, n, kwargs=dict(n_experts=n_experts, k=k, dim=dim, tokens_per_rank=tokens,
                                               capacity_factor=1.0, volume_factors=(1.0, 2.0)),
                 timeout=240)
    for r in res:
        assert r["capacity"] * n_experts == tokens * k
        assert r["a2a_bytes"] == {f"{d} {w}": 2 * per_a2a for d in ("backward", "forward")
                                  for w in ("received", "sent")}
        one, two = r["volume"]
        assert one["bytes"] == r["a2a_bytes"]
        assert two["bytes"]["forward sent"] == 2 * 2 * per_a2a  # twice the slots, twice the bytes


@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only contends (conftest's OMP_NUM_THREADS comes after torch's import)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_balancing_loss_evens_the_load_that_training_alone_leaves_skewed(one_thread):
    # Dropless training (capacity factor 4 drops nothing) on tokens leaning towards one expert: the
    # same model and batches with and without Switch's α = 0.01.
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, k=2, capacity_factor=4.0)
    with torch.no_grad():
        lean = 2.4 * moe.router.weight[0] / moe.router.weight[0].norm()
    teacher = torch.nn.Linear(16, 16)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(100):
        x = torch.randn(128, 16, generator=g) + lean
        batches.append((x, teacher(x).detach()))
    runs = {a: train_moe(copy.deepcopy(moe), batches, aux_weight=a) for a in (0.0, 0.01)}
    end = {a: torch.tensor(h["load_share"][-10:]).mean(0) for a, h in runs.items()}
    assert runs[0.0]["load_share"][0] == runs[0.01]["load_share"][0]  # same start
    assert end[0.01].max() < 0.3 < end[0.0].max()  # 0.25 is even
    assert runs[0.01]["dropped"][-1] < runs[0.0]["dropped"][-1]
    assert runs[0.01]["aux_loss"][-1] < runs[0.0]["aux_loss"][-1]
