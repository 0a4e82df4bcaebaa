"""Checks of notebook 09's exercises (expert parallelism)."""
import math

import torch
import torch.distributed as dist

from dpo_lab.exercises import Wrong, exercise


# --- 09.1 top-k routing with capacity --------------------------------------------------------------

def _keep_in_order(expert: torch.Tensor, n_experts: int, cap: int, order) -> torch.Tensor:
    """keep[t, j] when assignment (t, j) finds a free slot, placing assignments in `order`.
    Written as a plain loop (not dpo_lab's cumsum) to name the order a wrong solution used."""
    keep = torch.zeros_like(expert, dtype=torch.bool)
    filled = [0] * n_experts
    for t, j in order:
        e = int(expert[t, j])
        keep[t, j] = filled[e] < cap
        filled[e] += 1
    return keep


def _routing_cases():
    """(logits, k, capacity_factor): tokens lean towards expert 0 so that capacity binds."""
    g = torch.Generator().manual_seed(9)
    cases = []
    for n_tok, n_exp, k, cf in [(16, 4, 2, 1.0), (15, 6, 3, 0.75), (12, 4, 1, 1.0), (10, 3, 2, 1.25)]:
        logits = torch.randn(n_tok, n_exp, generator=g)
        logits[:, 0] += 1.0
        cases.append((logits, k, cf))
    return cases


@exercise("09.1", "top-k routing with capacity")
def check_route(fn):
    """fn(logits, k, capacity_factor) -> (expert, gate, keep), each (T, k), compared with
    dpo_lab.parallel.expert.route (GShard's rule: all first choices in token order, then all
    second choices; k = 1 keeps Switch's un-normalised gate)."""
    from dpo_lab.parallel.expert import route
    for logits, k, cf in _routing_cases():
        n_tok, n_exp = logits.shape
        want = route(logits, k, cf)
        out = fn(logits.clone(), k, cf)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise Wrong("return the tuple (expert, gate, keep)")
        expert, gate, keep = (torch.as_tensor(t) for t in out)
        where = f"(T={n_tok} tokens, E={n_exp} experts, k={k}, capacity factor {cf})"
        if expert.dim() == 1 or expert.shape[-1] == 1 and k > 1:
            raise Wrong(f"expert has shape {tuple(expert.shape)}: one choice per token, expected k={k} "
                        f"{where}: take the top-k experts (probs.topk(k))")
        for name, t in (("expert", expert), ("gate", gate), ("keep", keep)):
            if tuple(t.shape) != (n_tok, k):
                raise Wrong(f"{name} has shape {tuple(t.shape)}, expected ({n_tok}, {k}) {where}")
        if not torch.equal(expert.long(), want.expert):
            if torch.equal(expert.long().sort(-1).values, want.expert.sort(-1).values):
                raise Wrong(f"right experts, wrong order {where}: choice j must be the j-th most "
                            "probable expert (topk sorts descending); first choices are placed first")
            raise Wrong(f"token 0 chose experts {expert[0].tolist()}, expected {want.expert[0].tolist()} "
                        f"{where}: the k experts of highest router probability")
        _check_keep(keep.bool(), want, n_exp, k, cf, where)
        _check_gate(gate, want, k, where)


def _check_keep(keep, want, n_exp, k, cf, where):
    if torch.equal(keep, want.keep):
        return
    e = want.expert
    n_tok = e.shape[0]
    cap = want.capacity
    kept = torch.bincount(e[keep], minlength=n_exp)
    should = torch.bincount(e.flatten(), minlength=n_exp).clamp(max=cap)
    if (kept > cap).any():
        x = int((kept > cap).nonzero()[0])
        raise Wrong(f"expert {x} kept {int(kept[x])} assignments, more than its C={cap} slots {where}: "
                    "the capacity is per expert (each expert has its own C slots), not a budget shared "
                    "by all the tokens of the rank")
    if not torch.equal(kept, should):
        load = torch.bincount(e.flatten(), minlength=n_exp)
        for c in range(1, cap):  # a wrong capacity formula fills each expert to another c
            if torch.equal(kept, load.clamp(max=c)):
                raise Wrong(f"each expert kept up to {c} assignments, but its capacity is "
                            f"C = ceil(factor·T·k/E) = ceil({cf}·{n_tok}·{k}/{n_exp}) = {cap} {where}")
        x = int((kept != should).nonzero()[0])
        raise Wrong(f"expert {x} kept {int(kept[x])} assignments, expected {int(should[x])} = "
                    f"min(its load, C={cap}) {where}: the capacity is per expert, each expert fills "
                    "its own C slots")
    firsts_first = [(t, j) for j in range(k) for t in range(n_tok)]
    if torch.equal(keep, _keep_in_order(e, n_exp, cap, firsts_first[::-1])):
        raise Wrong(f"you kept the latest tokens and dropped the earliest {where}: slots are filled "
                    "first come, first served, in token order")
    if torch.equal(keep, _keep_in_order(e, n_exp, cap, [(t, j) for t in range(n_tok) for j in range(k)])):
        raise Wrong(f"a token's second choice took a slot before a later token's first choice {where}: "
                    "place all first choices (in token order), then all second choices (GShard)")
    t, j = (keep != want.keep).nonzero()[0].tolist()
    raise Wrong(f"token {t}'s choice {j} (expert {int(e[t, j])}) should be "
                f"{'kept' if want.keep[t, j] else 'dropped'} {where}")


def _check_gate(gate, want, k, where):
    gate = gate.double()
    ref = want.gate.double()
    m = want.keep  # a dropped assignment's gate is never used: zero or not, either is fine
    if torch.allclose(gate[m], ref[m], atol=1e-5):
        return
    top = want.probs.double().gather(-1, want.expert)
    if k > 1 and torch.allclose(gate[m], top[m], atol=1e-5):
        raise Wrong(f"the gates are the raw router probabilities {where}: renormalise them over the "
                    "k chosen experts (divide by their sum) so that each token's gates sum to 1")
    if k == 1 and torch.allclose(gate[m], torch.ones_like(gate[m])):
        raise Wrong("with k = 1 every gate is 1: keep the router probability p as the gate (Switch), "
                    "else the router gets no gradient")
    raise Wrong(f"token 0's gates are {[round(v, 4) for v in gate[0].tolist()]}, expected "
                f"{[round(v, 4) for v in ref[0].tolist()]} {where}: softmax over all experts, then the "
                "top-k probabilities divided by their sum (k > 1)")


# --- 09.2 the all-to-all of expert parallelism, from point-to-point sends --------------------------

def _code(src: int, dst: int, shape) -> torch.Tensor:
    """The chunk that rank `src` sends to rank `dst`: every value says where it came from and for whom."""
    return 100 * src + 10 * dst + torch.arange(math.prod(shape), dtype=torch.float32).view(shape) / 100


def _where_from(chunk: torch.Tensor) -> tuple[int, int] | None:
    v = chunk.flatten()[0].item()
    src, dst = int(v // 100), int(v // 10) % 10
    return (src, dst) if torch.equal(chunk, _code(src, dst, chunk.shape)) else None


def all_to_all_rank(fn, local: int = 2, slots: int = 3, dim: int = 2) -> None:
    """Rank function: buf holds n chunks of `local` experts' slots, chunk i for rank i; the student's
    fn(buf) must return the chunks received, chunk i from rank i, as dist.all_to_all_single does."""
    rank, n = dist.get_rank(), dist.get_world_size()
    shape = (local, slots, dim)
    buf = torch.cat([_code(rank, i, shape) for i in range(n)])
    want = torch.empty_like(buf)
    dist.all_to_all_single(want, buf)  # the library twin
    got = fn(buf.clone())
    dist.barrier()  # every rank has finished its exchange before any rank reports
    if not torch.is_tensor(got) or got.shape != buf.shape:
        raise Wrong(f"return a tensor shaped like buf {tuple(buf.shape)}, got "
                    f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
    if torch.equal(got, want):
        return
    chunks = got.chunk(n)
    origin = [_where_from(c) for c in chunks]
    for i, o in enumerate(origin):
        if o == (i, rank):
            continue
        if o is None:
            if not chunks[i].any():
                raise Wrong(f"with {n} ranks, chunk {i} is all zeros: "
                            + ("copy your own chunk (no need to send it to yourself)" if i == rank
                               else f"the chunk from rank {i} was never received into it"))
            raise Wrong(f"with {n} ranks, chunk {i} is not any rank's chunk as sent: receive each "
                        f"chunk whole, into rows [{i}·{local}, {i + 1}·{local})")
        src, dst = o
        if dst != rank:
            if src == rank:
                raise Wrong(f"with {n} ranks, chunk {i} is your own chunk for rank {dst}: nothing "
                            "was exchanged; send chunk j to rank j and receive from every rank")
            raise Wrong(f"with {n} ranks, chunk {i} holds rank {src}'s chunk for rank {dst}, not for "
                        f"you: each rank must send chunk j (rows of rank j's experts) to rank j")
        shift = (src - i) % n
        raise Wrong(f"with {n} ranks, chunk {i} came from rank {src}, expected rank {i}"
                    + (f": every chunk is {shift} step(s) late/shifted; chunk i of the result must "
                       "come from rank i" if all(oo is not None and (oo[0] - ii) % n == shift
                                                 for ii, oo in enumerate(origin)) else ""))


@exercise("09.2", "the all-to-all of expert parallelism")
def check_all_to_all(fn):
    """fn(buf) on real ranks at world sizes 2 and 3 (odd: a pairing that only works for even sizes
    fails), compared with dist.all_to_all_single."""
    from dpo_lab.parallel import launch
    for world_size in (2, 3):
        launch(all_to_all_rank, world_size, args=(fn,), timeout=60)


# --- 09.3 the load-balancing loss --------------------------------------------------------------------

@exercise("09.3", "the load-balancing loss")
def check_load_balancing_loss(fn):
    """fn(probs, expert) -> scalar: Switch Transformer's auxiliary loss E · Σ_e f_e · P_e, with f_e the
    fraction of the T·k assignments routed to expert e (a count: no gradient) and P_e the mean router
    probability of e (the gradient's only path). Compared with the formula written out on one-hot
    counts here (not dpo_lab's bincount), in value and in its gradient with respect to the probs."""
    g = torch.Generator().manual_seed(3)
    for n_tok, n_exp, k in [(12, 4, 2), (9, 3, 1), (10, 5, 3)]:
        logits = torch.randn(n_tok, n_exp, generator=g, dtype=torch.float64)
        logits[:, 0] += 1.0  # unbalanced, so that wrong counts show
        probs = logits.softmax(-1).requires_grad_()
        expert = probs.detach().topk(k, dim=-1).indices
        onehot = torch.nn.functional.one_hot(expert, n_exp).to(probs.dtype)  # (T, k, E)
        f = onehot.sum((0, 1)) / (n_tok * k)
        want = n_exp * (f * probs.mean(0)).sum()
        where = f"(T={n_tok}, E={n_exp}, k={k})"
        got = fn(probs, expert)
        if not torch.is_tensor(got) or got.numel() != 1:
            raise Wrong(f"return a scalar tensor {where}")
        got = got.reshape(())
        if not torch.allclose(got.detach(), want.detach(), rtol=1e-9, atol=1e-12):
            ratio = (got.detach() / want.detach()).item()
            first = n_exp * ((torch.nn.functional.one_hot(expert[:, 0], n_exp).to(probs.dtype).mean(0))
                             * probs.mean(0)).sum()
            if k > 1 and torch.allclose(got.detach(), first.detach(), rtol=1e-9):
                raise Wrong(f"only the first choice of each token is counted {where}: f_e counts all k choices")
            for factor, hint in [(1 / n_exp, "multiply by the number of experts E (a uniform router then gives 1)"),
                                 (k, "f_e divides by T·k assignments, not by T tokens"),
                                 (n_tok, "P_e is the mean router probability over tokens, not the sum")]:
                if abs(ratio - factor) < 1e-9 * max(1.0, factor):
                    raise Wrong(f"the loss is {factor:g}× the expected {where}: {hint}")
            raise Wrong(f"the loss is {got.item():.6g}, expected {want.item():.6g} {where}")
        if not got.requires_grad:
            raise Wrong(f"no gradient reaches the router probabilities {where}: P_e must stay in the graph "
                        "(f_e is a count and carries none)")
        (grad,) = torch.autograd.grad(got, probs)
        (want_grad,) = torch.autograd.grad(want, probs)
        if not torch.allclose(grad, want_grad, rtol=1e-9, atol=1e-12):
            raise Wrong(f"the value is right but the gradient is not {where}: only P_e may carry gradient; "
                        "compute f_e from the (integer) expert choices")
