"""A DPO run killed mid-way (even while writing a checkpoint) resumes to the same metrics."""
import json

import pytest

from dpo_lab.dpo import checkpoint as ckpt
from dpo_lab.dpo.config import load_config
from dpo_lab.paths import CONFIG_DIR

KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "learning_rate")


def test_latest_skips_partial_and_incomplete(tmp_path):
    assert ckpt.latest(tmp_path / "none") is None
    for name, complete in [("step_00000002", True), ("step_00000004", False),
                           ("step_00000006.partial", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    assert ckpt.latest(tmp_path).name == "step_00000002"


@pytest.mark.distributed
def test_killed_while_saving_then_resumed_equals_uninterrupted(tmp_path):
    from dpo_lab.dpo.trainer import run
    from dpo_lab.parallel import RankFailed

    def cfg(out, *extra):
        return load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", [
            "train.max_steps=6", "train.micro_batch=8", "train.lr=3e-3", "checkpoint.every=2",
            "checkpoint.keep=3", "eval.max_rows=16", f"output_dir={out}", *extra])

    whole = run(cfg(tmp_path / "whole", "checkpoint.resume=false"), nproc=2, timeout=600)
    # Both ranks die after writing their shards of step 4 but before it is complete.
    with pytest.raises(RankFailed):
        run(cfg(tmp_path / "cut", "debug.crash_while_saving=4"), nproc=2, timeout=600)
    cut = tmp_path / "cut" / "checkpoints"
    assert (cut / "step_00000004.partial").exists()
    assert ckpt.latest(cut).name == "step_00000002"  # the last good one survived
    logged = [json.loads(l) for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # steps 3-4 ran and are redone on resume

    resumed = run(cfg(tmp_path / "cut"), nproc=2, timeout=600)
    assert resumed["start_step"] == 2
    a, b = whole["history"], resumed["history"]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    diff = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in KEYS)
    assert diff <= 1e-6
    assert resumed["eval_after"]["pref_accuracy"] == pytest.approx(whole["eval_after"]["pref_accuracy"])
    assert a[-1]["loss"] < a[0]["loss"]  # it did train
    # the rewritten log holds the resumed history, once per step
    logged = [json.loads(l) for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]


@pytest.mark.distributed
def test_full_finetune_killed_then_resumed_equals_uninterrupted(tmp_path):
    """Full fine-tuning saves every parameter, and its reference is the initial model: a resumed
    run must score the reference BEFORE loading the checkpoint's trained weights. The disk cache
    is off (dpo.precompute_ref only), so nothing but that order gives the right reference."""
    import torch
    from safetensors.torch import load_file

    from dpo_lab.dpo.trainer import run
    from dpo_lab.parallel import RankFailed

    def cfg(out, *extra):
        return load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", [
            "train.finetune=full", "quant.load_in_4bit=false", "dpo.ref_cache=false", "dpo.precompute_ref=true",
            "train.max_steps=4", "train.micro_batch=4", "train.lr=1e-4", "checkpoint.every=2",
            "eval.max_rows=8", f"output_dir={out}", *extra])

    whole = run(cfg(tmp_path / "whole", "checkpoint.resume=false"), nproc=2, timeout=600)
    with pytest.raises(RankFailed):
        run(cfg(tmp_path / "cut", "debug.crash_at_step=3"), nproc=2, timeout=600)
    assert ckpt.latest(tmp_path / "cut" / "checkpoints").name == "step_00000002"
    resumed = run(cfg(tmp_path / "cut"), nproc=2, timeout=600)
    assert resumed["start_step"] == 2
    a, b = whole["history"], resumed["history"]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in KEYS) <= 1e-6
    assert resumed["eval_after"] == pytest.approx(whole["eval_after"], abs=1e-6)
    wa, wb = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("whole", "cut"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    assert a[-1]["loss"] < a[0]["loss"]  # it did train
