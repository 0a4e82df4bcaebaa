"""A cost model that plans past this machine: memory per GPU and step time for a parallel layout.

Everything here is a formula from the papers named below, written once so that the
small runs of the lessons can check it and the planning notebook can extrapolate with it:

    model_state_bytes(psi, zero_stage, dp)          ZeRO (Rajbhandari et al. 2020), k = 12
    activation_bytes_per_layer(s, b, h, a, t, sp)   Korthikanti et al. 2022 (attention="eager");
                                                    without the s² scores under SDPA/FlashAttention
    logits_bytes(s, seqs, V)                        the output layer: logits and fp32 log-softmax
    bubble_fraction(p, m, v)                        GPipe / 1F1B / interleaved 1F1B
    ring_all_reduce_time(S, n, alpha, beta)         the alpha-beta model: ring, tree, and the
    tree_all_reduce_time(S, n, alpha, beta)         faster of the two (what NCCL picks per size)
    memory_per_gpu(model, plan, method)             all of the above for a DPO (or plain) run
    step_time(model, plan, method, ..., overlap)    FLOPs / (GPUs · peak · MFU) + exposed comm
    rank_plans(model, method, gpus)                 every layout that fits, fastest first
    best_plan(model, method, gpus)                  the first of those

Bytes are bytes (not GiB); 1 GB = 1e9 bytes, as in the ZeRO paper's "7.5B → 120 GB".
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np

GB = 1e9
# Mixed-precision Adam: bf16 params (2) + bf16 grads (2) + fp32 master, m, v (4+4+4 = k = 12).
MIXED_PRECISION = dict(param_bytes=2, grad_bytes=2, optim_bytes=12)
# Plain fp32 Adam (what the CPU lessons run): fp32 params (4) + grads (4) + m, v (8); no master copy.
FP32_ADAM = dict(param_bytes=4, grad_bytes=4, optim_bytes=8)


def quantised_bits_per_param(blocksize: int = 64, double_quant: bool = True, code_bits: int = 4) -> float:
    """Bits per weight of a 4-bit (NF4/FP4) tensor, as bitsandbytes stores it (Dettmers et al. 2023):
    the code, plus one absmax per block of `blocksize` weights: fp32, or with double quantisation a
    uint8 with one fp32 per 256 of them. The DPO memory planner (dpo_lab.memory.planner.quantised_bytes)
    counts the same layout in whole bytes; tests/test_cost.py checks that the two agree."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    absmax = 8 / blocksize + 32 / (256 * blocksize) if double_quant else 32 / blocksize
    return code_bits + absmax


NF4_BITS = quantised_bits_per_param()  # QLoRA NF4 with double quantisation: 4.127 bits per parameter


@dataclass(frozen=True)
class ModelConfig:
    name: str
    params: float          # Ψ
    layers: int            # L
    hidden: int            # h
    heads: int             # a
    vocab: int = 32000
    seq: int = 4096        # s
    micro_batch: int = 1   # b: sequences per micro-batch (a DPO pair counts as 2, see below)


# Published shapes (Llama-2-7B, Llama-2-70B, Llama-3.1-405B) with nominal parameter counts.
LLAMA_7B = ModelConfig("7B", 7e9, 32, 4096, 32)
LLAMA_70B = ModelConfig("70B", 70e9, 80, 8192, 64)
LLAMA_405B = ModelConfig("405B", 405e9, 126, 16384, 128, vocab=128256)
MODELS = {m.name: m for m in (LLAMA_7B, LLAMA_70B, LLAMA_405B)}


@dataclass(frozen=True)
class Plan:
    dp: int = 1               # data-parallel degree Nd
    tp: int = 1               # tensor-parallel degree t
    pp: int = 1               # pipeline stages p
    zero_stage: int = 0       # 0 = plain DP, 1/2/3 = ZeRO stages (3 = FSDP)
    sp: bool = False          # sequence parallelism alongside TP
    micro_batches: int = 1    # m, per pipeline per step
    checkpointing: bool = False  # keep only each layer's input (2sbh bytes), recompute the rest

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass(frozen=True)
class Hardware:
    name: str = "H100 SXM"
    memory_bytes: float = 80 * GB
    peak_flops: float = 989e12       # bf16 dense
    mfu: float = 0.40                # achieved / peak, a typical large-run value
    gpus_per_node: int = 8
    intra_alpha: float = 5e-6        # NVLink: latency (s) and bus bandwidth (bytes/s)
    intra_beta: float = 350e9
    inter_alpha: float = 20e-6       # InfiniBand across nodes, per GPU
    inter_beta: float = 45e9


# ---------------------------------------------------------------- parameters and model states
def gpt_params(hidden: int, layers: int, vocab: int) -> float:
    """N ≈ h·V + L·(12h² + 13h) + 2h for a GPT-style model."""
    return hidden * vocab + layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden


def model_state_bytes(psi: float, zero_stage: int = 0, dp: int = 1, param_bytes: float = 2,
                      grad_bytes: float = 2, optim_bytes: float = 12) -> dict:
    """Parameters, gradients and optimizer state per rank under ZeRO stage 0-3 with Nd = dp.

    stage 1: 4Ψ + kΨ/Nd;  stage 2: 2Ψ + (2Ψ + kΨ)/Nd;  stage 3: (4Ψ + kΨ)/Nd  (mixed precision)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    shard = lambda stage: dp if zero_stage >= stage else 1
    return {"params": param_bytes * psi / shard(3), "grads": grad_bytes * psi / shard(2),
            "optimizer": optim_bytes * psi / shard(1)}


def lora_matrix_params(n_in: int, n_out: int, rank: int) -> int:
    """LoRA's A (r×in) and B (out×r) of one in→out matrix (Hu et al. 2021): r·(in+out).
    The DPO memory planner (dpo_lab.memory.planner) counts its adapters with it too."""
    return rank * (n_in + n_out)


def lora_params(model: ModelConfig, rank: int = 16) -> float:
    """LoRA on the 4 attention (h×h) and 2 MLP (h×4h) matrices of a GPT layer: r·(in+out) each."""
    h = model.hidden
    per_layer = 4 * lora_matrix_params(h, h, rank) + 2 * lora_matrix_params(h, 4 * h, rank)
    return model.layers * per_layer


# ---------------------------------------------------------------- activations and the pipeline
ATTENTION = ("eager", "sdpa")


def activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, tp: int = 1,
                               sp: bool = False, attention: str = "eager") -> float:
    """Korthikanti et al.: sbh(34 + 5as/h) without parallelism; sbh(10 + 24/t + 5as/(ht)) with TP;
    (sbh/t)(34 + 5as/h) with TP + SP. 16-bit activations, no recomputation.

    attention="eager" (the paper's count) stores the s×s scores: softmax output, dropout mask and
    dropout output, 5as²b bytes. attention="sdpa" is a fused kernel (FlashAttention, Dao et al. 2022;
    torch's scaled_dot_product_attention) that recomputes them in the backward and keeps only one
    fp32 log-sum-exp per query and head: 4asb bytes instead."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    s, b, h, a, t = seq, batch, hidden, heads, tp
    scores = 5 * a * s / h if attention == "eager" else 4 * a / h  # per sbh, before the split by t
    if sp:
        return s * b * h / t * (34 + scores)
    if t == 1:
        return s * b * h * (34 + scores)
    return s * b * h * (10 + 24 / t + scores / t)


def logits_bytes(seq: int, seqs: int, vocab: int, tp: int = 1, logit_bytes: float = 2,
                 reference_after: bool = False) -> float:
    """Peak bytes of the output layer for `seqs` sequences of `seq` tokens, as lesson 06's trainer
    computes log-probs (logits → .float() → log_softmax → gather), counted per logit entry:

    backward: the fp32 log-softmax kept for backward, its gradient and the logits' gradient: 3 × 4.
    reference_after (DPO whose reference forward runs after the policy's, as in lesson 06's trainer):
      the policy's kept log-softmax (4) while the reference materialises its logits (logit_bytes),
      their fp32 copy (4, none if already fp32) and its log-softmax (4): 14 bytes with bf16 logits.
    The peak is the larger of the two. Megatron's vocabulary-parallel output layer splits V by t."""
    if min(seq, seqs, vocab, tp) < 1:
        raise ValueError(f"seq, seqs, vocab and tp must be >= 1, got {seq}, {seqs}, {vocab}, {tp}")
    per_entry = 3 * 4
    if reference_after:
        per_entry = max(per_entry, 4 + logit_bytes + (4 if logit_bytes < 4 else 0) + 4)
    return seq * seqs * vocab * per_entry / tp


def bubble_ratio(p: int, m: int, v: int = 1) -> float:
    """Pipeline bubble / ideal compute time: (p−1)/(v·m) (GPipe and 1F1B have v = 1)."""
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"p, m and v must be >= 1, got p={p}, m={m}, v={v}")
    return (p - 1) / (v * m)


def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Share of the step spent idle: (p−1)/(m+p−1) for v = 1."""
    r = bubble_ratio(p, m, v)
    return r / (1 + r)


# ---------------------------------------------------------------- the alpha-beta model
def ring_all_reduce_time(size_bytes: float, n: int, alpha: float, beta: float) -> float:
    """T = 2(n−1)·α + 2(n−1)/n · S/β."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * size_bytes / beta


def tree_all_reduce_time(size_bytes: float, n: int, alpha: float, beta: float) -> float:
    """Pipelined (double) binary tree: reduce up, broadcast down, T = 2⌈log₂n⌉·α + 2·S/β.
    Latency grows with log n instead of n, bandwidth as the ring's for large n (Sanders, Speck and
    Träff 2009; NCCL's double binary trees)."""
    if n == 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * alpha + 2 * size_bytes / beta


def all_reduce_time(size_bytes: float, n: int, alpha: float, beta: float) -> float:
    """The faster of ring and tree: small messages go by tree (latency), large ones by ring."""
    return min(ring_all_reduce_time(size_bytes, n, alpha, beta), tree_all_reduce_time(size_bytes, n, alpha, beta))


def ring_all_gather_time(size_bytes: float, n: int, alpha: float, beta: float) -> float:
    """All-gather or reduce-scatter of S bytes in total: (n−1)·α + (n−1)/n · S/β."""
    if n == 1:
        return 0.0
    return (n - 1) * alpha + (n - 1) / n * size_bytes / beta


def fit_alpha_beta(sizes_bytes, seconds, n: int) -> tuple[float, float]:
    """Least-squares α (s) and β (bytes/s) of the ring all-reduce model from measured times.

    Relative errors are minimised (each row divided by its time) so 1 KiB and 64 MiB count alike."""
    S, t = np.asarray(sizes_bytes, float), np.asarray(seconds, float)
    if len(S) < 2 or len(S) != len(t):
        raise ValueError(f"need >= 2 (size, time) pairs of equal length, got {len(S)} and {len(t)}")
    A = np.stack([np.full_like(S, 2 * (n - 1)), 2 * (n - 1) / n * S], axis=1) / t[:, None]
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    return max(float(alpha), 0.0), 1.0 / max(float(inv_beta), 1e-30)


# ---------------------------------------------------------------- a whole DPO (or plain) run
METHODS = ("pretrain", "dpo_full", "dpo_qlora")


def trainable_params(model: ModelConfig, method: str, lora_rank: int = 16) -> float:
    return lora_params(model, lora_rank) if method == "dpo_qlora" else model.params


def memory_per_gpu(model: ModelConfig, plan: Plan, method: str = "dpo_full",
                   lora_rank: int = 16, attention: str = "sdpa") -> dict:
    """Bytes per GPU, by component, for `method`:

    pretrain   16Ψ of mixed-precision Adam state, sharded by TP·PP and by ZeRO over DP.
    dpo_full   the same for the policy, plus a frozen bf16 reference (2Ψ, sharded like the policy's
               parameters); chosen and rejected run as one batch, so activations are for 2b sequences.
    dpo_qlora  NF4 base (4.127 bits/param, sharded over DP under ZeRO-3 = FSDP+QLoRA), 16 bytes per
               LoRA parameter; the reference is the base with adapters off, so it costs nothing extra.

    Activations follow Korthikanti et al. with `attention` ("sdpa": no stored s² scores, the default,
    as in lesson 06's run; "eager": the paper's count). The output layer adds `logits_bytes` (with the
    reference forward after the policy's for DPO) for one micro-batch on the last pipeline stage; with
    p > 1 stages the reported activations are those of the fuller stage: the first keeps p
    micro-batches in flight (1F1B), the last one micro-batch plus the logits.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; have {METHODS}")
    split = plan.tp * plan.pp  # TP and PP split every parameter tensor or layer
    out = {}
    if method == "dpo_qlora":
        base_shard = plan.dp if plan.zero_stage == 3 else 1
        out["base_weights"] = model.params * NF4_BITS / 8 / split / base_shard
        out.update(model_state_bytes(lora_params(model, lora_rank) / split, plan.zero_stage,
                                     plan.dp, **MIXED_PRECISION))
    else:
        out.update(model_state_bytes(model.params / split, plan.zero_stage, plan.dp, **MIXED_PRECISION))
        if method == "dpo_full":
            out["reference"] = 2 * model.params / split / (plan.dp if plan.zero_stage == 3 else 1)
    seqs = model.micro_batch * (1 if method == "pretrain" else 2)
    layers_here = math.ceil(model.layers / plan.pp)
    in_flight = min(plan.pp, plan.micro_batches)  # 1F1B keeps at most p micro-batches alive
    full_layer = activation_bytes_per_layer(model.seq, seqs, model.hidden, model.heads, plan.tp, plan.sp,
                                            attention)
    if plan.checkpointing:  # each layer keeps its input; one layer's full activations recomputed
        per_layer = 2 * model.seq * seqs * model.hidden / (plan.tp if plan.sp else 1)
        acts = lambda n: per_layer * layers_here * n + full_layer
    else:
        acts = lambda n: full_layer * layers_here * n
    logits = logits_bytes(model.seq, seqs, model.vocab, plan.tp, reference_after=method != "pretrain")
    first, last = acts(in_flight), acts(1) + logits
    if plan.pp == 1 or last >= first:  # one stage holds both, or the last stage is the fuller one
        out["activations"], out["logits"] = acts(1 if plan.pp > 1 else in_flight), logits
    else:
        out["activations"], out["logits"] = first, 0.0
    out["total"] = sum(out.values())
    return out


def flops_per_token(model: ModelConfig, method: str = "pretrain") -> float:
    """Training: 6N + 12·L·h·s. DPO adds a reference forward (2N + 4Lhs); QLoRA skips the
    weight-gradient half of the backward (≈ 2N) since only the adapters learn."""
    N, L, h, s = model.params, model.layers, model.hidden, model.seq
    train = 6 * N + 12 * L * h * s
    if method == "pretrain":
        return train
    ref_forward = 2 * N + 4 * L * h * s
    if method == "dpo_qlora":
        train -= 2 * N
    return train + ref_forward


def step_time(model: ModelConfig, plan: Plan, method: str = "dpo_full", global_batch: int = 512,
              hw: Hardware = Hardware(), lora_rank: int = 16, overlap: float = 0.0) -> dict:
    """Seconds per optimizer step for `global_batch` sequences (DPO: pairs): compute at `hw.mfu`
    stretched by the pipeline bubble (and by one more forward under recomputation), plus
    data-parallel and tensor-parallel communication.

    `overlap` is the fraction of the data-parallel communication hidden behind compute (DDP's bucketed
    all-reduce during the backward, FSDP's prefetched all-gathers): 0 counts it all (an upper bound),
    1 hides it up to the compute time. Tensor-parallel all-reduces sit between dependent matmuls, so
    they stay exposed."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    seqs = global_batch * (1 if method == "pretrain" else 2)
    tokens = seqs * model.seq
    compute = flops_per_token(model, method) * tokens / (plan.gpus * hw.peak_flops * hw.mfu)
    compute *= 1 + bubble_ratio(plan.pp, plan.micro_batches)
    if plan.checkpointing:  # recomputation costs one more forward: +1/3 of the 3-pass training compute
        compute *= 4 / 3
    # Ranks of one DP group sit in different nodes once TP·PP fill a node.
    cross_node = plan.gpus > hw.gpus_per_node
    a, b = (hw.inter_alpha, hw.inter_beta) if cross_node else (hw.intra_alpha, hw.intra_beta)
    grad_bytes = 2 * trainable_params(model, method, lora_rank) / (plan.tp * plan.pp)
    if plan.zero_stage == 3:  # all-gather forward + backward, reduce-scatter: 3Ψ instead of 2Ψ
        gathered = grad_bytes if method != "dpo_qlora" else model.params * NF4_BITS / 8 / (plan.tp * plan.pp)
        dp_comm = 2 * ring_all_gather_time(gathered, plan.dp, a, b) + ring_all_gather_time(grad_bytes, plan.dp, a, b)
    else:
        dp_comm = all_reduce_time(grad_bytes, plan.dp, a, b)
    # Megatron TP: 2 all-reduces forward + 2 backward per layer of s·b·h bf16 activations.
    per_rank_seqs = seqs / plan.dp
    act = 2 * model.seq * per_rank_seqs * model.hidden
    tp_comm = 4 * model.layers / plan.pp * all_reduce_time(act, plan.tp, hw.intra_alpha, hw.intra_beta)
    hidden = overlap * min(dp_comm, compute)
    total = compute + dp_comm - hidden + tp_comm
    return {"compute": compute, "dp_comm": dp_comm, "dp_comm_hidden": hidden, "tp_comm": tp_comm,
            "total": total, "tokens_per_s": tokens / total}


def rank_plans(model: ModelConfig, method: str, gpus: int, hw: Hardware = Hardware(),
               global_batch: int = 512, lora_rank: int = 16, attention: str = "sdpa",
               overlap: float = 0.0) -> list:
    """Every layout of `gpus` GPUs that fits in `hw.memory_bytes` (with 10% headroom), fastest first
    (ties, e.g. ZeRO-0/1/2 whose traffic is the same, go to the smaller memory): a list of
    (plan, memory dict, time dict). Tries TP ≤ one node, PP, ZeRO stage and recomputation."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    fits = []
    for tp, pp, stage, ckpt in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16), (0, 1, 2, 3), (False, True)):
        if tp > hw.gpus_per_node or gpus % (tp * pp) or model.layers < pp:
            continue
        dp = gpus // (tp * pp)
        if dp > global_batch or (dp == 1 and stage > 0):  # ZeRO shards nothing over one replica
            continue
        m = max(1, min(global_batch // dp, 4 * pp)) if pp > 1 else 1
        plan = Plan(dp=dp, tp=tp, pp=pp, zero_stage=stage, sp=tp > 1, micro_batches=m, checkpointing=ckpt)
        mem = memory_per_gpu(model, plan, method, lora_rank, attention)
        if mem["total"] > 0.9 * hw.memory_bytes:
            continue
        fits.append((plan, mem, step_time(model, plan, method, global_batch, hw, lora_rank, overlap)))
    return sorted(fits, key=lambda f: (f[2]["total"], f[1]["total"]))


def best_plan(model: ModelConfig, method: str, gpus: int, hw: Hardware = Hardware(),
              global_batch: int = 512, lora_rank: int = 16, attention: str = "sdpa",
              overlap: float = 0.0):
    """The fastest plan that fits (`rank_plans`' first): (plan, memory dict, time dict), or None."""
    ranked = rank_plans(model, method, gpus, hw, global_batch, lora_rank, attention, overlap)
    return ranked[0] if ranked else None
