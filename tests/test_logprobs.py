"""Chunked token log-probs (dpo_lab.dpo.logprobs) against the naive log_softmax + gather."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_lab import task
from dpo_lab.dpo.batching import collate, concatenated_forward, encode_rows
from dpo_lab.dpo.logprobs import logit_sums, sequence_logps_chunked, token_logps
from dpo_lab.dpo.loss import completion_logit_sums
from dpo_lab.models import build_tiny_model, build_tokenizer


def naive(hidden, weight, labels, bias=None):
    """The reference: the full [N, V] logits, upcast, log_softmax, gather (torch only)."""
    logits = nn.functional.linear(hidden, weight, bias).float()
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)


def _inputs(n, h, v, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    return hid, w, b, torch.randint(v, (n,), generator=g)


class _Shapes(TorchDispatchMode):
    """Every op's output shapes, and the most elements any single op produced: the [N, V]
    matrix shows up here if it exists."""

    def __init__(self):
        super().__init__()
        self.largest, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


# N = 7: chunks that divide it (1, 7), that don't (3, 4) and one past it (10)
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 10])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(chunk, bias):
    hid, w, b, y = _inputs(7, 5, 11, torch.float64, bias=bias)
    args = (hid, w, b) if bias else (hid, w)
    fn = lambda h, w, b=None: token_logps(h, w, y, b, chunk_size=chunk)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [16, 37, 64])
def test_equals_naive_value_and_gradients(dtype, tol, chunk):
    hid, w, b, y = _inputs(37, 32, 1000, dtype)
    g = torch.randn(37)  # a non-uniform upstream gradient, so each token's scale matters
    ref = naive(hid, w, y, b)
    ref_grads = torch.autograd.grad((ref * g).sum(), (hid, w, b))
    out = token_logps(hid, w, y, b, chunk_size=chunk)
    grads = torch.autograd.grad((out * g).sum(), (hid, w, b))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == want.dtype, name
        scale = want.float().abs().max()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=tol, rtol=0,
                                   msg=lambda m: f"grad of {name}: {m}")


def test_frozen_head_gets_no_gradient():
    hid, w, _, y = _inputs(9, 8, 50, torch.float32, bias=False)
    w.requires_grad_(False)  # LoRA: the head is frozen, backward must skip its V x H matmul
    out = token_logps(hid, w, y, chunk_size=4)
    with _Shapes() as mode:
        out.sum().backward()
    torch.testing.assert_close(hid.grad, torch.autograd.grad(naive(hid, w, y).sum(), hid)[0])
    assert w.grad is None and (50, 8) not in mode.shapes, "backward built a weight gradient"
    assert (4, 8) in mode.shapes  # the mode does see backward: a chunk's grad_hidden


def test_bad_inputs_are_named():
    hid, w, _, y = _inputs(4, 8, 50, torch.float32, bias=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 50\)"):
        token_logps(hid, w, y + 50)
    with pytest.raises(ValueError, match="labels must be int64"):
        token_logps(hid, w, y[:3])
    with pytest.raises(ValueError, match="same H"):
        token_logps(hid, w[:, :4], y)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(hid, w, y, chunk_size=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_logit_sums_equal_trl_mean_logit(dtype, tol):
    hid, w, b, _ = _inputs(2 * 6, 32, 1000, dtype)
    hidden = hid.detach().view(2, 6, 32)
    logits = nn.functional.linear(hidden, w.detach(), b.detach())
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    want, n = completion_logit_sums(logits, mask)  # TRL's mean over the vocabulary, [N, V] in fp32
    per_pos = logit_sums(hidden[:, :-1].reshape(-1, 32), w.detach(), b.detach()) / w.shape[0]
    got = (per_pos.view(2, 5) * mask[:, 1:]).sum(-1)
    assert per_pos.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=tol * want.abs().max(), rtol=tol)


# --- a whole causal LM -------------------------------------------------------------------------

def _batch():
    tok = build_tokenizer()
    rows = task.read_jsonl(task.TASK_DIR / "test.jsonl")[:3]
    return collate(encode_rows(tok, rows), tok.pad_token_id)


def _lora(model):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make adapters on and off the same model
            nn.init.normal_(p, std=0.05)
    return model


def _both(model, batch, chunk=7):
    """(naive logps, naive grads, naive logit sums, chunked logps, chunked grads, chunked logit
    sums); the gradients are of a weighted sum, so that each sequence's scale matters."""
    params = [p for p in model.parameters() if p.requires_grad] if torch.is_grad_enabled() else []

    def naive_forward():
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (*concatenated_forward(model, batch), completion_logit_sums(logits, batch["loss_mask"]))
    out = []
    for fn in (naive_forward, lambda: sequence_logps_chunked(model, batch, chunk)):
        chosen, rejected, sums = fn()
        logps = torch.cat([chosen, rejected])
        grads = torch.autograd.grad((logps * torch.linspace(1, 2, len(logps))).sum(), params) \
            if params else ()
        out += [logps, grads, sums]
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("adapters", ["lora_on", "lora_off", "full"])
def test_sequence_logps_equal_concatenated_forward(arch, adapters):
    batch = _batch()
    model = build_tiny_model(arch, seed=0).eval()
    if adapters == "full":  # every parameter trains: the tied embedding/head gets both gradients
        ref, ref_g, ref_sums, got, got_g, sums = _both(model, batch)
    else:
        model = _lora(model).eval()
        if adapters == "lora_off":  # the reference policy: same module, adapters switched off
            with model.disable_adapter(), torch.no_grad():
                ref, ref_g, ref_sums, got, got_g, sums = _both(model, batch)
            on = torch.cat(concatenated_forward(model, batch))
            assert not torch.allclose(on, ref), "adapters on and off must differ for this test to mean anything"
        else:
            ref, ref_g, ref_sums, got, got_g, sums = _both(model, batch)
            assert ref_g and all(g.abs().sum() > 0 for g in ref_g)  # every adapter matrix is checked
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    assert len(got_g) == len(ref_g)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sums[0], ref_sums[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sums[1], ref_sums[1])


def test_untied_head_with_bias():
    batch = _batch()
    model = build_tiny_model("qwen2", seed=0, tie_word_embeddings=False)
    torch.manual_seed(2)
    old = model.lm_head
    model.lm_head = nn.Linear(old.in_features, old.out_features, bias=True)
    ref, ref_g, ref_sums, got, got_g, sums = _both(model, batch, chunk=5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(sums[0], ref_sums[0], atol=1e-4, rtol=1e-5)  # bias.sum() included


def test_capped_logits_are_refused():
    model = build_tiny_model("qwen2", seed=0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        sequence_logps_chunked(model, _batch())


# --- memory -----------------------------------------------------------------------------------

def _saved_bytes(fn, exclude):
    """Bytes autograd keeps for backward, not counting tensors that are views of `exclude`
    (the head's weight: a parameter that lives anyway)."""
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() != exclude.untyped_storage().data_ptr():
            saved.append(t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved), out


def test_memory_is_one_chunk_not_n_by_v():
    n, h, v, chunk = 64, 8, 50_000, 16
    hid, w, _, y = _inputs(n, h, v, torch.float32, bias=False)
    saved, out = _saved_bytes(lambda: token_logps(hid, w, y, chunk_size=chunk), w)
    assert saved <= n * h * 4 + n * 8 + n * 4  # hidden, labels (int64), lse
    naive_saved, _ = _saved_bytes(lambda: naive(hid, w, y), w)
    assert naive_saved >= n * v * 4  # what the test would catch: log_softmax's [N, V] output
    for fn, bound in ((lambda: token_logps(hid, w, y, chunk_size=chunk), chunk * v),
                      (lambda: naive(hid, w, y), None)):
        with _Shapes() as mode:
            fn().sum().backward()
        if bound is None:
            assert mode.largest >= n * v
        else:
            assert mode.largest <= bound, f"an op made {mode.largest} elements, more than one chunk {bound}"


# --- under FSDP2 ------------------------------------------------------------------------------

def _fsdp2_rank():
    """Rank function: both paths on fully_shard-ed copies of one model (each rank its own batch
    half), with LoRA and without; per-rank logps, gradients gathered whole, and whether the layers
    resharded after forward."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dpo_lab.dpo.qlora import decoder_layers
    rank, n = dist.get_rank(), dist.get_world_size()
    full = _batch()
    pairs = full["input_ids"].shape[0] // 2
    half = [*range(rank, pairs, n), *range(pairs + rank, 2 * pairs, n)]  # chosen rows, then their rejected
    batch = {k: v[half] for k, v in full.items()}
    out = {}
    for adapters, name, fn in ((a, *path) for a in (True, False) for path in (
            ("naive", lambda m: concatenated_forward(m, batch)),
            ("chunked", lambda m: sequence_logps_chunked(m, batch, 5)[:2]))):
        model = build_tiny_model("qwen2", seed=0)
        model = _lora(model) if adapters else model
        mesh = init_device_mesh("cpu", (n,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        logps = torch.cat(fn(model))  # the FIRST call on a fresh model: nothing gathered yet
        layer_sharded = all(isinstance(p, DTensor) for p in decoder_layers(model)[0].parameters())
        (logps * torch.linspace(1, 2, len(logps))).sum().backward()
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters() if p.grad is not None}
        out[adapters, name] = {"logps": logps.detach(), "grads": grads, "layer_sharded": layer_sharded}
    return out


@pytest.mark.distributed
def test_fsdp2_equals_concatenated_forward():
    from dpo_lab.parallel import launch
    res = launch(_fsdp2_rank, 2, timeout=300)
    for r, adapters in ((r, a) for r in res for a in (True, False)):
        naive, chunked = r[adapters, "naive"], r[adapters, "chunked"]
        torch.testing.assert_close(chunked["logps"], naive["logps"], atol=1e-4, rtol=1e-5)
        # FSDP2 still reshards every layer after its forward (it would not if a layer ran as root)
        assert naive["layer_sharded"] and chunked["layer_sharded"]
        assert naive["grads"] and naive["grads"].keys() == chunked["grads"].keys()
        for k, g in naive["grads"].items():
            torch.testing.assert_close(chunked["grads"][k], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
