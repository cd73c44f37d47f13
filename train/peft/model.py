"""A frozen base plus trainable adapters: :func:`prepare` and :class:`PeftModel`.

Adapters attach by Flax method interception (``nn.intercept_methods``)
around ``Transformer.apply``; the model code is unchanged except that its
layer scan also stacks the ``peft`` variable collection. Per-projection
adapter arrays live in that collection at the projection's module path
(``peft/layers/attn/q_proj/lora_a``), so under ``scan_layers`` they carry a
leading layer axis and the scan hands each layer its slice.

Trees (plain nested dicts):

- ``trainable``: ``{"params": base}`` for full fine-tuning (method none);
  else ``{"peft": ...}`` per-projection/per-layer arrays, ``{"prompt": [N, D]}``
  for prompt tuning, or ``{"prefix": {"embedding", "w1", "b1", "w2", "b2"}}``
  for prefix tuning with an MLP reparameterisation.
- ``frozen``: ``{"params": base}`` (QLoRA: targeted kernels removed) and,
  for QLoRA, ``{"peft": quantised kernels}``.

Per-projection arrays (kernel [*in, *out]): ``lora_a`` [*in, r], ``lora_b``
[r, *out] (zero-init), ``dora_magnitude`` [*out], ``ia3_out`` [*out] /
``ia3_in`` [*in], ``quant_*`` (see :mod:`.quant`); an expert projection's
arrays have an ``expert`` axis first ([E, *in, r], [E, r, *out], ...) and
each row of its grouped input goes through its expert's slice (the LoRA
path is two more ragged matmuls). Per attention layer:
``prefix_k``/``prefix_v`` [P, kv_heads, head_dim].

Prefix tuning: without a cache, the attention interceptor feeds the layer's
prefix to the attention as cache slots (positions 0..P-1, no RoPE, visible
to every query and every packed segment) and the tokens' positions are
shifted by P, as Hugging Face peft's past_key_values do. With a cache the
prefix must already be in it: :meth:`PeftModel.init_cache`. Prompt tuning:
without a cache the soft prompt is prepended as input embeddings (positions
0..N-1, tokens shifted by N, every packed segment sees it) and its logits
are dropped; with a cache, :meth:`PeftModel.init_cache` prefills it once.
"""

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from cadenza.errors import CadenzaError, ConfigError
from cadenza.models import quant
from cadenza.models.cache import KVCache
from cadenza.models.config import ModelConfig
from cadenza.models.layers import Attention, Projection, flat_matmul, flat_operands
from cadenza.models.moe import ExpertProjection, row_experts
from cadenza.models.params import logical_param_specs
from cadenza.models.transformer import Transformer
from cadenza.train.peft.sites import Site, get_path, projection_sites, select_sites, set_path
from cadenza.train.peft_config import LORA_METHODS, PeftConfig

COLLECTION = "peft"


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """Shape (with any layer axis), logical axes and initialiser name of one trainable array."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str
    site: Site | None = None


def column_norm(w, n_in: int, lead: int = 0):
    """L2 norm over the ``n_in`` input axes of a kernel (after ``lead`` layer axes), float32."""
    w = w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(lead, lead + n_in))))


def lora_delta(a, b, lead: int = 0):
    """``A @ B`` as a kernel-shaped delta [*in, *out] (vmapped over ``lead`` layer axes), f32."""
    fn = lambda a, b: jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), 1)  # noqa: E731
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(a, b)


def _contract(x, w, n: int, dtype):
    """Contract the last ``n`` dims of ``x`` with the first ``n`` of ``w`` in ``dtype`` (one
    2-D matmul, see :func:`cadenza.models.layers.flat_matmul`)."""
    return flat_matmul(x.astype(dtype), w.astype(dtype), n)


def lora_projection(x, kernel, a, b, scale: float):
    """``x @ (kernel + scale * a @ b)`` as one matmul with the merged kernel, for training.

    Shapes: ``x`` [..., *in], ``kernel`` [*in, *out], ``a`` [*in, r], ``b`` [r, *out],
    all float32 (merging rounds the update into the kernel's dtype, so lower-precision
    compute keeps the unmerged path); ``scale`` a Python float. Returns [..., *out].
    The gradients are the unmerged LoRA's: ``dx = dy @ merged^T``, ``da = scale * x^T (dy
    b^T)``, ``db = scale * (x a)^T dy``; the kernel's ``x^T dy`` is only computed when it is
    used (a frozen kernel's is dropped by the compiler). Compared with ``x @ kernel + scale *
    (x @ a) @ b`` this saves two rank-r matmuls with [rows, *out] outputs and two adds per
    projection per step. The backward pass merges the kernel again instead of keeping the
    forward's merged copy alive in between (one kernel-sized add and a rank-r matmul).
    """
    x2, k2, out_shape = flat_operands(x, kernel, a.ndim - 1)
    a2, b2 = a.reshape(k2.shape[0], -1), b.reshape(-1, k2.shape[1])
    return _merged_lora(x2, k2, a2, b2, scale).reshape(out_shape)


def _merged_kernel(kernel, a, b, scale):
    """The 2-D merged kernel ``kernel + scale * a @ b``."""
    return kernel + scale * (a @ b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _merged_lora(x, kernel, a, b, scale):
    """:func:`lora_projection` on 2-D operands [rows, in], [in, out], [in, r], [r, out]."""
    return x @ _merged_kernel(kernel, a, b, scale)


def _merged_lora_fwd(x, kernel, a, b, scale):
    return x @ _merged_kernel(kernel, a, b, scale), (x, x @ a, kernel, a, b)


def _merged_lora_bwd(scale, res, dy):
    x, xa, kernel, a, b = res
    # the barrier ties the merge to dy: it runs in the backward pass, and the compiler cannot
    # reuse the forward's merged kernel (which would keep it alive in between)
    kernel, a, b, dy = jax.lax.optimization_barrier((kernel, a, b, dy))
    dxa = dy @ b.T
    return (dy @ _merged_kernel(kernel, a, b, scale).T, x.T @ dy, scale * (x.T @ dxa),
            scale * (xa.T @ dy))


_merged_lora.defvjp(_merged_lora_fwd, _merged_lora_bwd)


@dataclasses.dataclass(frozen=True)
class PeftModel:
    """The static description of an adapted model (no arrays): configs and targeted sites."""

    model_config: ModelConfig
    peft_config: PeftConfig
    sites: tuple[Site, ...]

    @property
    def method(self) -> str:
        return self.peft_config.method

    # ----- layout ---------------------------------------------------------------------------

    def _attn_paths(self) -> list[tuple[tuple[str, ...], int]]:
        cfg = self.model_config
        if cfg.scan_layers:
            return [(("layers", "attn"), cfg.num_layers)]
        return [((f"layer_{i}", "attn"), 0) for i in range(cfg.num_layers)]

    def _layout(self) -> dict:
        """Nested dict of :class:`_Leaf` mirroring the trainable tree."""
        cfg, pc = self.model_config, self.peft_config
        tree: dict = {}
        if self.method in LORA_METHODS:
            r = pc.rank
            for s in self.sites:
                set_path(tree, ("peft",) + s.path + ("lora_a",),
                         _Leaf(s.lead + s.in_shape + (r,), s.lead_axes + s.in_axes + (None,),
                               "lora_a", s))
                set_path(tree, ("peft",) + s.path + ("lora_b",),
                         _Leaf(s.lead + (r,) + s.out_shape, s.lead_axes + (None,) + s.out_axes,
                               "zeros", s))
                if self.method == "dora":
                    set_path(tree, ("peft",) + s.path + ("dora_magnitude",),
                             _Leaf(s.lead + s.out_shape, s.lead_axes + s.out_axes, "dora", s))
        elif self.method == "ia3":
            ff = re.compile(pc.ia3_feedforward)
            for s in self.sites:
                if ff.fullmatch(s.name):
                    leaf = _Leaf(s.lead + s.in_shape, s.lead_axes + s.in_axes, "ones", s)
                    set_path(tree, ("peft",) + s.path + ("ia3_in",), leaf)
                else:
                    leaf = _Leaf(s.lead + s.out_shape, s.lead_axes + s.out_axes, "ones", s)
                    set_path(tree, ("peft",) + s.path + ("ia3_out",), leaf)
        elif self.method == "prefix":
            p, kvh, hd = pc.num_virtual_tokens, cfg.num_kv_heads, cfg.resolved_head_dim
            if pc.prefix_projection:
                d, h = cfg.hidden_size, pc.prefix_hidden_size or cfg.hidden_size
                out = cfg.num_layers * 2 * kvh * hd
                tree["prefix"] = {
                    "embedding": _Leaf((p, d), (None, "embed"), "normal"),
                    "w1": _Leaf((d, h), ("embed", None), "lecun"),
                    "b1": _Leaf((h,), (None,), "zeros"),
                    "w2": _Leaf((h, out), (None, None), "lecun"),
                    "b2": _Leaf((out,), (None,), "zeros")}
            else:
                for path, layers in self._attn_paths():
                    lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
                    for name in ("prefix_k", "prefix_v"):
                        set_path(tree, ("peft",) + path + (name,),
                                 _Leaf(lead + (p, kvh, hd),
                                       lead_axes + (None, "kv_heads", "head_dim"), "normal"))
        elif self.method == "prompt":
            tree["prompt"] = _Leaf((pc.num_virtual_tokens, cfg.hidden_size), (None, "embed"),
                                   "prompt")
        return tree

    def abstract_trainable(self, base_params=None):
        """ShapeDtypeStruct tree of the trainable arrays (float32; method none: the base's)."""
        if self.method == "none":
            if base_params is None:
                from cadenza.models.params import abstract_params
                return {"params": abstract_params(self.model_config)}
            return {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                           base_params)}
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.float32),
                            self._layout(), is_leaf=lambda x: isinstance(x, _Leaf))

    def trainable_logical_specs(self):
        """Logical PartitionSpec tree of the trainable arrays (rank and prefix-length unsharded)."""
        if self.method == "none":
            return {"params": logical_param_specs(self.model_config)}
        return jax.tree.map(lambda leaf: PartitionSpec(*leaf.axes), self._layout(),
                            is_leaf=lambda x: isinstance(x, _Leaf))

    def frozen_logical_specs(self):
        """Logical PartitionSpec tree of the frozen arrays (quantised kernels: sharded along
        their layer and expert axes only)."""
        if self.method == "none":
            return {}
        params = logical_param_specs(self.model_config)
        if self.method != "qlora":
            return {"params": params}
        params = jax.tree.map(lambda x: x, params)
        peft: dict = {}
        pc = self.peft_config
        for s in self.sites:
            module = get_path(params, s.path)
            del module["kernel"]
            keys = ([quant.QUANT_CODES, quant.QUANT_ABSMAX_CODES, quant.QUANT_ABSMAX_SCALE,
                     quant.QUANT_ABSMAX_MEAN] if pc.double_quant
                    else [quant.QUANT_CODES, quant.QUANT_ABSMAX])
            for k in keys:
                extra = () if k == quant.QUANT_ABSMAX_MEAN else (None,)
                set_path(peft, s.path + (k,), PartitionSpec(*(s.lead_axes + extra)))
        return {"params": params, "peft": peft}

    def shardings(self, mesh, rules):
        """``(trainable, frozen)`` NamedSharding trees on ``mesh`` under logical ``rules``."""
        return (nn.logical_to_mesh_sharding(self.trainable_logical_specs(), mesh, rules),
                nn.logical_to_mesh_sharding(self.frozen_logical_specs(), mesh, rules))

    # ----- creation -------------------------------------------------------------------------

    def check_base(self, base_params) -> None:
        """Fail clearly unless every targeted kernel is in ``base_params`` with the right shape."""
        for s in self.sites:
            want = s.lead + s.in_shape + s.out_shape
            try:
                got = tuple(get_path(base_params, s.path)["kernel"].shape)
            except (KeyError, TypeError):
                raise CadenzaError(f"the base params have no kernel at {s.name}",
                                   where="base params",
                                   fix="use base params built for this model config") from None
            if got != want:
                raise CadenzaError(f"base kernel {s.name} has shape {got}, the model config "
                                   f"expects {want}", where="base params",
                                   fix="use base params built for this model config")

    def init_trainable(self, rng, base_params, *, mesh=None, rules=None):
        """Fresh trainable arrays (float32), created in their shards when ``mesh`` is given.

        LoRA B is zero, DoRA's magnitude is the base kernel's column norm,
        (IA)3 vectors are ones: each of these starts as the base model.
        """
        if self.method == "none":
            return {"params": base_params}
        self.check_base(base_params)
        layout = self._layout()
        leaves, treedef = jax.tree.flatten(layout, is_leaf=lambda x: isinstance(x, _Leaf))

        def init(rng, base):
            out = []
            for i, leaf in enumerate(leaves):
                key = jax.random.fold_in(rng, i)
                out.append(self._init_leaf(leaf, key, base))
            return jax.tree.unflatten(treedef, out)

        if mesh is None:
            return jax.jit(init)(rng, base_params)
        shardings, _ = self.shardings(mesh, rules)
        with jax.set_mesh(mesh):
            return jax.jit(init, out_shardings=shardings)(rng, base_params)

    def _init_leaf(self, leaf: _Leaf, key, base):
        pc = self.peft_config
        if leaf.init == "zeros":
            return jnp.zeros(leaf.shape, jnp.float32)
        if leaf.init == "ones":
            return jnp.ones(leaf.shape, jnp.float32)
        if leaf.init == "normal":
            return jax.random.normal(key, leaf.shape, jnp.float32)
        if leaf.init == "lecun":
            return jax.random.normal(key, leaf.shape, jnp.float32) / math.sqrt(leaf.shape[0])
        if leaf.init == "lora_a":
            if pc.lora_init == "gaussian":
                return jax.random.normal(key, leaf.shape, jnp.float32) / pc.rank
            bound = 1.0 / math.sqrt(math.prod(leaf.site.in_shape))
            return jax.random.uniform(key, leaf.shape, jnp.float32, -bound, bound)
        if leaf.init == "dora":
            s = leaf.site
            return column_norm(get_path(base, s.path)["kernel"], len(s.in_shape), len(s.lead))
        if leaf.init == "prompt":
            table = base["embed"]["embedding"].astype(jnp.float32)
            n = pc.num_virtual_tokens
            if pc.prompt_init == "tokens":
                return table[jnp.asarray(pc.prompt_init_ids, jnp.int32)]
            if pc.prompt_init == "sample_vocab":
                return table[jax.random.randint(key, (n,), 0, table.shape[0])]
            return jax.random.normal(key, leaf.shape, jnp.float32) * jnp.std(table)
        raise AssertionError(leaf.init)

    def freeze(self, base_params):
        """The frozen tree from the base params (QLoRA: targeted kernels quantised).

        Arrays are shared with ``base_params``, not copied, except quantised ones.
        """
        if self.method == "none":
            return {}
        if self.method != "qlora":
            return {"params": base_params}
        self.check_base(base_params)
        pc = self.peft_config
        params = jax.tree.map(lambda x: x, base_params)
        peft: dict = {}
        qfn = jax.jit(quant.quantize_stacked, static_argnames=(
            "lead", "quant_type", "block_size", "double_quant", "dq_block_size"))
        for s in self.sites:
            module = get_path(params, s.path)
            q = qfn(module.pop("kernel"), lead=len(s.lead), quant_type=pc.quant_type,
                    block_size=pc.quant_block_size, double_quant=pc.double_quant,
                    dq_block_size=pc.double_quant_block_size)
            for k, v in q.items():
                set_path(peft, s.path + (k,), v)
        return {"params": params, "peft": peft}

    def dequantized_params(self, frozen):
        """QLoRA: the base params with every quantised kernel dequantised (param dtype)."""
        pc, dtype = self.peft_config, jnp.dtype(self.model_config.param_dtype)
        params = jax.tree.map(lambda x: x, frozen["params"])
        for s in self.sites:
            q = get_path(frozen["peft"], s.path)
            q = {k: v for k, v in q.items() if k in quant.QUANT_KEYS}
            w = quant.dequantize_stacked(q, s.in_shape + s.out_shape, len(s.lead),
                                         quant_type=pc.quant_type, block_size=pc.quant_block_size,
                                         dq_block_size=pc.double_quant_block_size, dtype=dtype)
            get_path(params, s.path)["kernel"] = w
        return params

    # ----- forward --------------------------------------------------------------------------

    def prefix_kv(self, trainable):
        """Prefix keys and values, each [layers, P, kv_heads, head_dim] float32."""
        cfg = self.model_config
        if self.peft_config.prefix_projection:
            m = trainable["prefix"]
            h = jnp.tanh(m["embedding"] @ m["w1"] + m["b1"])
            kv = (h @ m["w2"] + m["b2"]).reshape(self.peft_config.num_virtual_tokens,
                                                 cfg.num_layers, 2, cfg.num_kv_heads,
                                                 cfg.resolved_head_dim)
            kv = kv.transpose(2, 1, 0, 3, 4)
            return kv[0], kv[1]
        peft = trainable["peft"]
        if cfg.scan_layers:
            a = peft["layers"]["attn"]
            return a["prefix_k"], a["prefix_v"]
        return tuple(jnp.stack([peft[f"layer_{i}"]["attn"][n] for i in range(cfg.num_layers)])
                     for n in ("prefix_k", "prefix_v"))

    def _variables(self, trainable, frozen):
        params = trainable["params"] if "params" in trainable else frozen["params"]
        peft = _merge(trainable.get("peft", {}), frozen.get("peft", {}))
        if self.method == "prefix" and self.peft_config.prefix_projection:
            k, v = self.prefix_kv(trainable)
            for (path, layers) in self._attn_paths():
                i = None if layers else int(path[0].split("_")[1])
                set_path(peft, path + ("prefix_k",), k if layers else k[i])
                set_path(peft, path + ("prefix_v",), v if layers else v[i])
        return {"params": params, COLLECTION: peft}

    def apply(self, trainable, frozen, tokens=None, *, embeddings=None, positions=None,
              segment_ids=None, attention_mask=None, cache=None, dropout_rng=None,
              logits_at=None, intermediates=False):
        """``Transformer.__call__`` with the adapters: returns ``(logits, hidden, cache)``.

        With ``intermediates`` it returns ``(logits, hidden, cache, collection)``, the
        ``intermediates`` collection the model sowed (MoE router logits).

        Same arguments and shapes as the model (logits [B, T, V] for the T
        given tokens also under prompt tuning; ``logits_at`` indexes those T).
        ``dropout_rng`` (a key) turns on LoRA dropout; None is deterministic. Differentiate with
        respect to ``trainable`` only.
        """
        cfg, pc = self.model_config, self.peft_config
        model = Transformer(cfg)
        variables = self._variables(trainable, frozen)
        n_prompt = 0
        if cache is None and self.method in ("prefix", "prompt"):
            b, t = (tokens if tokens is not None else embeddings).shape[:2]
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            positions = positions + pc.num_virtual_tokens
        if cache is None and self.method == "prompt":
            if embeddings is None:
                embeddings = model.apply(variables, tokens, method=Transformer.embed_tokens)
            n_prompt = pc.num_virtual_tokens
            embeddings, positions, attention_mask = _prepend_prompt(
                trainable["prompt"], embeddings, positions, segment_ids, attention_mask)
            tokens, segment_ids = None, None
        rngs = {} if dropout_rng is None or not pc.dropout else {"dropout": dropout_rng}
        if logits_at is not None:
            logits_at = logits_at + n_prompt
        # merged-kernel LoRA pays a kernel-sized merge per call: worth it over whole
        # sequences (training, evaluation), not for the few rows of a cached decode step
        with nn.intercept_methods(self._interceptor(dropout=bool(rngs), merge=cache is None)):
            out = model.apply(
                variables, tokens, embeddings=embeddings, positions=positions,
                segment_ids=segment_ids, attention_mask=attention_mask, cache=cache, rngs=rngs,
                logits_at=logits_at, mutable=["intermediates"] if intermediates else False)
        (logits, hidden, cache), state = out if intermediates else (out, {})
        if logits_at is None:
            logits = logits[:, n_prompt:]
        if intermediates:
            return logits, hidden[:, n_prompt:], cache, state.get("intermediates", {})
        return logits, hidden[:, n_prompt:], cache

    def init_cache(self, trainable, frozen, batch: int, max_len: int, dtype=None) -> KVCache:
        """A KVCache for decoding: prefix K/V (or the soft prompt's) in its first slots.

        Prefix: slots [0, P) hold the prefix at positions 0..P-1, lengths = P.
        Prompt: the soft prompt is prefilled, lengths = N. Other methods: empty.
        ``dtype``: the cache's (default the compute dtype; ``jnp.int8``: an int8 cache).
        """
        cfg, n = self.model_config, self.peft_config.num_virtual_tokens
        cache = KVCache.create(cfg, batch, max_len, dtype)
        if self.method == "prefix":
            k, v = self.prefix_kv(trainable)
            shape = (cfg.num_layers, batch) + k.shape[1:]
            k = jnp.broadcast_to(k[:, None], shape)
            v = jnp.broadcast_to(v[:, None], shape)
            pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
            return cache.write(k, v, pos).with_lengths(n)
        if self.method == "prompt":
            emb = jnp.broadcast_to(trainable["prompt"][None], (batch,) + trainable["prompt"].shape)
            _, _, cache = self.apply(trainable, frozen, embeddings=emb, cache=cache)
            return cache.advance(n)
        return cache

    def _interceptor(self, dropout: bool, merge: bool):
        cfg, pc = self.model_config, self.peft_config
        dtype = jnp.dtype(cfg.dtype)
        s = pc.scaling

        def var(m, name):
            return m.get_variable(COLLECTION, name) if m.has_variable(COLLECTION, name) else None

        def projection(m, next_fun, args, kwargs):
            # A Projection contracts x's last n_in dims; an ExpertProjection maps rows grouped
            # by expert (args[1] = group sizes) through each expert's slice of every array.
            x, n_in = args[0], len(m.in_axes)
            if (merge and dtype == jnp.float32 and isinstance(m, Projection) and m.has_variable(
                    COLLECTION, "lora_a") and m.has_variable("params", "kernel")
                    and not m.has_variable(COLLECTION, "dora_magnitude")
                    and not dropout):   # plain float32 LoRA: merged kernel
                y = lora_projection(x.astype(dtype), m.get_variable("params", "kernel").astype(
                    dtype), var(m, "lora_a").astype(dtype), var(m, "lora_b").astype(dtype), s)
                return y + m.get_variable("params", "bias").astype(dtype) if m.use_bias else y
            if isinstance(m, ExpertProjection):
                sizes = args[1]
                ids = row_experts(sizes, x.shape[0])
                per_row = lambda v: v[ids]  # noqa: E731
                matmul = lambda h, w, n: jax.lax.ragged_dot(  # noqa: E731
                    h.astype(dtype), w.astype(dtype), sizes)
                lead = 1
            else:
                per_row = lambda v: v  # noqa: E731
                matmul = lambda h, w, n: _contract(h, w, n, dtype)  # noqa: E731
                lead = 0
            l_in = var(m, "ia3_in")
            if l_in is not None:
                x = x * per_row(l_in).astype(x.dtype)
            if m.has_variable(COLLECTION, quant.QUANT_CODES):
                q = {k: var(m, k) for k in quant.QUANT_KEYS if m.has_variable(COLLECTION, k)}
                x, q = quant.tie_to_step(x, q)       # dequantised in the step, not hoisted
                kernel = quant.dequantize_stacked(
                    q, x.shape[-n_in:] + tuple(m.features), lead, quant_type=pc.quant_type,
                    block_size=pc.quant_block_size, dq_block_size=pc.double_quant_block_size,
                    dtype=jnp.dtype(cfg.param_dtype))
                y = matmul(x, kernel, n_in)
                if m.use_bias:
                    y = y + m.get_variable("params", "bias").astype(dtype)
            else:
                y = next_fun(x, *args[1:], **kwargs)
            l_out = var(m, "ia3_out")
            if l_out is not None:
                y = y * per_row(l_out).astype(y.dtype)
            a = var(m, "lora_a")
            if a is None:
                return y
            h = x
            if dropout:
                keep = jax.random.bernoulli(m.make_rng("dropout"), 1.0 - pc.dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - pc.dropout), 0).astype(x.dtype)
            delta = matmul(matmul(h, a, n_in), var(m, "lora_b"), 1) * s
            mag = var(m, "dora_magnitude")
            if mag is None:
                return y + delta
            w = m.get_variable("params", "kernel").astype(jnp.float32) + s * lora_delta(
                a, var(m, "lora_b"), lead)
            scale = per_row(mag / jax.lax.stop_gradient(column_norm(w, n_in, lead))).astype(dtype)
            base = y - m.get_variable("params", "bias").astype(dtype) if m.use_bias else y
            return y + (scale - 1) * base + scale * delta

        def attention(m, next_fun, args, kwargs):
            x, ctx, window, layer_cache = args
            if layer_cache is not None or not m.has_variable(COLLECTION, "prefix_k"):
                return next_fun(*args, **kwargs)
            pk, pv = var(m, "prefix_k"), var(m, "prefix_v")
            b, p = x.shape[0], pk.shape[0]
            kc = jnp.broadcast_to(pk.astype(dtype)[None], (b,) + pk.shape)
            vc = jnp.broadcast_to(pv.astype(dtype)[None], (b,) + pv.shape)
            ctx = ctx.replace(cache_lengths=jnp.full((b,), p, jnp.int32),
                              cache_positions=jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32),
                                                               (b, p)))
            return next_fun(x, ctx, window, (kc, vc), **kwargs)

        def intercept(next_fun, args, kwargs, context):
            m = context.module
            if context.method_name == "__call__":
                if isinstance(m, (Projection, ExpertProjection)):
                    return projection(m, next_fun, args, kwargs)
                if isinstance(m, Attention):
                    return attention(m, next_fun, args, kwargs)
            return next_fun(*args, **kwargs)

        return intercept

    # ----- training helpers -----------------------------------------------------------------

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """``tx`` for the trainable tree; LoRA+: LoRA B's updates scaled by ``lora_plus_ratio``.

        Scaling the final update of B by the ratio equals lr_B = ratio * lr_A
        for every optax optimizer whose update is linear in the learning
        rate (adamw incl. its weight decay, adafactor, lion, sgd).
        """
        if self.method != "lora_plus":
            return tx
        return optax.chain(tx, scale_lora_b(self.peft_config.lora_plus_ratio))

    def summary(self, trainable, frozen) -> dict:
        """Parameter counts and the memory PEFT saves versus full fine-tuning (Adam, f32).

        ``optimizer_bytes_saved``: Adam moments (2 x f32) and gradients (f32)
        not held for frozen params; ``storage_bytes_saved``: QLoRA quantisation.
        """
        size = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
        nbytes = lambda t: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize  # noqa: E731
                               for x in jax.tree.leaves(t))
        total = self.model_config.num_params()
        n_train = size(trainable)
        peft = self.method != "none"
        base_bytes = total * jnp.dtype(self.model_config.param_dtype).itemsize
        return {"method": self.method, "total_params": total, "trainable_params": n_train,
                "trainable_fraction": n_train / total, "frozen_bytes": nbytes(frozen),
                "optimizer_bytes_saved": 12 * (total - n_train) if peft else 0,
                "storage_bytes_saved": (base_bytes - nbytes(frozen)
                                        if self.method == "qlora" else 0)}

    def describe(self, trainable, frozen) -> str:
        """One line for the run log: trainable/total params and memory saved."""
        s = self.summary(trainable, frozen)
        mib = 1 << 20
        return (f"peft {s['method']}: trainable {s['trainable_params']:,} / total "
                f"{s['total_params']:,} params ({100 * s['trainable_fraction']:.3f}%); "
                f"gradient+Adam memory saved {s['optimizer_bytes_saved'] / mib:.1f} MiB; "
                f"quantised storage saved {s['storage_bytes_saved'] / mib:.1f} MiB")


def _merge(a: dict, b: dict) -> dict:
    """Union of two nested dicts with disjoint leaves (new dicts, arrays shared)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def _prepend_prompt(prompt, embeddings, positions, segment_ids, attention_mask):
    """Soft prompt [N, D] before embeddings [B, T, D]: returns embeddings, positions, mask."""
    b, t = embeddings.shape[:2]
    n = prompt.shape[0]
    emb = jnp.concatenate([jnp.broadcast_to(prompt.astype(embeddings.dtype)[None],
                                            (b,) + prompt.shape), embeddings], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
                           positions.astype(jnp.int32)], axis=1)
    tail = jnp.tril(jnp.ones((t, t), bool)) if attention_mask is None else attention_mask
    tail = jnp.broadcast_to(tail, (b, t, t))
    if segment_ids is not None:
        tail = tail & (segment_ids[:, :, None] == segment_ids[:, None, :])
    top = jnp.concatenate([jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n)),
                           jnp.zeros((b, n, t), bool)], axis=-1)
    bottom = jnp.concatenate([jnp.ones((b, t, n), bool), tail], axis=-1)
    return emb, pos, jnp.concatenate([top, bottom], axis=1)


def scale_lora_b(ratio: float) -> optax.GradientTransformation:
    """Stateless transform multiplying the updates of every ``lora_b`` leaf by ``ratio``."""

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u * ratio if getattr(path[-1], "key", None) == "lora_b" else u,
            updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lora_plus_labels(trainable):
    """Label tree for ``optax.multi_transform``: ``"lora_b"`` for B matrices, else ``"default"``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "lora_b" if getattr(path[-1], "key", None) == "lora_b" else "default",
        trainable)


def build(model_config: ModelConfig, peft_config: PeftConfig) -> PeftModel:
    """Validate the method against the model and return the static :class:`PeftModel`.

    Fails before anything is compiled: a target regex matching no
    projection, a rank larger than a targeted layer's input or output size.
    """
    regex = peft_config.target_regex
    sites = ()
    if regex is not None:
        sites = tuple(select_sites(projection_sites(model_config), regex))
    if peft_config.method in LORA_METHODS:
        for s in sites:
            limit = min(math.prod(s.in_shape), math.prod(s.out_shape))
            if peft_config.rank > limit:
                raise ConfigError(f"rank {peft_config.rank} exceeds the size {limit} of "
                                  f"{s.name} (in {s.in_shape}, out {s.out_shape})",
                                  where="peft.rank", fix=f"use rank <= {limit}")
    return PeftModel(model_config, peft_config, sites)


def prepare(config, base_params, rng, *, mesh=None, rules=None):
    """Adapt ``base_params`` per ``config.peft``: returns ``(peft_model, trainable, frozen)``.

    ``config`` is an ExperimentConfig (``model`` and ``peft`` sections are
    used; ``rules`` default to ``config.mesh.rules()`` when a ``mesh`` is
    given). Train by differentiating ``peft_model.apply(trainable, frozen,
    ...)`` with respect to ``trainable`` only and giving the optimizer
    ``peft_model.optimizer(tx)`` over ``trainable``; ``frozen`` is passed
    through unchanged (never donated, no optimizer state).
    """
    pm = build(config.model, config.peft)
    if mesh is not None and rules is None:
        rules = config.mesh.rules()
    trainable = pm.init_trainable(rng, base_params, mesh=mesh, rules=rules)
    return pm, trainable, pm.freeze(base_params)
