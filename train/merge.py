"""Model merging: combine fine-tunes of one base model into one model directory.

Every method works on task vectors ``tau_i = theta_i - theta_0`` (fine-tune minus
base), leaf by leaf, in float32, and casts the result to the base's dtype:

- ``linear`` (model soup): ``theta_0 + sum_i w_i tau_i / sum_i w_i`` (weights default to 1,
  so the uniform average of the models).
- ``task_arithmetic``: ``theta_0 + lam * sum_i w_i tau_i``.
- ``ties``: keep each tau's top ``density`` fraction of magnitudes, elect the sign of
  the summed (weighted) mass per entry, take the weighted mean of the entries that agree
  with it (disjoint mean), ``theta_0 + lam * merged``.
- ``dare_linear``: drop each entry of each tau with probability ``p`` and rescale the
  survivors by ``1 / (1 - p)`` (or by a fixed ``rescale``, as DAREx does), then task
  arithmetic. ``dare_ties``: the same masks, then TIES' sign election and disjoint mean.
- ``breadcrumbs``: per tau, zero the ``top`` fraction of largest and the ``bottom``
  fraction of smallest magnitudes, then task arithmetic.
- ``model_stock``: ``t = N cos / (1 + (N - 1) cos)`` from the mean pairwise cosine of the
  taus (``2 cos / (1 + cos)`` for two fine-tunes), per weight matrix (per layer slice for
  scanned layers), ``theta = t * mean_i theta_i + (1 - t) theta_0``.
- ``wise_ft``: one fine-tune, ``(1 - alpha) theta_0 + alpha theta_1``.

Random masks are keyed by ``fold_in(fold_in(key(seed), crc32(param path)), model
index)``, so a merge is reproducible and the same on any mesh. Each leaf is one jitted
function whose output keeps the base leaf's sharding: a merge on a mesh never gathers
the model on one device.

:func:`merge_params` merges pytrees; :func:`merge_models` reads model directories, Hugging
Face folders (converted in memory), LoRA-family adapter directories (folded into their base
first) or BitDelta directories (:mod:`cadenza.train.bitdelta`, rebuilt on the base first)
and writes a new model directory with a ``merge.json`` recording the inputs and settings.
"""

import dataclasses
import functools
import json
import pathlib
import zlib

import jax
import jax.numpy as jnp

from cadenza.errors import CadenzaError, ConfigError
from cadenza.outputs import atomic_dir
from cadenza.validation import check_choice, check_range, require

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
           "model_stock", "wise_ft")
MERGE_FILE = "merge.json"
# Options each method reads; giving another one is an error (nothing silently ignored).
_USES = {"linear": {"weights"},
         "task_arithmetic": {"weights", "lam"},
         "ties": {"weights", "lam", "density"},
         "dare_linear": {"weights", "lam", "drop_rate", "rescale", "seed"},
         "dare_ties": {"weights", "lam", "drop_rate", "rescale", "seed"},
         "breadcrumbs": {"weights", "lam", "top", "bottom"},
         "model_stock": set(),
         "wise_ft": {"alpha"}}
_DEFAULTS = {"lam": 1.0, "density": 0.2, "drop_rate": 0.9, "top": 0.01, "bottom": 0.9, "alpha": 0.5,
             "seed": 0}


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """A merge method and its settings (validated on creation).

    Leave a setting None to take its default (``lam`` 1, ``density`` 0.2, ``drop_rate`` 0.9,
    ``rescale`` 1/(1-p), ``top`` 0.01, ``bottom`` 0.9, ``alpha`` 0.5, ``seed`` 0,
    ``weights`` all 1). A setting the method does not use must stay None.
    """

    method: str
    weights: tuple[float, ...] | None = None   # one per model
    lam: float | None = None                   # scale of the merged task vector
    density: float | None = None               # TIES: fraction of each tau kept
    drop_rate: float | None = None             # DARE: drop probability p
    rescale: float | None = None               # DARE: survivor scale (DAREx); default 1/(1-p)
    top: float | None = None                   # Breadcrumbs: largest magnitudes dropped
    bottom: float | None = None                # Breadcrumbs: smallest magnitudes dropped
    alpha: float | None = None                 # WiSE-FT interpolation
    seed: int | None = None                    # DARE masks

    def __post_init__(self):
        s = "merge"
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        check_choice(s, "method", self.method, METHODS)
        unused = [f.name for f in dataclasses.fields(self)
                  if f.name != "method" and getattr(self, f.name) is not None
                  and f.name not in _USES[self.method]]
        require(not unused, f"{s}.{unused[0] if unused else ''}",
                f"method {self.method!r} does not use {', '.join(unused)}",
                f"drop it, or pick a method that uses it ({_users(unused)})")
        check_range(s, "density", self.density, low=0.0, high=1.0, optional=True)
        check_range(s, "drop_rate", self.drop_rate, low=0.0, high=1.0, high_inclusive=False,
                    optional=True)
        check_range(s, "rescale", self.rescale, low=0.0, low_inclusive=False, optional=True)
        check_range(s, "top", self.top, low=0.0, high=1.0, optional=True)
        check_range(s, "bottom", self.bottom, low=0.0, high=1.0, optional=True)
        require(self.get("top") + self.get("bottom") <= 1.0 or self.method != "breadcrumbs",
                f"{s}.top", f"top {self.get('top')} + bottom {self.get('bottom')} drop more "
                            "than every entry", "make top + bottom <= 1")
        check_range(s, "alpha", self.alpha, low=0.0, high=1.0, optional=True)
        if self.weights is not None:
            require(all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                    f"{s}.weights", f"weights {list(self.weights)} must be >= 0 with a "
                                    "positive sum", "give non-negative weights, one per model")

    def get(self, name: str):
        """The setting ``name`` with its default filled in."""
        value = getattr(self, name)
        if value is None and name == "rescale":
            return 1.0 / (1.0 - self.get("drop_rate"))
        return _DEFAULTS.get(name) if value is None else value

    def resolved(self, num_models: int) -> dict:
        """The settings the merge actually uses (defaults filled in), for ``merge.json``."""
        out = {"method": self.method}
        for name in sorted(_USES[self.method]):
            out[name] = (list(self.model_weights(num_models)) if name == "weights"
                         else self.get(name))
        return out

    def model_weights(self, num_models: int) -> tuple[float, ...]:
        """One weight per model (default all 1); fails if the count differs."""
        if self.weights is None:
            return (1.0,) * num_models
        if len(self.weights) != num_models:
            raise ConfigError(f"{len(self.weights)} weights for {num_models} models",
                              where="merge.weights", fix="give exactly one weight per model")
        return tuple(float(w) for w in self.weights)

    def check_count(self, num_models: int) -> None:
        """Fail unless the method can merge ``num_models`` models."""
        if num_models < 1:
            raise ConfigError("no models to merge", where="merge.models",
                              fix="give at least one fine-tuned model")
        if self.method == "wise_ft" and num_models != 1:
            raise ConfigError(f"wise_ft interpolates one fine-tune, got {num_models}",
                              where="merge.models", fix="give exactly one model")
        if self.method == "model_stock" and num_models < 2:
            raise ConfigError("model_stock needs at least two fine-tunes of the base",
                              where="merge.models", fix="give two or more models")
        self.model_weights(num_models)


def _users(names) -> str:
    return ", ".join(sorted(m for m, uses in _USES.items() if uses & set(names))) or "none"


def path_key(seed: int, path: str) -> jax.Array:
    """The random key of the param at ``path`` (a ``jax.tree_util.keystr``): independent
    of the mesh, the device count and the order leaves are visited in."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def magnitude_mask(tau: jax.Array, keep_top: float, drop_top: float = 0.0) -> jax.Array:
    """bool mask of ``tau``'s entries whose magnitude rank (largest first) lies in
    ``[drop_top, keep_top)`` as fractions of its size: ``magnitude_mask(t, 0.2)`` keeps
    the largest 20%, ``magnitude_mask(t, 0.1, 0.01)`` the 1%..10% band. The counts are
    rounded to the nearest entry; entries tied with a boundary value go to the larger side
    (kept at the lower boundary, dropped at the upper one)."""
    n = tau.size
    mag = jnp.abs(tau).astype(jnp.float32)
    order = jnp.sort(mag.ravel())[::-1]
    keep, drop = round(keep_top * n), round(drop_top * n)
    mask = mag >= order[keep - 1] if keep > 0 else jnp.zeros(tau.shape, bool)
    if drop > 0:
        mask &= mag < order[drop - 1]
    return mask


def dare(tau: jax.Array, key: jax.Array, p: float, rescale: float | None = None) -> jax.Array:
    """DARE: each entry of ``tau`` kept with probability ``1 - p`` and scaled by
    ``rescale`` (default ``1 / (1 - p)``, so the expectation is ``tau``); float32."""
    scale = 1.0 / (1.0 - p) if rescale is None else rescale
    keep = jax.random.bernoulli(key, 1.0 - p, tau.shape)
    return jnp.where(keep, tau.astype(jnp.float32) * scale, 0.0)


def ties_combine(taus: list[jax.Array], weights) -> jax.Array:
    """TIES' sign election and disjoint mean of already trimmed ``taus``: the sign of
    ``sum_i w_i tau_i`` per entry, then the ``w``-weighted mean of the nonzero entries
    with that sign (0 where none agrees). float32, shape of the taus."""
    taus = [t.astype(jnp.float32) for t in taus]
    sign = jnp.sign(sum(w * t for w, t in zip(weights, taus)))
    agree = [(jnp.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(jnp.where(a, w * t, 0.0) for a, w, t in zip(agree, weights, taus))
    den = sum(jnp.where(a, w, 0.0) for a, w in zip(agree, weights))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def model_stock_ratio(taus: list[jax.Array], layer_axis: bool) -> jax.Array:
    """Model Stock's ``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise
    cosine of the ``N`` taus: a scalar, or one per slice of axis 0 if ``layer_axis``.
    ``t = 0`` (keep the base) where a tau is zero."""
    axes = tuple(range(1, taus[0].ndim)) if layer_axis else None
    flat = [t.astype(jnp.float32) for t in taus]
    norms = [jnp.sqrt(jnp.sum(t * t, axis=axes)) for t in flat]
    pairs = [(i, j) for i in range(len(flat)) for j in range(i + 1, len(flat))]
    cos = sum(jnp.sum(flat[i] * flat[j], axis=axes) / jnp.maximum(norms[i] * norms[j], 1e-30)
              for i, j in pairs) / len(pairs)
    n = len(flat)
    valid = jnp.all(jnp.stack([m > 0 for m in norms]), axis=0)
    return jnp.where(valid, n * cos / jnp.maximum(1 + (n - 1) * cos, 1e-12), 0.0)


@functools.lru_cache(maxsize=64)
def _merge_leaf(spec: MergeSpec, weights: tuple, layer_axis: bool, out_shardings):
    """jitted (key, base, *models) -> (merged leaf in the base dtype, model-stock t or None);
    cached so leaves of one shape and sharding compile once."""
    lam = spec.get("lam")

    def fn(key, base, *models):
        b = base.astype(jnp.float32)
        taus = [m.astype(jnp.float32) - b for m in models]
        extra = None
        m = spec.method
        if m == "linear":
            merged = b + sum(w * t for w, t in zip(weights, taus)) / sum(weights)
        elif m == "wise_ft":
            merged = b + spec.get("alpha") * taus[0]
        elif m == "model_stock":
            extra = model_stock_ratio(taus, layer_axis)
            t = extra.reshape(extra.shape + (1,) * (b.ndim - extra.ndim))
            merged = b + t * (sum(taus) / len(taus))
        else:
            if m == "ties":
                taus = [jnp.where(magnitude_mask(t, spec.get("density")), t, 0.0) for t in taus]
            elif m == "breadcrumbs":
                taus = [jnp.where(magnitude_mask(t, 1.0 - spec.get("bottom"), spec.get("top")),
                                  t, 0.0) for t in taus]
            elif m.startswith("dare_"):
                taus = [dare(t, jax.random.fold_in(key, i), spec.get("drop_rate"),
                             spec.get("rescale"))
                        for i, t in enumerate(taus)]
            if m in ("ties", "dare_ties"):
                delta = ties_combine(taus, weights)
            else:
                delta = sum(w * t for w, t in zip(weights, taus))
            merged = b + lam * delta
        return merged.astype(base.dtype), extra

    return jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)


def _out_shardings(leaf):
    """Output shardings that keep ``leaf``'s sharding (the ratio replicated), or None."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return (sharding, replicated)
    return None


def merge_params(spec: MergeSpec, base, models: list, *, stacked_key: str = "layers"):
    """Merge the param pytrees ``models`` (fine-tunes of ``base``, same structure, shapes
    and any float dtypes) with ``spec``.

    Returns ``(params, stats)``: params with the base's structure, dtypes and shardings
    (each leaf one jitted map; nothing is donated), and ``stats`` (``{"model_stock_t":
    {path: float or [per layer]}}`` for model_stock, else ``{}``). Leaves under the
    top-level key ``stacked_key`` carry a leading layer axis (scanned layers): Model
    Stock computes one ratio per layer there.
    """
    spec.check_count(len(models))
    weights = spec.model_weights(len(models))
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    others = []
    for i, m in enumerate(models):
        leaves, tdef = jax.tree.flatten(m)
        if tdef != treedef or any(a.shape != b.shape for (_, a), b in zip(flat, leaves)):
            raise CadenzaError(f"model {i} has another param structure or shape than the base",
                               where="merge.models", fix="merge fine-tunes of the base model")
        others.append(leaves)
    out, stats = [], {}
    for i, (kp, leaf) in enumerate(flat):
        path = jax.tree_util.keystr(kp)
        layer_axis = bool(kp) and getattr(kp[0], "key", None) == stacked_key and leaf.ndim > 1
        fn = _merge_leaf(spec, weights, layer_axis, _out_shardings(leaf))
        merged, t = fn(path_key(spec.get("seed"), path), leaf, *[o[i] for o in others])
        out.append(merged)
        if t is not None:
            stats.setdefault("model_stock_t", {})[path] = jax.device_get(t).tolist()
    return jax.tree.unflatten(treedef, out), stats


# ---------------------------------------------------------------------------------------
# Model and adapter directories


def _kind(directory: pathlib.Path) -> str:
    from cadenza.models.checkpoint import is_model_dir
    from cadenza.models.hf_folder import is_hf_folder
    from cadenza.train.bitdelta import is_bitdelta_dir

    if not directory.is_dir():
        raise CadenzaError("no such directory", where=str(directory),
                           fix="check the path (a model, adapter or BitDelta directory, or a "
                               "Hugging Face folder)")
    if is_hf_folder(directory):
        return "hf"
    if is_model_dir(directory):
        return "model"
    if (directory / "config.yaml").is_file() and (directory / "adapters").is_dir():
        return "adapter"
    if is_bitdelta_dir(directory):
        return "bitdelta"
    raise CadenzaError("not a cadenza model, adapter or BitDelta directory, nor a Hugging "
                       "Face folder (needs config.yaml and params.safetensors, params/ or "
                       "adapters/, or bitdelta.safetensors, or config.json and "
                       "*.safetensors)",
                       where=str(directory),
                       fix="pass directories written by training, 'cadenza convert "
                           "hf-import', save_adapters or 'cadenza convert bitdelta', or a "
                           "Hugging Face model folder")


def _config(directory: pathlib.Path, kind: str):
    """The ExperimentConfig of an input, read without its weights."""
    from cadenza.config import load_config
    from cadenza.models.hf_folder import hf_folder_config

    return hf_folder_config(directory) if kind == "hf" else load_config(directory / "config.yaml")


def check_inputs(base_dir, model_dirs) -> tuple:
    """Read only the configs (a Hugging Face folder's config.json and safetensors headers):
    ``(base ExperimentConfig, [kind per model])`` with kinds ``model``, ``hf``, ``adapter``
    or ``bitdelta``; fails naming the first differing model field when an input was made
    for another architecture."""
    from cadenza.train.checkpoints import model_differences

    base_dir = pathlib.Path(base_dir)
    base_kind = _kind(base_dir)
    if base_kind not in ("model", "hf"):
        raise CadenzaError(f"the base must be a model directory or Hugging Face folder, not a "
                           f"{base_kind} directory", where=str(base_dir),
                           fix="pass the model the fine-tunes were made from")
    base = _config(base_dir, base_kind)
    kinds = []
    for d in map(pathlib.Path, model_dirs):
        kinds.append(_kind(d))
        other = _config(d, kinds[-1])
        diffs = model_differences(base.model, other.model, names=("the base", "this input"))
        if diffs:
            raise CadenzaError("made for another architecture than the base: "
                               + "; ".join(diffs), where=str(d),
                               fix="merge only fine-tunes of the same base model")
    return base, kinds


def merge_models(base_dir, model_dirs, out_dir, spec: MergeSpec, *, mesh=None,
                 progress=None) -> dict:
    """Merge model, Hugging Face, adapter or BitDelta directories into the new model
    directory ``out_dir``.

    Checks every input's config against the base's and the method's settings before
    reading any weight; adapters are folded into the base first
    (:func:`cadenza.train.peft.merge.merge`). With ``mesh`` every param is read into
    its shards (the base config's mesh rules) and merged there. ``out_dir`` is written
    as a temporary sibling and renamed into place when complete; it must not exist.
    ``progress``: an optional ``callable(str)`` for status lines. Returns the record
    written to ``out_dir/merge.json``.
    """
    import cadenza
    from cadenza.models.checkpoint import load_model, save_model, tokenizer_dir
    from cadenza.train.bitdelta import apply_bitdelta
    from cadenza.train.peft import merge as fold
    from cadenza.train.peft.artifacts import load_adapters

    say = progress or (lambda _: None)
    out = pathlib.Path(out_dir).absolute()
    model_dirs = [pathlib.Path(d) for d in model_dirs]
    if out.exists():
        raise CadenzaError("the output directory already exists", where=str(out),
                           fix="choose a new output directory or delete the old one")
    spec.check_count(len(model_dirs))
    base_config, kinds = check_inputs(base_dir, model_dirs)
    record = {"cadenza": cadenza.__version__, "base": str(pathlib.Path(base_dir).absolute()),
              "models": [{"path": str(d.absolute()), "kind": k}
                         for d, k in zip(model_dirs, kinds)],
              **spec.resolved(len(model_dirs))}
    rules = base_config.mesh.rules()
    _, base = load_model(base_dir, mesh=mesh, rules=rules)
    models = []
    for d, kind in zip(model_dirs, kinds):
        say(f"reading {kind} {d}")
        if kind in ("model", "hf"):
            models.append(load_model(d, mesh=mesh, rules=rules)[1])
        elif kind == "bitdelta":
            models.append(apply_bitdelta(d, base, base_dir))
        else:
            pm, trainable = load_adapters(d, base_config, mesh=mesh, rules=rules)
            models.append(fold.merge(pm, trainable, pm.freeze(base)))
    say(f"merging {len(models)} models with {spec.method} "
        f"({len(jax.tree.leaves(base))} param arrays)")
    merged, stats = merge_params(spec, base, models)
    record.update(stats)
    with atomic_dir(out) as tmp:  # a temporary sibling, renamed into place when complete
        save_model(tmp, base_config, merged, tokenizer_dir=tokenizer_dir(base_dir))
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2))
    return record
