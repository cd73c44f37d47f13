"""Layer-skip self-speculation: the target drafts for itself with some of its layers skipped.

SWIFT (Xia et al., 2024) and Kangaroo (Liu et al., 2024) style, training-free. The draft
model is the target with a static set of layers left out (the residual stream passes
them unchanged): the same embedding, the kept layers in order, the same final norm and
LM head, so no second model is stored. Each round (:mod:`cadenza.decode.speculative`):

1. the kept layers' keys/values are read from the *target's* cache, so every cached
   token is seen as the full model computed it (the draft is only approximate for the
   tokens it drafts itself);
2. the draft feeds the pending token at slot ``L`` and its own drafts after it,
   writing slots ``L .. L + g - 1`` of that copy; the copy is then dropped: the round's
   verify forward writes all layers' keys/values at ``[L, L + g + 1)`` in the target's
   own cache, so nothing the draft computed survives the round;
3. drafting stops when ``gamma`` tokens are drafted or, with the confidence rule
   (:class:`cadenza.decode.specdec_head.StopRule` kind ``confidence``), once
   ``1 - prod q(d_i) > threshold`` (``q`` the draft's own warped probabilities);
4. verification is the round's: greedy output equals plain greedy, sampled output
   follows the target (``q`` is passed, so the residual rule applies).

Draft params are a :class:`SkipParams` (:func:`skip_params`): the kept layers' params in
the layout of a model with fewer layers (the same arrays in the unrolled layout that
decoding uses on CPU) and the kept layer indices as an int32 array, so every skip set
with the same number of layers shares one compiled program (:func:`search_skip_set`).
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode.forward import ModelForward
from cadenza.decode.speculative import chain, draft_chain, param_count
from cadenza.errors import CadenzaError

FIELD = "decode.layer_skip.skip_layers"


@flax.struct.dataclass
class SkipParams:
    """``params``: the draft's params (a model of ``len(kept)`` layers); ``kept`` int32
    [n]: the target's layer index of each draft layer, ascending."""

    params: Any
    kept: jax.Array


def kept_layers(num_layers: int, skip) -> tuple:
    """The layers left after skipping ``skip`` (ints) of ``num_layers``; CadenzaError naming
    ``decode.layer_skip.skip_layers`` for an index out of range, a repeat, or a set that
    skips every layer."""
    skip = [int(i) for i in skip]
    bad = [i for i in skip if not 0 <= i < num_layers]
    if bad:
        raise CadenzaError(f"layer {bad[0]} does not exist: the model has {num_layers} layers "
                           f"(0..{num_layers - 1})", where=FIELD,
                           fix=f"give indices in 0..{num_layers - 1}")
    if len(set(skip)) != len(skip):
        raise CadenzaError(f"layer indices repeat in {skip}", where=FIELD,
                           fix="give each layer once")
    kept = tuple(i for i in range(num_layers) if i not in set(skip))
    if not kept:
        raise CadenzaError(f"skipping {sorted(skip)} skips every layer of the model",
                           where=FIELD, fix="keep at least one layer (fewer indices)")
    return kept


def check_plain(forward) -> None:
    """Refuse (CadenzaError) a target forward that is not a plain model: the draft runs the
    model's own layers without an adapter's."""
    if not isinstance(forward, ModelForward):
        raise CadenzaError("layer_skip drafts with the plain model's layers; this target "
                           "carries an adapter", where="decode.method",
                           fix="merge the adapter into the model first (cadenza merge)")


def layer_skip_drafter(forward, params, config) -> tuple:
    """``(LayerSkip, SkipParams)`` for the target ``forward`` and its ``params`` from a
    DecodeConfig: ``decode.layer_skip`` (skip set, stop rule; ``threshold`` 1 = none) and
    ``decode.speculative.gamma``. Raises CadenzaError naming the field on bad input."""
    from cadenza.decode.specdec_head import StopRule

    check_plain(forward)
    ls = config.layer_skip
    stop = StopRule("confidence", ls.threshold, ls.min_length) if ls.threshold < 1 else None
    return (LayerSkip(gamma=config.speculative.gamma, stop=stop),
            skip_params(forward.config, params, ls.skip_layers))


def draft_config(config, num_kept: int):
    """The ModelConfig of a draft keeping ``num_kept`` of ``config``'s layers."""
    return dataclasses.replace(config, num_layers=num_kept)


def skip_params(config, params, skip) -> SkipParams:
    """The draft params for skipping layers ``skip`` of the model ``config`` (params in the
    unrolled ``layer_i`` layout or the scanned ``layers`` layout). Raises CadenzaError,
    naming the field, on a bad skip set or a model whose layers use different attention
    windows (the draft's kept layers must keep their own windows)."""
    kept = kept_layers(config.num_layers, skip)
    windows = config.layer_windows()
    sub = draft_config(config, len(kept))
    if sub.layer_windows() != [windows[i] for i in kept]:
        raise CadenzaError("this model alternates local and global attention layers; "
                           "skipping layers would change the kept layers' windows",
                           where=FIELD, fix="use another decoding method for this model")
    rest = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layer_")}
    if "layers" in params:
        idx = np.asarray(kept)
        layers = {"layers": jax.tree.map(lambda x: x[idx], params["layers"])}
    else:
        layers = {f"layer_{j}": params[f"layer_{i}"] for j, i in enumerate(kept)}
    return SkipParams(params={**rest, **layers}, kept=jnp.asarray(kept, jnp.int32))


@dataclasses.dataclass(frozen=True)
class LayerSkip:
    """Layer-skip drafter: a chain of up to ``gamma`` drafts, ended early by ``stop``
    (a :class:`~cadenza.decode.specdec_head.StopRule` of kind ``confidence``, or None).
    Draft params: :func:`skip_params` of the target."""

    gamma: int = 4
    stop: Any = None
    name: str = "layer_skip"

    def __post_init__(self):
        if self.gamma < 1:
            raise ValueError("LayerSkip.gamma must be >= 1")
        if self.stop is not None and self.stop.kind != "confidence":
            raise ValueError("LayerSkip stops on the draft's confidence only")

    @property
    def parents(self) -> tuple:
        return chain(self.gamma)

    @property
    def variable_length(self) -> bool:
        """With a stop rule drafts end early: the round verifies only up to the longest
        (:func:`cadenza.decode.speculative.verify_longest`)."""
        return self.stop is not None

    def check(self, forward, draft_params) -> None:
        """Refuse, before compiling, a target that is not a plain model (an adapter: merge
        it first) and draft params that are not :func:`skip_params` of this target."""
        check_plain(forward)
        if not isinstance(draft_params, SkipParams):
            raise CadenzaError("layer_skip needs draft params from skip_params(config, params, "
                               "skip)", where="draft_params",
                               fix="pass skip_params(model.config, params, skip_layers)")
        n, total = draft_params.kept.shape[0], forward.config.num_layers
        if not 1 <= n <= total:
            raise CadenzaError(f"the draft keeps {n} layers of a {total}-layer target",
                               where=FIELD, fix="build the draft params for this target")

    def cost_ratio(self, params, draft_params) -> float:
        """Estimate of t_draft / t_target: the draft's share of the target's parameters."""
        return param_count(draft_params.params) / max(param_count(params), 1)

    def init(self, draft_params, pre):
        return None          # the draft reads the target's cache every round

    def propose(self, draft_params, state, ctx):
        """Draft a chain with the kept layers over a copy of their slice of the target's cache."""
        dp = draft_params
        f = ModelForward(draft_config(ctx.forward.config, dp.kept.shape[0]), ctx.forward.rules)
        c = ctx.cache
        cache = c.replace(k=jnp.take(c.k, dp.kept, axis=0), v=jnp.take(c.v, dp.kept, axis=0))
        logits, _, cache = f(dp.params, ctx.pending[:, None], cache=cache)
        prop, _ = draft_chain(f, dp.params, cache.advance(1), logits[:, -1], ctx, self.gamma,
                              self.stop)
        return prop, state

    def observe(self, draft_params, state, obs):
        return state


def search_skip_set(model, params, prompts, config, num_skip: int, *, tokenizer=None,
                    report=None):
    """Search the set of ``num_skip`` layers whose skipping keeps the most accepted tokens
    per target forward when decoding ``prompts`` greedily with ``config`` (method
    ``layer_skip``; its gamma, stop threshold and max_new_tokens).

    Greedy forward selection: starting from no skipped layer, each of ``num_skip`` stages
    tries every remaining layer on top of the set so far and keeps the best (ties: the
    lower index). Sets of one size share one compiled program. ``report(str)`` (optional)
    receives a line per trial. Returns ``(skip tuple sorted, trials)``: one dict per trial
    with ``skip``, ``accepted_per_forward`` and ``predicted_speedup``. Raises CadenzaError
    naming ``--search-skip`` unless ``1 <= num_skip < num_layers``.
    """
    from cadenza.decode.config import with_fields
    from cadenza.decode.forward import as_forward
    from cadenza.decode.registry import generate

    layers = as_forward(model).config.num_layers
    if not 1 <= num_skip < layers:
        raise CadenzaError(f"cannot search for {num_skip} skipped layers of a {layers}-layer "
                           "model", where="--search-skip",
                           fix=f"give 1..{layers - 1} (at least one layer must stay)")
    config = with_fields(config, method="layer_skip", speculative__sample=False)
    chosen, trials = (), []
    for _ in range(num_skip):
        best = None
        for layer in range(layers):
            if layer in chosen:
                continue
            skip = tuple(sorted(chosen + (layer,)))
            res = generate(model, params, prompts,
                           with_fields(config, layer_skip__skip_layers=list(skip)),
                           tokenizer=tokenizer)
            trial = {"skip": list(skip), "accepted_per_forward":
                     res.stats["mean_accepted_per_forward"],
                     "predicted_speedup": res.stats["predicted_speedup"]}
            trials.append(trial)
            if report is not None:
                report(f"skip {','.join(map(str, skip))}: "
                       f"{trial['accepted_per_forward']:.3f} tokens per target forward, "
                       f"predicted speedup {trial['predicted_speedup']:.2f}x")
            if best is None or trial["accepted_per_forward"] > best[0]:
                best = (trial["accepted_per_forward"], skip)
        chosen = best[1]
    return chosen, trials
