"""Which Hugging Face tensor holds which cadenza param, and how the layouts differ.

HF ``nn.Linear`` weights are ``[out, in]``; cadenza kernels are ``[in, out]``
with attention heads split out: q/k/v ``[embed, heads, head_dim]``, o
``[heads, head_dim, embed]``. Per-layer HF tensors (``model.layers.{i}.``)
are stacked on cadenza's leading ``layers`` axis, and per-expert tensors
(``...experts.{e}...``) on the ``expert`` axis after it. :func:`read_block` turns a
block in cadenza coordinates into the HF rows/columns holding it, so a lazily
read tensor (a safetensors slice) yields one device's shard while reading only
that shard's heads, rows and columns.
"""

import dataclasses

import numpy as np

from cadenza.models.config import ModelConfig
from cadenza.models.families import FAMILIES

# How an HF tensor [per layer] relates to the cadenza param [per layer].
SAME = "same"              # norms, embeddings, biases of the right shape
TRANSPOSE = "transpose"    # [out, in] -> [in, out]
HEADS_IN = "heads_in"      # [H*hd, D] -> [D, H, hd]       (q/k/v)
HEADS_OUT = "heads_out"    # [D, H*hd] -> [H, hd, D]       (o)
HEADS_BIAS = "heads_bias"  # [H*hd] -> [H, hd]             (q/k/v bias)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One cadenza param leaf and its HF source.

    ``path``: keys into the (scanned-layout) params dict. ``hf_name``: the HF
    tensor name, with ``{i}`` for the layer index when ``layered`` and ``{e}``
    for the expert index when ``experts`` > 0 (the param then has an expert
    axis after the layer axis).
    """

    path: tuple[str, ...]
    hf_name: str
    layout: str
    layered: bool
    experts: int = 0

    def stack_shape(self, num_layers: int) -> tuple[int, ...]:
        """The leading param dims that index separate HF tensors (layers, experts)."""
        return (((num_layers,) if self.layered else ())
                + ((self.experts,) if self.experts else ()))

    def hf_names(self, num_layers: int) -> list[tuple[tuple[int, ...], str]]:
        """``[(index into the stacked dims, HF tensor name)]`` in row-major order."""
        return [(idx, self.hf_name.format(**dict(zip("ie", idx))))
                for idx in np.ndindex(*self.stack_shape(num_layers))]


def weight_specs(config: ModelConfig) -> list[WeightSpec]:
    """The HF source of every cadenza param of ``config``, in a fixed order."""
    fam = FAMILIES[config.family]
    layer = "model.layers.{i}."
    specs = [WeightSpec(("embed", "embedding"), "model.embed_tokens.weight", SAME, False)]
    for name in ("q", "k", "v"):
        specs.append(WeightSpec(("layers", "attn", f"{name}_proj", "kernel"),
                                f"{layer}self_attn.{name}_proj.weight", HEADS_IN, True))
        if config.qkv_bias:
            specs.append(WeightSpec(("layers", "attn", f"{name}_proj", "bias"),
                                    f"{layer}self_attn.{name}_proj.bias", HEADS_BIAS, True))
    specs.append(WeightSpec(("layers", "attn", "o_proj", "kernel"),
                            f"{layer}self_attn.o_proj.weight", HEADS_OUT, True))
    if config.qk_norm != "none":  # per head: [head_dim]; OLMoE: [heads * head_dim]
        layout = SAME if config.qk_norm == "head" else HEADS_BIAS
        for name in ("q", "k"):
            specs.append(WeightSpec(("layers", "attn", f"{name}_norm", "scale"),
                                    f"{layer}self_attn.{name}_norm.weight", layout, True))
    if config.is_moe:
        block = f"{layer}{fam.moe_block}."
        specs.append(WeightSpec(("layers", "mlp", "router", "kernel"), f"{block}gate.weight",
                                TRANSPOSE, True))
        for ours, theirs in zip(("gate_proj", "up_proj", "down_proj"), fam.expert_names):
            specs.append(WeightSpec(("layers", "mlp", ours, "kernel"),
                                    f"{block}experts.{{e}}.{theirs}.weight", TRANSPOSE, True,
                                    config.num_experts))
        if config.shared_expert_size:
            for name in ("gate", "up", "down"):
                specs.append(WeightSpec(("layers", "mlp", "shared_expert", f"{name}_proj",
                                         "kernel"),
                                        f"{block}shared_expert.{name}_proj.weight", TRANSPOSE,
                                        True))
            specs.append(WeightSpec(("layers", "mlp", "shared_expert_gate", "kernel"),
                                    f"{block}shared_expert_gate.weight", TRANSPOSE, True))
    else:
        for name in ("gate", "up", "down"):
            specs.append(WeightSpec(("layers", "mlp", f"{name}_proj", "kernel"),
                                    f"{layer}mlp.{name}_proj.weight", TRANSPOSE, True))
    for ours, theirs in fam.norms.items():
        specs.append(WeightSpec(("layers", ours, "scale"), f"{layer}{theirs}.weight", SAME, True))
    specs.append(WeightSpec(("final_norm", "scale"), "model.norm.weight", SAME, False))
    if not config.tie_embeddings:
        specs.append(WeightSpec(("lm_head", "kernel"), "lm_head.weight", TRANSPOSE, False))
    return specs


def read_stacked(spec: WeightSpec, num_layers: int, block, index: tuple[slice, ...]
                 ) -> np.ndarray:
    """Block ``index`` of a whole (stacked) param: ``block(hf_name, per-tensor index)`` for
    each HF tensor the leading (layer, expert) slices select, stacked back."""
    dims = spec.stack_shape(num_layers)

    def gather(prefix: tuple[int, ...]):
        j = len(prefix)
        if j == len(dims):
            return block(spec.hf_name.format(**dict(zip("ie", prefix))), index[j:])
        return np.stack([gather(prefix + (x,)) for x in range(dims[j])[index[j]]])

    return np.asarray(gather(()))


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape holding a cadenza param of (per-layer) ``shape``."""
    if layout == SAME:
        return tuple(shape)
    if layout == TRANSPOSE:
        return tuple(reversed(shape))
    if layout == HEADS_IN:
        d, h, hd = shape
        return (h * hd, d)
    if layout == HEADS_OUT:
        h, hd, d = shape
        return (d, h * hd)
    if layout == HEADS_BIAS:
        h, hd = shape
        return (h * hd,)
    raise ValueError(layout)


def read_block(layout: str, tensor, shape: tuple[int, ...], index: tuple[slice, ...]
               ) -> np.ndarray:
    """Block ``index`` of a cadenza param (per-layer ``shape``), read from its HF tensor.

    Args:
      layout: how the HF tensor relates to the param (``SAME``, ``TRANSPOSE``, ...).
      tensor: the HF tensor, anything indexable by a tuple of slices in HF
        layout that returns a numpy array (a ``safetensors`` slice, a numpy array).
      shape: the param's per-layer shape in cadenza layout.
      index: one slice per cadenza axis (positive steps, as
        ``jax.make_array_from_callback`` passes them).

    Only the HF rows and columns of the block's heads are read (a sliced
    head_dim reads its heads whole, then selects).
    """
    if layout == SAME:
        return tensor[index]
    if layout == TRANSPOSE:
        return tensor[index[::-1]].T
    if layout == HEADS_IN:  # [H*hd, D] -> [D, H, hd]
        d, heads, dims = index
        rows, count, step = _head_span(heads, shape[1], shape[2])
        block = tensor[rows, d].T
        return block.reshape(block.shape[0], count, shape[2])[:, ::step, dims]
    if layout == HEADS_OUT:  # [D, H*hd] -> [H, hd, D]
        heads, dims, d = index
        cols, count, step = _head_span(heads, shape[0], shape[1])
        block = tensor[d, cols].T
        return block.reshape(count, shape[1], block.shape[1])[::step, dims]
    if layout == HEADS_BIAS:  # [H*hd] -> [H, hd]
        heads, dims = index
        rows, count, step = _head_span(heads, shape[0], shape[1])
        return tensor[(rows,)].reshape(count, shape[1])[::step, dims]
    raise ValueError(layout)


def _head_span(heads: slice, num_heads: int, head_dim: int) -> tuple[slice, int, int]:
    """HF rows of the heads ``heads`` selects: (row slice, heads in that span, head step)."""
    start, stop, step = heads.indices(num_heads)
    stop = max(start, stop)
    return slice(start * head_dim, stop * head_dim), stop - start, step


def to_hf(layout: str, array: np.ndarray) -> np.ndarray:
    """A cadenza param (one layer) in HF layout (a numpy view; inverse of :func:`read_block`)."""
    if layout == SAME:
        return array
    if layout == TRANSPOSE:
        return array.T
    if layout == HEADS_IN:
        return array.reshape(array.shape[0], -1).T
    if layout == HEADS_OUT:
        return array.reshape(-1, array.shape[-1]).T
    if layout == HEADS_BIAS:
        return array.reshape(-1)
    raise ValueError(layout)


def get_path(tree, path: tuple[str, ...]):
    """``tree[path[0]][path[1]]...``."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """Set ``tree[path[0]]...[path[-1]] = value``, creating dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
