"""QLoRA under FSDP2: a 4-bit NF4 base, LoRA adapters on top, every decoder layer sharded.

The recipe, and why each step is there (QLoRA, Dettmers et al. 2023; Answer.AI's FSDP + QLoRA, 2024):
1. Load the base through `BitsAndBytesConfig` with double quantisation and a *float* storage dtype:
   FSDP shards only floating tensors, so the packed 4-bit bytes travel in a bf16 container.
2. Add LoRA with PEFT and keep the adapters in a fixed dtype (bf16 as in QLoRA).
3. `fully_shard` each decoder layer, then the root; nothing may cast the storage dtype.
The reference policy is the same module with the adapters disabled (`model.disable_adapter()`).
Full fine-tuning (train.finetune=full, `full_finetune`) skips 1-2: an unquantised model, every
parameter trainable, sharded the same way.
"""
import torch
import torch.nn as nn

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
         "uint8": torch.uint8}


class WrapError(ValueError):
    """The model has no list of decoder layers that FSDP can wrap one by one."""


def bnb_config(q):
    """`QuantConfig` -> transformers' BitsAndBytesConfig (None when 4-bit loading is off)."""
    from transformers import BitsAndBytesConfig
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPE[q.compute_dtype],
        bnb_4bit_quant_storage=DTYPE[q.storage_dtype])


def one_kernel_path(model):
    """Make every 4-bit layer compute through one numerical path, on any CPU and on CUDA.

    On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks its weight the first time
    it runs in eval mode on an input without grad, and from then on multiplies with a bf16 inference
    kernel (`gemv_4bit`); otherwise it dequantises to the compute dtype and uses a plain matmul. The
    DPO reference forward (no grad, adapters off) would then be a different function from the policy
    forward, so at step 1 the implicit rewards would not be zero and the loss not ln 2. We switch
    the repack off. A repack that already happened is undone, with a warning: it is lossy (the
    block scales were rounded to bf16), so call this before any forward, as `load_model` does.
    Returns the number of 4-bit layers seen.
    """
    import warnings

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    n = repacked = 0
    for m in model.modules():
        if not hasattr(m, "support_avx512bf16_for_cpu"):
            continue
        n += 1
        m.support_avx512bf16_for_cpu = False
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
            repacked += 1
    if repacked:
        warnings.warn(f"{repacked} 4-bit layers had already been repacked for bitsandbytes' bf16 CPU "
                      f"kernel, which rounds their block scales to bf16; unpacked them, but the weights "
                      f"now differ slightly from the checkpoint. Load 4-bit models with "
                      f"dpo_lab.models.load_model to avoid this.", stacklevel=2)
    return n


def resolve_model(name: str) -> str:
    """'tiny-sft' is the workbook's SFT model (trained and cached on first use); else a dir or HF name."""
    if name == "tiny-sft":
        from dpo_lab.models import sft_model_dir
        return str(sft_model_dir(progress=False))
    return name


def load_quantized(model_cfg, quant_cfg, device: torch.device | None = None):
    """Base model in 4 bits and its tokenizer. The quantisation config places the weights:
    `.to(device)` on a 4-bit model afterwards is the classic mistake, so we pass a device_map."""
    from dpo_lab.models import load_model
    kwargs = {}
    if device is not None and device.type == "cuda":
        kwargs["device_map"] = {"": device.index}
    model, tok = load_model(resolve_model(model_cfg.name), dtype=DTYPE[model_cfg.dtype],
                            quantization_config=bnb_config(quant_cfg), **kwargs)
    if device is not None and device.type == "cuda" and not quant_cfg.load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    return model, tok


def enable_checkpointing(model) -> None:
    """Activation checkpointing per decoder layer, the reentrant variant: bitsandbytes + LoRA need
    it (the other one blows memory up), and full fine-tuning uses the same so both recompute alike."""
    # transformers 5 renamed gradient_checkpointing_enable (the old name warns); 4.x has only it.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()  # reentrant checkpointing passes no gradient otherwise


def full_finetune(model, gradient_checkpointing: bool = False):
    """Every parameter trainable in the dtype it was loaded in (model.dtype); refuses a 4-bit model."""
    quantised = [n for n, p in model.named_parameters() if hasattr(p, "quant_state")]
    if quantised:
        raise ValueError(f"full fine-tuning cannot train 4-bit weights ({quantised[0]} and "
                         f"{len(quantised) - 1} more); load the model with quant.load_in_4bit=false")
    if gradient_checkpointing:
        enable_checkpointing(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def add_lora(model, lora_cfg, gradient_checkpointing: bool = False, seed: int = 0):
    """Wrap with PEFT LoRA; adapters get `lora_cfg.dtype`, everything else stays frozen."""
    from peft import LoraConfig, get_peft_model
    if gradient_checkpointing:
        enable_checkpointing(model)
    peft_cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=list(lora_cfg.target_modules), bias="none",
                          task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # lora_A init: same adapters on every rank and in every run
    model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    dtype = DTYPE[lora_cfg.dtype]
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def decoder_layers(model) -> nn.ModuleList:
    """The repeated decoder layers, each one FSDP unit. Raises WrapError naming the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    no_split = set(getattr(base, "_no_split_modules", None) or [])
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m).__name__ for m in module}
            if len(kinds) == 1 and (kinds & no_split or "Layer" in next(iter(kinds))
                                    or "Block" in next(iter(kinds))):
                return module
    raise WrapError(f"{type(base).__name__} has no ModuleList of decoder layers to wrap with "
                    f"fully_shard (looked for {sorted(no_split) or 'classes named *Layer/*Block'})")


def shard(model, mesh, fsdp_cfg):
    """fully_shard every decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    layers = decoder_layers(model)
    one_kernel_path(model)  # also: a repack (`weight.data = ...`) would overwrite FSDP's gathered param
    kw = {"mesh": mesh, "reshard_after_forward": fsdp_cfg.reshard_after_forward}
    if fsdp_cfg.param_dtype or fsdp_cfg.reduce_dtype:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=DTYPE[fsdp_cfg.param_dtype] if fsdp_cfg.param_dtype else None,
            reduce_dtype=DTYPE[fsdp_cfg.reduce_dtype] if fsdp_cfg.reduce_dtype else None)
    if fsdp_cfg.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


# --- memory accounting ------------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_constants_bytes(qs) -> dict:
    """Bytes of one weight's quantisation constants: the per-block absmax (uint8 when double
    quantised) and, for double quantisation, its own fp32 absmax and offset; plus the code tables."""
    out = {"absmax": _nbytes(qs.absmax), "absmax2": 0, "code": _nbytes(qs.code)}
    if qs.nested:
        out["absmax2"] = _nbytes(qs.state2.absmax) + _nbytes(qs.offset)
        out["code"] += _nbytes(qs.state2.code)
    return out


def memory_report(model) -> dict:
    """Per-rank bytes held, split into 4-bit base weights, their constants, adapters and the rest.

    `base_bytes_per_param` = (packed weights + absmax + second-level constants) / #params of the
    quantised layers; NF4 with double quantisation expects 4 + 8/64 + 32/(64*256) = 4.127 bits.
    The 16-entry/256-entry code tables are per tensor, so they are reported separately.
    """
    rep = dict(base_local=0, base_total=0, base_params=0, constants=0, code_tables=0,
               adapters_local=0, adapters_total=0, other_local=0, other_total=0)
    quantised = set()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        qs = getattr(mod, "quant_state", None) or getattr(w, "quant_state", None)
        if w is None or qs is None:
            continue
        quantised.add(id(w))
        rep["base_local"] += _nbytes(_local(w))
        rep["base_total"] += _nbytes(w)
        rep["base_params"] += int(torch.Size(qs.shape).numel())
        c = quant_constants_bytes(qs)
        rep["constants"] += c["absmax"] + c["absmax2"]
        rep["code_tables"] += c["code"]
    for name, p in model.named_parameters():
        if id(p) in quantised:
            continue
        key = "adapters" if p.requires_grad else "other"
        rep[f"{key}_local"] += _nbytes(_local(p))
        rep[f"{key}_total"] += _nbytes(p)
    if rep["base_params"]:
        rep["base_bytes_per_param"] = (rep["base_total"] + rep["constants"]) / rep["base_params"]
        rep["base_bits_per_param"] = 8 * rep["base_bytes_per_param"]
        rep["base_local_fraction"] = rep["base_local"] / rep["base_total"]
    if rep["adapters_total"]:
        rep["adapters_local_fraction"] = rep["adapters_local"] / rep["adapters_total"]
    return rep
