"""Pipeline-parallel executor: a model split over p ranks, run by a schedule from schedules.py.

Each rank owns v model chunks (virtual stages r, r + p, ...). It walks its list of actions in
order; a forward receives the activation from the previous virtual stage (point-to-point recv),
runs its chunk and sends the output on; a backward receives the output-gradient from the next
virtual stage, back-propagates and sends the input-gradient back. Sends are non-blocking, receives
block, and a valid schedule guarantees that every receive is eventually matched.

Every executed action is recorded as an event (rank, kind, micro-batch, chunk, start, end) on the
shared monotonic clock, so bubbles and Gantt charts come from what really ran. The wall-clock
bubble depends on the machine's load; `bubble_replayed` gives the bubble of the executed order
with nominal durations, which does not.
"""
import copy
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dpo_lab.arch.transformer import TinyTransformer
from dpo_lab.parallel.schedules import (Action, bubble_formula, bubble_fraction, dependencies,
                                        make_schedule, n_chunks, simulate)


class Chunk(nn.Module):
    """Layers [lo, hi) of a TinyTransformer; the first chunk embeds, the last one norms and
    projects to the vocabulary."""

    def __init__(self, model, lo: int, hi: int):
        super().__init__()
        n = len(model.blocks)
        self.first, self.last = lo == 0, hi == n
        self.embed = copy.deepcopy(model.embed) if self.first else None
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in range(lo, hi))
        self.norm = copy.deepcopy(model.norm) if self.last else None
        self.head = copy.deepcopy(model.head) if self.last else None
        self.lo, self.hi = lo, hi

    def forward(self, x):
        if self.first:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) if self.last else x


def split_model(model, n_parts: int) -> list[Chunk]:
    n = len(model.blocks)
    if n % n_parts:
        raise ValueError(f"{n} layers cannot be split evenly into {n_parts} virtual stages")
    per = n // n_parts
    return [Chunk(model, i * per, (i + 1) * per) for i in range(n_parts)]


def _tag(microbatch: int, receiver_vs: int, backward: bool, n_virtual: int) -> int:
    """One tag per message: the micro-batch, the virtual stage receiving it, and the direction."""
    return (microbatch * n_virtual + receiver_vs) * 2 + int(backward)


def check_microbatches(schedule, microbatches, targets) -> None:
    """Every stage sizes its receive buffers from micro-batch 0, so micro-batches of another shape,
    or a schedule over another number of them, would mismatch a send and a receive (a hang or
    garbage). Agreed over the ranks, so that every rank raises and none waits in a receive."""
    shapes = [tuple(mb.shape) for mb in microbatches]
    wanted = 1 + max((a.microbatch for stage in schedule for a in stage), default=-1)
    problem = None
    if not shapes:
        problem = "no micro-batches"
    elif len(targets) != len(shapes):
        problem = f"{len(shapes)} micro-batches but {len(targets)} targets"
    elif wanted != len(shapes):
        problem = f"the schedule runs {wanted} micro-batches, {len(shapes)} were given"
    else:
        for i, (shape, tgt) in enumerate(zip(shapes, targets)):
            if shape != shapes[0]:
                problem = (f"micro-batch {i} has shape {shape}, micro-batch 0 has {shapes[0]}: "
                           f"pipeline micro-batches must all have one shape")
                break
            if tuple(tgt.shape) != shape:
                problem = f"targets of micro-batch {i} have shape {tuple(tgt.shape)}, its tokens {shape}"
                break
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, (problem, shapes[:1]))
    for rank, (prob, first) in enumerate(found):
        if prob is None and first != found[0][1]:
            prob = (f"micro-batch 0 has shape {first[0]} here, {found[0][1][0]} on rank 0: every "
                    f"stage must see micro-batches of one shape")
        if prob is not None:
            raise ValueError(f"rank {rank}: {prob}")


def run_pipeline(chunks: dict[int, Chunk], schedule, microbatches, targets, t_f: float = 0.0,
                 t_b: float | None = None, t0: float = 0.0):
    """Execute this rank's part of `schedule`. chunks: {chunk index: Chunk}; microbatches and
    targets: lists of m token tensors (only the first / last virtual stage reads them).

    t_f / t_b pad each forward / backward of a micro-batch through this whole stage to a fixed
    duration (sleep), so compute per micro-batch is uniform and bubbles can be compared with the
    formulas; with v chunks a stage runs v actions per micro-batch, each padded to t_f / v (t_b / v),
    so every schedule does the same work. Returns (events, loss or None, peak number of micro-batch
    chunks whose activations were held)."""
    rank, p = dist.get_rank(), dist.get_world_size()
    if len(schedule) != p:
        raise ValueError(f"schedule has {len(schedule)} stages but the job has {p} ranks")
    check_microbatches(schedule, microbatches, targets)
    t_b = 2 * t_f if t_b is None else t_b
    v = len(chunks)
    last_vs = v * p - 1
    mb_shape = (*microbatches[0].shape, chunks[0].blocks[0].attn.q_proj.in_features)
    inputs, outputs, sends, events = {}, {}, [], []
    loss_total, peak = 0.0, 0
    m = len(microbatches)
    for a in schedule[rank]:
        vs = a.chunk * p + rank
        key = (a.microbatch, a.chunk)
        if a.kind == "F":
            if vs == 0:
                x = microbatches[a.microbatch]
            else:
                x = torch.empty(mb_shape)
                dist.recv(x, src=(vs - 1) % p, tag=_tag(a.microbatch, vs, False, v * p))
                x.requires_grad_()
            start = time.perf_counter()
            y = chunks[a.chunk](x)
            if vs == last_vs:  # mean over micro-batches = the loss of the whole batch
                y = F.cross_entropy(y.flatten(0, 1), targets[a.microbatch].flatten()) / m
                loss_total += y.item()
                send = None
            else:
                send = (y.detach().contiguous(), (vs + 1) % p, _tag(a.microbatch, vs + 1, False, v * p))
            inputs[key], outputs[key] = x, y
            peak = max(peak, len(outputs))
            duration = t_f / v
        else:
            x, y = inputs.pop(key), outputs.pop(key)
            if vs == last_vs:
                grad = None
            else:
                grad = torch.empty(mb_shape)
                dist.recv(grad, src=(vs + 1) % p, tag=_tag(a.microbatch, vs, True, v * p))
            start = time.perf_counter()
            torch.autograd.backward(y, grad)
            send = (x.grad.contiguous(), (vs - 1) % p, _tag(a.microbatch, vs - 1, True, v * p)) if vs > 0 else None
            duration = t_b / v
        # Uniform compute: pad the real work to a fixed duration, then hand the result on.
        time.sleep(max(0.0, duration - (time.perf_counter() - start)))
        events.append((rank, a.kind, a.microbatch, a.chunk, start - t0, time.perf_counter() - t0))
        if send is not None:
            tensor, dst, tag = send
            sends.append((dist.isend(tensor, dst=dst, tag=tag), tensor))
    for work, _ in sends:
        work.wait()
    return events, (loss_total if rank == (last_vs % p) else None), peak


def bubble_from_events(events, p: int) -> float:
    """Measured idle share: 1 − Σ busy / (p · makespan), over the events of all ranks."""
    start = min(e[4] for e in events)
    end = max(e[5] for e in events)
    busy = sum(e[5] - e[4] for e in events)
    return 1.0 - busy / (p * (end - start))


def executed_order(events, p: int) -> list[list[Action]]:
    """Per rank, the actions in the order they ran (a rank runs one action at a time)."""
    order = [[] for _ in range(p)]
    for rank, kind, mb, chunk, _, _ in sorted(events, key=lambda e: (e[0], e[4])):
        order[rank].append(Action(kind, mb, chunk))
    return order


def bubble_replayed(events, p: int, t_f: float = 1.0, t_b: float = 2.0) -> float:
    """Bubble of the executed order with nominal durations t_f / t_b and free communication:
    what the run's bubble is once the machine's load is taken out. Equals bubble_formula when
    every rank ran its whole schedule in order (simulate raises if an action is missing)."""
    return bubble_fraction(simulate(executed_order(events, p), t_f, t_b))


def dependency_violations(events, p: int) -> list[tuple]:
    """Events that started before an action they depend on had ended, on the shared clock.
    A receive returns only after the sender recorded its end and sent, so this is empty on any
    machine, loaded or not, unless the executor hands results on before they are done."""
    order = executed_order(events, p)
    v = n_chunks(order)
    end = {(e[0], Action(e[1], e[2], e[3])): e[5] for e in events}
    bad = []
    for rank, kind, mb, chunk, start, _ in events:
        for dep in dependencies(Action(kind, mb, chunk), rank, p, v):
            if dep not in end or end[dep] > start:  # a dependency that never ran counts too
                bad.append(((rank, Action(kind, mb, chunk)), dep, end.get(dep, float("inf")) - start))
    return bad


def pipeline_rank(settings, seed: int = 0, t_f: float = 0.01, vocab: int = 64, dim: int = 32,
                  n_heads: int = 4, seq: int = 8, mb_size: int = 2) -> list[dict]:
    """Rank function: for each (schedule, m, v) in settings, run one training step of a
    TinyTransformer split over the ranks and compare loss and gradients with the unsplit model.
    Every setting trains the same model (p · lcm of the v's layers), so schedules are compared on
    equal work.
    Returns per setting: events, loss error, max gradient error on this rank, peak in-flight."""
    rank, p = dist.get_rank(), dist.get_world_size()
    results = []
    n_layers = max(p * math.lcm(*(v for _, _, v in settings)), 2)
    for name, m, v in settings:
        torch.manual_seed(seed)
        model = TinyTransformer(vocab, dim, n_layers, n_heads)
        tokens = torch.randint(0, vocab, (m * mb_size, seq))
        targets = torch.randint(0, vocab, (m * mb_size, seq))
        parts = split_model(model, p * v)
        chunks = {c: parts[c * p + rank] for c in range(v)}
        schedule = make_schedule(name, p, m, v)
        mbs, tgts = list(tokens.chunk(m)), list(targets.chunk(m))
        run_pipeline(chunks, schedule, mbs, tgts)  # warm-up: first calls pay one-off costs
        for chunk in chunks.values():
            chunk.zero_grad()
        t0 = torch.tensor([time.perf_counter()], dtype=torch.float64)
        dist.broadcast(t0, src=0)  # one clock origin (perf_counter is system-wide on Linux)
        dist.barrier()
        events, loss, peak = run_pipeline(chunks, schedule, mbs, tgts, t_f=t_f, t0=t0.item())
        ref_loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        ref_loss.backward()
        ref_params = dict(model.named_parameters())
        err = 0.0
        for c, chunk in chunks.items():
            for pname, prm in chunk.named_parameters():
                if pname.startswith("blocks."):
                    i, rest = pname.split(".", 2)[1:]
                    ref = ref_params[f"blocks.{chunk.lo + int(i)}.{rest}"]
                else:
                    ref = ref_params[pname]
                err = max(err, (ref.grad - prm.grad).abs().max().item())
        results.append({"schedule": name, "p": p, "m": m, "v": v, "n_layers": n_layers,
                        "events": events, "peak_in_flight": peak,
                        "loss": loss, "ref_loss": ref_loss.item(), "grad_err": err})
        dist.barrier()
    return results


def gather_runs(per_rank: list[list[dict]]) -> list[dict]:
    """Merge the ranks' results of pipeline_rank: one dict per setting with all events,
    bubbles (wall clock, replayed with nominal durations, formula), per-stage peaks, loss and
    worst gradient error."""
    merged = []
    for runs in zip(*per_rank):
        first = runs[0]
        events = sorted((e for r in runs for e in r["events"]), key=lambda e: e[4])
        loss = next(r["loss"] for r in runs if r["loss"] is not None)
        p, m, v = first["p"], first["m"], first["v"]
        merged.append({"schedule": first["schedule"], "p": p, "m": m, "v": v, "n_layers": first["n_layers"],
                       "events": events,
                       "bubble_measured": bubble_from_events(events, p),   # depends on load
                       "bubble_replayed": bubble_replayed(events, p),      # does not
                       "dependency_violations": len(dependency_violations(events, p)),
                       "bubble_formula": bubble_formula(p, m, v),
                       "peak_in_flight": [r["peak_in_flight"] for r in runs],
                       "loss_err": abs(loss - first["ref_loss"]),
                       "grad_err": max(r["grad_err"] for r in runs)})
    return merged


def plot_timeline(ax, events, p: int, title: str = ""):
    """Gantt chart of executed events: one row per stage, forwards light, backwards dark,
    labelled with the micro-batch and one prime per chunk after the first (interleaved)."""
    from matplotlib.patches import Patch

    colors = {("F", 0): "#9ecae1", ("B", 0): "#3182bd", ("F", 1): "#fdd0a2", ("B", 1): "#e6550d"}
    chunks = set()
    for rank, kind, mb, chunk, start, end in events:
        chunks.add(chunk)
        ax.barh(rank, end - start, left=start, color=colors[(kind, chunk % 2)], edgecolor="k", lw=0.3)
        ax.text((start + end) / 2, rank, f"{mb}" + "'" * chunk, ha="center", va="center", fontsize=6)
    v = max(chunks, default=0) + 1
    names = {1: [""], 2: [", chunk 0", ", chunk 1 (')"]}.get(v, [", even chunks", ", odd chunks"])
    handles = [Patch(color=colors[(k, c)], label=("forward" if k == "F" else "backward") + name)
               for c, name in enumerate(names) for k in "FB"]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.005, 0.5))
    ax.set_yticks(range(p), [f"stage {r}" for r in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (wall clock)")
    ax.set_title(title, fontsize=9)
