"""Hand-written all-reduces against dist.all_reduce, and the bandwidth definitions."""
import math

import pytest

from dpo_lab.parallel import launch
from dpo_lab.parallel.collectives import bandwidths, recursive_doubling_time
from dpo_lab.parallel.cost import ring_all_reduce_time
from dpo_lab.parallel.demos import check_all_reduce, collectives_tour

NUMELS = [1, 3, 7, 64, 1001]  # includes sizes smaller than and not divisible by the world size


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3, 4, 6])  # 3, 6: recursive doubling folds 1, 2 extra ranks in
def test_naive_and_ring_equal_dist_all_reduce(world_size):
    results = launch(check_all_reduce, world_size, args=(NUMELS, 1), timeout=120)
    p = 1 << (world_size.bit_length() - 1)      # largest power of two <= world_size
    extra = world_size - p
    for rank, res in enumerate(results):
        for numel in NUMELS:
            for algo in ("naive", "ring", "doubling"):
                assert res[(algo, numel)]["max_abs_diff"] < 1e-5, (rank, algo, numel)
            # Recursive doubling: log2(p) exchanges of all S bytes; of the first 2·extra ranks the
            # even ones hand their S in and sit out, the odd ones also send the result back.
            S = 4 * numel
            expected = (S if rank % 2 == 0 else (int(math.log2(p)) + 1) * S) if rank < 2 * extra \
                else int(math.log2(p)) * S
            assert res[("doubling", numel)]["bytes_sent"] == expected, (rank, numel)
            # Ring: every rank sends 2(n-1) chunks of about numel/n elements.
            if numel % world_size == 0:
                assert res[("ring", numel)]["bytes_sent"] == 2 * (world_size - 1) * numel // world_size * 4
        naive = res[("naive", 1001)]["bytes_sent"]
        assert naive == (4 * 1001 * (world_size - 1) if rank == 0 else 4 * 1001)


@pytest.mark.distributed
def test_tour_matches_definitions():
    out = launch(collectives_tour, 4, args=(4,), timeout=120)
    before = [out[r]["all_reduce"][0] for r in range(4)]
    total = [sum(col) for col in zip(*before)]
    assert all(out[r]["all_reduce"][1] == total for r in range(4))
    assert out[0]["reduce"][1] == total
    assert all(out[r]["broadcast"][1] == before[0] for r in range(4))
    assert all(out[r]["all_gather"][1] == [10.0 * k for k in range(4)] for r in range(4))
    assert [out[r]["reduce_scatter"][1][0] for r in range(4)] == total
    assert out[2]["all_to_all"][1] == [out[k]["all_to_all"][0][2] for k in range(4)]
    assert out[1]["send_recv"][1] == out[0]["send_recv"][0]


def test_bandwidth_factors():
    algbw, busbw = bandwidths("all_reduce", 1e9, 1.0, 4)
    assert algbw == 1e9 and busbw == pytest.approx(1.5e9)
    assert bandwidths("all_gather", 1e9, 2.0, 4)[1] == pytest.approx(0.375e9)
    assert bandwidths("broadcast", 1e9, 1.0, 8)[1] == 1e9
    with pytest.raises(ValueError, match="unknown collective"):
        bandwidths("gossip", 1, 1, 2)


def test_recursive_doubling_model_beats_ring_only_for_small_messages():
    # α = 1 ms, β = 1 GB/s, 4 ranks: ring 6α + 1.5 S/β, doubling 2α + 2 S/β, equal at S = 8αβ = 8 MB.
    a, b = 1e-3, 1e9
    assert recursive_doubling_time(1e6, 4, a, b) == pytest.approx(2 * (a + 1e6 / b))
    assert recursive_doubling_time(8e6, 4, a, b) == pytest.approx(ring_all_reduce_time(8e6, 4, a, b))
    assert recursive_doubling_time(1e6, 4, a, b) < ring_all_reduce_time(1e6, 4, a, b)
    assert recursive_doubling_time(64e6, 4, a, b) > ring_all_reduce_time(64e6, 4, a, b)
    # 6 ranks fold onto 4: 2 doubling steps + the fold-in and the hand-back.
    assert recursive_doubling_time(1e6, 6, a, b) == pytest.approx(4 * (a + 1e6 / b))
    assert recursive_doubling_time(1e6, 1, a, b) == 0.0
