"""Sharded checkpoints with torch.distributed.checkpoint (DCP), safe against a crash mid-save.

Layout of <run>/checkpoints/:
    step_00000020/           a complete checkpoint (DCP shards of adapters + optimizer,
                             trainer_state.json, rng_rank<r>.pt)
    step_00000030.partial/   being written; never read
A checkpoint is written into `<name>.partial` and renamed only after every rank has finished
writing and rank 0 wrote `trainer_state.json`, so a crash while saving leaves the previous
checkpoint as the latest complete one. Only trainable parameters (the adapters; with full
fine-tuning every parameter) are saved: a frozen 4-bit base is reloaded from the model files.

`save(..., asynchronous=True)` uses DCP's `async_save`: the state is copied into CPU memory (the
snapshot) before it returns, the shards are written by a background thread, and the returned
`PendingSave.finish()` (collective) waits for them and only then completes the checkpoint, so a
crash while the thread writes leaves the previous checkpoint as the latest.
"""
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

_OPTS = StateDictOptions(ignore_frozen_params=True)
_NAME = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest(root) -> Path | None:
    """The newest complete checkpoint under root (".partial" ones are ignored), or None."""
    root = Path(root)
    if not root.exists():
        return None
    done = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(_NAME.match(p.name).group(1)), default=None)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _begin(root, step: int) -> tuple[Path, Path]:
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".partial")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return final, tmp


def _complete(root, tmp: Path, final: Path, state_json: str, keep: int) -> None:
    """Collective, once every rank's shards are on disk: rank 0 marks the checkpoint complete."""
    _barrier()
    if _rank() == 0:
        # trainer_state.json last: its presence marks a complete checkpoint.
        (tmp / "trainer_state.json").write_text(state_json)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        old = sorted((p for p in Path(root).iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


class PendingSave:
    """An asynchronous checkpoint whose shards a background thread is writing."""

    def __init__(self, root, final: Path, tmp: Path, future, state_json: str, keep: int):
        self.root, self.final, self.tmp, self.future = root, final, tmp, future
        self.state_json, self.keep = state_json, keep

    def done(self) -> bool:
        """This rank's writes finished (other ranks may still be writing: ask them all)."""
        return self.future.done()

    def finish(self) -> Path:
        """Collective: wait for this rank's writes, then complete the checkpoint."""
        self.future.result()  # re-raises a failed write here, on the training thread
        _complete(self.root, self.tmp, self.final, self.state_json, self.keep)
        return self.final


def save(root, step: int, model, optimizer, trainer_state: dict, keep: int = 2,
         crash_hook=None, asynchronous: bool = False, process_group=None):
    """Collective: every rank calls it. Returns the final directory, or with `asynchronous` a
    PendingSave whose finish() every rank must call before the next save and before exiting.
    `process_group`: the group DCP's background thread talks on; give it one of its own (a gloo
    group) so that its collectives never interleave with training's on the default group."""
    final, tmp = _begin(root, step)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTS)
    # the trainer keeps mutating these after an asynchronous save returns: serialise them now
    state_json = json.dumps(trainer_state, indent=2)
    if asynchronous:
        # stages (copies) every tensor to CPU memory before returning, then writes in a thread
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp),
                                process_group=process_group)
    else:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if crash_hook is not None:
        crash_hook()  # tests: die with the shards half written (or, async, still being written)
    if asynchronous:
        return PendingSave(root, final, tmp, future, state_json, keep)
    _complete(root, tmp, final, state_json, keep)
    return final


def load(path, model, optimizer) -> dict:
    """Collective: restore adapters, optimizer and this rank's RNG; return trainer_state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    # strict=False: the frozen 4-bit base is not in the checkpoint (it comes from the model files);
    # every trainable tensor must be, though.
    res = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                         options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(res, "missing_keys", []) if k in trainable]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks trainable tensors: {missing[:5]}")
    rng_file = path / f"rng_rank{_rank()}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(f"{rng_file} missing: resume with the world size the checkpoint "
                                f"was written with")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def save_adapter(model, out_dir) -> Path:
    """Collective: gather the full adapter on rank 0 and write it in PEFT format
    (adapter_config.json + adapter_model.safetensors), loadable by PeftModel.from_pretrained."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    out_dir = Path(out_dir)
    if _rank() == 0:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        # PEFT's own key names (no ".default"), from the gathered full tensors.
        own = get_peft_model_state_dict(model, state_dict=full)
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.peft_config["default"].save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in own.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    _barrier()
    return out_dir


def save_model(model, out_dir) -> Path:
    """Collective: gather the fully fine-tuned model on rank 0 and write it in transformers' format
    (config.json + model.safetensors), loadable by AutoModelForCausalLM.from_pretrained."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out_dir = Path(out_dir)
    if _rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), state_dict=full)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    _barrier()
    return out_dir
