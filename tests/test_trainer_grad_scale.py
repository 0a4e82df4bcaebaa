"""The trainer's gradient scale: 1 rank and 2 ranks on the same global batch give the same
gradients. The loss alone cannot show it: AdamW divides the step by the gradient's own scale, so a
trainer that forgot FSDP's averaging (the × world_size) would train to the same loss. The logged
pre-clip grad norm and, after the steps, the saved adapter must agree."""
import json

import pytest
import torch

from dpo_lab.dpo.config import load_config
from dpo_lab.paths import CONFIG_DIR

pytestmark = pytest.mark.distributed


def _run(out, nproc):
    from dpo_lab.dpo.trainer import run
    # fp32 adapters: bf16 gradients would round differently on 1 and 2 ranks and blur the check
    cfg = load_config(CONFIG_DIR / "dpo" / "tiny_cpu.yaml", [
        "train.max_steps=2", "train.micro_batch=8", f"train.grad_accum={2 // nproc}", "train.lr=3e-3",
        "train.warmup_ratio=0", "lora.dtype=float32", "eval.max_rows=8", "checkpoint.resume=false",
        f"output_dir={out}"])
    return run(cfg, nproc=nproc, timeout=600)


def test_one_and_two_ranks_give_the_same_gradients_and_adapter(tmp_path):
    from safetensors.torch import load_file
    one, two = _run(tmp_path / "one", 1), _run(tmp_path / "two", 2)
    assert one["global_batch"] == two["global_batch"] == 16
    for a, b in zip(one["history"], two["history"]):
        assert a["grad_norm"] > 0.1  # a real gradient, above the 1e-6-level rounding
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    logged = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in logged] == [r["grad_norm"] for r in two["history"]]
    w1 = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys() and len(w1) > 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
