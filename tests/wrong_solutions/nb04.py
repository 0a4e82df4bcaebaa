"""Realistic wrong ring collectives for notebook 04 (run on ranks by the checks)."""
import torch
import torch.distributed as dist

from tests.wrong_solutions import wrong


def _exchange(send, dst, recv, src):
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, dst), dist.P2POp(dist.irecv, recv, src)])
    for req in reqs:
        req.wait()


def _reduce_scatter(chunks, send_idx, recv_idx, steps=None, add=True, right_step=1):
    r, n = dist.get_rank(), dist.get_world_size()
    for s in range(n - 1 if steps is None else steps):
        i, j = send_idx(r, s, n), recv_idx(r, s, n)
        buf = torch.empty_like(chunks[j])
        _exchange(chunks[i], (r + right_step) % n, buf, (r - right_step) % n)
        if add:
            chunks[j] += buf
        else:
            chunks[j].copy_(buf)


@wrong("04.1", "indices run one step late")
def rs_one_step_late(chunks):  # starts by sending chunk rank − 1, not its own chunk
    _reduce_scatter(chunks, lambda r, s, n: (r - s - 1) % n, lambda r, s, n: (r - s - 2) % n)


@wrong("04.1", "is not the one its left neighbour sends")
def rs_receive_into_sent_chunk(chunks):  # adds what arrives into the chunk it just sent
    _reduce_scatter(chunks, lambda r, s, n: (r - s) % n, lambda r, s, n: (r - s) % n)


@wrong("04.1", "is not the one its left neighbour sends")
def rs_indices_count_up(chunks):  # (rank + s) with the neighbours of (rank − s)
    _reduce_scatter(chunks, lambda r, s, n: (r + s) % n, lambda r, s, n: (r + s + 1) % n)


@wrong("04.1", "overwrote the chunk")
def rs_overwrites(chunks):
    _reduce_scatter(chunks, lambda r, s, n: (r - s) % n, lambda r, s, n: (r - s - 1) % n, add=False)


@wrong("04.1", "lacks the values of rank(s)")
def rs_too_few_steps(chunks):  # range(n - 2): one step short
    _reduce_scatter(chunks, lambda r, s, n: (r - s) % n, lambda r, s, n: (r - s - 1) % n,
                    steps=dist.get_world_size() - 2)


@wrong("04.1", "the sum was averaged")
def rs_averaged(chunks):
    _reduce_scatter(chunks, lambda r, s, n: (r - s) % n, lambda r, s, n: (r - s - 1) % n)
    r, n = dist.get_rank(), dist.get_world_size()
    chunks[(r + 1) % n] /= n


@wrong("04.1", "still blocked in dist.send (in rs_send_then_recv, line")
def rs_send_then_recv(chunks):  # blocking send first on every rank: nobody receives
    r, n = dist.get_rank(), dist.get_world_size()
    for s in range(n - 1):
        i, j = (r - s) % n, (r - s - 1) % n
        buf = torch.empty_like(chunks[j])
        dist.send(chunks[i], (r + 1) % n)
        dist.recv(buf, (r - 1) % n)
        chunks[j] += buf


@wrong("04.1", "Size each receive buffer like the chunk it receives")
def rs_equal_buffers(chunks):  # one buffer shaped like chunk 0 for every step
    r, n = dist.get_rank(), dist.get_world_size()
    buf = torch.empty_like(chunks[0])
    for s in range(n - 1):
        i, j = (r - s) % n, (r - s - 1) % n
        _exchange(chunks[i], (r + 1) % n, buf, (r - 1) % n)
        chunks[j] += buf


def _all_gather(chunks, send_idx, recv_idx, add=False):
    r, n = dist.get_rank(), dist.get_world_size()
    for s in range(n - 1):
        i, j = send_idx(r, s, n), recv_idx(r, s, n)
        buf = torch.empty_like(chunks[j])
        _exchange(chunks[i], (r + 1) % n, buf, (r - 1) % n)
        if add:
            chunks[j] += buf
        else:
            chunks[j].copy_(buf)


@wrong("04.2", "receive into the chunk (copy), don't add")
def ag_adds(chunks):  # the reduce-scatter's loop reused as it is
    _all_gather(chunks, lambda r, s, n: (r + 1 - s) % n, lambda r, s, n: (r - s) % n, add=True)


@wrong("04.2", "forwarded a chunk before it had received it")
def ag_reduce_scatter_schedule(chunks):  # the reduce-scatter's indices, which start one chunk early
    _all_gather(chunks, lambda r, s, n: (r - s) % n, lambda r, s, n: (r - s - 1) % n)


@wrong("04.2", "still blocked in dist.recv")
def ag_recv_then_send(chunks):  # blocking receive first on every rank: nobody sends
    r, n = dist.get_rank(), dist.get_world_size()
    for s in range(n - 1):
        dist.recv(chunks[(r - s) % n], (r - 1) % n)
        dist.send(chunks[(r + 1 - s) % n], (r + 1) % n)


@wrong("04.1", "one step too many")
def rs_one_step_too_many(chunks):  # range(n): the extra step adds a finished chunk again
    _reduce_scatter(chunks, lambda r, s, n: (r - s) % n, lambda r, s, n: (r - s - 1) % n,
                    steps=dist.get_world_size())


@wrong("04.2", "never arrived")
def ag_too_few_steps(chunks):  # range(n - 2)
    r, n = dist.get_rank(), dist.get_world_size()
    for s in range(n - 2):
        _exchange(chunks[(r + 1 - s) % n], (r + 1) % n, chunks[(r - s) % n], (r - 1) % n)


@wrong("04.2", "is not the one its left neighbour sends")
def ag_wrong_direction(chunks):  # sends to the left, receives from the right, same indices
    r, n = dist.get_rank(), dist.get_world_size()
    for s in range(n - 1):
        _exchange(chunks[(r + 1 - s) % n], (r - 1) % n, chunks[(r - s) % n], (r + 1) % n)
