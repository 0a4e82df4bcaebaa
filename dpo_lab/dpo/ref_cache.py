"""The reference log-probs of each training row, computed once and kept on disk.

The reference policy never changes during DPO, so log π_ref(y|x) of a row is a constant of the
run (Rafailov et al. 2023, §4; TRL's `precompute_ref_log_probs`). We store it per data row, not
per step, so a β sweep, another seed or a resumed run reuses it:

    <cache>/ref_logps/<fingerprint>/manifest.json        the inputs hashed + the parts below
    <cache>/ref_logps/<fingerprint>/part-<sha>.safetensors  row keys (N, 16) uint8, chosen (N,), rejected (N,)

The fingerprint hashes what the numbers depend on besides the row: the base model's files
(config + weights, read from disk: the adapters are never in them), the tokenizer's serialisation,
max_length, the dtypes, the quantisation settings and ld_alpha. A row's key hashes its token ids,
so a changed text, tokenizer or truncation gives new keys. Files are written to a temporary name
and renamed (atomic on POSIX), and each part's sha256 is in the manifest: a torn or corrupt part
is reported by name and its rows are recomputed.
"""
import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

SCHEMA = 1  # bump when the log-prob convention changes: old caches then miss instead of lying
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
    """16-byte key of one encoded pair: its prompt, chosen and rejected token ids."""
    ids = [encoded["prompt_ids"], encoded["chosen_ids"], encoded["rejected_ids"]]
    return hashlib.blake2b(json.dumps(ids).encode(), digest_size=16).digest()


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half


class RefCache:
    """One fingerprint's directory. `load` returns {row key: (chosen, rejected)} and the problems
    it found; `save` adds a part."""

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
        for part in self._parts(problems):
            path = self.dir / part["file"]
            try:
                if not path.exists():
                    raise FileNotFoundError("missing")
                if _sha256_file(path) != part["sha256"]:
                    raise ValueError("sha256 differs from the manifest (truncated or corrupt)")
                t = load_file(str(path))
                keys, c, r = t["keys"], t["chosen"], t["rejected"]
                if not (keys.shape == (part["rows"], 16) and c.shape == r.shape == (part["rows"],)):
                    raise ValueError(f"shapes {tuple(keys.shape)}, {tuple(c.shape)}, {tuple(r.shape)} "
                                     f"do not hold {part['rows']} rows")
            except Exception as e:  # noqa: BLE001  (any unreadable part: recompute, never crash)
                problems.append(f"{path}: {e}; its {part.get('rows', '?')} rows are recomputed")
                continue
            for k, a, b in zip(keys.numpy(), c.tolist(), r.tolist()):
                table[bytes(k)] = (a, b)
        return table, problems

    def save(self, new: dict) -> Path:
        """Write `new` {key: (chosen, rejected)} as one part, then list it in the manifest."""
        from safetensors.torch import save_file
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = sorted(new)
        tensors = {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(-1, 16),
                   "chosen": torch.tensor([new[k][0] for k in keys], dtype=torch.float32),
                   "rejected": torch.tensor([new[k][1] for k in keys], dtype=torch.float32)}
        name = "part-" + hashlib.sha256(b"".join(keys)).hexdigest()[:16] + ".safetensors"
        _atomic_write(self.dir / name, lambda p: save_file(tensors, str(p)))
        parts = [q for q in self._parts([]) if q["file"] != name]  # re-read: another run may have added one
        parts.append({"file": name, "rows": len(keys), "sha256": _sha256_file(self.dir / name)})
        body = json.dumps({"inputs": self.inputs, "parts": parts}, indent=1)
        _atomic_write(self.manifest, lambda p: p.write_text(body))
        return self.dir / name


def precompute(cache: RefCache | None, keys: dict, batches, forward) -> tuple[dict, dict]:
    """Collective: the reference log-probs of every row in `keys` {row index: row key}.

    Rank 0 alone reads the cache and broadcasts it, so all ranks agree on which rows are missing.
    `batches(r)` lists rank r's micro-batches (lists of row indices, in training order) and
    `forward(idx)` runs THIS rank's reference forward on one (a collective under FSDP). A
    micro-batch runs on every rank when any rank's copy of it holds a missing row, so all ranks
    run the same forwards in the same order; the results are gathered and rank 0 writes them.
    Returns ({row index: (chosen, rejected)}, stats)."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    table, problems = cache.load() if cache is not None and rank == 0 else ({}, [])
    shared = [table, problems]
    dist.broadcast_object_list(shared, src=0)
    table, problems = shared
    for p in problems if rank == 0 else []:
        print(f"reference cache: {p}", flush=True)
    missing = {k for k in keys.values() if k not in table}
    plans = [batches(r) for r in range(ws)]
    mine, forwards = {}, 0
    for j, idx in enumerate(plans[rank]):
        if not any(keys[i] in missing for p in plans for i in p[j]):
            continue
        forwards += 1
        chosen, rejected = forward(idx)
        for i, a, b in zip(idx, chosen.tolist(), rejected.tolist()):
            if keys[i] in missing:
                mine.setdefault(keys[i], (a, b))
    gathered = [None] * ws
    dist.all_gather_object(gathered, mine)
    new = {}
    for part in gathered:  # rank order: the same choice on every rank for a row seen twice
        for k, v in part.items():
            new.setdefault(k, v)
    if new and cache is not None and rank == 0:
        cache.save(new)
    dist.barrier()  # the part is on disk before any rank goes on (the group's timeout guards it)
    table.update(new)
    stats = {"rows": len(set(keys.values())), "reused": len(set(keys.values())) - len(missing),
             "computed": len(new), "forwards": forwards, "problems": problems,
             "dir": str(cache.dir) if cache is not None else None}
    return {i: table[k] for i, k in keys.items()}, stats
