"""Hand-written all-reduces against dist.all_reduce, and the bandwidth definitions."""
import pytest

from dpo_lab.parallel import launch
from dpo_lab.parallel.collectives import bandwidths
from dpo_lab.parallel.demos import check_all_reduce, collectives_tour

NUMELS = [1, 3, 7, 64, 1001]  # includes sizes smaller than and not divisible by the world size


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_naive_and_ring_equal_dist_all_reduce(world_size):
    results = launch(check_all_reduce, world_size, args=(NUMELS, 1), timeout=120)
    for rank, res in enumerate(results):
        for numel in NUMELS:
            for algo in ("naive", "ring"):
                assert res[(algo, numel)]["max_abs_diff"] < 1e-5, (rank, algo, numel)
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
