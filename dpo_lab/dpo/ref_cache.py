"""The reference log-probs of each training micro-batch, computed once and kept on disk.

The reference policy never changes during DPO, so log π_ref(y|x) is a constant of the run
(Rafailov et al. 2023, §4; TRL's `precompute_ref_log_probs`), and a β sweep, a rerun or a resumed
run can reuse it. Reused values must be the very floats a fresh reference forward would give,
since step-1 metrics compare policy and reference exactly (`rewards/accuracies` counts `>`). A
row's log-prob is not a function of the row alone: its micro-batch's padded length, packing
layout and neighbours change the matmul shapes and so the float rounding (~1e-7). So a value is
keyed by the whole computation that produced it, and reused only for the same computation:

    entry key = H(micro-batch key, position of the row in it)
    micro-batch key = H(every tensor the forward receives: names, dtypes, shapes, bytes,
                        + its other fields + the rank's environment: torch and transformers
                        versions, torch threads, world size, device)

and the directory's fingerprint hashes the rest: the base model's files (config + weights, read
from disk: the adapters are never in them), the tokenizer, max_length, the dtypes, the
quantisation settings, ld_alpha and the log-prob path. Same fingerprint and same micro-batch key
means the same deterministic forward on the same inputs, hence the same bits; anything else
misses and is recomputed (`stats["other_layout"]` counts rows that were cached under another
make-up). Keying by the actual tensors rather than by a list of layout settings means a layout
option added later cannot be forgotten in the key. What it costs: another world size, batch size
or thread count recomputes instead of reusing values that may be ~1e-7 off.

    <cache>/ref_logps/<fingerprint>/manifest.json           the inputs hashed + the parts below
    <cache>/ref_logps/<fingerprint>/part-<sha>.safetensors  entry keys (N, 16), row keys (N, 16),
                                                             chosen (N,), rejected (N,) float32

Files are written under a unique temporary name and renamed (atomic on POSIX), the manifest's
read-modify-write holds an exclusive lock (two runs with one fingerprint, e.g. pytest-xdist
workers, never drop each other's parts), and each part's sha256 is in the manifest: a torn or
corrupt part is reported by name and its rows are recomputed. Loading touches the manifest, so its
mtime is the directory's last use: `prune` (`dpo-lab cache --max-gib N`) deletes the least recently
used directories until the cache fits.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

SCHEMA = 2  # bump when the key or log-prob convention changes: old caches then miss instead of lying
_HUB_BLOB = re.compile(r"^[0-9a-f]{64}$")


def _sha256_file(path: Path) -> str:
    # A HF hub snapshot links to blobs named by their sha256: no need to read 16 GB again.
    real = Path(os.path.realpath(path))
    if _HUB_BLOB.match(real.name):
        return real.name
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(model_dir) -> str:
    """sha256 over the model dir's config and weight files (the base alone: adapters live elsewhere)."""
    d = Path(model_dir)
    if not d.is_dir():
        from huggingface_hub import snapshot_download  # a hub name: its local snapshot, no download
        d = Path(snapshot_download(str(model_dir), local_files_only=True))
    files = sorted(p for p in d.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise FileNotFoundError(f"{d}: no .safetensors or .bin weights to fingerprint")
    return hashlib.sha256("".join(f"{p.name}:{_sha256_file(p)};" for p in files).encode()).hexdigest()


def tokenizer_digest(tok) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normaliser) and special tokens."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    special = json.dumps([tok.eos_token, tok.pad_token, tok.bos_token, tok.padding_side])
    return hashlib.sha256((text + special).encode()).hexdigest()


def row_key(encoded: dict) -> bytes:
    """16-byte key of one encoded pair: its prompt, chosen and rejected token ids (for the stats:
    it tells a row cached under another micro-batch make-up from a row never seen)."""
    ids = [encoded["prompt_ids"], encoded["chosen_ids"], encoded["rejected_ids"]]
    return hashlib.blake2b(json.dumps(ids).encode(), digest_size=16).digest()


def environment(device) -> dict:
    """What besides the inputs decides a forward's rounding on this rank."""
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "world_size": dist.get_world_size() if dist.is_initialized() else 1,
           "device": torch.device(device).type}
    if env["device"] == "cuda":  # kernels differ between GPU models and with TF32 on or off
        env.update(gpu=torch.cuda.get_device_name(device), tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_tf32=torch.backends.cudnn.allow_tf32)
    return env


def batch_key(batch: dict, env: dict) -> bytes:
    """16-byte key of one micro-batch as the reference forward receives it: every tensor's name,
    dtype, shape and bytes (so the padded or packed length and the row order are in it), every
    other field, and the rank's `environment`."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(env, sort_keys=True).encode())
    for name in sorted(batch):
        v = batch[name]
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"|{name}:{t.dtype}:{tuple(v.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"|{name}={v!r}".encode())
    return h.digest()


def entry_key(micro_key: bytes, position: int) -> bytes:
    """Key of the row at `position` of the micro-batch keyed `micro_key`."""
    return hashlib.blake2b(micro_key + position.to_bytes(4, "little"), digest_size=16).digest()


def fingerprint_inputs(cfg, model_dir, tok, device_type: str = "cpu") -> dict:
    """Everything besides the row that the reference log-probs depend on."""
    return {"schema": SCHEMA, "model": model_digest(model_dir), "tokenizer": tokenizer_digest(tok),
            "max_length": cfg.data.max_length, "dtype": cfg.model.dtype,
            "param_dtype": cfg.fsdp.param_dtype, "quant": asdict(cfg.quant),
            "ld_alpha": cfg.dpo.ld_alpha, "device": device_type,
            # how the log-probs are computed: another path agrees only to float noise
            "logps": [cfg.dpo.chunked_logps, cfg.dpo.logps_chunk_size if cfg.dpo.chunked_logps else None,
                      cfg.data.packing, cfg.data.max_tokens_per_row]}


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def _atomic_write(path: Path, write) -> None:
    # unique per writer (pid + random): two processes never write into one temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path):
    """Exclusive advisory lock: one manifest read-modify-write at a time across processes."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RefCache:
    """One fingerprint's directory. `load` returns {entry key: (row key, chosen, rejected)} and the
    problems it found; `save` adds a part."""

    def __init__(self, root, inputs: dict):
        self.inputs = inputs
        self.dir = Path(root) / "ref_logps" / fingerprint(inputs)
        self.manifest = self.dir / "manifest.json"

    def _parts(self, problems: list) -> list:
        if not self.manifest.exists():
            return []
        try:
            return json.loads(self.manifest.read_text())["parts"]
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{self.manifest}: unreadable manifest ({e}); recomputing every row")
            return []

    def load(self) -> tuple[dict, list]:
        from safetensors.torch import load_file
        table, problems = {}, []
        if self.manifest.exists():
            os.utime(self.manifest)  # last use, for `prune`
        for part in self._parts(problems):
            path = self.dir / part["file"]
            try:
                if not path.exists():
                    raise FileNotFoundError("missing")
                if _sha256_file(path) != part["sha256"]:
                    raise ValueError("sha256 differs from the manifest (truncated or corrupt)")
                t = load_file(str(path))
                keys, rows, c, r = t["keys"], t["rows"], t["chosen"], t["rejected"]
                n = part["rows"]
                if not (keys.shape == rows.shape == (n, 16) and c.shape == r.shape == (n,)):
                    raise ValueError(f"shapes {tuple(keys.shape)}, {tuple(rows.shape)}, {tuple(c.shape)}, "
                                     f"{tuple(r.shape)} do not hold {n} rows")
            except Exception as e:  # noqa: BLE001  (any unreadable part: recompute, never crash)
                problems.append(f"{path}: {e}; its {part.get('rows', '?')} rows are recomputed")
                continue
            for k, w, a, b in zip(keys.numpy(), rows.numpy(), c.tolist(), r.tolist()):
                table[bytes(k)] = (bytes(w), a, b)
        return table, problems

    def save(self, new: dict) -> Path:
        """Write `new` {entry key: (row key, chosen, rejected)} as one part, then list it in the manifest."""
        from safetensors.torch import save_file
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = sorted(new)

        def column(j, dtype):
            return torch.tensor([new[k][j] for k in keys], dtype=dtype)
        tensors = {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(-1, 16),
                   "rows": torch.tensor([list(new[k][0]) for k in keys], dtype=torch.uint8).reshape(-1, 16),
                   "chosen": column(1, torch.float32), "rejected": column(2, torch.float32)}
        name = "part-" + hashlib.sha256(b"".join(keys)).hexdigest()[:16] + ".safetensors"
        _atomic_write(self.dir / name, lambda p: save_file(tensors, str(p)))
        with _locked(self.dir / ".lock"):  # re-read under the lock: another run may have added a part
            parts = [q for q in self._parts([]) if q["file"] != name]
            parts.append({"file": name, "rows": len(keys), "sha256": _sha256_file(self.dir / name)})
            body = json.dumps({"inputs": self.inputs, "parts": parts}, indent=1)
            _atomic_write(self.manifest, lambda p: p.write_text(body))
        return self.dir / name


def usage(root) -> list[dict]:
    """Each fingerprint directory under `root`/ref_logps: {dir, bytes, rows, last_used (epoch s)},
    most recently used first."""
    out = []
    for d in sorted((Path(root) / "ref_logps").glob("*/")):
        manifest = d / "manifest.json"
        try:
            rows = sum(p["rows"] for p in json.loads(manifest.read_text())["parts"])
        except (OSError, ValueError, KeyError, TypeError):
            rows = None  # unreadable: a candidate for pruning like any other
        last = (manifest if manifest.exists() else d).stat().st_mtime
        out.append({"dir": d, "bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
                    "rows": rows, "last_used": last})
    return sorted(out, key=lambda e: -e["last_used"])


def prune(root, max_bytes: int, min_idle_s: float = 60.0) -> list[dict]:
    """Delete the least recently used fingerprint directories until the rest take at most
    `max_bytes`; one used in the last `min_idle_s` seconds is kept (a run may be writing it).
    Returns the entries deleted."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes} must be >= 0")
    entries, gone = usage(root), []
    total = sum(e["bytes"] for e in entries)
    for e in reversed(entries):  # oldest first
        if total <= max_bytes:
            break
        if time.time() - e["last_used"] < min_idle_s:
            continue
        shutil.rmtree(e["dir"], ignore_errors=True)
        total -= e["bytes"]
        gone.append(e)
    return gone


def precompute(cache: RefCache | None, plan: list, build, forward, row_keys: dict, env: dict):
    """Collective: the reference log-probs of each of this rank's micro-batches.

    `plan` lists this rank's micro-batches (lists of row indices) in training order, `build(idx)`
    makes one exactly as training does, `forward(batch)` runs THIS rank's reference forward on it
    (a collective under FSDP) and `row_keys` maps a row index to its `row_key`. Rank 0 alone reads
    the cache and answers every rank's entry keys, so all ranks agree on which micro-batches miss:
    micro-batch j runs on every rank when any rank's j-th misses, so the FSDP forwards stay in step.
    The new values are gathered and rank 0 writes them.
    Returns ([(chosen, rejected) float32 (B,) tensors per micro-batch of `plan`], stats)."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    mine = [[entry_key(batch_key(build(idx), env), p) for p in range(len(idx))] for idx in plan]
    gathered = [None] * ws
    dist.all_gather_object(gathered, [mine, [[row_keys[i] for i in idx] for idx in plan]])
    if len({len(g[0]) for g in gathered}) != 1:
        raise RuntimeError(f"ranks plan {[len(g[0]) for g in gathered]} micro-batches: they must agree")
    shared = [{}, [], 0]  # hits {entry key: value}, problems, rows cached under another make-up
    if rank == 0:
        table, problems = cache.load() if cache is not None else ({}, [])
        cached_rows = {v[0] for v in table.values()}
        hits = {e: table[e] for es, _ in gathered for m in es for e in m if e in table}
        other = sum(w in cached_rows for es, rows in gathered for m, rs in zip(es, rows)
                    for e, w in zip(m, rs) if e not in hits)
        shared = [hits, problems, other]
        for p in problems:
            print(f"reference cache: {p}", flush=True)
    dist.broadcast_object_list(shared, src=0)
    hits, problems, other = shared
    values, new, forwards = [], {}, 0
    for j, idx in enumerate(plan):
        if all(e in hits for es, _ in gathered for e in es[j]):
            values.append(tuple(torch.tensor([hits[e][k] for e in mine[j]], dtype=torch.float32) for k in (1, 2)))
            continue
        forwards += 1
        chosen, rejected = forward(build(idx))
        if chosen.dtype != torch.float32 or rejected.dtype != torch.float32:
            raise TypeError(f"reference log-probs are {chosen.dtype}/{rejected.dtype}; the cache "
                            f"stores float32 and would round them")
        values.append((chosen.detach().cpu(), rejected.detach().cpu()))
        for e, i, a, b in zip(mine[j], idx, chosen.tolist(), rejected.tolist()):
            if e not in hits:  # another rank's miss made this one run: its value is cached already
                new[e] = (row_keys[i], a, b)
    everyone = [None] * ws
    dist.all_gather_object(everyone, new)
    new = {k: v for part in everyone for k, v in part.items()}  # entry keys hold the rank's env: no clash
    if new and cache is not None and rank == 0:
        cache.save(new)
    dist.barrier()  # the part is on disk before any rank goes on (the group's timeout guards it)
    n_rows = sum(len(m) for es, _ in gathered for m in es)
    stats = {"micro_batches": sum(len(es) for es, _ in gathered), "rows": n_rows,
             "reused": n_rows - len(new), "computed": len(new), "other_layout": other,
             "forwards": forwards, "problems": problems, "dir": str(cache.dir) if cache is not None else None}
    return values, stats
