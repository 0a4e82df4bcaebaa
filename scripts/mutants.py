#!/usr/bin/env python
"""Hand-written mutation testing: plant one realistic bug at a time and see whether the tests notice.

    python scripts/mutants.py                  # every mutant; prints killed/survived and the kill ratio
    python scripts/mutants.py --only NAME ...  # some of them (exact names, or a prefix ending in '*')
    python scripts/mutants.py --list           # names, files and what each plants
    python scripts/mutants.py --check          # only check that every snippet still occurs once

Each mutant is (file, exact source snippet, replacement, description, tests). The script copies
the repository (without .git, build outputs and caches) into a temporary directory once, and for
each mutant writes the edited file there, runs `pytest -x -q -p no:cacheprovider <tests>` with
that copy first on PYTHONPATH (spawned ranks inherit it), then restores the file. Tracked files
are never edited. A mutant is killed when pytest fails or times out; it survives when pytest
passes. A snippet that no longer occurs exactly once is an error, so the list cannot silently rot.

The tests named per mutant are the fast unit tests that should catch it (not the notebooks).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # per mutant: a hang guard only (a mutant that hangs a collective is killed by it)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    why: str
    tests: tuple


def M(name, file, old, new, why, *tests):
    return Mutant(name, file, old, new, why, tests)


T = "tests/"
NORMS, ATTN, LOSS = "dpo_lab/arch/norms.py", "dpo_lab/arch/attention.py", "dpo_lab/dpo/loss.py"
TOY, BATCH = "dpo_lab/dpo/toy.py", "dpo_lab/dpo/batching.py"
COLL, DP, ZERO = "dpo_lab/parallel/collectives.py", "dpo_lab/parallel/data_parallel.py", "dpo_lab/parallel/zero.py"
FSDP, TP, SP = "dpo_lab/parallel/fsdp.py", "dpo_lab/parallel/tensor.py", "dpo_lab/parallel/sequence.py"
PP, SCHED, EP = "dpo_lab/parallel/pipeline.py", "dpo_lab/parallel/schedules.py", "dpo_lab/parallel/expert.py"
MESH, COST = "dpo_lab/parallel/mesh.py", "dpo_lab/parallel/cost.py"
TASK, DATA = "dpo_lab/task.py", "dpo_lab/data.py"
LAUNCH, DEMOS = "dpo_lab/parallel/launch.py", "dpo_lab/parallel/demos.py"
CONFIG, MODELS = "dpo_lab/dpo/config.py", "dpo_lab/models.py"

DP_RANKS = T + "test_dp_correctness.py"  # ranks that differ: unused parameters, no_sync, a 2nd backward
DP_UNUSED = DP_RANKS + "::test_parameter_used_on_some_ranks_only_matches_single_process_and_ddp"
DP_ACCUM = DP_RANKS + "::test_gradient_accumulation_with_no_sync_matches_single_process_and_ddp"
DP_TWICE = DP_RANKS + "::test_second_backward_before_the_sync_raises"
CONFIG_CLI = T + "test_dpo_config.py::test_cli_names_the_bad_key_and_value_and_exits_2_before_any_rank"
CONFIG_STRICT = T + "test_strict_config.py"  # every range and type rule at its boundary

# the single-process MoE tests (the expert-parallel launches run only where a mutant needs them)
MOE_UNIT = tuple(T + "test_expert.py::" + t for t in (
    "test_capacity_drops_the_late_tokens_first_choices_first", "test_capacity_rounds_up",
    "test_gates_are_the_top_k_probabilities_renormalised", "test_load_balancing_loss_by_hand_with_two_choices",
    "test_load_balancing_loss_is_one_when_uniform_and_larger_when_skewed", "test_moe_equals_per_token_loop",
    "test_larger_capacity_factor_drops_fewer_tokens"))

MUTANTS = [
    # ---------------------------------------------------------------- arch/norms
    M("bn-eps-outside-sqrt", NORMS, "torch.sqrt(var.view(shape) + self.eps)",
      "(torch.sqrt(var.view(shape)) + self.eps)", "BatchNorm: ε added after the square root",
      T + "test_strict_norms.py", T + "test_norms.py"),
    M("bn-running-var-biased", NORMS, "unbiased = var * n / max(n - 1, 1)", "unbiased = var",
      "BatchNorm tracks the biased variance", T + "test_norms.py"),
    M("bn-momentum-flipped", NORMS, "self.running_mean.lerp_(mean, self.momentum)",
      "self.running_mean.lerp_(mean, 1 - self.momentum)", "BatchNorm running mean: momentum reversed",
      T + "test_norms.py"),
    M("ln-eps-outside-sqrt", NORMS, "torch.rsqrt(var + self.eps)", "1 / (torch.sqrt(var) + self.eps)",
      "LayerNorm: ε added after the square root", T + "test_strict_norms.py", T + "test_norms.py"),
    M("rms-eps-outside-sqrt", NORMS, "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)",
      "1 / (xf.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)", "RMSNorm: ε added after the square root",
      T + "test_strict_norms.py", T + "test_norms.py"),
    M("weightnorm-whole-norm", NORMS, "return self.g * self.v / self.v.norm(dim=1, keepdim=True)",
      "return self.g * self.v / self.v.norm()", "WeightNorm divides by the whole matrix's norm",
      T + "test_norms.py"),
    # ---------------------------------------------------------------- arch/attention
    M("attn-scale-by-d", ATTN, "scores = (qg @ k.transpose(-2, -1) / math.sqrt(d))",
      "scores = (qg @ k.transpose(-2, -1) / d)", "attention scores scaled by 1/d, not 1/√d",
      T + "test_attention.py::test_equals_sdpa"),
    M("attn-causal-off-by-one", ATTN,
      "        sk = k.shape[-2]\n        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)",
      "        sk = k.shape[-2]\n        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=q_offset + 1)",
      "causal mask lets each position see the next one", T + "test_attention.py::test_equals_sdpa"),
    M("attn-softmax-dim", ATTN, "probs = torch.softmax(scores.float(), dim=-1)",
      "probs = torch.softmax(scores.float(), dim=-2)", "grouped attention softmax over the wrong axis",
      T + "test_attention.py::test_equals_sdpa"),
    M("rope-rotation-sign", ATTN, "rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)",
      "rotated = torch.cat([x[..., half:], -x[..., :half]], dim=-1)", "RoPE rotates the other way",
      T + "test_attention.py::test_equals_transformers"),
    M("rope-freq-off-by-one", ATTN, "dtype=torch.float32, device=positions.device) / head_dim))",
      "dtype=torch.float32, device=positions.device) / (head_dim - 2)))", "RoPE frequencies: wrong exponent",
      T + "test_attention.py::test_equals_transformers"),
    M("kv-cache-positions-restart", ATTN,
      "start = cache.seq_len(self.layer_idx) if cache is not None else 0", "start = 0",
      "decoding with a cache restarts RoPE positions at 0", T + "test_attention.py::test_cached_decoding_equals_full_forward"),
    M("attn-kv-heads-zero-check", ATTN, "n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads",
      "n_kv_heads = n_kv_heads or n_heads", "n_kv_heads=0 silently means multi-head attention",
      T + "test_edges.py::test_attention_rejects_fewer_than_one_kv_head"),
    M("attn-odd-head-dim-check", ATTN, "        if (dim // n_heads) % 2:", "        if False:",
      "an odd head dimension reaches RoPE", T + "test_edges.py::test_attention_rejects_a_head_dim_rope_cannot_rotate"),
    # ---------------------------------------------------------------- dpo/loss
    M("logps-target-off-by-one", LOSS, "logp.gather(-1, input_ids[:, 1:, None])",
      "logp.gather(-1, input_ids[:, :-1, None])", "log-probs gathered for the current, not the next token",
      T + "test_dpo_loss.py"),
    M("logps-softmax-dim", LOSS, "torch.log_softmax(logits[:, :-1].float(), dim=-1)",
      "torch.log_softmax(logits[:, :-1].float(), dim=1)", "log_softmax over the sequence axis",
      T + "test_dpo_loss.py"),
    M("logps-average-no-clamp", LOSS, "total / mask.sum(-1).clamp(min=1)", "total / mask.sum(-1)",
      "average log-prob of a completion with no tokens is NaN", T + "test_strict_loss.py", T + "test_dpo_loss.py"),
    M("smoothing-sign", LOSS, "- eps * F.logsigmoid(-beta * delta)\n",
      "+ eps * F.logsigmoid(-beta * delta)\n", "conservative DPO: label-smoothing term with the wrong sign",
      T + "test_strict_loss.py", T + "test_dpo_loss.py"),
    M("robust-no-denominator", LOSS, ") / (1 - 2 * eps)", ")", "robust DPO without its 1/(1−2ε)",
      T + "test_strict_loss.py", T + "test_dpo_loss.py"),
    M("hinge-no-margin", LOSS, "torch.relu(1 - beta * delta)", "torch.relu(-beta * delta)",
      "hinge loss without its margin of 1", T + "test_strict_loss.py", T + "test_dpo_loss.py"),
    M("ipo-rejected-by-chosen-length", LOSS, "rejected_score / rejected_lengths.clamp(min=1)",
      "rejected_score / chosen_lengths.clamp(min=1)", "IPO divides the rejected log-ratio by the chosen length",
      T + "test_strict_loss.py", T + "test_dpo_loss.py"),
    M("reward-beta-twice", LOSS, "chosen_rewards = beta * chosen_logratios.detach()",
      "chosen_rewards = beta * beta * chosen_logratios.detach()", "β applied twice to the chosen reward",
      T + "test_strict_loss.py", T + "test_dpo_loss.py"),
    M("beta-check-dropped", LOSS, "if not float(beta) > 0:", "if float(beta) < 0:",
      "β = 0 accepted", T + "test_edges.py::test_dpo_loss_rejects_non_positive_beta"),
    M("loss-shape-check-dropped", LOSS, "        if tuple(t.shape) != tuple(ref.shape):", "        if t.dim() != ref.dim():",
      "pairs of different counts broadcast against each other", T + "test_edges.py::test_dpo_loss_rejects_mismatched_shapes"),
    M("ipo-one-length-accepted", LOSS, "if (chosen_lengths is None) != (rejected_lengths is None):",
      "if chosen_lengths is None and rejected_lengths is not None:", "IPO with chosen lengths alone",
      T + "test_edges.py::test_ipo_needs_both_lengths"),
    # ---------------------------------------------------------------- dpo/toy
    M("toy-logz-sign", TOY, "return torch.logsumexp(ref_logp + reward / beta, dim=-1)",
      "return torch.logsumexp(ref_logp - reward / beta, dim=-1)", "log Z with the reward's sign flipped",
      T + "test_toy.py"),
    M("toy-kl-reversed", TOY, "return (logp.exp() * (logp - ref_logp)).sum(-1)",
      "return (ref_logp.exp() * (ref_logp - logp)).sum(-1)", "KL(π_ref ‖ π) instead of KL(π ‖ π_ref)",
      T + "test_toy.py"),
    M("toy-objective-no-beta", TOY, "- beta * (p * (logp - ref_logp)).sum(-1)",
      "- (p * (logp - ref_logp)).sum(-1)", "RLHF objective without β on the KL", T + "test_toy.py"),
    M("toy-pairs-allow-ties", TOY, "j = (i + torch.randint(1, k, (pairs_per_prompt,), generator=g)) % k",
      "j = torch.randint(k, (pairs_per_prompt,), generator=g)", "sampled pairs may compare a response with itself",
      T + "test_toy.py"),
    # ---------------------------------------------------------------- dpo/batching
    M("collate-mask-prompt", BATCH, "m = [0] * len(ex[\"prompt_ids\"]) + [1] * len(ex[key])",
      "m = [1] * len(ex[\"prompt_ids\"]) + [1] * len(ex[key])", "prompt tokens counted in the loss",
      T + "test_dpo_config.py::test_batch_masks_completion_and_eos"),
    M("plan-rank-slice-off-by-one", BATCH, "return chunks[rank * self.grad_accum:(rank + 1) * self.grad_accum]",
      "return chunks[rank * self.grad_accum:(rank + 1) * self.grad_accum + 1]", "a rank takes one micro-batch too many",
      T + "test_dpo_config.py::test_plan_same_global_batch_on_1_and_2_ranks"),
    M("plan-same-permutation-every-epoch", BATCH, "manual_seed(self.seed * 100003 + epoch)",
      "manual_seed(self.seed * 100003)", "every epoch sees the rows in the same order",
      T + "test_dpo_config.py::test_plan_same_global_batch_on_1_and_2_ranks"),
    # ---------------------------------------------------------------- parallel/collectives
    M("ring-assign-not-add", COLL, "        chunks[recv_idx] += buf", "        chunks[recv_idx] = buf",
      "ring reduce-scatter replaces the partial sum (and writes nothing into the tensor)",
      T + "test_collectives.py::test_naive_and_ring_equal_dist_all_reduce"),
    M("naive-overwrites", COLL, "            t += buf", "            t.copy_(buf)",
      "naive all-reduce keeps the last rank's tensor instead of the sum",
      T + "test_collectives.py::test_naive_and_ring_equal_dist_all_reduce"),
    M("busbw-allgather-factor", COLL, "\"all_gather\": lambda n: (n - 1) / n,",
      "\"all_gather\": lambda n: 2 * (n - 1) / n,", "all-gather bus bandwidth with the all-reduce factor",
      T + "test_collectives.py::test_bandwidth_factors"),
    # ---------------------------------------------------------------- parallel/data_parallel
    M("dp-no-average", DP, "            grad.div_(self.world_size)\n", "",
      "unbucketed DP sums gradients instead of averaging", T + "test_data_parallel.py::test_dp_equals_single_and_ddp_with_and_without_buckets"),
    M("dp-bucket-no-average", DP, "torch.cat([p.grad.reshape(-1) for p in bucket]).div_(self.world_size)",
      "torch.cat([p.grad.reshape(-1) for p in bucket])", "bucketed DP sums gradients instead of averaging",
      T + "test_data_parallel.py::test_dp_equals_single_and_ddp_with_and_without_buckets"),
    M("dp-bucket-limit-inclusive", DP, "size + p.numel() * p.element_size() > limit",
      "size + p.numel() * p.element_size() >= limit", "a bucket that would be exactly full is split",
      T + "test_strict_data_parallel.py"),
    M("dp-bytes-one-way", DP, "self.bytes_sent += 2 * (self.world_size - 1) * grad.numel()",
      "self.bytes_sent += (self.world_size - 1) * grad.numel()",
      "all-reduce volume counted as one pass", T + "test_data_parallel.py::test_dp_equals_single_and_ddp_with_and_without_buckets"),
    M("dp-unused-bucket-skipped", DP, "        bucket = self.buckets[i]\n        for p in bucket:",
      "        bucket = self.buckets[i]\n        if all(p.grad is None for p in bucket):\n            return\n        for p in bucket:",
      "a bucket with no gradient on this rank is not all-reduced there (no zeros): collectives mismatch",
      DP_UNUSED),
    M("dp-bucket-order-by-readiness", DP,
      "        self.ready[i] += 1\n"
      "        while self.next_bucket < len(self.buckets) and \\\n"
      "                self.ready[self.next_bucket] == len(self.buckets[self.next_bucket]):\n"
      "            self._launch(self.next_bucket)\n\n"
      "    def _launch(self, i: int) -> None:\n"
      "        assert i == self.next_bucket, (i, self.next_bucket)  # one order on every rank\n"
      "        self.next_bucket += 1\n",
      "        self.ready[i] += 1\n"
      "        if self.ready[i] == len(self.buckets[i]):  # launched as soon as it is full\n"
      "            self._launch(i)\n\n"
      "    def _launch(self, i: int) -> None:\n"
      "        if i == self.next_bucket:\n"
      "            self.next_bucket += 1\n"
      "        if any(j == i for j, _, _ in self.pending):\n"
      "            return\n",
      "buckets launched in the order they become ready on this rank, not in one order everywhere",
      DP_UNUSED),
    M("dp-no-sync-ignored", DP, "before, self.require_sync = self.require_sync, False",
      "before = self.require_sync", "no_sync() communicates anyway", DP_ACCUM),
    M("dp-second-backward-unchecked", DP, "if i < self.next_bucket:  # its all-reduce is in flight",
      "if False:  # its all-reduce is in flight", "a second backward before the sync adds into a gradient being reduced",
      DP_TWICE),
    M("dp-unused-mask-local", DP, "dist.all_reduce(used, async_op=True)", "dist.all_reduce(used.clone(), async_op=True)",
      "find_unused_parameters: each rank decides from its own used-mask (the reduced copy is dropped)",
      DP_UNUSED),
    M("dp-unused-grad-kept", DP, "                    p.grad = None\n", "                    pass\n",
      "find_unused_parameters: a parameter no rank used keeps a zero gradient (AdamW decays it)", DP_UNUSED),
    # ---------------------------------------------------------------- parallel/zero
    M("zero-shard-floor", ZERO, "k = math.ceil(numel / world_size)", "k = numel // world_size",
      "ZeRO pieces rounded down: the tail of each parameter is never owned", T + "test_zero.py::test_shard_range_covers_every_element_once"),
    M("zero2-no-average", ZERO, "full = padded(p.grad.reshape(-1), k * self.world_size).div_(self.world_size)",
      "full = padded(p.grad.reshape(-1), k * self.world_size)", "ZeRO-2 reduce-scatter sums instead of averaging",
      T + "test_zero.py"),
    M("zero2-grad-accum-overwrites", ZERO, "shard.grad = g if shard.grad is None else shard.grad + g",
      "shard.grad = g", "ZeRO-2 drops the gradient of earlier micro-batches (accumulation)",
      T + "test_strict_zero.py"),
    M("zero2-unused-skipped", ZERO, "        if p.grad is None:  # unused on this rank: it still takes part, with zeros\n"
      "            p.grad = torch.zeros_like(p)\n",
      "        if p.grad is None:  # unused on this rank: it still takes part, with zeros\n            return\n",
      "ZeRO-2: a parameter without a gradient on this rank is not reduce-scattered there", DP_UNUSED),
    M("zero2-order-by-readiness", ZERO,
      "        self.ready[i] = True\n        while self.launched < len(self.order) and self.ready[self.order[self.launched]]:\n"
      "            self._launch_next()\n",
      "        self.ready[i] = True\n        self.order.remove(i)\n        self.order.insert(self.launched, i)\n"
      "        self.position = {i: j for j, i in enumerate(self.order)}\n        self._launch_next()\n",
      "ZeRO-2: reduce-scatters launched in the order gradients become ready on this rank", DP_UNUSED),
    M("zero2-second-backward-unchecked", ZERO, "if self.position[i] < self.launched:", "if False:",
      "ZeRO-2: a second backward before the sync is silently lost", DP_TWICE),
    # ---------------------------------------------------------------- parallel/fsdp
    M("fsdp-no-average", FSDP, "grad = grad.div_(n).contiguous()", "grad = grad.contiguous()",
      "FSDP reduce-scatter sums instead of averaging", T + "test_fsdp.py::test_fsdp_with_tied_and_frozen_parameters"),
    M("fsdp-grad-accum-overwrites", FSDP, "unit.shard.grad = g if unit.shard.grad is None else unit.shard.grad + g",
      "unit.shard.grad = g", "FSDP drops the gradient of earlier micro-batches (accumulation)",
      T + "test_strict_fsdp.py"),
    M("fsdp-bytes-n", FSDP, "self.fsdp.bytes_sent += (n - 1) * self.k * send.element_size()",
      "self.fsdp.bytes_sent += n * self.k * send.element_size()", "all-gather volume counts the rank's own shard",
      T + "test_fsdp.py::test_fsdp_equals_single_and_fsdp2"),
    M("fsdp-accepts-bf16", FSDP, "if p.requires_grad and p.dtype != torch.float32", "if False",
      "FSDP silently trains a bf16 module in fp32", T + "test_edges.py::test_fsdp_on_a_bf16_module_raises_on_every_rank"),
    # ---------------------------------------------------------------- parallel/tensor
    M("vocab-embed-boundary", TP, "outside = (tokens < self.lo) | (tokens >= self.hi)",
      "outside = (tokens < self.lo) | (tokens > self.hi)", "the token at a shard's upper boundary is looked up twice",
      T + "test_strict_tensor.py"),
    M("vocab-ce-sum-of-max", TP, "dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)",
      "dist.all_reduce(zmax, group=group)", "vocab-parallel cross-entropy shifts by the sum of the maxima",
      T + "test_strict_tensor.py"),
    M("vocab-ce-grad-unmasked", TP, "-inside[..., None].to(g.dtype)", "-torch.ones_like(g[..., :1])",
      "every rank subtracts the one-hot, not only the owner of the target",
      T + "test_tensor_parallel.py::test_vocab_parallel_embedding_and_cross_entropy_equal_torch"),
    M("vocab-ce-mean-counts-ignored", TP, "return loss.sum() / (target != ignore_index).sum()",
      "return loss.sum() / target.numel()", "vocab CE mean divides by every row, ignored ones included",
      T + "test_vocab_parallel_ce.py::test_equals_torch_cross_entropy_with_ignore_index"),
    M("vocab-ce-ignored-grad", TP, "        grad = grad.masked_fill(ignored, 0.0)\n", "",
      "vocab CE: ignored rows still get a softmax gradient",
      T + "test_vocab_parallel_ce.py::test_equals_torch_cross_entropy_with_ignore_index"),
    M("vocab-ce-ignore-index-fixed", TP, "ignored = target == ignore_index", "ignored = target == -100",
      "vocab CE: ignore_index other than -100 not honoured",
      T + "test_vocab_parallel_ce.py::test_equals_torch_cross_entropy_with_ignore_index"),
    M("vocab-ce-range-check-local", TP, "        if zmax[-1] > 0:\n", "        if bad.any():\n",
      "vocab CE: an out-of-range target raises only on the rank that holds it; the others wait",
      T + "test_vocab_parallel_ce.py::test_out_of_range_targets_raise_on_every_rank"),
    M("vocab-ce-range-upper-inclusive", TP, "bad = ~ignored & ((target < 0) | (target >= vocab))",
      "bad = ~ignored & ((target < 0) | (target > vocab))", "vocab CE: target == V accepted",
      T + "test_vocab_parallel_ce.py::test_out_of_range_targets_raise_on_every_rank"),
    M("tp-f-backward-no-reduce", TP, "        return _all_reduce(grad, ctx.group, \"backward\"), None",
      "        return grad, None", "f does not all-reduce the input gradient",
      T + "test_tensor_parallel.py::test_parallel_block_equals_unsplit_forward_and_gradients"),
    # ---------------------------------------------------------------- parallel/sequence
    M("sp-bias-not-synced", TP, "[*self.attn_norm.parameters(), *self.mlp_norm.parameters(), self.mlp.down.bias]",
      "[*self.attn_norm.parameters(), *self.mlp_norm.parameters()]", "SP: the MLP bias gradient stays partial",
      T + "test_sequence_parallel.py::test_sequence_parallel_equals_tensor_parallel"),
    M("sp-activation-formula", SP, "elems = 2 * sbh + (14 * sbh + kv + attn + 2 * s * b) // t",
      "elems = 2 * sbh + (14 * sbh + kv + attn) // t + 2 * s * b", "SP formula: norm statistics not sharded",
      T + "test_sequence_parallel.py::test_measured_activation_bytes_match_formula"),
    M("korthikanti-tp-scores", SP, "return s * b * h * (10 + 24 / t + scores / t)",
      "return s * b * h * (10 + 24 / t + scores)", "Korthikanti TP formula: attention scores not split by t",
      T + "test_sequence_parallel.py::test_korthikanti_formulas"),
    # ---------------------------------------------------------------- parallel/pipeline + schedules
    M("pp-loss-not-averaged", PP, "targets[a.microbatch].flatten()) / m", "targets[a.microbatch].flatten())",
      "pipeline loss summed over micro-batches, not averaged", T + "test_pipeline.py::test_four_stages_equal_unsplit_model"),
    M("pp-bubble-per-stage", PP, "return 1.0 - busy / (p * (end - start))", "return 1.0 - busy / (end - start)",
      "measured bubble forgets the number of stages", T + "test_pipeline.py::test_bubble_from_events"),
    M("pp-check-dropped", PP, "    check_microbatches(schedule, microbatches, targets)\n", "",
      "micro-batches of unequal shape reach the executor", T + "test_edges.py::test_pipeline_with_bad_microbatches_raises_on_every_rank"),
    M("pp-check-local-only", PP, "    found = [None] * dist.get_world_size()\n",
      "    if problem:\n        raise ValueError(problem)\n    found = [None] * dist.get_world_size()\n",
      "the micro-batch check raises only where it sees the problem; the other ranks wait",
      T + "test_edges.py::test_pipeline_with_bad_microbatches_raises_on_every_rank"),
    M("pp-replayed-wall-clock", PP, "return bubble_fraction(simulate(executed_order(events, p), t_f, t_b))",
      "return bubble_from_events(events, p)", "the replayed bubble is the wall-clock one (depends on load)",
      T + "test_pipeline.py::test_replayed_bubble_is_the_formula_whatever_the_wall_clock"),
    M("1f1b-warmup-off-by-one", SCHED, "warmup = min(p - r - 1, m)", "warmup = min(p - r, m)",
      "1F1B: one warm-up forward too many", T + "test_schedules.py"),
    M("interleaved-warmup-off-by-one", SCHED, "warmup = min((p - r - 1) * 2 + (v - 1) * p, total)",
      "warmup = min((p - r - 1) * 2 + v * p, total)", "interleaved 1F1B: p warm-up forwards too many",
      T + "test_strict_schedules.py", T + "test_schedules.py"),
    M("bubble-formula", SCHED, "return (p - 1) / (v * m + p - 1)", "return (p - 1) / (v * m + p)",
      "bubble formula off by one", T + "test_schedules.py"),
    M("deps-last-stage", SCHED, "    if vs < last:\n", "    if vs < last - 1:\n",
      "the backward of the second-to-last virtual stage does not wait for the last",
      T + "test_schedules.py"),
    # ---------------------------------------------------------------- parallel/expert
    M("moe-gates-unnormalised", EP, "gate = top / top.sum(-1, keepdim=True) if k > 1 else top", "gate = top",
      "top-k gates not renormalised", *MOE_UNIT),
    M("moe-capacity-floor", EP, "max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))",
      "max(1, int(capacity_factor * n_tokens * k / n_experts))", "capacity rounded down", *MOE_UNIT),
    M("moe-aux-no-E", EP, "return n_experts * (f * r.probs.mean(0)).sum()", "return (f * r.probs.mean(0)).sum()",
      "load-balancing loss without its factor E", *MOE_UNIT),
    M("moe-aux-f-per-token", EP, "minlength=n_experts).float() / r.expert.numel()",
      "minlength=n_experts).float() / r.expert.shape[0]", "load share f divided by tokens, not assignments",
      *MOE_UNIT),
    M("moe-slots-forget-first-choices", EP, "pos = onehot.cumsum(0) - 1 + filled", "pos = onehot.cumsum(0) - 1",
      "second choices overwrite the first choices' slots", *MOE_UNIT),
    M("moe-keep-inclusive", EP, "slot < cap, gate, probs, cap", "slot <= cap, gate, probs, cap",
      "one token more than the capacity is kept", *MOE_UNIT),
    M("ep-token-check-dropped", EP, "        self._check_token_counts(tokens)\n", "",
      "unequal token counts reach the all-to-all", T + "test_edges.py::test_expert_parallel_with_unequal_token_counts_raises_on_every_rank"),
    # ---------------------------------------------------------------- parallel/mesh
    M("mesh-dp-groups-transposed", MESH, "dp_groups = [[d * tp + t for d in range(dp)] for t in range(tp)]",
      "dp_groups = [[t * dp + d for d in range(dp)] for t in range(tp)]", "data-parallel groups built like tensor-parallel ones",
      T + "test_mesh.py::test_grid_rows_are_tensor_parallel_columns_data_parallel"),
    M("mesh-dp-grad-not-averaged", MESH, "            p.grad /= dp\n", "",
      "dp × tp training sums the replicas' gradients", T + "test_mesh.py::test_dp_by_tp_training_equals_single_process"),
    # ---------------------------------------------------------------- parallel/cost
    M("cost-zero-stage-strict", COST, "shard = lambda stage: dp if zero_stage >= stage else 1",
      "shard = lambda stage: dp if zero_stage > stage else 1", "ZeRO stage s shards only what stage s+1 shards",
      T + "test_cost.py"),
    M("cost-allgather-alpha-n", COST, "return (n - 1) * alpha + (n - 1) / n * size_bytes / beta",
      "return n * alpha + (n - 1) / n * size_bytes / beta", "all-gather latency term counts n steps",
      T + "test_cost.py"),
    M("cost-flops-no-attention", COST, "train = 6 * N + 12 * L * h * s", "train = 6 * N",
      "training FLOPs without the attention term", T + "test_cost.py"),
    M("cost-no-bubble", COST, "    compute *= 1 + bubble_ratio(plan.pp, plan.micro_batches)\n", "",
      "step time ignores the pipeline bubble", T + "test_cost.py"),
    M("cost-no-reference", COST, "            out[\"reference\"] = 2 * model.params / split / (plan.dp if plan.zero_stage == 3 else 1)\n",
      "            out[\"reference\"] = 0.0\n", "full DPO forgets the reference model's weights", T + "test_cost.py"),
    M("cost-in-flight-m", COST, "in_flight = min(plan.pp, plan.micro_batches)", "in_flight = plan.micro_batches",
      "1F1B activations counted for every micro-batch (GPipe)", T + "test_cost.py"),
    M("cost-tp-two-allreduces", COST, "tp_comm = 4 * model.layers / plan.pp", "tp_comm = 2 * model.layers / plan.pp",
      "TP communication counts only the forward all-reduces", T + "test_cost.py"),
    M("cost-recompute-free", COST, "t = {**t, \"compute\": t[\"compute\"] * 4 / 3}", "t = {**t}",
      "activation recomputation costs no compute", T + "test_cost.py"),
    # ---------------------------------------------------------------- task, data
    M("task-carry-strict", TASK, "return a % 10 + b % 10 >= 10", "return a % 10 + b % 10 > 10",
      "a units sum of exactly 10 needs no carry", T + "test_data.py"),
    M("task-checker-whole-text", TASK, "first = completion.strip().split(\"\\n\")[0].strip()",
      "first = completion.strip()", "the checker reads past the first line", T + "test_data.py::test_checker"),
    M("data-blank-not-empty", DATA, "        if not row[name].strip():", "        if not row[name]:",
      "a whitespace-only completion passes as non-empty", T + "test_data.py::test_each_bad_row_gets_its_own_named_error"),
    M("data-max-length-inclusive", DATA, "if longest > max_length:", "if longest >= max_length:",
      "a row of exactly max_length is refused", T + "test_data.py::test_max_length_counts_tokens_when_a_tokenizer_is_given"),
    M("data-bom-rejected-jsonl", DATA, "\"utf-8-sig\" if n == 1 else \"utf-8\"", "\"utf-8\"",
      "a JSONL file that opens with a UTF-8 BOM is refused", T + "test_data_errors.py::test_a_utf8_byte_order_mark_is_accepted"),
    M("data-bom-rejected-json", DATA, "text = raw.decode(\"utf-8-sig\")", "text = raw.decode(\"utf-8\")",
      "a .json file that opens with a UTF-8 BOM is refused", T + "test_data_errors.py::test_a_utf8_byte_order_mark_is_accepted"),
    M("data-blank-lines-uncounted", DATA, "for n, raw in enumerate(f, 1):",
      "for n, raw in enumerate((r for r in f if r.strip()), 1):", "JSONL line numbers skip blank lines",
      T + "test_data_errors.py::test_malformed_line_names_file_and_line_counting_blank_lines",
      T + "test_data_errors.py::test_bad_row_after_blank_lines_gets_its_file_line"),
    M("data-column-with-line-ending", DATA, ".rstrip(\"\\r\\n\")  # a BOM may open the file", "  # a BOM may open the file",
      "a malformed JSONL line's column is counted with its line ending", T + "test_strict_data.py"),
    # ---------------------------------------------------------------- launcher
    M("launch-survivor-error-wins", LAUNCH,
      "                if dead := rep.silent_dead():\n                    raise rep.died(dead[0])\n"
      "                rank = next(iter(rep.errors))",
      "                rank = next(iter(rep.errors))",
      "a survivor's 'connection reset' is reported instead of the rank that died",
      T + "test_launch_failures.py::test_the_dead_rank_is_named_even_when_its_peers_errors_arrive_first"),
    M("launch-no-death-grace", LAUNCH, "DEATH_GRACE_S = 3.0", "DEATH_GRACE_S = 0.0",
      "no wait for a dead rank after a survivor's error",
      T + "test_launch_failures.py::test_the_dead_rank_is_named_even_when_its_peers_errors_arrive_first"),
    M("launch-exit-0-unnoticed", LAUNCH, "if p.exitcode is not None and r not in self.ok",
      "if p.exitcode not in (None, 0) and r not in self.ok",
      "a rank that exits 0 without a report is only noticed at the timeout",
      T + "test_launch_failures.py::test_exit_0_without_a_report_is_an_error_not_a_timeout"),
    # ---------------------------------------------------------------- dpo/config
    M("config-lr-unchecked", CONFIG, "lr: Positive = 5e-4", "lr: Float = 5e-4", "train.lr=-1 accepted",
      CONFIG_STRICT, CONFIG_CLI, T + "test_dpo_config.py::test_assignment_is_checked_too"),
    M("config-count-lax", CONFIG, "Count = Annotated[int, Strict(), Field(ge=1)]", "Count = Annotated[int, Field(ge=1)]",
      "counts accept True, 2.0 and '2' (lax ints)", CONFIG_STRICT, CONFIG_CLI),
    M("config-float-accepts-bool", CONFIG, "    if isinstance(v, bool):  # pydantic", "    if False:  # pydantic",
      "dpo.beta=true read as 1.0", CONFIG_STRICT, CONFIG_CLI),
    M("config-warmup-inclusive", CONFIG, "warmup_ratio: Annotated[Float, Field(ge=0, lt=1)]",
      "warmup_ratio: Annotated[Float, Field(ge=0, le=1)]", "warmup_ratio = 1 accepted (no step after warm-up)",
      CONFIG_STRICT, CONFIG_CLI),
    M("config-smoothing-inclusive", CONFIG, "label_smoothing: Annotated[Float, Field(ge=0, lt=0.5)]",
      "label_smoothing: Annotated[Float, Field(ge=0, le=0.5)]", "label_smoothing = 0.5 accepted (robust DPO divides by 0)",
      CONFIG_STRICT, T + "test_dpo_config.py"),
    M("config-max-length-floor", CONFIG, "max_length: Annotated[int, Strict(), Field(ge=4)]",
      "max_length: Annotated[int, Strict(), Field(ge=1)]", "data.max_length below 4 accepted",
      CONFIG_STRICT, T + "test_dpo_config.py"),
    M("config-seed-negative", CONFIG, "seed: Annotated[int, Strict(), Field(ge=0)]",
      "seed: Annotated[int, Strict()]", "train.seed=-1 accepted", CONFIG_STRICT, T + "test_dpo_config.py"),
    M("config-dropout-inclusive", CONFIG, "dropout: Annotated[Float, Field(ge=0, lt=1)]",
      "dropout: Annotated[Float, Field(ge=0, le=1)]", "lora.dropout = 1 accepted", CONFIG_STRICT, T + "test_dpo_config.py"),
    M("config-every-negative", CONFIG, "Every = Annotated[int, Strict(), Field(ge=0)]", "Every = Annotated[int, Strict()]",
      "checkpoint.every=-1 and the like accepted", CONFIG_STRICT, T + "test_dpo_config.py"),
    M("config-bool-lax", CONFIG, "Bool = Annotated[bool, Strict()]", "Bool = bool",
      "booleans accept 1 and 'true' (lax)", CONFIG_STRICT, CONFIG_CLI),
    # ---------------------------------------------------------------- demos, models
    M("time-all-reduce-local-stop", DEMOS, "spent = _max_over_ranks(sum(times), dev)", "spent = sum(times)",
      "time_all_reduce: each rank stops repeating on its own clock (deadlock with a slow rank)",
      T + "test_collective_loops.py::test_one_slow_rank_all_ranks_repeat_the_same_number_of_times"),
    M("load-model-kernel-unpinned", MODELS,
      "        one_kernel_path(model)  # policy and reference must run the same 4-bit kernel\n",
      "        pass\n", "load_model leaves bitsandbytes free to switch 4-bit layers to the bf16 CPU kernel",
      T + "test_kernel_path.py::test_every_loader_pins_the_kernel_even_where_the_cpu_offers_the_bf16_one"),
]


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1]))


def _copy_repo(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", "build", "*.egg-info")
    shutil.copytree(REPO, dst, ignore=ignore, dirs_exist_ok=True)
    cache = REPO / "build" / "cache"
    if cache.is_dir():  # the tiny SFT model: reused rather than retrained per mutant
        shutil.copytree(cache, dst / "build" / "cache", dirs_exist_ok=True)


def _apply(m: Mutant, root: Path) -> tuple[Path, str]:
    path = root / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutant {m.name}: the snippet occurs {n} times in {m.file} (expected once):\n{m.old}")
    path.write_text(text.replace(m.old, m.new))
    return path, text


def run_one(m: Mutant, root: Path, timeout: float) -> tuple[str, float, str]:
    tests = [t for t in m.tests if (root / t.split("::")[0]).exists()]
    if not tests:
        return "error", 0.0, f"none of {m.tests} exists"
    path, original = _apply(m, root)
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    # A session of its own, so that a timeout ends pytest and the ranks it spawned together.
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "survived" if proc.returncode == 0 else "killed"
        if proc.returncode in (4, 5):  # usage error / no tests collected: the mapping is wrong
            status = "error"
        tail = out.strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        status, tail = "killed", [f"(timed out after {timeout:.0f}s)"]
    finally:
        path.write_text(original)
    return status, time.monotonic() - start, tail[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="mutant names (a trailing * matches a prefix)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="check every snippet occurs once, run nothing")
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per mutant (hang guard)")
    args = ap.parse_args(argv)

    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "duplicate mutant names"
    chosen = MUTANTS
    if args.only:
        chosen = [m for m in MUTANTS if any(_matches(o, m.name) for o in args.only)]
        unknown = [o for o in args.only if not any(_matches(o, m.name) for m in MUTANTS)]
        if unknown:
            raise SystemExit(f"unknown mutant(s) {unknown}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.file:34s} {m.why}")
        return 0
    stale = [f"mutant {m.name}: snippet occurs {n} times in {m.file}" for m in chosen  # an error before
             for n in [(REPO / m.file).read_text().count(m.old)] if n != 1]       # anything runs, all named
    if stale:
        raise SystemExit("\n".join(stale))
    if args.check:
        print(f"{len(chosen)} mutants, every snippet found once")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="dpo-lab-mutants-") as tmp:
        root = Path(tmp) / "repo"
        _copy_repo(root)
        for i, m in enumerate(chosen, 1):
            status, seconds, tail = run_one(m, root, args.timeout)
            results.append((m, status))
            print(f"[{i:2d}/{len(chosen)}] {status:8s} {seconds:6.1f}s  {m.name:34s} {m.why}"
                  + (f"\n        {tail}" if status != "killed" or "timed out" in tail else ""), flush=True)
    killed = sum(s == "killed" for _, s in results)
    print(f"\nkilled {killed}/{len(results)} = {killed / max(1, len(results)):.0%}")
    for m, s in results:
        if s != "killed":
            print(f"  {s}: {m.name} ({m.file}): {m.why}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
