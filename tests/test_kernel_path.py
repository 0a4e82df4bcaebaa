"""One numerical path for every 4-bit model, whatever the CPU.

bitsandbytes picks a CPU kernel by CPU feature: with AVX512-BF16, a `Linear4bit` in eval mode whose
input needs no grad repacks its weight and multiplies with a bf16 inference kernel; otherwise it
dequantises and uses a plain matmul. If the DPO reference forward (no grad, adapters off) took the
first and the policy forward the second, step 1 would not give ln 2. These tests pin the path on
machines with the feature (the real kernels) and on machines without it (the feature faked).
"""
import math

import pytest
import torch

from dpo_lab.dpo.config import load_config
from dpo_lab.paths import CONFIG_DIR
from dpo_lab.task import TASK_DIR, read_jsonl

TINY = CONFIG_DIR / "dpo" / "tiny_cpu.yaml"


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16
    return bool(has_avx512bf16())


def _4bit_layers(model):
    return [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]


def _packed(model) -> int:
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
               for m in _4bit_layers(model))


@pytest.fixture
def fake_avx512bf16(monkeypatch):
    """Every Linear4bit built from now on believes the CPU has AVX512-BF16."""
    import bitsandbytes.nn.modules as bnb_modules
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _batch(tok, n=4):
    from dpo_lab.dpo.batching import collate, encode_rows
    return collate(encode_rows(tok, read_jsonl(TASK_DIR / "train.jsonl")[:n]), tok.pad_token_id, 64)


def _eval_no_grad_forward(model, tok):
    model.eval()
    with torch.no_grad():
        model(input_ids=_batch(tok)["input_ids"])


def _loaders(cfg, tmp_path):
    """Every way the workbook builds a 4-bit model: name -> () -> (model, tok)."""
    from dpo_lab.dpo.evaluate import load_with_adapter
    from dpo_lab.dpo.qlora import add_lora, load_quantized
    from dpo_lab.dpo.trl_recipe import load_policy

    def with_adapter():
        model, _ = load_quantized(cfg.model, cfg.quant)
        add_lora(model, cfg.lora, seed=0).save_pretrained(tmp_path / "adapter")
        return load_with_adapter(cfg, tmp_path / "adapter")
    return {"load_quantized": lambda: load_quantized(cfg.model, cfg.quant),
            "trl_recipe.load_policy": lambda: load_policy(cfg),
            "evaluate.load_with_adapter": with_adapter}


def test_every_loader_pins_the_kernel_even_where_the_cpu_offers_the_bf16_one(fake_avx512bf16, tmp_path):
    """Runs on every CPU: with the feature faked, no loader may leave the repack switched on."""
    cfg = load_config(TINY)
    for name, load in _loaders(cfg, tmp_path).items():
        model, tok = load()
        layers = _4bit_layers(model)
        assert layers, name
        on = [m for m in layers if m.support_avx512bf16_for_cpu]
        assert not on, f"{name}: {len(on)} of {len(layers)} 4-bit layers would switch to the bf16 kernel"
        _eval_no_grad_forward(model, tok)
        assert _packed(model) == 0, f"{name}: an eval forward repacked the weights"


def test_one_kernel_path_undoes_a_repack_that_already_happened():
    """A weight repacked before we got to it (a model evaluated first) is unpacked again, with a
    warning since the repack rounded its scales; from then on eval and train forwards agree."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from dpo_lab.dpo.qlora import load_quantized, one_kernel_path
    cfg = load_config(TINY)
    model, tok = load_quantized(cfg.model, cfg.quant)
    x = _batch(tok)["input_ids"]
    for m in _4bit_layers(model):
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    assert _packed(model) == len(_4bit_layers(model))
    with pytest.warns(UserWarning, match="already been repacked"):
        assert one_kernel_path(model) == len(_4bit_layers(model))
    assert _packed(model) == 0
    with torch.no_grad():
        evaluated = model.eval()(input_ids=x).logits
    trained = model.train()(input_ids=x).logits
    assert torch.equal(evaluated, trained.detach())
    assert _packed(model) == 0


def test_reference_forward_equals_policy_forward_bitwise_at_step_1():
    """What the trainer does at step 1, on this machine's real kernels: the policy (train mode,
    grad, LoRA B = 0) and the reference (eval, no grad, adapters off) give identical log-probs,
    so every implicit reward is exactly 0 and the sigmoid loss exactly ln 2."""
    from dpo_lab.dpo.batching import concatenated_forward
    from dpo_lab.dpo.loss import dpo_loss
    from dpo_lab.dpo.qlora import add_lora, load_quantized
    cfg = load_config(TINY)
    model, tok = load_quantized(cfg.model, cfg.quant)
    model = add_lora(model, cfg.lora, seed=0)
    batch = _batch(tok, 8)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        rc, rr = concatenated_forward(model, batch)
    model.train()
    pc, pr = concatenated_forward(model, batch)
    assert torch.equal(pc.detach(), rc) and torch.equal(pr.detach(), rr)
    losses, cr, rrw = dpo_loss(pc, pr, rc, rr, beta=cfg.dpo.beta)
    assert torch.equal(cr, torch.zeros_like(cr)) and torch.equal(rrw, torch.zeros_like(rrw))
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.skipif(not _has_avx512bf16(), reason="the bf16 kernel path needs a CPU with AVX512-BF16")
def test_the_bf16_kernel_really_is_a_different_function_here():
    """Why the pin matters, shown on a CPU that has the feature: bitsandbytes' own default
    (repack on an eval/no-grad forward) changes the logits measurably."""
    from dpo_lab.dpo.qlora import load_quantized
    cfg = load_config(TINY)
    model, tok = load_quantized(cfg.model, cfg.quant)
    x = _batch(tok)["input_ids"]
    with torch.no_grad():
        pinned = model.eval()(input_ids=x).logits
    for m in _4bit_layers(model):
        m.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    with torch.no_grad():
        default = model(input_ids=x).logits
    assert _packed(model) == len(_4bit_layers(model))
    assert (default - pinned).abs().max().item() > 1e-3


def test_step_1_is_exact_on_a_simulated_cpu_without_avx512bf16():
    """The other machine kind, on this one: every process of a child pytest believes the CPU lacks
    AVX512-BF16 (tests/cpu_without_avx512bf16/sitecustomize.py), and step 1 is still exact there."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(here / "cpu_without_avx512bf16"), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes.functional as F; print(F.has_avx512bf16())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr
    test = f"{__file__}::test_reference_forward_equals_policy_forward_bitwise_at_step_1"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", test],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
