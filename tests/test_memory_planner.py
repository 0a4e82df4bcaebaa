"""The DPO memory planner: every term against a hand count, the adapter and 4-bit counts against
PEFT and bitsandbytes, the prediction against measured steps of our trainer, and `dpo-lab memory`
on every shipped config."""
import json

import pytest
import torch

from dpo_lab.dpo.config import load_config
from dpo_lab.memory import planner
from dpo_lab.memory.planner import ModelShape, plan_dpo_memory
from dpo_lab.paths import CONFIG_DIR

# 2 layers, h = 8, 2 heads of 4 (1 kv head), intermediate 16, vocabulary 10, tied embeddings
TINY = ModelShape("hand", hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=10,
                  tied_embeddings=True)


def _tiny_cfg(*extra):
    return load_config(None, ["train.micro_batch=1", "data.max_length=4", "lora.r=2",
                              "lora.target_modules=['q_proj', 'down_proj']", *extra])


def test_every_term_against_a_hand_count():
    b = plan_dpo_memory(TINY, _tiny_cfg(), nproc=1, tokens=8, completion_tokens=4).terms
    # linears per layer (in·out): q 64, k 32, v 32, o 64, gate 128, up 128, down 128.
    # NF4 packs 2 per byte: 288 B. absmax blocks of 64: 1,1,1,1,2,2,2 = 10 uint8, and per tensor
    # one fp32 second-level absmax and one fp32 offset (8 B x 7); code tables 16 + 256 fp32 per tensor.
    per_layer = 288 + (10 + 7 * 8) + 7 * (16 + 256) * 4
    # embedding (tied: once) 10x8 and 5 norms of 8, fp32; inv_freq + original_inv_freq (2 fp32 each)
    assert b["base_weights"] == 2 * per_layer + (80 + 40) * 4 + 2 * 2 * 4
    assert b["reference"] == 0  # the adapters-off trick
    # LoRA r=2: q 2·(8+8) = 32, down 2·(16+8) = 48 per layer; bf16 params, grads, Adam m and v
    assert b["adapters"] == b["adapter_grads"] == 2 * 80 * 2
    assert b["optimizer"] == 2 * 2 * 80 * 2 + 4 * 8  # + one fp32 step per adapter tensor (8)
    # per token and layer, fp32: norm inputs 2·8 + rsqrt 2 + q,k,v,out 4·(2·4) + gate,up,act 3·16
    # = 98 values; the packed mask row (rows of max_length = 4 tokens: the two sequences are two rows);
    # LoRA casts (q: 8, down: 16) + A outputs (2 each) in bf16
    per_token = 4 * 98 + 4 * 4 + 2 * (8 + 2 + 16 + 2)
    assert b["activations"] == 2 * 8 * per_token + 2 * 4 * 4 * 8  # + rope cos and sin, fp32
    # chunked head: 4 completion hidden states (fp32) + one chunk (4) of logits, log-softmax, grad
    assert b["logits"] == 4 * 8 * 4 + 3 * 4 * 10 * 4
    # one rank: nothing gathered; the largest dequantised weight (128 fp32); MLP backward 3·8·16 fp32
    assert b["transient"] == 128 * 4 + 3 * 8 * 16 * 4


def test_sharding_and_reference_options():
    cfg = _tiny_cfg()
    one = plan_dpo_memory(TINY, cfg, nproc=1, tokens=8).terms
    two = plan_dpo_memory(TINY, cfg, nproc=2, tokens=8).terms
    # FSDP halves the packed weights and fp32 others, not the 4-bit constants or the rope buffers
    constants = 2 * ((10 + 7 * 8) + 7 * (16 + 256) * 4) + 2 * 2 * 4
    assert two["base_weights"] - constants == pytest.approx((one["base_weights"] - constants) / 2)
    assert two["adapters"] == one["adapters"] / 2
    assert two["activations"] == one["activations"]  # data parallel: the same micro-batch per rank
    assert two["transient"] - one["transient"] == 2 * 576 / 2  # two gathered 4-bit layers
    sep = plan_dpo_memory(TINY, cfg, nproc=1, tokens=8, reference="separate").terms
    assert sep["reference"] == one["base_weights"]
    full = plan_dpo_memory(TINY, cfg, nproc=1, tokens=8, finetune="full", reference="cached").terms
    # every parameter trainable, fp32 (model.dtype): linears, 5 norms of 8, the tied embedding 10x8;
    # AdamW's m and v in fp32, one fp32 step per tensor (2 x (7 linears + 2 norms) + norm + embedding)
    psi = 2 * 576 + 40 + 80
    assert (full["adapters"], full["adapter_grads"], full["optimizer"]) == (4 * psi, 4 * psi, 8 * psi + 4 * 20)
    assert full["base_weights"] == 2 * 2 * 4  # only the rope buffers are not trained
    # no LoRA casts; each norm keeps its normalised input and its output (the next linears' input)
    per_token_full = 4 * 98 + 4 * 4 + 4 * 4 * 8
    assert full["activations"] == 2 * 8 * per_token_full + 2 * 4 * 4 * 8
    full_cfg = _tiny_cfg("train.finetune=full", "quant.load_in_4bit=false")
    two_full = plan_dpo_memory(TINY, full_cfg, nproc=2, tokens=8)  # finetune and reference from cfg
    assert (two_full.inputs["finetune"], two_full.inputs["reference"]) == ("full", "cached")
    assert two_full.terms["adapters"] == 4 * psi / 2  # every dim 0 of TINY is even
    # FSDP2 gives rank 0 ceil(rows / ranks): an odd vocabulary of 11 leaves rank 0 six rows of 8
    odd = ModelShape("odd", 8, 2, 2, 1, 16, 11, True)
    assert plan_dpo_memory(odd, full_cfg, nproc=2, tokens=8).terms["adapters"] == 4 * ((psi - 80) / 2 + 6 * 8)
    ckpt = plan_dpo_memory(TINY, _tiny_cfg("model.gradient_checkpointing=true"), nproc=1, tokens=8).terms
    assert ckpt["activations"] == 2 * 8 * 8 * 4 + one["activations"] / 2 + 2 * 4 * 4 * 8 / 2
    with pytest.raises(ValueError, match="adapters_off"):
        plan_dpo_memory(TINY, cfg, finetune="full", reference="adapters_off")
    with pytest.raises(ValueError, match="nproc=3"):
        plan_dpo_memory(TINY, cfg, nproc=3, tp=2)


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    from dpo_lab.models import build_tiny_model
    model = build_tiny_model("qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    counted = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    c = model.config
    shape = ModelShape("t", c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                       c.num_key_value_heads, c.intermediate_size, c.vocab_size)
    assert planner.lora_params(shape, 8, targets) == counted


@pytest.mark.parametrize("n,double", [(64 * 256 * 3 + 64, True), (4096, False)])
def test_quantised_bytes_match_bitsandbytes(n, double):
    import bitsandbytes.functional as F

    from dpo_lab.dpo.qlora import quant_constants_bytes
    w = torch.randn(n, dtype=torch.float32)
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
    c = quant_constants_bytes(qs)
    got = planner.quantised_bytes(n, 4, double)
    assert got["packed"] == packed.numel() * packed.element_size()
    assert got["constants"] == c["absmax"] + c["absmax2"]
    assert got["code"] == c["code"]


@pytest.mark.distributed
def test_prediction_against_measured_steps():
    """Measured with torch.profiler's memory events (the step's peak above the held tensors) plus
    a count of the held tensors (see planner._measure_rank). Memory is deterministic for a given
    batch, so the tolerance is not about load: it bounds what the planner does not model (small
    temporaries, allocator rounding) and is the worst error seen over these configurations."""
    rows = planner.check_against_measured(LORA)  # full fine-tuning: test_memory_planner_full.py
    assert len(rows) >= 6
    for r in rows:
        m, t = r["measured_terms"], r["terms"]
        # the structural parts, exactly
        assert (t["base_weights"], t["adapters"], t["optimizer"]) == (m["weights"], m["adapters"], m["optimizer"]), r["name"]
    errs = {r["name"]: round(r["rel_err"], 3) for r in rows}
    assert max(abs(e) for e in errs.values()) <= TOTAL_TOLERANCE, errs


TOTAL_TOLERANCE = 0.10
LORA = [c for c in planner.MEASURED if "train.finetune=full" not in c[2]]


def test_cli_memory_on_every_shipped_config(capsys):
    from dpo_lab.cli import main
    files = sorted((CONFIG_DIR / "dpo").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        assert main(["memory", "--config", str(f), "--nproc", "8", "--device-gib", "80"]) == 0
        out = capsys.readouterr().out
        assert "total" in out and "fits in 80.0 GiB" in out, out
    f = CONFIG_DIR / "dpo" / "llama3_8b_8gpu.yaml"
    assert main(["memory", "--config", str(f), "--device-gib", "1", "--json"]) == 1  # one 1 GiB GPU
    res = json.loads(capsys.readouterr().out)
    assert res["fits"] is False and res["total"] == pytest.approx(sum(res["terms"].values()))
    assert main(["memory", "--config", str(f), "train.micro_batch=0"]) == 2
    assert "train.micro_batch" in capsys.readouterr().err
