"""The DPO memory planner: the peak bytes per rank of one DPO step, term by term.

    shape = model_shape("meta-llama/Meta-Llama-3-8B-Instruct")     # or a local model dir, "tiny-sft"
    plan_dpo_memory(shape, cfg, nproc=8, device_gib=80)            # -> Breakdown (bytes per rank)
    measure_step(cfg, nproc=2)                                      # the same terms, measured (CPU)

The terms follow what our trainer (dpo_lab.dpo.trainer) holds during a step:

    base_weights   4-bit linear weights (NF4/FP4: 4 bits packed, one absmax per 64 weights: a byte
                   with double quantisation plus an fp32 per 256 absmax, Dettmers et al. 2023) or
                   16/32-bit ones, plus the unquantised embeddings and norms; FSDP (ZeRO-3) shards
                   the parameters, the 4-bit constants stay whole on every rank
    reference      a separate frozen reference model (same bytes as the base); 0 for the
                   adapters-off trick (our trainer) and for a cached reference
    adapters, adapter_grads, optimizer
                   LoRA (Hu et al. 2021): r·(in+out) per target matrix; full fine-tuning (our
                   trainer's train.finetune=full): every parameter, in model.dtype, FSDP2 giving rank
                   0 ceil(rows / ranks) of each; torch's AdamW keeps m and v in the parameter's dtype
                   plus an fp32 step per tensor (cost.model_state_bytes)
    activations    what autograd keeps for the backward of chosen + rejected in ONE forward
                   (tokens = both), per layer of a Llama/Qwen2 block with LoRA (counted below);
                   with checkpointing, each layer's input plus one layer recomputed
    logits         the LM head: chunked (chunk × V fp32 at a time, plus the completion positions'
                   hidden states) or full fp32 logits and log-softmax (cost.logits_bytes)
    transient      the FSDP-gathered layer (and the prefetched next), one dequantised weight and
                   the MLP backward's three T×intermediate gradients
Shared with lesson 10's planner (dpo_lab.parallel.cost): NF4 bits, model_state_bytes,
logits_bytes, lora_params' per-matrix count.
"""
import math
from dataclasses import dataclass, field

import torch

from dpo_lab.parallel import cost

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """A Llama/Qwen2-style decoder: what the planner needs of a model config."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False           # Qwen2 has biases on q, k and v; Llama does not

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict:
        """(in, out) of each linear of one layer, named as in transformers' Llama/Qwen2."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# Published config.json values (no download at run time)
KNOWN = {"meta-llama/Meta-Llama-3-8B-Instruct": ModelShape("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256),
         "meta-llama/Meta-Llama-3-8B": ModelShape("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256),
         "meta-llama/Meta-Llama-3-70B-Instruct": ModelShape("Llama-3-70B", 8192, 80, 64, 8, 28672, 128256),
         "meta-llama/Llama-3.2-1B-Instruct": ModelShape("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True),
         "meta-llama/Llama-3.2-3B-Instruct": ModelShape("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True)}


def model_shape(name: str) -> ModelShape:
    """A known Hub name, "tiny-sft" or a local model directory (its config.json)."""
    if name in KNOWN:
        return KNOWN[name]
    from pathlib import Path

    from dpo_lab.dpo.qlora import resolve_model
    path = Path(resolve_model(name))
    if not (path / "config.json").exists():
        raise ValueError(f"model {name!r}: not a known shape ({', '.join(KNOWN)}) and no local "
                         f"{path / 'config.json'}")
    import json
    c = json.loads((path / "config.json").read_text())
    return ModelShape(name, c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                      c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"],
                      c["vocab_size"], bool(c.get("tie_word_embeddings", False)),
                      c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))


def quantised_bytes(n: int, quant_type_bits: int = 4, double_quant: bool = True, blocksize: int = 64) -> dict:
    """Bytes of one 4-bit weight of n entries: packed 4-bit codes, absmax (uint8 per block with
    double quantisation, with an fp32 per 256 of them and one fp32 offset; else fp32 per block)
    and the code tables (16 fp32 NF4/FP4 values, 256 fp32 for the second level)."""
    blocks = math.ceil(n / blocksize)
    out = {"packed": math.ceil(n * quant_type_bits / 8)}
    if double_quant:
        out["constants"] = blocks + 4 * math.ceil(blocks / 256) + 4
        out["code"] = 16 * 4 + 256 * 4
    else:
        out["constants"], out["code"] = 4 * blocks, 16 * 4
    return out


def lora_params(shape: ModelShape, r: int, targets) -> int:
    """r·(in+out) per targeted matrix, all layers (cost.lora_matrix_params)."""
    lin = shape.linear_shapes()
    unknown = [t for t in targets if t not in lin]
    if unknown:
        raise ValueError(f"lora target_modules {unknown} are not linears of the model ({', '.join(lin)})")
    return shape.layers * sum(cost.lora_matrix_params(*lin[t], r) for t in targets)


def full_params_rank0(shape: ModelShape, shards: int) -> tuple[int, int]:
    """(parameters held by rank 0, parameter tensors) of the whole model split `shards` ways:
    FSDP2 shards every tensor on dim 0 and gives rank 0 ceil(rows / shards) rows (a Linear's
    weight is (out, in)); tied embeddings count once."""
    rows = lambda n: math.ceil(n / shards)
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    layer = sum(rows(out) * inp for inp, out in shape.linear_shapes().values()) + 2 * rows(h)
    tensors = len(shape.linear_shapes()) + 2
    if shape.qkv_bias:
        layer += rows(h) + 2 * rows(kv)
        tensors += 3
    n_embed = 1 if shape.tied_embeddings else 2
    return (shape.layers * layer + n_embed * rows(shape.vocab) * h + rows(h),
            shape.layers * tensors + n_embed + 1)


def layer_activation_bytes(shape: ModelShape, tokens: int, compute_bytes: int, lora_r: int | None,
                           targets=(), lora_bytes: int = 2, row_tokens: int | None = None,
                           trainable_base: bool = False) -> float:
    """Bytes one Llama/Qwen2 layer keeps for backward over `tokens` tokens (our trainer's layer,
    SDPA attention), counted from its autograd graph:
      compute dtype: both norms' inputs (2h) and rsqrt (2), q, k, v (k, v repeated to every head)
      and the attention output (4·heads·head_dim), gate, up and act(gate)·up (3i);
      the attention mask, one row of `row_tokens` per token (packed rows: a block-diagonal mask);
      LoRA: each targeted linear casts its input to the adapters' dtype (in) and keeps A's output (r);
      full fine-tuning (`trainable_base`): each norm's normalised input, for its weight's gradient,
      and its output, the input of the linears after it, for theirs (2 norms x 2h).
    Korthikanti et al.'s sbh(34 + 5as/h) (cost.activation_bytes_per_layer) counts a GPT layer in 16
    bits with dropout; this is its counterpart for the layer we train."""
    h, i = shape.hidden, shape.intermediate
    per_token = compute_bytes * (2 * h + 2 + 4 * shape.heads * shape.head_dim + 3 * i)
    per_token += compute_bytes * (row_tokens or 0)
    if trainable_base:
        per_token += compute_bytes * 4 * h
    if lora_r:
        lin = shape.linear_shapes()
        per_token += lora_bytes * sum(lin[t][0] + lora_r for t in targets)
    return tokens * per_token


@dataclass
class Breakdown:
    """Bytes per rank, term by term; `total` is their sum, `fits` compares it with the device."""
    terms: dict
    inputs: dict = field(default_factory=dict)
    device_bytes: float | None = None

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def to_dict(self) -> dict:
        return {"terms": dict(self.terms), "total": self.total, "inputs": dict(self.inputs),
                "device_bytes": self.device_bytes, "fits": self.fits}

    def table(self) -> str:
        unit, div = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)  # small runs in MiB
        rows = [f"{k:16s} {v / div:10.3f} {unit}" for k, v in self.terms.items()]
        rows.append(f"{'total':16s} {self.total / div:10.3f} {unit}")
        if self.device_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(f"{verdict} in {self.device_bytes / GIB:.1f} GiB "
                        f"({100 * self.total / self.device_bytes:.0f} % used)")
        return "\n".join(rows)


REFERENCES = ("adapters_off", "separate", "cached")
FINETUNES = ("lora", "full")


def plan_dpo_memory(shape: ModelShape, cfg, nproc: int = 1, device_gib: float | None = None,
                    zero_stage: int = 3, tp: int = 1, pp: int = 1, finetune: str | None = None,
                    reference: str | None = None, tokens: int | None = None,
                    completion_tokens: int | None = None) -> Breakdown:
    """Peak bytes per rank of one DPO step of `cfg` (a TrainConfig) on `shape`.

    nproc ranks = dp · tp · pp; zero_stage 3 is our trainer's FSDP2 (0-2: ZeRO stages of the
    trainable state, parameters whole). `tokens` in one micro-batch (chosen + rejected; default
    2 · micro_batch · max_length, every sequence full) and `completion_tokens` (default half of
    them) size activations and logits. finetune: None follows cfg (train.finetune); reference: None
    follows cfg (cached when dpo.precompute_ref or dpo.ref_cache, else the adapters-off trick)."""
    finetune = finetune or cfg.train.finetune
    if finetune not in FINETUNES:
        raise ValueError(f"finetune must be one of {FINETUNES}, got {finetune!r}")
    if reference is None:
        reference = "cached" if cfg.dpo.precompute_ref or cfg.dpo.ref_cache else "adapters_off"
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if finetune == "full" and reference == "adapters_off":
        raise ValueError("reference='adapters_off' needs LoRA adapters; full fine-tuning keeps a "
                         "'separate' reference or a 'cached' one")
    if min(nproc, tp, pp) < 1 or nproc % (tp * pp):
        raise ValueError(f"nproc={nproc} must be a multiple of tp·pp={tp * pp} (all >= 1)")
    dp, split = nproc // (tp * pp), tp * pp
    shard = dp if zero_stage == 3 else 1
    q, m = cfg.quant, cfg.model
    cb = DTYPE_BYTES[q.compute_dtype if q.load_in_4bit else m.dtype]
    wb = DTYPE_BYTES[m.dtype]
    lin = shape.linear_shapes()
    n_lin = sum(a * b for a, b in lin.values())
    terms = {}
    # ---- base weights
    if q.load_in_4bit and finetune == "lora":
        per = [quantised_bytes(a * b, 4, q.double_quant) for a, b in lin.values()]
        packed = shape.layers * sum(p["packed"] for p in per)
        consts = shape.layers * sum(p["constants"] + p["code"] for p in per)
        linear = packed / split / shard + consts / split
    else:
        linear = shape.layers * n_lin * wb / split / shard
    embed = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    norms = (2 * shape.layers + 1) * shape.hidden
    biases = shape.layers * (shape.hidden + 2 * shape.kv_heads * shape.head_dim) if shape.qkv_bias else 0
    rope = 2 * shape.head_dim // 2 * 4  # inv_freq and original_inv_freq buffers, fp32, on every rank
    # FSDP2 shards dim 0 and gives rank 0 ceil(rows / ranks): count rank 0's embedding rows
    embed_rows = math.ceil(shape.vocab / split / shard) * (1 if shape.tied_embeddings else 2)
    other = (embed_rows * shape.hidden + (norms + biases) / split / shard) * DTYPE_BYTES[m.dtype] + rope
    if finetune == "full":  # the trainable parameters are in `adapters` below; the rope buffers stay
        terms["base_weights"] = float(rope)
        base = linear + other
    else:
        terms["base_weights"] = linear + other
        base = terms["base_weights"]
    terms["reference"] = base if reference == "separate" else 0.0
    # ---- trainable state
    if finetune == "lora":
        psi = lora_params(shape, cfg.lora.r, cfg.lora.target_modules)
        lb = DTYPE_BYTES[cfg.lora.dtype]
        st = cost.model_state_bytes(psi / split, zero_stage, dp, param_bytes=lb, grad_bytes=lb,
                                    optim_bytes=2 * lb)  # torch AdamW: m and v in the param dtype
        n_tensors = 2 * len(cfg.lora.target_modules) * shape.layers
        terms["adapters"], terms["adapter_grads"] = st["params"], st["grads"]
        terms["optimizer"] = st["optimizer"] + 4 * n_tensors  # + AdamW's fp32 step per tensor
    else:
        # ZeRO stage k shards the optimizer state (k >= 1), the gradients (>= 2), the parameters (3)
        whole, n_tensors = full_params_rank0(shape, split)
        part = full_params_rank0(shape, split * dp)[0]
        held = lambda stage: part if zero_stage >= stage else whole
        terms["adapters"], terms["adapter_grads"] = wb * held(3), wb * held(2)
        terms["optimizer"] = 2 * wb * held(1) + 4 * n_tensors  # AdamW's m, v + fp32 step per tensor
    # ---- activations of one micro-batch (chosen + rejected in one forward)
    seqs = 2 * cfg.train.micro_batch
    tokens = tokens if tokens is not None else seqs * cfg.data.max_length
    completion_tokens = completion_tokens if completion_tokens is not None else tokens // 2
    # attention-mask row per token: a packed row holds up to max_tokens_per_row (default max_length)
    # tokens with a block-diagonal mask over the row; a padded row is one sequence
    row = (min(tokens, cfg.data.max_tokens_per_row or cfg.data.max_length) if cfg.data.packing
           else math.ceil(tokens / seqs))
    targets = cfg.lora.target_modules if finetune == "lora" else ()
    layer = layer_activation_bytes(shape, tokens, cb, cfg.lora.r if finetune == "lora" else None,
                                   targets, DTYPE_BYTES[cfg.lora.dtype], row, finetune == "full") / tp
    layers_here = math.ceil(shape.layers / pp)
    rope_acts = 2 * shape.head_dim * cb * tokens  # cos and sin, shared by the layers
    if m.gradient_checkpointing:  # each layer's input kept; one layer recomputed in backward
        terms["activations"] = layers_here * tokens * shape.hidden * cb / tp + layer + rope_acts
    else:
        terms["activations"] = layers_here * layer + rope_acts
    # ---- logits
    if cfg.dpo.chunked_logps:
        chunk = min(cfg.dpo.logps_chunk_size, completion_tokens)
        # kept hidden states of the completion positions; one chunk's logits, log-softmax, grad
        terms["logits"] = completion_tokens * shape.hidden * cb + 3 * chunk * shape.vocab * 4 / tp
    else:
        per_seq = tokens / seqs
        terms["logits"] = cost.logits_bytes(math.ceil(per_seq), seqs, shape.vocab, tp, logit_bytes=cb,
                                            reference_after=reference != "cached")
    # ---- transient: the gathered layer (+ the prefetched one), one dequantised weight, and the
    # MLP's backward, which holds the gradients of gate, up and act(gate)·up at once (3 × T×i)
    layer_params = n_lin * (0.5 if q.load_in_4bit and finetune == "lora" else wb) / split
    gathered = 2 * layer_params if shard > 1 else 0.0
    dequant = max(a * b for a, b in lin.values()) * cb / split if q.load_in_4bit and finetune == "lora" else 0.0
    mlp_backward = 3 * tokens * shape.intermediate * cb / tp
    terms["transient"] = gathered + dequant + mlp_backward
    return Breakdown(terms, inputs={"model": shape.name, "nproc": nproc, "dp": dp, "tp": tp, "pp": pp,
                                    "zero_stage": zero_stage, "finetune": finetune, "reference": reference,
                                    "tokens": tokens, "completion_tokens": completion_tokens,
                                    "checkpointing": m.gradient_checkpointing,
                                    "chunked_logps": cfg.dpo.chunked_logps, "load_in_4bit": q.load_in_4bit},
                     device_bytes=None if device_gib is None else device_gib * GIB)


# ------------------------------------------------------------------ measuring our trainer's step


def _nbytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _quant_state_bytes(model) -> int:
    """absmax, second-level constants and code tables of every 4-bit weight (not parameters)."""
    from dpo_lab.dpo.qlora import quant_constants_bytes
    seen, total = set(), 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        qs = getattr(mod, "quant_state", None) or getattr(w, "quant_state", None)
        if qs is None or id(qs) in seen:
            continue
        seen.add(id(qs))
        total += sum(quant_constants_bytes(qs).values())
    return total


def _measure_rank(cfg_dict: dict) -> dict:
    """One rank: build the trainer's model and optimizer, run one warm-up step (Adam's state
    appears), then measure the next step. Persistent bytes are counted from the tensors held
    (parameters' local shards, buffers, 4-bit constants, optimizer state); the step's own peak
    above them comes from torch.profiler's memory events (every allocation and free, replayed in
    time order; on a GPU, max_memory_allocated above the held bytes). Activations kept for backward are counted by a saved-tensors hook (unique
    storages), a breakdown term, not part of the total."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from dpo_lab.runtime import quiet_stderr
    from dpo_lab.bench.logprobs import _cpu_peak_bytes, _cuda_peak_bytes
    from dpo_lab.dpo.batching import BatchPlan, EncodedRows, to_device
    from dpo_lab.dpo.config import from_dict
    from dpo_lab.dpo.qlora import resolve_model
    from dpo_lab.dpo.trainer import build_policy, dpo_step_terms, load_data, micro_batch, reference_logps
    from dpo_lab.parallel import rank_device
    import warnings
    # the reference forward runs under no_grad through reentrant checkpointing, which warns that no
    # input requires grad: true and harmless there (the reference needs no gradients)
    warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True",
                            category=UserWarning, module=r"torch\.utils\.checkpoint")
    cfg = from_dict(cfg_dict)
    rank, ws, device = dist.get_rank(), dist.get_world_size(), rank_device()
    torch.manual_seed(cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = EncodedRows(tok, load_data(cfg, tok)[0])
    plan = BatchPlan(len(rows), cfg.train.micro_batch, cfg.train.grad_accum, ws, cfg.train.seed)
    model, _ = build_policy(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    model.train()

    def batches(step):
        return [to_device(micro_batch([rows[i] for i in idx], cfg, tok.pad_token_id), device)
                for idx in plan.micro_indices(step, rank)]

    warmup, measured = batches(0), batches(1)
    # as the trainer: with dpo.ref_cache / precompute_ref the reference log-probs are computed
    # before step 1 (full fine-tuning has no other reference) and a step runs no reference forward
    cached = cfg.dpo.ref_cache or cfg.dpo.precompute_ref
    refs = {id(b): reference_logps(model, b, cfg.dpo.ld_alpha) if cached else None for b in warmup + measured}

    def step(bs):
        for j, batch in enumerate(bs):
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(j == len(bs) - 1)
            terms = dpo_step_terms(model, batch, cfg, refs[id(batch)])
            (terms[0].sum() * ws / plan.global_batch).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step(warmup)
    held = {"weights": sum(_nbytes(p) for p in model.parameters() if not p.requires_grad)
            + sum(_nbytes(b) for b in model.buffers()) + _quant_state_bytes(model),
            "adapters": sum(_nbytes(p) for p in params),
            "optimizer": sum(_nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}
    if device.type == "cuda":  # the allocator's own statistics (not yet run on a GPU here)
        peak = _cuda_peak_bytes(lambda: step(measured), device)
    else:
        with quiet_stderr():
            peak = _cpu_peak_bytes(lambda: step(measured))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = dpo_step_terms(model, measured[0], cfg, refs[id(measured[0])])
    del terms
    opt.zero_grad(set_to_none=True)
    b = measured[0]
    return {**held, "step_peak": peak, "total": sum(held.values()) + peak,
            "saved_activations": sum(saved.values()),
            "tokens": int(b["input_ids"].numel()), "completion_tokens": int(b["loss_mask"].sum().item()),
            "sequences": 2 * len(plan.micro_indices(1, rank)[0])}


def measure_step(cfg, nproc: int = 1, timeout: float = 600) -> dict:
    """Measured bytes of one DPO step of `cfg` (TrainConfig) on `nproc` CPU ranks: rank 0's
    {weights, adapters, optimizer, step_peak, total, saved_activations, tokens, completion_tokens,
    sequences} (see _measure_rank for how each is measured)."""
    from dpo_lab.parallel import launch
    return launch(_measure_rank, nproc, args=(cfg.to_dict(),), timeout=timeout)[0]


# The configurations checked against measured steps (tests/test_memory_planner.py, notebook 14):
# (name, ranks, overrides of configs/dpo/tiny_cpu.yaml)
MEASURED = (
    ("1 rank, packed, chunked", 1, []),
    ("2 ranks, packed, chunked", 2, []),
    ("1 rank, full logits", 1, ["dpo.chunked_logps=false"]),
    ("1 rank, checkpointing", 1, ["model.gradient_checkpointing=true"]),
    ("2 ranks, checkpointing, full logits", 2, ["model.gradient_checkpointing=true",
                                                "dpo.chunked_logps=false"]),
    ("1 rank, padded rows", 1, ["data.packing=false"]),
    ("2 ranks, 16-bit base, LoRA r=64", 2, ["quant.load_in_4bit=false", "lora.r=64"]),
    ("1 rank, full fine-tuning", 1, ["train.finetune=full", "quant.load_in_4bit=false"]),
    ("2 ranks, full fine-tuning", 2, ["train.finetune=full", "quant.load_in_4bit=false"]),
)


def check_against_measured(configs=MEASURED, base_config=None, timeout: float = 600) -> list[dict]:
    """Predicted vs measured peak per configuration: [{name, nproc, predicted, measured,
    rel_err, terms, measured_terms}]. The planner is told the measured micro-batch's token counts
    (its input is the batch shape, not the data)."""
    from dpo_lab.dpo.config import load_config
    from dpo_lab.paths import CONFIG_DIR
    base_config = base_config or CONFIG_DIR / "dpo" / "tiny_cpu.yaml"
    out = []
    for name, nproc, overrides in configs:
        cfg = load_config(base_config, ["eval.max_rows=16", *overrides])
        m = measure_step(cfg, nproc, timeout=timeout)
        p = plan_dpo_memory(model_shape(cfg.model.name), cfg, nproc=nproc, tokens=m["tokens"],
                            completion_tokens=m["completion_tokens"])
        out.append({"name": name, "nproc": nproc, "predicted": p.total, "measured": m["total"],
                    "rel_err": p.total / m["total"] - 1, "terms": p.terms, "measured_terms": m})
    return out


def figures(rows: list[dict]) -> dict:
    """The notebook's figures from check_against_measured's rows."""
    return {"dpo_memory_planner_max_rel_err": max(abs(r["rel_err"]) for r in rows),
            "dpo_memory_planner_configs": len(rows),
            **{f"dpo_memory_planner_rel_err/{r['name']}": r["rel_err"] for r in rows}}


def what_if(model: str = "meta-llama/Meta-Llama-3-8B-Instruct", seq: int = 1024, micro_batch: int = 2,
            lora_r: int = 16, load_in_4bit: bool = True, zero_stage: int = 3, nproc: int = 8,
            checkpointing: bool = True, device_gib: float | None = 80, base_config=None) -> Breakdown:
    """The breakdown of `base_config` (default configs/dpo/llama3_8b_8gpu.yaml) with the knobs of
    notebook 14's sliders changed: model (a KNOWN name), sequence length, micro-batch, LoRA rank,
    4-bit or 16-bit base, ZeRO stage and ranks, gradient checkpointing."""
    from dpo_lab.dpo.config import load_config
    from dpo_lab.paths import CONFIG_DIR
    if model not in KNOWN:
        raise ValueError(f"model {model!r} is not one of {', '.join(KNOWN)}")
    flag = lambda b: "true" if b else "false"
    cfg = load_config(base_config or CONFIG_DIR / "dpo" / "llama3_8b_8gpu.yaml",
                      [f"data.max_length={seq}", f"train.micro_batch={micro_batch}", f"lora.r={lora_r}",
                       f"quant.load_in_4bit={flag(load_in_4bit)}",
                       f"model.gradient_checkpointing={flag(checkpointing)}"])
    return plan_dpo_memory(KNOWN[model], cfg, nproc=nproc, device_gib=device_gib, zero_stage=zero_stage)
