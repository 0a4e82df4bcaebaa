from tests.wrong_solutions import wrong


def _zero(psi, stage, nd, weight=2, grad=2, optim=12, os_from=1, g_from=2, p_from=3):
    shard = lambda s: nd if stage >= s else 1
    return {"params": weight * psi / shard(p_from), "grads": grad * psi / shard(g_from),
            "optimizer": optim * psi / shard(os_from)}


@wrong("10.1", "optimizer states are not sharded at stage 1")
def zero_stage1_replicates_optimizer(psi, stage, nd):
    return _zero(psi, stage, nd, os_from=2)


@wrong("10.1", "gradients counted in fp32")
def zero_fp32_grads(psi, stage, nd):
    return _zero(psi, stage, nd, grad=4)


@wrong("10.1", "forgot the fp32 master copy")
def zero_no_master(psi, stage, nd):
    return _zero(psi, stage, nd, optim=8)


@wrong("10.1", "parameters are not sharded under ZeRO-3")
def zero3_replicates_params(psi, stage, nd):
    return _zero(psi, stage, nd, p_from=4)


@wrong("10.1", "gradients are sharded too early")
def zero1_shards_grads(psi, stage, nd):
    return _zero(psi, stage, nd, g_from=1)


@wrong("10.1", "return a dict with keys")
def zero_total_only(psi, stage, nd):
    return sum(_zero(psi, stage, nd).values())


@wrong("10.2", "counted an fp32 master copy")
def fp32_with_master(psi, stage, nd):
    return _zero(psi, stage, nd, weight=4, grad=4, optim=12)


@wrong("10.2", "gradients counted in bf16")
def fp32_bf16_grads(psi, stage, nd):
    return _zero(psi, stage, nd, weight=4, grad=2, optim=8)


@wrong("10.2", "optimizer states are not sharded at stage 1")
def fp32_stage1_replicates_optimizer(psi, stage, nd):
    return _zero(psi, stage, nd, weight=4, grad=4, optim=8, os_from=2)


@wrong("10.2", "not by a fixed 2")
def fp32_shards_over_two(psi, stage, nd):  # hard-codes the notebook's 2 ranks: wrong on 3
    return _zero(psi, stage, 2, weight=4, grad=4, optim=8)


def _act(s, b, h, a, t, sp, attn=True, split_all=False, sp_splits=True, scale=1.0):
    att = 5 * a * s / h if attn else 0
    if sp and sp_splits:
        return scale * s * b * h / t * (34 + att)
    if t == 1:
        return scale * s * b * h * (34 + att)
    if split_all:
        return scale * s * b * h * (34 + att) / t
    return scale * s * b * h * (10 + 24 / t + att / t)


@wrong("10.3", "the attention term is missing")
def act_no_attention(s, b, h, a, t, sp):
    return _act(s, b, h, a, t, sp, attn=False)


@wrong("10.3", "tensor parallelism alone does not split everything")
def act_tp_splits_all(s, b, h, a, t, sp):
    return _act(s, b, h, a, t, sp, split_all=True)


@wrong("10.3", "sequence parallelism also splits")
def act_sp_ignored(s, b, h, a, t, sp):
    return _act(s, b, h, a, t, sp, sp_splits=False)


@wrong("10.3", "2× too large")
def act_times_two(s, b, h, a, t, sp):
    return _act(s, b, h, a, t, sp, scale=2.0)
