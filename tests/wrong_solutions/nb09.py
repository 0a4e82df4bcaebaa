import math

import torch
import torch.distributed as dist

from tests.wrong_solutions import wrong


def _route(logits, k, capacity_factor, renormalise=True, order="firsts_first", cap=None, top1=False):
    """A hand-written router with one knob per mistake."""
    n_tok, n_exp = logits.shape
    probs = logits.softmax(-1)
    top, expert = probs.topk(1 if top1 else k, dim=-1)
    gate = top / top.sum(-1, keepdim=True) if renormalise and k > 1 else top
    if cap is None:
        cap = math.ceil(capacity_factor * n_tok * k / n_exp)
    kk = expert.shape[1]
    pairs = {"firsts_first": [(t, j) for j in range(kk) for t in range(n_tok)],
             "token_major": [(t, j) for t in range(n_tok) for j in range(kk)]}
    pairs["latest_first"] = pairs["firsts_first"][::-1]
    keep = torch.zeros_like(expert, dtype=torch.bool)
    filled = [0] * n_exp
    for t, j in pairs[order]:
        keep[t, j] = filled[expert[t, j]] < cap
        filled[expert[t, j]] += 1
    return expert, gate, keep


@wrong("09.1", "renormalise them over the k chosen experts")
def route_raw_gates(logits, k, cf):
    return _route(logits, k, cf, renormalise=False)


@wrong("09.1", "every gate is 1")
def route_renormalised_top1(logits, k, cf):
    expert, gate, keep = _route(logits, k, cf)
    return expert, gate / gate.sum(-1, keepdim=True), keep


@wrong("09.1", "one choice per token, expected k=2")
def route_top1(logits, k, cf):
    return _route(logits, k, cf, top1=True)


@wrong("09.1", "you kept the latest tokens")
def route_latest(logits, k, cf):
    return _route(logits, k, cf, order="latest_first")


@wrong("09.1", "place all first choices (in token order), then all second choices")
def route_token_major(logits, k, cf):
    return _route(logits, k, cf, order="token_major")


@wrong("09.1", "more than its C=")
def route_capacity_per_rank(logits, k, cf):
    """Keeps the first E·C assignments of the rank: the buffer's size, shared by all experts."""
    expert, gate, _ = _route(logits, k, cf)
    n_tok, n_exp = logits.shape
    budget = n_exp * math.ceil(cf * n_tok * k / n_exp)
    order = [(t, j) for j in range(k) for t in range(n_tok)]
    keep = torch.zeros_like(expert, dtype=torch.bool)
    for i, (t, j) in enumerate(order):
        keep[t, j] = i < budget
    return expert, gate, keep


@wrong("09.1", "C = ceil(factor·T·k/E)")
def route_capacity_without_k(logits, k, cf):
    n_tok, n_exp = logits.shape
    return _route(logits, k, cf, cap=math.ceil(cf * n_tok / n_exp))


@wrong("09.1", "choice j must be the j-th most probable expert")
def route_sorted_by_expert(logits, k, cf):
    expert, gate, keep = _route(logits, k, cf)
    order = expert.argsort(-1)
    return expert.gather(-1, order), gate.gather(-1, order), keep.gather(-1, order)


# --- 09.2 ---------------------------------------------------------------------------------------

@wrong("09.2", "nothing was exchanged")
def a2a_no_exchange(buf):
    return buf.clone()


@wrong("09.2", "each rank must send chunk j")
def a2a_sends_own_index(buf):
    """Sends the chunk at its own index to everyone (mixes up 'my chunk' and 'chunk for rank j')."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = list(buf.chunk(n))
    out = [c.clone() if i == rank else torch.empty_like(c) for i, c in enumerate(chunks)]
    reqs = [dist.isend(chunks[rank].contiguous(), j) for j in range(n) if j != rank]
    reqs += [dist.irecv(out[j], j) for j in range(n) if j != rank]
    for r in reqs:
        r.wait()
    return torch.cat(out)


@wrong("09.2", "chunk i of the result must come from rank i")
def a2a_one_step_late(buf):
    """Ring exchange that files each received chunk one slot too far."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = list(buf.chunk(n))
    out = [None] * n
    out[(rank + 1) % n] = chunks[rank].clone()
    for s in range(1, n):
        dst, src = (rank + s) % n, (rank - s) % n
        recv = torch.empty_like(chunks[0])
        reqs = [dist.isend(chunks[dst].contiguous(), dst), dist.irecv(recv, src)]
        for r in reqs:
            r.wait()
        out[(src + 1) % n] = recv
    return torch.cat(out)


@wrong("09.2", "copy your own chunk")
def a2a_forgets_own_chunk(buf):
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = list(buf.chunk(n))
    out = [torch.zeros_like(c) for c in chunks]
    reqs = [dist.isend(chunks[j].contiguous(), j) for j in range(n) if j != rank]
    reqs += [dist.irecv(out[j], j) for j in range(n) if j != rank]
    for r in reqs:
        r.wait()
    return torch.cat(out)


@wrong("09.2", "receive from every rank")
def a2a_pairwise_swap(buf):
    """Pairs ranks 0<->1, 2<->3, ...: right for even world sizes; with 3, rank 2 has no partner."""
    rank, n = dist.get_rank(), dist.get_world_size()
    chunks = list(buf.chunk(n))
    out = [c.clone() for c in chunks]
    peer = rank ^ 1
    if peer < n:
        reqs = [dist.isend(chunks[peer].contiguous(), peer), dist.irecv(out[peer], peer)]
        for r in reqs:
            r.wait()
    return torch.cat(out)


@wrong("09.1", "each expert fills its own C slots")
def route_capacity_shared_by_rank(logits, k, cf):
    """Keeps the rank's first C assignments in all: one expert's capacity used as the rank's."""
    expert, gate, _ = _route(logits, k, cf)
    n_tok, n_exp = logits.shape
    cap = math.ceil(cf * n_tok * k / n_exp)
    order = [(t, j) for j in range(k) for t in range(n_tok)]
    keep = torch.zeros_like(expert, dtype=torch.bool)
    for i, (t, j) in enumerate(order):
        keep[t, j] = i < cap
    return expert, gate, keep


def _lb(probs, expert, count_k=True, scale=True, per_token=False, mean=True, detach_p=False):
    n_tok, n_exp = probs.shape
    chosen = expert if count_k else expert[:, :1]
    f = torch.bincount(chosen.flatten(), minlength=n_exp).to(probs.dtype)
    f = f / (n_tok if per_token else chosen.numel())
    p = probs.mean(0) if mean else probs.sum(0)
    if detach_p:
        p = p.detach()
    return (n_exp if scale else 1) * (f * p).sum()


@wrong("09.3", "multiply by the number of experts")
def lb_no_e(probs, expert):
    return _lb(probs, expert, scale=False)


@wrong("09.3", "only the first choice of each token is counted")
def lb_first_choice(probs, expert):
    return _lb(probs, expert, count_k=False)


@wrong("09.3", "not by T tokens")
def lb_per_token(probs, expert):
    return _lb(probs, expert, per_token=True)


@wrong("09.3", "not the sum")
def lb_sum_probs(probs, expert):
    return _lb(probs, expert, mean=False)


@wrong("09.3", "no gradient reaches the router probabilities")
def lb_detached(probs, expert):
    return _lb(probs, expert, detach_p=True)
