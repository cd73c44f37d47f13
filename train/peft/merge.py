"""Fold adapters into the base kernels and take them out again (float32 math).

- LoRA / LoRA+ / QLoRA: ``W + s * A @ B`` (QLoRA merges into the dequantised base).
- DoRA: ``m * (W + s A B) / ||W + s A B||`` (norm over the input axes).
- (IA)3: output scaling multiplies the kernel's output columns (and bias);
  input scaling (``ia3_in``) multiplies its input rows.

Unmerging is exact up to float32 rounding for LoRA and (IA)3; DoRA cannot
be unmerged (the norm of the adapted weight is not recoverable from the
merged weight) and prefix / prompt tuning have nothing to merge.
"""

import jax
import jax.numpy as jnp

from cadenza.errors import CadenzaError
from cadenza.train.peft.model import PeftModel, column_norm, lora_delta
from cadenza.train.peft.sites import get_path


def _base_params(pm: PeftModel, frozen):
    return pm.dequantized_params(frozen) if pm.method == "qlora" else frozen["params"]


def _fold(pm: PeftModel, trainable, params, sign: int):
    pc = pm.peft_config
    params = jax.tree.map(lambda x: x, params)
    for s in pm.sites:
        module = get_path(params, s.path)
        ad = get_path(trainable["peft"], s.path)
        kernel = module["kernel"]
        w = kernel.astype(jnp.float32)
        lead, n_in, n_out = len(s.lead), len(s.in_shape), len(s.out_shape)
        if "lora_a" in ad:
            delta = pc.scaling * lora_delta(ad["lora_a"], ad["lora_b"], lead)
            if "dora_magnitude" in ad:
                w = w + delta
                w = w * (ad["dora_magnitude"] / column_norm(w, n_in, lead)).reshape(
                    s.lead + (1,) * n_in + s.out_shape)
            else:
                w = w + sign * delta
        if "ia3_out" in ad:
            lv = ad["ia3_out"].reshape(s.lead + (1,) * n_in + s.out_shape)
            w = w * lv if sign > 0 else w / lv
            if s.use_bias:
                b = module["bias"].astype(jnp.float32)
                module["bias"] = (b * ad["ia3_out"] if sign > 0
                                  else b / ad["ia3_out"]).astype(module["bias"].dtype)
        if "ia3_in" in ad:
            lv = ad["ia3_in"].reshape(s.lead + s.in_shape + (1,) * n_out)
            w = w * lv if sign > 0 else w / lv
        module["kernel"] = w.astype(kernel.dtype)
    return params


def _check(pm: PeftModel, what: str):
    if pm.method in ("none", "prefix", "prompt"):
        raise CadenzaError(f"method {pm.method!r} has no adapter weights to {what}",
                           where="peft.method",
                           fix="merge works for lora, lora_plus, dora, qlora and ia3")


def merge(pm: PeftModel, trainable, frozen):
    """Full base params (plain model layout) with the adapters folded in, in the param dtype."""
    _check(pm, "merge")
    return jax.jit(lambda t, f: _fold(pm, t, _base_params(pm, f), +1))(trainable, frozen)


def unmerge(pm: PeftModel, trainable, merged_params):
    """The base params back from :func:`merge`'s output (LoRA family except DoRA, (IA)3)."""
    _check(pm, "unmerge")
    if pm.method == "dora":
        raise CadenzaError("DoRA cannot be unmerged: the merged weight does not keep the "
                           "norm of W + sBA", where="peft.method",
                           fix="keep the base model and the adapters, and merge a copy")
    return jax.jit(lambda t, p: _fold(pm, t, p, -1))(trainable, merged_params)
