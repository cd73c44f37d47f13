"""Quantized Hugging Face checkpoints: the layouts cadenza maps onto its own formats.

cadenza reads one family of quantized HF checkpoints: **compressed-tensors**
(``quantization_config.quant_method: compressed-tensors``, as written by
llm-compressor) with symmetric, static, integer, weight-only quantisation:

- ``int8`` per output channel (``strategy: channel``, ``num_bits: 8``) onto
  cadenza's ``int8`` format;
- ``int4`` group-wise (``strategy: group``, ``num_bits: 4``, any ``group_size``)
  onto cadenza's ``int4`` format with that group;

both in the ``pack-quantized`` format (the one compressed-tensors writes and
reads for integer weight-only schemes).

A quantized ``nn.Linear`` ``<base>.weight`` is stored as ``<base>.weight_packed``
(int32 ``[out, ceil(in * bits / 32)]``: element ``i`` of a row at bit ``i * bits``,
little-endian, holding ``code + 2 ** (bits - 1)``), ``<base>.weight_scale``
(float ``[out, 1]`` per channel or ``[out, ceil(in / group)]`` per group) and
``<base>.weight_shape`` (``[out, in]``); the weight is ``code * scale``. Codes and
scales are carried over unchanged (int4 codes are repacked into cadenza's
nibbles, scales cast to float32 exactly): nothing is dequantised or re-quantised,
so cadenza computes with exactly the checkpoint's weights.

Everything else (GPTQ, AWQ, bitsandbytes, fp8, activation quantisation,
asymmetric zero points, act-order ``g_idx``, int8 groups, sparsity, KV-cache
schemes) is refused with one line naming the config field and what cadenza accepts.
"""

import dataclasses
import math
import re

import numpy as np

from cadenza.errors import CadenzaError
from cadenza.models import quant

METHOD = "compressed-tensors"
ACCEPTED = ("cadenza imports compressed-tensors checkpoints (format pack-quantized) with "
            "symmetric static int weights only: int8 per channel or int4 per group")
FIX = ("import the float checkpoint and quantize it with 'cadenza convert quantize --scheme "
       "int8|int4|nf4' (or 'cadenza generate --quantize')")
PACKED = "pack-quantized"


@dataclasses.dataclass(frozen=True)
class HFQuant:
    """The quantisation of an accepted checkpoint: cadenza ``scheme`` (int8/int4) and the
    int4 ``group`` (0 for int8)."""

    scheme: str
    group: int

    @property
    def bits(self) -> int:
        """Bits per code (8 or 4)."""
        return 8 if self.scheme == "int8" else 4


def _refuse(what: str, field: str, where: str):
    raise CadenzaError(f"{what}; {ACCEPTED}", where=f"{where}: quantization_config{field}",
                       fix=FIX)


def parse(quant, where: str = "config.json") -> HFQuant:
    """The :class:`HFQuant` of a config.json ``quantization_config`` dict.

    Raises CadenzaError (one line: the field, its value, what is accepted) for any
    method, format or setting cadenza cannot map exactly onto its formats.
    """
    if not isinstance(quant, dict):
        _refuse("quantization_config is not a JSON object", "", where)
    method = quant.get("quant_method", "not given")
    if method != METHOD:
        _refuse(f"the checkpoint is quantized with quant_method: {method}", ".quant_method", where)
    status = quant.get("quantization_status", "compressed")
    if status != "compressed":
        _refuse(f"quantization_status is {status!r}, not 'compressed'", ".quantization_status",
                where)
    for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if quant.get(field):
            _refuse(f"{method} with {field} (not weight-only quantisation)", f".{field}", where)
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        _refuse(f"{method} without config_groups", ".config_groups", where)
    found = {_parse_group(name, group, quant.get("format"), where)
             for name, group in groups.items()}
    if len(found) > 1:
        _refuse(f"config_groups mix {len(found)} schemes ({sorted(found, key=str)})",
                ".config_groups", where)
    return found.pop()


def _parse_group(name: str, group, top_format, where: str) -> HFQuant:
    field = f".config_groups.{name}"
    if not isinstance(group, dict):
        _refuse("a config group is not a JSON object", field, where)
    fmt = group.get("format") or top_format
    fmt_field = f"{field}.format" if group.get("format") else ".format"
    for side in ("input_activations", "output_activations"):
        if group.get(side):
            _refuse(f"{side} are quantized too (cadenza runs weight-only quantisation)",
                    f"{field}.{side}", where)
    args = group.get("weights")
    if not isinstance(args, dict):
        _refuse("a config group quantizes no weights", f"{field}.weights", where)
    field += ".weights"
    kind, bits = args.get("type", "int"), args.get("num_bits")
    strategy, size = args.get("strategy"), args.get("group_size")
    checks = (("type", kind == "int", f"type {kind!r} (only int)"),
              ("symmetric", args.get("symmetric", True) is True,
               "asymmetric quantisation (zero points)"),
              ("dynamic", not args.get("dynamic"), "dynamic quantisation"),
              ("actorder", args.get("actorder") in (None, "weight"),
               f"actorder {args.get('actorder')!r} (g_idx column order)"),
              ("block_structure", not args.get("block_structure"), "block quantisation"),
              ("num_bits", bits in (4, 8), f"num_bits {bits}"),
              ("strategy", (bits, strategy) in ((8, "channel"), (4, "group")),
               f"{bits}-bit weights with strategy {strategy!r}"))
    for key, ok, what in checks:
        if not ok:
            _refuse(what, f"{field}.{key}", where)
    if fmt != PACKED:
        _refuse(f"format {fmt!r}", fmt_field, where)
    if bits == 4 and not (isinstance(size, int) and size >= 2):
        _refuse(f"group_size {size!r}", f"{field}.group_size", where)
    return HFQuant("int8" if bits == 8 else "int4", size if bits == 4 else 0)


def base_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj`` for ``model.layers.0.mlp.up_proj.weight``."""
    return weight_name.removesuffix(".weight")


def is_quantized(weight_name: str, names) -> bool:
    """Whether the checkpoint (tensor ``names``) stores ``weight_name`` quantized."""
    return f"{base_name(weight_name)}.weight_scale" in names


def tensor_shapes(weight_name: str, shape: tuple[int, int], q: HFQuant
                  ) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """``{tensor name: (shape, accepted safetensors dtype tags)}`` storing the HF weight
    ``weight_name`` of float ``shape`` ``[out, in]`` in the format ``q``."""
    out, k = shape
    base = base_name(weight_name)
    floats = ("F32", "F16", "BF16")
    scales = (out, 1) if q.scheme == "int8" else (out, math.ceil(k / q.group))
    return {f"{base}.weight_packed": ((out, math.ceil(k * q.bits / 32)), ("I32",)),
            f"{base}.weight_scale": (scales, floats),
            f"{base}.weight_shape": ((2,), ("I64", "I32"))}


def read_codes(tensor, shape: tuple[int, int], q: HFQuant) -> np.ndarray:
    """The int8 codes ``[out, in]`` (in [-2**(bits-1), 2**(bits-1) - 1]) of a stored
    ``weight_packed`` array (int32 words ``[out, ceil(in * bits / 32)]``)."""
    words = np.asarray(tensor)
    raw = np.ascontiguousarray(words.astype("<i4", copy=False)).view(np.uint8)
    raw = raw.reshape(words.shape[0], -1)
    if q.bits == 4:
        raw = np.stack([raw & 15, raw >> 4], axis=-1).reshape(words.shape[0], -1)
    offset = 1 << (q.bits - 1)
    return (raw[:, :shape[1]].astype(np.int16) - offset).astype(np.int8)


def to_cadenza(codes: np.ndarray, scale: np.ndarray, kernel_shape: tuple[int, ...], n_in: int,
               q: HFQuant) -> dict:
    """cadenza's arrays (:data:`quant.QWEIGHT`, :data:`quant.QSCALE`) for a kernel of
    ``kernel_shape`` ``[*in, *out]`` (its first ``n_in`` dims contracted) from HF codes
    ``[out, in]`` and scales ``[out, 1 or groups]``: the HF input and output indices are
    the C-order flattenings of cadenza's in and out dims. Codes are moved, never changed."""
    out_shape = tuple(kernel_shape[n_in:])
    codes_t = codes.T  # [in, out]
    scale_t = np.asarray(scale, np.float32).T.reshape((-1,) + out_shape)
    if q.scheme == "int8":
        return {quant.QWEIGHT: np.ascontiguousarray(codes_t).reshape(kernel_shape),
                quant.QSCALE: scale_t.reshape(out_shape)}
    packed = quant.pack_int4(codes_t.reshape((codes_t.shape[0],) + out_shape), q.group)
    return {quant.QWEIGHT: np.asarray(packed), quant.QSCALE: scale_t}


def site_targets(paths: list[tuple[str, ...]]) -> str:
    """The ``weight_quant_targets`` regex naming exactly the module ``paths``."""
    return "|".join(re.escape(".".join(p)) for p in paths)
