"""Asynchronous checkpoints (checkpoint.async_save): the snapshot is taken when save returns, a
crash while the writer thread works leaves the previous checkpoint, and resuming from an
asynchronous checkpoint reproduces an uninterrupted run exactly."""
import pytest
import torch

from dpo_lab.dpo import checkpoint as ckpt
from dpo_lab.dpo.config import ConfigError, load_config
from dpo_lab.paths import CONFIG_DIR


def _snapshot_rank(root: str) -> float:
    """Save asynchronously, then mutate every parameter and Adam moment in place at once (what
    the next optimizer step does while the writer thread works); the checkpoint must hold the
    values of the moment save returned."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 256)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    pending = ckpt.save(root, 1, model, opt, {"step": 1}, asynchronous=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            for v in opt.state[p].values():
                if v.dim():
                    v.add_(1.0)
    pending.finish()
    state = ckpt.load(ckpt.latest(root), model, opt)
    assert state == {"step": 1}
    return max((p - b).abs().max().item() for p, b in zip(model.parameters(), before))


def test_async_snapshot_is_taken_before_save_returns(tmp_path):
    from dpo_lab.parallel import launch
    [diff] = launch(_snapshot_rank, 1, args=(str(tmp_path),), timeout=300)
    assert diff == 0.0  # the mutation (1.0 per entry) must not reach the checkpoint


def test_async_save_switch_is_checked():
    assert load_config(None, ["checkpoint.async_save=true"]).checkpoint.async_save is True
    with pytest.raises(ConfigError, match="checkpoint.async_save"):
        load_config(None, ["checkpoint.async_save=1"])  # strict bool, as every switch


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_async_killed_mid_write_then_resumed_equals_uninterrupted(tmp_path, nproc):
    from dpo_lab.memory.async_ckpt import resume_vs_uninterrupted
    cfg = load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", [
        "train.max_steps=6", "train.micro_batch=8", "train.lr=3e-3", "checkpoint.every=2",
        "checkpoint.keep=3", "eval.max_rows=16"])
    res = resume_vs_uninterrupted(cfg, nproc=nproc, crash_at=4, out_dir=tmp_path, timeout=600)
    # the kill hit while step 4's shards were being written: step 2 stays the latest complete one
    assert res["partial_after_crash"] == ["step_00000004.partial"]
    assert res["latest_after_crash"] == "step_00000002"
    assert res["start_step"] == 2
    assert [r["step"] for r in res["resumed"]] == [1, 2, 3, 4, 5, 6]
    # exactly: the same arithmetic in the same order (the uninterrupted run saves synchronously)
    assert res["max_abs_diff"] == 0.0
    whole_eval, resumed_eval = res["eval_after"]
    assert resumed_eval["pref_accuracy"] == whole_eval["pref_accuracy"]
    assert res["whole"][-1]["loss"] < res["whole"][0]["loss"]  # it did train
    assert len(res["blocked_s"]) == 2  # the resumed run saved at steps 4 and 6, asynchronously


@pytest.mark.distributed
def test_blocked_times_measures_both_saves():
    from dpo_lab.memory.async_ckpt import blocked_times
    out = blocked_times(nproc=2, width=256, layers=2, repeats=1)
    # 2 layers of 256x256 weights + 256 biases, fp32, sharded over 2 ranks: params, m and v
    # (4 tensors), plus Adam's step counter (an fp32 scalar per parameter, on every rank)
    assert out["snapshot_bytes"] == 3 * 2 * (256 * 256 + 256) * 4 // 2 + 4 * 4
    assert out["sync_s"] > 0 and out["async_blocked_s"] > 0
    assert out["async_total_s"] >= out["async_blocked_s"]
