"""dpo_lab.memory: roofline counts, activation recomputation, optimizer-state offload (issue 14)."""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dpo_lab.arch.transformer import Block, TinyTransformer
from dpo_lab.memory import offload as O
from dpo_lab.memory import recompute as R
from dpo_lab.memory import roofline as RL


# --- roofline: FLOP and byte counts from shapes, by hand ---

def test_op_counts_equal_hand_counts():
    mm = RL.matmul_cost(2, 3, 4)  # 2·3·4 multiply-adds; read 2×3 and 3×4, write 2×4, fp32
    assert (mm.flops, mm.bytes) == (48, 4 * (6 + 12 + 8))
    add = RL.elementwise_cost(10)  # a + b: 1 FLOP, 2 reads + 1 write per element
    assert (add.flops, add.bytes) == (10, 120)
    sm = RL.softmax_cost(3, 4)
    assert (sm.flops, sm.bytes) == (5 * 12, 2 * 4 * 12)
    rms = RL.rmsnorm_cost(3, 4, elem_bytes=2)  # bf16: x and y, plus the gain once
    assert (rms.flops, rms.bytes) == (4 * 12, 2 * (24 + 4))
    att = RL.attention_cost(1, 2, 3, 5, 4)  # 2 heads, 3 queries on 5 keys, head_dim 4
    assert att.flops == 2 * (2 * 3 * 5 * 4 * 2 + 5 * 3 * 5)
    assert att.bytes == 4 * 2 * (3 * 4 * 2 + 5 * 4 * 2)  # Q, O: 3×4; K, V: 5×4; per head
    assert RL.matmul_cost(600, 600, 600).intensity == pytest.approx(600 / 6)  # 2n³ / (12 n²)


def test_matmul_and_block_flops_equal_torchs_flop_counter():
    """torch.utils.flop_counter counts the aten matmuls the model actually runs (2 FLOPs per
    multiply-add), independently of our shape formulas."""
    torch.manual_seed(0)
    block = Block(16, 4, n_kv_heads=2)
    x = torch.randn(2, 5, 16)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        block(x)
    assert RL.block_cost(block, 2, 5).flops == fc.get_total_flops()
    assert RL.block_cost(block, 2, 5).bytes == 4 * (sum(p.numel() for p in block.parameters()) + 2 * 2 * 5 * 16)
    with FlopCounterMode(display=False) as fc:
        torch.randn(3, 7) @ torch.randn(7, 11)
    assert RL.matmul_cost(3, 7, 11).flops == fc.get_total_flops()


def test_attainable_is_the_lower_roof():
    peak, bw = 100e9, 10e9  # ridge at 10 FLOP/byte
    assert RL.attainable(1.0, peak, bw) == 10e9 and RL.attainable(50.0, peak, bw) == peak
    assert RL.attained_fraction(5e9, 1.0, peak, bw) == pytest.approx(0.5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="k=0"):
        RL.matmul_cost(2, 0, 3)


# --- recomputation ---

CONFIGS = [(dict(dim=32, n_layers=3, n_heads=4), 2, 5, 2),
           (dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, mlp_ratio=2), 3, 7, 3)]


@pytest.mark.parametrize("cfg,b,s,k", CONFIGS)
def test_recomputation_gives_the_same_gradients(cfg, b, s, k):
    """Bitwise: recomputation runs the same CPU kernels on the same inputs (no dropout, so no RNG)."""
    torch.manual_seed(0)
    model = TinyTransformer(**cfg)
    tokens = torch.randint(0, 256, (b, s))
    model(tokens).logsumexp(-1).mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    for policy in R.POLICIES:
        model.zero_grad()
        R.forward(model, tokens, policy, k).logsumexp(-1).mean().backward()
        for (name, p), w in zip(model.named_parameters(), want):
            assert torch.equal(p.grad, w), f"{policy}: {name}"


@pytest.mark.parametrize("cfg,b,s,k", CONFIGS)
def test_saved_bytes_equal_the_formula(cfg, b, s, k):
    model = TinyTransformer(**cfg)
    tokens = torch.randint(0, 256, (b, s))
    got = {p: R.saved_bytes(model, tokens, p, k) for p in R.POLICIES}
    for p in R.POLICIES:
        assert got[p] == R.saved_bytes_formula(model.config, b, s, p, k), p
    assert got["every"] < got["every_k"] < got["none"] and got["selective"] < got["none"]


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="'sometimes'"):
        R.forward(TinyTransformer(), torch.zeros(1, 2, dtype=torch.long), "sometimes")


# --- offload ---

def _model():
    torch.manual_seed(0)
    return TinyTransformer(dim=32, n_layers=2, n_heads=4)


@pytest.mark.parametrize("tier", O.TIERS)
def test_offloaded_adamw_equals_torch_adamw_bitwise(tier, tmp_path):
    ref_model, model = _model(), _model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    opt = O.OffloadedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, tier=tier,
                           chunk_numel=5000, directory=tmp_path)
    with opt:
        assert tier == "cpu" or len(opt.chunks) > 2  # several chunks: the prefetch path runs
        for step in range(4):
            tokens = torch.randint(0, 256, (2, 6))
            for m, o in ((ref_model, ref), (model, opt)):
                o.zero_grad()
                m(tokens).logsumexp(-1).mean().backward()
                o.step()
            for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
                assert torch.equal(a, b), f"step {step + 1}: {name}"
        for i, p in enumerate(ref_model.parameters()):
            m, v = opt.state_of(i)
            assert torch.equal(m, ref.state[p]["exp_avg"]) and torch.equal(v, ref.state[p]["exp_avg_sq"])
    assert list(tmp_path.iterdir()) == []  # close() removed the state files


@pytest.mark.parametrize("chunk_numel", [3000, 20000])
def test_resident_bytes_fall_as_the_formula_says(chunk_numel, tmp_path):
    model = _model()
    numels = [p.numel() for p in model.parameters()]
    sizes = {}
    for tier in O.TIERS:
        with O.OffloadedAdamW(model.parameters(), tier=tier, chunk_numel=chunk_numel, directory=tmp_path) as opt:
            sizes[tier] = opt.resident_state_bytes()
            assert sizes[tier] == O.resident_state_bytes_formula(numels, chunk_numel, tier)
            if tier == "disk":
                on_disk = sum(os.path.getsize(p) for p in opt.paths)
                assert on_disk == 2 * 4 * sum(numels)  # every moment, once
    assert sizes["disk"] < sizes["cpu"] == 2 * 4 * sum(numels)


def test_chunks_keep_whole_tensors_in_order():
    assert O.chunk_params([4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3, 4]]


def test_disk_step_model_is_the_longest_of_io_the_update_chain_and_the_work_per_core():
    # 2 chunks of 100 bytes at 100 B/s read and write: I/O busy 4 s; chain 1 + 2·0.5 + 1 = 3 s
    assert O.disk_step_model([100, 100], 100, 100, [0.5, 0.5]) == 4
    assert O.disk_step_model([100, 100], 100, 100, [3, 3]) == 1 + 6 + 1
    # 4 s of I/O and 3 s of updates: 2 free cores overlap them (4 s); 1 core runs both in turn (7 s)
    assert O.disk_step_model([100, 100], 100, 100, [1.5, 1.5], cores=2) == 1 + 3 + 1
    assert O.disk_step_model([100, 100], 100, 100, [1.5, 1.5], cores=1) == 4 + 3
    assert O.disk_step_model([100, 100], 100, 100, [1.5, 1.5], cores=1.4) == pytest.approx(7 / 1.4)
    with pytest.raises(ValueError, match="cores=0.5"):
        O.disk_step_model([100], 100, 100, [1.0], cores=0.5)


def test_the_disk_step_trace_is_the_pipeline(tmp_path):
    """The timeline the notebook plots: each chunk read, updated, written once, in that order."""
    model = _model()
    with O.OffloadedAdamW(model.parameters(), tier="disk", chunk_numel=3000, directory=tmp_path) as opt:
        model(torch.randint(0, 256, (2, 6))).logsumexp(-1).mean().backward()
        opt.step()
        n = len(opt.chunks)
        ev = {(k, j): (a, b) for k, j, a, b in opt.trace}
        assert len(opt.trace) == len(ev) == 3 * n
        for j in range(n):
            (r0, r1), (u0, u1), (w0, w1) = ev["read", j], ev["update", j], ev["write", j]
            assert 0 <= r0 <= r1 <= u0 <= u1 <= w0 <= w1, j
        assert [len(O.trace_seconds(opt.trace, k)) for k in ("read", "update", "write")] == [n] * 3


def test_file_bandwidth_names_a_bad_chunk_list():
    with pytest.raises(ValueError, match="chunk_bytes=\\[\\]"):
        O.file_bandwidth(chunk_bytes=[])
    with pytest.raises(ValueError, match="1 files for 2 chunks"):
        O.file_bandwidth(chunk_bytes=[64, 64], fds=[0])


def test_file_bandwidth_on_the_optimizer_s_own_files_leaves_its_state_as_it_was(tmp_path):
    model = _model()
    model(torch.randint(0, 64, (2, 8))).logsumexp(-1).mean().backward()
    with O.OffloadedAdamW(model.parameters(), tier="disk", chunk_numel=5000, directory=tmp_path) as opt:
        opt.step()
        before = [opt.state_of(i) for i in range(len(opt.params))]
        chunk_bytes = [2 * 4 * opt._chunk_numel(c) for c in opt.chunks]
        bw = O.file_bandwidth(chunk_bytes=chunk_bytes, repeats=2, evict_bytes=1 << 16, fds=opt.fds)
        assert bw["read"] > 0 and bw["write"] > 0
        for (m0, v0), i in zip(before, range(len(opt.params))):
            m1, v1 = opt.state_of(i)
            assert torch.equal(m0, m1) and torch.equal(v0, v1), i


def test_bad_tier_is_named():
    with pytest.raises(ValueError, match="'gpu'"):
        O.OffloadedAdamW(_model().parameters(), tier="gpu")


def test_fsdp2_cpu_offload_policy_trains_the_same_model():
    """torch's own offload (FSDP2 CPUOffloadPolicy, 2 gloo ranks) against no offload: same weights
    bitwise (on the CPU the policy moves nothing, so the same kernels run on the same values), and
    the shards and Adam's state live on the CPU."""
    from dpo_lab.parallel.launch import launch
    on, off = (launch(O.fsdp2_train, 2, args=(flag,), kwargs=dict(steps=2), timeout=240) for flag in (True, False))
    assert on[0]["param_device"] == on[0]["state_device"] == "cpu"
    for a, b in zip(on[0]["params"], off[0]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(on[0]["params"], on[1]["params"]):  # the full tensors are the same on both ranks
        assert torch.equal(a, b)
