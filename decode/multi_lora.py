"""Many LoRA adapters in one batch: a bank of stacked factors and a forward that picks per row.

A :class:`MultiLoraForward` is a forward (:mod:`cadenza.decode.forward`) over a frozen
base whose every prompt row may use a different LoRA adapter, or none. Its params are::

    {"params": base params,
     "lora": {site path: {"lora_a": [*layers, N, *in, R], "lora_b": [*layers, N, R, *out]}},
     "adapter_ids": int32 [B]}

for a bank of N adapters: each adapter's factors sit at its index along the N axis,
ranks are padded with zeros to the largest rank R (zero columns of A and rows of B add
nothing), each adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) is folded
into its B, and a site an adapter does not target holds zeros for it. ``adapter_ids[b]``
is row b's adapter index, or -1 for the base alone. At each targeted projection,
row b adds ``x_b @ A[ids[b]] @ B[ids[b]]``: the factors are gathered per row and applied
as two batched matmuls (the gathered copies are [B, *in, R] and [B, R, *out], small next
to the base kernel for small ranks; rows sharing an adapter cost what rows on different
adapters do: ``bench/multi_lora_bench.py``). A bank holding DoRA adapters also has
``"dora_scale"`` [*layers, N, *out] per site: DoRA's ``m / ||W + s A B||`` (norm over the
input axes), computed once from the base kernel, 1 for the other adapters; a row's output
is then ``scale * (x W + x A B)`` plus the bias, as the merged DoRA kernel computes it.

``adapter_ids`` are data, not part of the compiled program: changing which row uses which
adapter does not recompile; changing the bank (its adapters, ranks or sites) does.

:func:`load_adapter_bank` reads cadenza adapter directories
(:mod:`cadenza.train.peft.artifacts`) and Hugging Face peft LoRA folders;
:func:`stack_adapters` builds a bank from adapters in memory. Decode with
``cadenza.decode.generate(bank.forward, bank.params(base_params, names), prompts,
adapters=...)`` (see :func:`with_adapters`).
"""

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.errors import CadenzaError
from cadenza.models.cache import KVCache
from cadenza.models.layers import Projection
from cadenza.models.transformer import Transformer
from cadenza.train.peft.model import COLLECTION, column_norm, lora_delta
from cadenza.train.peft.sites import Site, get_path, projection_sites, set_path

# peft methods of the LoRA family (a QLoRA adapter's factors are added to the full-precision
# base, not to a quantised copy of it; DoRA's column scaling is precomputed per adapter)
BANK_METHODS = ("lora", "lora_plus", "qlora", "dora")
_REFUSE_FIX = ("decode it alone ('cadenza generate --adapter DIR'), or merge it into the base "
               "where its method allows ('cadenza convert merge-lora') and decode that model")


@dataclasses.dataclass(frozen=True)
class MultiLoraForward:
    """A base model with a bank of LoRA adapters selected per row (see the module docstring).

    ``config``: the base ModelConfig; ``names``: the adapters, in bank order; ``rules``:
    logical-axis rules or None. Params: ``{"params", "lora", "adapter_ids"}``.
    """

    config: object
    names: tuple[str, ...]
    rules: tuple | None = None

    def decode_layout(self, params):
        """``(forward, params)`` to decode with: on CPU a ``scan_layers`` base and its
        factors unrolled, as :func:`cadenza.models.decode_layout` does for a plain model
        (XLA's CPU backend would copy every layer's slice on every decode step); elsewhere
        unchanged."""
        from cadenza.models import decode_layout, unstack_layers

        model, base = decode_layout(Transformer(self.config), params["params"])
        if model.config == self.config:
            return self, params
        lora = params["lora"]
        if "layers" in lora:
            lora = unstack_layers(lora, self.config.num_layers)
        return (dataclasses.replace(self, config=model.config),
                {**params, "params": base, "lora": lora})

    def adapter_ids(self, adapters: Sequence) -> jax.Array:
        """int32 [B]: each row's adapter index, -1 for a row naming None (the base alone).

        ``adapters``: one adapter name (or None) per row. Raises CadenzaError on a name
        not in the bank.
        """
        if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
            raise CadenzaError("adapters must be a list with one adapter name (or None) per "
                               "prompt", where="adapters", fix="wrap a single name in a list")
        index = {n: i for i, n in enumerate(self.names)}
        ids = []
        for i, name in enumerate(adapters):
            if name is not None and name not in index:
                raise CadenzaError(f"row {i} names adapter {name!r}, which the bank does not "
                                   "hold", where=f"adapters[{i}]",
                                   fix=f"use one of: {', '.join(self.names)}, or None for the "
                                       "base model")
            ids.append(-1 if name is None else index[name])
        return jnp.asarray(ids, jnp.int32)

    def init_cache(self, params, batch: int, max_len: int) -> KVCache:
        """An empty KVCache of ``max_len`` slots per row (lengths 0)."""
        return KVCache.create(self.config, batch, max_len)

    def __call__(self, params, tokens=None, *, embeddings=None, positions=None,
                 attention_mask=None, cache=None, logits_at=None):
        """The base model's forward with each row's adapter added at every targeted
        projection; returns ``(logits float32, hidden, cache)`` as
        :meth:`cadenza.decode.forward.ModelForward.__call__` does. ``params["adapter_ids"]``
        must have one entry per row of ``tokens`` / ``embeddings``."""
        ids = params["adapter_ids"]
        b = (tokens if tokens is not None else embeddings).shape[0]
        if ids.shape != (b,):
            raise CadenzaError(f"adapter_ids has shape {ids.shape} for a batch of {b} rows",
                               where="params['adapter_ids']",
                               fix="give one adapter index per row (with_adapters)")
        variables = {"params": params["params"], COLLECTION: params["lora"]}
        with nn.logical_axis_rules(self.rules or ()), nn.intercept_methods(
                _interceptor(ids, jnp.dtype(self.config.dtype))):
            return Transformer(self.config).apply(
                variables, tokens, embeddings=embeddings, positions=positions,
                attention_mask=attention_mask, cache=cache, logits_at=logits_at)

    def embed(self, params, tokens):
        """Raw embedding rows [B, T, D] of ``tokens`` int32 [B, T] (the base's embedding)."""
        with nn.logical_axis_rules(self.rules or ()):
            return Transformer(self.config).apply({"params": params["params"]}, tokens,
                                                  method=Transformer.embed_tokens)


def _interceptor(ids, dtype):
    """Flax interceptor adding row b's LoRA delta ``x_b A[ids_b] B[ids_b]`` to every
    projection holding bank factors (rows with id -1 add zero)."""
    take = jnp.maximum(ids, 0)
    on = (ids >= 0).astype(dtype)

    def projection(m, next_fun, x, kwargs):
        y = next_fun(x, **kwargs)
        if not m.has_variable(COLLECTION, "lora_a"):
            return y
        if x.shape[0] != ids.shape[0]:
            raise CadenzaError(f"projection {'.'.join(m.path)} sees {x.shape[0]} rows, not one "
                               f"per prompt ({ids.shape[0]})", where="multi-adapter bank",
                               fix="target per-token projections only (attention and MLP)")
        n_in = len(m.in_axes)
        a = m.get_variable(COLLECTION, "lora_a")[take].astype(dtype)   # [B, *in, R]
        b = m.get_variable(COLLECTION, "lora_b")[take].astype(dtype)   # [B, R, *out]
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(1, n_in + 1)))
        h = jax.lax.dot_general(x.astype(dtype), a, (contract, ((0,), (0,))))  # [B, ..., R]
        h = h * on.reshape((-1,) + (1,) * (h.ndim - 1))
        delta = jax.lax.dot_general(h, b, (((h.ndim - 1,), (1,)), ((0,), (0,))))
        if not m.has_variable(COLLECTION, "dora_scale"):
            return y + delta.astype(y.dtype)
        n_out = len(m.features)
        scale = m.get_variable(COLLECTION, "dora_scale")[take].astype(dtype)   # [B, *out]
        scale = 1 + (scale - 1) * on.reshape((-1,) + (1,) * n_out)
        scale = scale.reshape(scale.shape[:1] + (1,) * (y.ndim - 1 - n_out) + scale.shape[1:])
        base = y - m.get_variable("params", "bias").astype(dtype) if m.use_bias else y
        return y + ((scale - 1) * base + scale * delta).astype(y.dtype)

    def intercept(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, Projection):
            return projection(context.module, next_fun, args[0], kwargs)
        return next_fun(*args, **kwargs)

    return intercept


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterBank:
    """A loaded bank: ``forward`` (a :class:`MultiLoraForward`), ``factors`` (the
    ``"lora"`` params tree, in the base's param dtype), ``sites`` (the projections some
    adapter targets) and ``rank`` (the padded rank R)."""

    forward: MultiLoraForward
    factors: dict
    sites: tuple[Site, ...]
    rank: int

    @property
    def names(self) -> tuple[str, ...]:
        return self.forward.names

    def params(self, base_params, adapters: Sequence) -> dict:
        """The forward's params: ``base_params`` (shared, not copied), the factors and the
        ids of ``adapters`` (one name or None per row; see :meth:`MultiLoraForward.adapter_ids`)."""
        return {"params": base_params, "lora": self.factors,
                "adapter_ids": self.forward.adapter_ids(adapters)}


def with_adapters(forward, params, adapters: Sequence, batch: int | None) -> dict:
    """``params`` of ``forward`` (a :class:`MultiLoraForward`) with ``adapter_ids`` set from
    ``adapters`` (one name or None per prompt, ``batch`` prompts; None: any count);
    CadenzaError otherwise."""
    if not isinstance(forward, MultiLoraForward):
        raise CadenzaError("adapters= needs a multi-adapter model",
                           where="generate(adapters=...)",
                           fix="pass bank.forward and bank.params(...) from load_adapter_bank")
    ids = forward.adapter_ids(adapters)
    if batch is not None and ids.shape[0] != batch:
        raise CadenzaError(f"{ids.shape[0]} adapter names for {batch} prompts",
                           where="generate(adapters=...)",
                           fix="give one adapter name (or None for the base) per prompt")
    return {**params, "adapter_ids": ids}


# ----- building a bank ------------------------------------------------------------------------

def stack_adapters(model_config, adapters: Sequence, *, base_params=None,
                   rules=None) -> AdapterBank:
    """A bank from adapters in memory: ``adapters`` is a list of ``(name, peft_model,
    trainable)`` (as :func:`cadenza.train.peft.prepare` or the loaders return them), all for
    the base ``model_config``; ``base_params``: the base's params, needed only for DoRA
    adapters (their column scaling depends on the base kernel); ``rules``: logical-axis
    rules of a sharded base (the factors are small and stay replicated). Ranks are padded
    to the largest, scalings folded into B, sites an adapter lacks are zero for it. Raises
    CadenzaError on an empty list, a duplicate or empty name, a method outside the LoRA
    family (:data:`BANK_METHODS`), or DoRA without (or with mismatched) ``base_params``."""
    names = [name for name, _, _ in adapters]
    _check_names(names)
    for name, pm, _ in adapters:
        _check_method(name, pm.method, "peft.method")
    dora = [name for name, pm, _ in adapters if pm.method == "dora"]
    if dora:
        if base_params is None:
            raise CadenzaError(f"DoRA adapters {dora} need the base params (their scaling "
                               "depends on the base kernels)", where="base_params",
                               fix="pass base_params=... (the base model's params)")
        for name, pm, _ in adapters:
            _relabel(f"adapter {name!r}", pm.check_base, base_params)
    order = [s.name for s in projection_sites(model_config)]
    sites = {s.name: s for _, pm, _ in adapters for s in pm.sites}
    sites = [sites[n] for n in order if n in sites]
    rank = max(pm.peft_config.rank for _, pm, _ in adapters)
    dtype = np.dtype(jnp.dtype(model_config.param_dtype))
    factors: dict = {}
    n = len(adapters)
    for s in sites:
        lead = len(s.lead)
        a_all = np.zeros(s.lead + (n,) + s.in_shape + (rank,), np.float32)
        b_all = np.zeros(s.lead + (n, rank) + s.out_shape, np.float32)
        for i, (_, pm, trainable) in enumerate(adapters):
            if s not in pm.sites:
                continue
            ad = get_path(trainable["peft"], s.path)
            r = pm.peft_config.rank
            at = (slice(None),) * lead + (i,)
            a_all[at + (Ellipsis, slice(0, r))] = np.asarray(ad["lora_a"], np.float32)
            b_all[at + (slice(0, r),)] = np.asarray(ad["lora_b"], np.float32) * \
                pm.peft_config.scaling
        set_path(factors, s.path + ("lora_a",), jnp.asarray(a_all.astype(dtype)))
        set_path(factors, s.path + ("lora_b",), jnp.asarray(b_all.astype(dtype)))
        if dora:
            scale = np.ones(s.lead + (n,) + s.out_shape, np.float32)
            for i, (_, pm, trainable) in enumerate(adapters):
                if pm.method == "dora" and s in pm.sites:
                    scale[(slice(None),) * lead + (i,)] = _dora_scale(
                        s, get_path(base_params, s.path)["kernel"],
                        get_path(trainable["peft"], s.path), pm.peft_config.scaling)
            set_path(factors, s.path + ("dora_scale",), jnp.asarray(scale.astype(dtype)))
    forward = MultiLoraForward(config=model_config, names=tuple(names),
                               rules=None if rules is None else tuple(rules))
    return AdapterBank(forward=forward, factors=factors, sites=tuple(sites), rank=rank)


def _dora_scale(site: Site, kernel, adapter: dict, scaling: float) -> np.ndarray:
    """DoRA's output-column scale ``m / ||W + s A B||`` [*lead, *out] at ``site``, float32."""
    lead = len(site.lead)
    w = jnp.asarray(kernel, jnp.float32) + scaling * lora_delta(adapter["lora_a"],
                                                                adapter["lora_b"], lead)
    return np.asarray(adapter["dora_magnitude"] / column_norm(w, len(site.in_shape), lead))


def _check_names(names: list) -> None:
    """Fail unless ``names`` is a non-empty list of distinct non-empty strings."""
    if not names:
        raise CadenzaError("no adapters given", where="adapters",
                           fix="give at least one NAME=DIR adapter")
    for name in names:
        if not isinstance(name, str) or not name:
            raise CadenzaError(f"adapter name {name!r} is not a non-empty string",
                               where="adapters", fix="name every adapter, e.g. NAME=DIR")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CadenzaError(f"adapter names {dup} are given more than once", where="adapters",
                           fix="give every adapter a distinct name")


def _check_method(name: str, method: str, where: str) -> None:
    if method not in BANK_METHODS:
        raise CadenzaError(f"adapter {name!r} uses method {method!r}; a multi-adapter bank "
                           f"holds LoRA-family adapters only ({', '.join(BANK_METHODS)})",
                           where=where, fix=_REFUSE_FIX)


def _base_config(base):
    """The base ExperimentConfig: ``base`` itself, or read from a model directory (cadenza
    or Hugging Face; the config only)."""
    from cadenza.config import ExperimentConfig, load_config
    from cadenza.models.hf_folder import is_hf_folder

    if isinstance(base, ExperimentConfig):
        return base
    d = pathlib.Path(base)
    if is_hf_folder(d):   # its config only: no tensor data is read
        from cadenza.models.hf_import import open_hf_checkpoint

        ckpt, model_config = open_hf_checkpoint(d)
        return ExperimentConfig(name=ckpt.directory.name, model=model_config)
    if not (d / "config.yaml").is_file():
        raise CadenzaError("not a model directory (no config.yaml)", where=str(d),
                           fix="pass the base model directory, or its ExperimentConfig")
    return load_config(d / "config.yaml")


def _load_one(name: str, directory, config, base_params):
    """``(peft_model, trainable)`` of one adapter directory, checked for the bank."""
    from cadenza.config import load_config
    from cadenza.train.checkpoints import model_differences
    from cadenza.train.peft.artifacts import load_adapters, peft_import

    d = pathlib.Path(directory)
    where = f"adapter {name!r} ({d})"
    if not d.is_dir():
        raise CadenzaError("no such adapter directory", where=where, fix="check the path")
    hf = d / "adapter_config.json"
    if hf.is_file():
        try:
            meta = json.loads(hf.read_text())
        except (OSError, ValueError) as e:
            raise CadenzaError(f"cannot read adapter_config.json: {e}", where=where,
                               fix="pass a folder written by peft's save_pretrained") from None
        peft_type = meta.get("peft_type") if isinstance(meta, dict) else None
        if peft_type != "LORA":
            raise CadenzaError(f"adapter {name!r} is a peft {peft_type!r} adapter; a "
                               "multi-adapter bank holds LoRA-family adapters only",
                               where=f"{where}: peft_type", fix=_REFUSE_FIX)
        return _relabel(where, peft_import, d, config, base_params)
    if (d / "config.yaml").is_file():
        saved = load_config(d / "config.yaml")
        _check_method(name, saved.peft.method, f"{where}: peft.method")
        diffs = model_differences(saved.model, config.model)
        if diffs:
            raise CadenzaError(
                f"adapter {name!r} was made for another base model: "
                + "; ".join(diffs).replace("checkpoint has", "adapter has")
                .replace("this run has", "the base has"), where=where,
                fix="use adapters trained on this base model")
        return _relabel(where, load_adapters, d, config)
    raise CadenzaError("not an adapter directory (needs config.yaml and adapters/, or peft's "
                       "adapter_config.json and adapter_model.safetensors)", where=where,
                       fix="pass a cadenza adapter directory or a peft save_pretrained folder")


def _relabel(where: str, fn, *args):
    """``fn(*args)``, with a CadenzaError's location prefixed by the adapter's name."""
    try:
        return fn(*args)
    except CadenzaError as e:
        raise CadenzaError(e.what, where=f"{where}: {e.where}" if e.where else where,
                           fix=e.fix) from None


def parse_adapter_specs(specs: Sequence[str], where: str = "--adapter") -> list[tuple[str, str]]:
    """``[(name, directory)]`` from command-line ``NAME=DIR`` strings (for
    :func:`load_adapter_bank`); CadenzaError naming ``where`` on a spec without ``=``, an
    empty name or directory. Duplicate names are left to :func:`load_adapter_bank`."""
    pairs = []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise CadenzaError(f"adapter {spec!r} is not NAME=DIR", where=where,
                               fix="name each adapter, e.g. --adapter sql=runs/sql/adapters")
        pairs.append((name, directory))
    return pairs


def load_adapter_bank(base, adapters, *, base_params=None, rules=None) -> AdapterBank:
    """Read LoRA adapters for one base into a bank.

    Args:
      base: the base model directory (cadenza or Hugging Face folder) or its ExperimentConfig.
      adapters: ``{name: directory}`` or a list of ``(name, directory)`` pairs; each
        directory a cadenza adapter directory (``config.yaml`` + ``adapters/``) or a
        Hugging Face peft LoRA folder (``adapter_config.json`` +
        ``adapter_model.safetensors``).
      base_params: the base's params: needed for DoRA adapters; also used to check a copy
        of the base's ``lm_head`` / embedding that peft saves next to adapters targeting
        them (shape only without).
      rules: logical-axis rules when the base is sharded (see :func:`stack_adapters`).

    Returns an :class:`AdapterBank` in the order given. Raises CadenzaError, naming the
    adapter and the field, before building anything on: duplicate or empty names, a
    directory that is neither format, a method outside the LoRA family ((IA)3, prefix,
    prompt, ...), DoRA without ``base_params``, an adapter made for another base (model
    fields such as hidden_size, num_layers, vocab_size differ, or the tensors do not fit),
    targets the base lacks.
    Adapters may target different projections (a site an adapter lacks is zero for it).
    """
    pairs = list(adapters.items()) if isinstance(adapters, Mapping) else list(adapters)
    for p in pairs:
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise CadenzaError(f"adapter entry {p!r} is not a (name, directory) pair",
                               where="adapters", fix="pass {name: directory}")
    _check_names([name for name, _ in pairs])
    config = _base_config(base)
    loaded = [(name, *_load_one(name, d, config, base_params)) for name, d in pairs]
    return stack_adapters(config.model, loaded, base_params=base_params, rules=rules)
