"""The from-scratch optimizers of dpo_lab.optim against their library twins.

AdamW/Adam-L2 vs torch.optim.AdamW/Adam, Muon vs torch.optim.Muon, GaLore vs galore_torch.GaLoreAdamW,
LISA's sampling and state, and measured optimizer-state bytes vs the formulas."""
import itertools
import warnings

import pytest
import torch
import torch.nn as nn

from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.optim import (LISA, AdamW, GaLoreAdamW, Muon, adam_l2, adamw_state_bytes,
                           galore_state_bytes, lisa_state_bytes, muon_state_bytes, newton_schulz,
                           state_bytes)


def _mlp(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    # a tall (24×8), a wide (8×24) and a square weight, biases: every orientation the optimizers split on
    return nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 8), nn.Tanh(), nn.Linear(8, 8)).to(dtype)


def _train_pair(make_mine, make_ref, steps, seed=0, dtype=torch.float64):
    """The same model, data and steps under both optimizers; returns the max |Δθ| over all steps."""
    a, b = _mlp(seed, dtype), _mlp(seed, dtype)
    opt_a, opt_b = make_mine(a.parameters()), make_ref(b.parameters())
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g, dtype=dtype)
        y = torch.randn(32, 8, generator=g, dtype=dtype)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        worst = max(worst, max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())))
    return worst, a


GRID = list(itertools.product((1e-3, 3e-2), ((0.9, 0.999), (0.8, 0.95)), (1e-8, 1e-3), (0.0, 0.1)))


@pytest.mark.parametrize("lr,betas,eps,wd", GRID)
def test_adamw_equals_torch(lr, betas, eps, wd):
    # float64 on both sides: only summation order differs, ~1e-16 per step; 1e-12 after 40 steps is
    # far below any algorithmic slip (a missing bias correction moves θ by ~lr at step 1)
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd)
    worst, _ = _train_pair(lambda p: AdamW(p, **kw), lambda p: torch.optim.AdamW(p, **kw), steps=40)
    assert worst < 1e-12, worst


@pytest.mark.parametrize("wd", (0.0, 0.1))
def test_adam_l2_equals_torch_adam(wd):
    kw = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    worst, _ = _train_pair(lambda p: adam_l2(p, **kw), lambda p: torch.optim.Adam(p, **kw), steps=40)
    assert worst < 1e-12, worst


def test_decoupled_decay_differs_from_l2():
    # with λ > 0 the two rules must part ways (else the comparison of the notebook shows nothing)
    kw = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    worst, _ = _train_pair(lambda p: AdamW(p, **kw), lambda p: adam_l2(p, **kw), steps=20)
    assert worst > 1e-3


# --- Muon ---------------------------------------------------------------------------------------

def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32)])
def test_newton_schulz_orthogonalises(shape):
    """In float64, NS keeps the singular vectors of G and maps every σ into Jordan's band."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    O = newton_schulz(G, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    core = U.T @ O @ Vh.T  # diagonal when O = U S' Vᵀ
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-10
    sv = torch.linalg.svdvals(O)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv  # not exactly 1: the coefficients trade that for speed
    # zero steps = the Frobenius normalisation alone (which puts every σ ≤ 1)
    assert newton_schulz(G, steps=0, dtype=torch.float64).norm().item() == pytest.approx(1.0)


# torch.optim.Muon runs Newton–Schulz in bfloat16. We run ours in float32 and compare the update of
# every step from the same state (the states are re-synced after each step, so rounding cannot
# compound). Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2⁻⁹ ≈ 0.2 %) over ~15
# roundings per 5 iterations; measured, torch's bf16 result sits 1.3–1.8 % (relative Frobenius)
# from a float64 iteration, and our own bf16 run 3–4 %. 5 % covers that; the planted slips
# (no Nesterov, no √(rows/cols) scale, cubic coefficients) move the update by ≥ 10 %.
MUON_REL_TOL = 0.05


@pytest.mark.parametrize("nesterov,wd", [(True, 0.1), (False, 0.0)])
def test_muon_equals_torch_step_by_step(nesterov, wd):
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 48), (48, 16), (32, 32)]
    mine = [torch.randn(s, generator=g) for s in shapes]
    ref = [p.clone() for p in mine]
    kw = dict(lr=0.02, weight_decay=wd, momentum=0.95, nesterov=nesterov)
    opt_m, opt_r = Muon(mine, ns_dtype=torch.float32, **kw), torch.optim.Muon(ref, **kw)
    for step in range(8):
        before = [p.clone() for p in ref]
        for p, q in zip(mine, ref):
            p.grad = torch.randn(p.shape, generator=g) + 0.5  # a shared mean: momentum matters
            q.grad = p.grad.clone()
        opt_m.step()
        opt_r.step()
        for p, q, p0 in zip(mine, ref, before):
            assert _rel(p - p0, q - p0) < MUON_REL_TOL, (step, p.shape, _rel(p - p0, q - p0))
            # momentum buffers are fp32 on both sides: equal to rounding
            torch.testing.assert_close(opt_m.state[p]["momentum_buffer"], opt_r.state[q]["momentum_buffer"])
            p.data.copy_(q)  # re-sync: each step is compared from the same state


def test_muon_rejects_non_2d():
    with pytest.raises(ValueError, match=r"\(5,\)"):
        Muon([nn.Parameter(torch.zeros(5))])


# --- GaLore -------------------------------------------------------------------------------------

def _galore_groups(model, rank, gap, scale):
    mats = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return [{"params": rest}, {"params": mats, "rank": rank, "update_proj_gap": gap, "scale": scale,
                               "proj_type": "std"}]


@pytest.mark.parametrize("rank,wd", [(2, 0.0), (4, 0.05)])
def test_galore_equals_galore_torch(rank, wd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' import-time notices
        from galore_torch import GaLoreAdamW as RefGaLore
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
    gap = 3  # 8 steps: the subspace is refreshed at steps 0, 3 and 6
    a, b = _mlp(1), _mlp(1)
    opt_a = GaLoreAdamW(_galore_groups(a, rank, gap, 0.25), **kw)
    opt_b = RefGaLore(_galore_groups(b, rank, gap, 0.25), no_deprecation_warning=True, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        x, y = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(32, 8, generator=g, dtype=torch.float64)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        # float64 moments on both sides and the same float32 SVD input: equal to ~1e-15
        for p, q in zip(a.parameters(), b.parameters()):
            assert (p - q).abs().max() < 1e-10, (step, p.shape, (p - q).abs().max().item())
    # the low-rank moments really are low-rank: r × max(m, n)
    for p in a.parameters():
        if p.ndim == 2:
            assert sorted(opt_a.state[p]["exp_avg"].shape) == sorted((rank, max(p.shape)))


def test_galore_refresh_changes_the_subspace():
    a = _mlp(2)
    opt = GaLoreAdamW(_galore_groups(a, 2, 3, 0.25), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    w = a[0].weight
    seen = []
    for step in range(4):
        opt.zero_grad()
        x = torch.randn(16, 8, generator=g, dtype=torch.float64)
        (a(x) ** 2).mean().backward()
        opt.step()
        seen.append(opt.state[w]["P"].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # kept for T steps
    assert not torch.allclose(seen[2], seen[3])  # refreshed at step 3


# --- LISA ---------------------------------------------------------------------------------------

def _tiny(seed=0):
    torch.manual_seed(seed)
    return TinyTransformer(vocab_size=32, dim=16, n_layers=6, n_heads=2)


def test_lisa_only_sampled_blocks_get_grads_and_state():
    model = _tiny()
    lisa = LISA(model, gamma=2, interval=3, seed=5)
    opt = AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    for step in range(9):
        resampled = lisa.step(step, opt)
        assert resampled == (step % 3 == 0)
        history.append(tuple(lisa.active))
        tokens = torch.randint(0, 32, (4, 10), generator=g)
        opt.zero_grad(set_to_none=True)
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
        for i, block in enumerate(model.blocks):
            for p in block.parameters():
                assert (p.grad is not None) == (i in lisa.active), (step, i)
                assert (p in opt.state) == (i in lisa.active), (step, i)
        assert all(p.grad is not None for p in lisa.always)  # embeddings, final norm, head
        assert state_bytes(opt) == lisa_state_bytes(lisa.always, lisa.blocks, lisa.active)
    assert len(set(history)) > 1  # it did resample
    assert all(history[k] == history[k - k % 3] for k in range(9))  # constant within each window
    # seeded: the same seed gives the same schedule, another seed another one
    # (the global RNG is reset to the same state before each, so only LISA's own seed can differ)
    schedules = {}
    for seed in (5, 6):
        lisa = LISA(_tiny(), gamma=2, interval=3, seed=seed)
        torch.manual_seed(100)
        schedules[seed] = [lisa.step(s) and tuple(lisa.active) for s in (0, 3, 6)]
    assert schedules[5] == [history[s] for s in (0, 3, 6)]
    assert schedules[6] != schedules[5]


def test_lisa_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        LISA(_tiny(), gamma=7, interval=2)


# --- optimizer-state bytes: measured == formula ---------------------------------------------------

def _one_step(model, opt):
    opt.zero_grad()
    model(torch.randn(4, 8, dtype=torch.float32)).square().mean().backward()
    opt.step()


def test_state_bytes_match_formulas():
    model = _mlp(0, torch.float32)
    params = list(model.parameters())
    mats = [p for p in params if p.ndim == 2]
    for opt, want in [
        (AdamW(params), adamw_state_bytes(params)),
        (torch.optim.AdamW(params), adamw_state_bytes(params, torch_step=True)),
        (Muon(mats), muon_state_bytes(mats)),
        (GaLoreAdamW([{"params": mats, "rank": 2, "update_proj_gap": 5, "scale": 0.25}]),
         galore_state_bytes(mats, rank=2)),
    ]:
        _one_step(model, opt)
        assert state_bytes(opt) == want, type(opt).__name__
    # GaLore saves memory only where r < min(m, n)/… : here 2·r·max + r·min < 2·m·n for every weight
    assert galore_state_bytes(mats, rank=2) < adamw_state_bytes(mats)
