"""Checks of notebook 10's exercises (planning at scale): the ZeRO memory formula, against the
planner (`cost.model_state_bytes`) in mixed precision, and against the bytes real ranks hold
(world sizes 2 and 3) in the plain fp32 Adam that the CPU ranks run."""
from dpo_lab.exercises import Wrong, exercise, expect_close
from dpo_lab.parallel import cost

KEYS = ("params", "grads", "optimizer")
WHAT = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states"}
SHARDED_FROM = {"optimizer": 1, "grads": 2, "params": 3}  # ZeRO-1 P_os, ZeRO-2 +P_g, ZeRO-3 +P_p


def _as_dict(got, case: str) -> dict:
    if not isinstance(got, dict) or set(got) != set(KEYS):
        have = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise Wrong(f"{case}: return a dict with keys 'params', 'grads', 'optimizer' (bytes per rank), got {have}")
    return got


def _near(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * abs(b)


def _sharding(key: str, stage: int, nd: int, ratio: float, rtol: float) -> str | None:
    """The diagnosis when `ratio` = predicted / expected is N_d or 1/N_d: sharded at the wrong stage."""
    if nd < 2:
        return None
    name = f"ZeRO-{stage}" if stage else "plain data parallelism (stage 0)"
    if _near(ratio, nd, rtol):
        if key == "optimizer" and stage == 1:
            return ("the optimizer states are not sharded at stage 1: ZeRO-1 (P_os) already divides "
                    "them by N_d")
        return f"the {WHAT[key]} are not sharded under {name}: from stage {SHARDED_FROM[key]} on, divide them by N_d"
    if _near(ratio, 1 / nd, rtol):
        return (f"the {WHAT[key]} are sharded too early: under {name} every rank still holds all of them "
                "(stage 1 shards optimizer states, stage 2 adds gradients, stage 3 parameters)")
    return None


@exercise("10.1", "the ZeRO memory formula (mixed precision)")
def check_zero_formula(fn):
    """fn(psi, stage, nd) -> {'params', 'grads', 'optimizer'} bytes per rank for mixed-precision Adam,
    vs the planner's cost.model_state_bytes."""
    dtype_hints = {
        "params": {2: "parameters counted in fp32 (4 bytes): the working copy is bf16, 2 bytes; the fp32 "
                      "copy is the master, counted with the optimizer states"},
        "grads": {2: "gradients counted in fp32 (4 bytes): in mixed precision they are bf16, 2 bytes"},
        "optimizer": {2 / 3: "you forgot the fp32 master copy: K = 12 = 4 (master weights) + 4 (momentum) "
                             "+ 4 (variance)",
                      4 / 3: "the optimizer states are K = 12 bytes: fp32 master weights, momentum and variance"},
    }
    # stage 0 on one rank first: a wrong byte count shows there before any sharding does
    for psi, stage, nd in [(7.5e9, 0, 1), (7.5e9, 1, 64), (7.5e9, 2, 64), (7.5e9, 3, 64),
                           (1e6, 0, 3), (1e6, 1, 3), (1e6, 2, 3), (1e6, 3, 3), (1e6, 3, 1)]:
        case = f"Ψ={psi:g}, stage {stage}, N_d={nd}"
        got = _as_dict(fn(psi, stage, nd), case)
        want = cost.model_state_bytes(psi, stage, nd)
        for key in KEYS:
            g, w = float(got[key]), want[key]
            if _near(g, w, 1e-9):
                continue
            ratio = g / w
            for factor, hint in dtype_hints[key].items():
                if _near(ratio, factor, 1e-6):
                    raise Wrong(f"{case}: {hint}")
            if said := _sharding(key, stage, nd, ratio, 1e-6):
                raise Wrong(f"{case}: {said}")
            expect_close(g, w, f"{case}: {key}", rtol=1e-9, atol=0)


def _train_quietly(**kwargs):
    """Rank function: lesson 05's strategies, without torch's deprecation notices for the
    *_into_tensor / *_tensor collectives they call (they would print in the student's notebook)."""
    import warnings
    from dpo_lab.parallel.dp_training import train_strategies
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    return train_strategies(**kwargs)


_MEASURED: dict[int, list] = {}  # world size -> per-rank bytes; the ranks' bytes do not depend on fn


def measure_rank_bytes(world_size: int) -> list[dict]:
    """[{stage: {'params', 'grads', 'optimizer'}}] per rank, after one step of the tiny transformer
    under DP, ZeRO-1, ZeRO-2 and FSDP (lesson 05's implementations), and the parameter count Ψ."""
    if world_size not in _MEASURED:
        from dpo_lab.parallel import launch
        runs = launch(_train_quietly, world_size, timeout=180,
                      kwargs=dict(strategies=("dp", "zero1", "zero2", "fsdp"), steps=1, batch=6))
        psi = sum(p.numel() for p in runs[0]["dp"]["params"].values())
        _MEASURED[world_size] = [psi, [{stage: r[s]["memory"] for stage, s in enumerate(("dp", "zero1", "zero2", "fsdp"))}
                                       for r in runs]]
    return _MEASURED[world_size]


@exercise("10.2", "the ZeRO memory formula on real ranks (fp32 Adam)", timeout=420)
def check_fp32_on_ranks(fn):
    """fn(psi, stage, nd) -> bytes per rank for plain fp32 Adam (fp32 weights and gradients, m and v,
    no master copy), vs the bytes each of 2 and 3 real ranks holds after a training step."""
    # the student's predictions first: a stub is "not implemented yet" before any rank starts
    psi = measure_psi()
    preds = {(nd, s): _as_dict(fn(psi, s, nd), f"stage {s}, N_d={nd}") for nd in (2, 3) for s in range(4)}
    hints = {"params": {0.5: "parameters counted in bf16 (2 bytes): these ranks train in fp32, 4 bytes"},
             "grads": {0.5: "gradients counted in bf16 (2 bytes): these ranks train in fp32, 4 bytes"},
             "optimizer": {1.5: "you counted an fp32 master copy: in fp32 training the weights are the master; "
                                "Adam keeps only momentum and variance, 4 + 4 bytes",
                           0.5: "Adam keeps two fp32 states per parameter (momentum and variance): 8 bytes"}}
    for nd in (2, 3):
        ranks_psi, ranks = measure_rank_bytes(nd)
        assert ranks_psi == psi, (ranks_psi, psi)  # the ranks trained the model counted above
        for rank, held in enumerate(ranks):
            for stage in range(4):
                got = preds[(nd, stage)]
                for key in KEYS:
                    g, m = float(got[key]), held[stage][key]
                    # 1%: shards of Ψ/3 are rounded up on the first ranks, and Adam keeps a step counter
                    if _near(g, m, 0.01):
                        continue
                    where = (f"on {nd} ranks, rank {rank} holds {m} bytes of {WHAT[key]} at stage {stage}, "
                             f"you predict {g:.0f}")
                    if nd == 3 and stage >= SHARDED_FROM[key] and _near(g, float(preds[(2, stage)][key]), 1e-9):
                        raise Wrong(f"{where}, as many as on 2 ranks: divide by N_d (the argument nd), "
                                    "not by a fixed 2")
                    for factor, hint in hints[key].items():
                        if _near(g / m, factor, 0.01):
                            raise Wrong(f"{where}: {hint}")
                    if said := _sharding(key, stage, nd, g / m, 0.01):
                        raise Wrong(f"{where}: {said}")
                    raise Wrong(f"{where}: {g / m:.3g}× too {'many' if g > m else 'few'} bytes")


def measure_psi() -> int:
    """Ψ of the tiny transformer the ranks train (counted here, without starting ranks)."""
    from dpo_lab.parallel.dp_training import make_model
    return sum(p.numel() for p in make_model(0).parameters())


# --- 10.3 activation memory per layer ----------------------------------------------------------------

@exercise("10.3", "activation memory per layer, with TP and SP")
def check_activation_bytes(fn):
    """fn(s, b, h, a, t, sp) -> bytes of 16-bit activations one transformer layer stores for backward
    (no recomputation), compared with the planner's `cost.activation_bytes_per_layer` (Korthikanti et
    al. 2022, Table 2)."""
    cases = [(2048, 1, 4096, 32, 1, False), (4096, 2, 8192, 64, 8, False), (4096, 2, 8192, 64, 8, True),
             (1024, 4, 2048, 16, 2, False), (1024, 4, 2048, 16, 2, True), (512, 8, 1024, 8, 1, True)]
    for s, b, h, a, t, sp in cases:
        want = cost.activation_bytes_per_layer(s, b, h, a, tp=t, sp=sp)
        got = fn(s, b, h, a, t, sp)
        where = f"(s={s}, b={b}, h={h}, a={a}, t={t}, sp={sp})"
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Wrong(f"return a number of bytes {where}, got {type(got).__name__}")
        if _near(got, want, 1e-9):
            continue
        no_attn = (s * b * h * (34 if t == 1 or sp else 10 + 24 / t)) / (t if sp else 1)
        if _near(got, no_attn, 1e-9):
            raise Wrong(f"the attention term is missing {where}: the scores, softmax and its dropout mask add "
                        "5as/h per sbh (quadratic in s)")
        if t > 1 and not sp and _near(got, s * b * h * (34 + 5 * a * s / h) / t, 1e-9):
            raise Wrong(f"tensor parallelism alone does not split everything {where}: the layer-norm inputs "
                        "and dropout masks (10 sbh) stay whole on every rank: sbh(10 + 24/t + 5as/(ht))")
        if t > 1 and sp and _near(got, s * b * h * (10 + 24 / t + 5 * a * s / (h * t)), 1e-9):
            raise Wrong(f"sequence parallelism also splits the 10 sbh that TP leaves whole {where}: "
                        "(sbh/t)(34 + 5as/h)")
        if _near(got, 2 * want, 1e-9):
            raise Wrong(f"2× too large {where}: the coefficients already count bytes of 16-bit values")
        if _near(got, want / 2, 1e-9):
            raise Wrong(f"half the expected bytes {where}: the coefficients count bytes, not elements")
        raise Wrong(f"{got:.6g} bytes, expected {want:.6g} {where}")
