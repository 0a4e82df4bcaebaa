"""Full fine-tuning in the DPO trainer (train.finetune=full): every parameter of the unquantised
model trained under FSDP2, the reference = the initial model's log-probs computed before step 1.
The twin is the plain transformers model (no FSDP, padded rows, full fp32 logits) with log-probs
and the sigmoid DPO loss written out here, sharing no code with the trainer's path (packed rows,
chunked head, dpo_lab.dpo.loss)."""
import pytest
import torch
import torch.nn.functional as F

from dpo_lab.dpo.config import ConfigError, load_config
from dpo_lab.paths import CONFIG_DIR

TINY = CONFIG_DIR / "dpo" / "tiny_cpu.yaml"
FULL = ["train.finetune=full", "quant.load_in_4bit=false"]


def _cfg(out, *extra):
    return load_config(TINY, [*FULL, "train.micro_batch=4", "train.lr=1e-4", "train.warmup_ratio=0",
                              "train.schedule=constant", "eval.max_rows=8", "checkpoint.resume=false",
                              f"output_dir={out}", *extra])


@pytest.mark.parametrize("overrides,key", [
    (["train.finetune=full"], "quant.load_in_4bit"),  # tiny_cpu.yaml loads in 4 bits
    ([*FULL, "dpo.ref_cache=false", "dpo.precompute_ref=false"], "dpo.ref_cache"),
    (["train.finetune=partial"], "train.finetune"),
])
def test_bad_full_finetune_settings_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, overrides)


def test_alias_and_default():
    assert load_config(TINY).train.finetune == "lora"
    assert load_config(TINY, FULL).train.finetune == "full"
    with pytest.raises(ConfigError, match=r"did you mean train\.finetune"):
        load_config(TINY, ["train.finetuning_type=full"])


def _plain_logps(model, batch):
    """Sum of completion-token log-probs, from full logits, written out (no dpo_lab code)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["loss_mask"][:, 1:]).sum(-1).chunk(2)


def _one_step_rank(cfg_dict, idx):
    """Rank function: the trainer's model, reference and step terms on one micro-batch (rows
    `idx`); the loss, and every parameter's full gradient by name."""
    from transformers import AutoTokenizer

    from dpo_lab.dpo.batching import EncodedRows, to_device
    from dpo_lab.dpo.config import from_dict
    from dpo_lab.dpo.qlora import resolve_model
    from dpo_lab.dpo.trainer import build_policy, dpo_step_terms, load_data, micro_batch, reference_logps
    cfg = from_dict(cfg_dict)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name))
    rows = EncodedRows(tok, load_data(cfg, tok)[0])
    model, _ = build_policy(cfg, torch.device("cpu"))
    model.train()
    batch = to_device(micro_batch([rows[i] for i in idx], cfg, tok.pad_token_id), torch.device("cpu"))
    ref = reference_logps(model, batch)  # before any update: the initial model
    with pytest.raises(ValueError, match="needs `ref`"):
        dpo_step_terms(model, batch, cfg)  # no adapters to switch off: never a silent policy-as-reference
    losses = dpo_step_terms(model, batch, cfg, ref)[0]
    losses.mean().backward()
    grads = {n: None if p.grad is None else (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    return losses.mean().item(), grads, [t.clone() for t in ref]


@pytest.mark.distributed
def test_step_loss_and_gradients_equal_plain_autograd(tmp_path):
    """Before any update policy == reference (loss ln 2) but the gradient is not zero:
    -β/2 · ∇(log π(chosen) - log π(rejected)) per pair, checked on every parameter."""
    from transformers import AutoTokenizer

    from dpo_lab.dpo.batching import EncodedRows, collate
    from dpo_lab.dpo.qlora import resolve_model
    from dpo_lab.dpo.trainer import load_data
    from dpo_lab.models import load_model
    from dpo_lab.parallel import launch
    cfg = _cfg(tmp_path)
    idx = [0, 1, 2, 3]
    loss, grads, ref = launch(_one_step_rank, 1, args=(cfg.to_dict(), idx), timeout=600)[0]

    model, tok = load_model(resolve_model(cfg.model.name), dtype=torch.float32)
    model.train()
    rows = EncodedRows(AutoTokenizer.from_pretrained(resolve_model(cfg.model.name)), load_data(cfg, tok)[0])
    batch = collate([rows[i] for i in idx], tok.pad_token_id, cfg.data.max_length)
    with torch.no_grad():
        rc, rr = _plain_logps(model, batch)
    pc, pr = _plain_logps(model, batch)
    want = -F.logsigmoid(cfg.dpo.beta * ((pc - rc) - (pr - rr))).mean()  # DPO, Rafailov et al. eq. 7
    want.backward()
    torch.testing.assert_close(ref[0], rc, rtol=0, atol=1e-4)  # the reference is the initial model
    torch.testing.assert_close(ref[1], rr, rtol=0, atol=1e-4)
    assert loss == pytest.approx(want.item(), abs=1e-6)
    plain = dict(model.named_parameters())
    assert grads.keys() == plain.keys() and len(grads) > 10  # every parameter is trainable
    for n, g in grads.items():
        assert g is not None and plain[n].grad is not None, n
        # fp32 sums over differently ordered kernels (packed + chunked vs padded + full logits)
        torch.testing.assert_close(g, plain[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3  # a real gradient


def _state(model_dir):
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.distributed
def test_every_parameter_trains_reference_stays_initial_one_and_two_ranks_agree(tmp_path):
    """3 steps on 1 rank (2 micro-batches per step) and on 2 ranks (1 each): the same global batch.
    Every parameter tensor moves; the reference behind each step's rewards is the initial model's
    (rewards/chosen = β(logps/chosen - ref chosen), the twin scores the step's rows with the initial
    model); the two runs end with the same parameters."""
    from transformers import AutoTokenizer

    from dpo_lab.dpo.batching import BatchPlan, EncodedRows, collate
    from dpo_lab.dpo.qlora import resolve_model
    from dpo_lab.dpo.trainer import load_data, run
    from dpo_lab.models import load_model
    steps = ["train.max_steps=3", "dpo.ref_cache=false", "dpo.precompute_ref=true"]
    one = run(_cfg(tmp_path / "one", *steps, "train.grad_accum=2"), nproc=1, timeout=600)
    two = run(_cfg(tmp_path / "two", *steps, "train.grad_accum=1"), nproc=2, timeout=600)
    cfg = _cfg(tmp_path, *steps, "train.grad_accum=1")

    initial, tok = load_model(resolve_model(cfg.model.name), dtype=torch.float32)
    w0 = {n: p.detach() for n, p in initial.named_parameters()}
    w1, w2 = _state(tmp_path / "one" / "model"), _state(tmp_path / "two" / "model")
    # (a tied lm_head.weight may be written too, equal to the embedding: not a parameter of its own)
    assert w0.keys() <= w1.keys() and w0.keys() <= w2.keys()
    unchanged = [n for n in w0 if torch.equal(w1[n], w0[n])]
    assert not unchanged, f"not trained: {unchanged}"
    for n in w0:  # 1 rank x 2 micro-batches == 2 ranks x 1: FSDP's averaging, fp32 rounding apart
        torch.testing.assert_close(w2[n], w1[n], rtol=0, atol=1e-5, msg=n)

    rows = EncodedRows(AutoTokenizer.from_pretrained(resolve_model(cfg.model.name)), load_data(cfg, tok)[0])
    plan = BatchPlan(len(rows), 4, 1, 2, cfg.train.seed)
    initial.train()
    for rec, rec1 in zip(two["history"], one["history"]):
        s = rec["step"] - 1
        idx = [i for r in range(2) for micro in plan.micro_indices(s, r) for i in micro]
        with torch.no_grad():
            rc, _ = _plain_logps(initial, collate([rows[i] for i in idx], tok.pad_token_id, cfg.data.max_length))
        ref_chosen = rec["logps/chosen"] - rec["rewards/chosen"] / cfg.dpo.beta
        assert ref_chosen == pytest.approx(rc.mean().item(), abs=1e-4), rec["step"]
        assert rec1["loss"] == pytest.approx(rec["loss"], abs=1e-6)
    assert two["history"][-1]["rewards/margins"] > 0  # it trained
