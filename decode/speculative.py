"""Speculative decoding: one tree-shaped round for every drafter; rows advance raggedly.

Per round and row ``b`` (``L_b`` = the target's cached length, ``y`` = the
pending token, emitted but not cached):

1. the drafter proposes a :class:`Proposal`: ``N`` node tokens whose parents
   are static (``drafter.parents``; -1 = the pending token, so a chain of
   ``gamma`` tokens has parents ``(-1, 0, 1, ..)``), a per-row validity mask
   (a chain of ``g_b <= gamma`` drafts marks the rest invalid) and, for drafts
   sampled from a distribution, ``q`` (None for point masses);
2. the target scores ``[y, nodes]`` at positions ``L_b + depth`` with the
   ancestor-or-self mask in one :func:`~cadenza.decode.verify.verify` call;
3. acceptance (:mod:`cadenza.decode.verify`): greedy keeps the deepest path of
   nodes equal to the target's argmax at their parent; sampling uses the exact
   rule (chains with ``q``: residual and bonus token; point masses: sequential
   elimination), so outputs follow the target's own distribution;
4. the row emits the accepted path and the token after it (cut at a stop id
   and ``max_new_tokens``), the path's keys/values are compacted into
   consecutive slots (trees only) and the cache length becomes ``L_b + n + 1``;
5. the drafter's ``observe`` sees what happened (the target's logits and
   hidden states at every node, the accepted path), so drafters that learn
   from the target need no program of their own.

A drafter (:class:`Drafter`) is a frozen dataclass with ``name``, ``parents``,
``init``, ``propose``, ``observe``, ``check`` and ``cost_ratio``; a new one is
one file (see docs/decoding.md). The result's ``stats`` add
``target_forwards``, ``mean_accepted_per_forward`` (tokens emitted per row per
target forward, bonus included), ``acceptance_per_position`` (per depth),
``mean_draft_length``, ``verify_widths`` (rounds by tokens verified), ``cost_ratio`` and
``predicted_speedup``.

A chain drafter whose drafts end early (``variable_length``: a draft model or layer skip
with a stop rule, prompt lookup) has step 2 verify only as far as the round's longest draft
(:func:`verify_longest`), rather than ``gamma + 1`` tokens every round; one whose rounds
may draft nothing (``empty_drafts``: prompt lookup without a match) then verifies the
pending token alone.
"""

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode import sampling
from cadenza.decode.config import SamplingSpec
from cadenza.decode.driver import generate_with
from cadenza.decode.forward import ModelForward, as_forward, prefix_slots
from cadenza.decode.method import Batch, Emitted, MethodBase, not_finite
from cadenza.decode.plain import check_top_k, first_logits, mark_seen, seen_mask
from cadenza.decode.verify import (
    compact,
    exact_accept,
    tree_greedy_accept,
    tree_mask,
    tree_sample_accept,
    verify,
)
from cadenza.errors import CadenzaError


@flax.struct.dataclass
class Proposal:
    """A drafter's proposal for one round.

    tokens: int32 [B, N] node tokens; valid: bool [B, N] (an invalid node and
    its descendants are never accepted); q: float32 [B, N, V] the distribution
    each node was drawn from (chains only), or None for point masses;
    parents: static tuple of N ints, each node's parent (-1 = the pending
    token; parents precede children). Node positions are ``L + depth``.
    """

    tokens: jax.Array
    valid: jax.Array
    q: jax.Array | None = None
    parents: tuple = flax.struct.field(pytree_node=False, default=())


@flax.struct.dataclass
class Context:
    """What a drafter sees when proposing: ``prev`` int32 [B] the token before the
    pending one; ``pending`` int32 [B]; ``lengths`` int32 [B] the target's cached
    tokens; ``hidden`` [B, D] the target's final hidden state where it produced
    ``pending``; ``seen`` bool [B, V] or None; ``keys``: this round's per-row keys
    (None when greedy); ``spec`` (static): the sampler settings; ``forward``
    (static): the target's forward; ``cache``: the target's KVCache (its first
    ``lengths`` slots, prefix slots included, hold the cached tokens; a drafter may read
    it or draft into a copy: the round verifies with its own); ``rows``: per-row sampler
    settings overriding ``spec``'s (:class:`~cadenza.decode.sampling.RowSampling`) or None."""

    prev: jax.Array
    pending: jax.Array
    lengths: jax.Array
    hidden: jax.Array
    seen: jax.Array | None
    keys: jax.Array | None
    spec: SamplingSpec = flax.struct.field(pytree_node=False)
    forward: Any = flax.struct.field(pytree_node=False)
    cache: Any = None
    rows: Any = None


@flax.struct.dataclass
class Observation:
    """What verification decided, for ``Drafter.observe``: ``logits`` float32 [B, N + 1, V]
    and ``hidden`` [B, N + 1, D] of the target at the root (index 0) and every node;
    ``path`` int32 [B, D + 1] node indices of the accepted path (root first, valid up
    to ``n``); ``n`` int32 [B] accepted nodes; ``emitted`` int32 [B, D + 1] the
    accepted tokens then the next pending token; ``active`` bool [B] rows that were
    running; ``lengths`` int32 [B] the row's cached tokens before the round (as in
    :class:`Context`)."""

    logits: jax.Array
    hidden: jax.Array
    path: jax.Array
    n: jax.Array
    emitted: jax.Array
    active: jax.Array
    lengths: jax.Array


@flax.struct.dataclass
class Prefilled:
    """What ``Drafter.init`` sees after the target's prefill: ``batch``; ``first`` int32
    [B] the first emitted token; ``hidden`` [B, D] the target's last prompt hidden
    state; ``forward`` (static): the target's forward."""

    batch: Batch
    first: jax.Array
    hidden: jax.Array
    forward: Any = flax.struct.field(pytree_node=False)


class Drafter(Protocol):
    """A proposer of draft tokens (a frozen, hashable dataclass). Optionally
    ``depth_field``: the config field that sets its tree's depth; a tree deeper than
    ``max_new_tokens`` is then refused naming it."""

    name: str
    parents: tuple

    def check(self, forward, draft_params) -> None: ...

    def cost_ratio(self, params, draft_params) -> float: ...

    def init(self, draft_params, pre: Prefilled) -> Any: ...

    def propose(self, draft_params, state, ctx: Context) -> tuple[Proposal, Any]: ...

    def observe(self, draft_params, state, obs: Observation) -> Any: ...


def chain(gamma: int) -> tuple:
    """Parents of a chain of ``gamma`` nodes: ``(-1, 0, 1, .., gamma - 2)``."""
    return tuple(range(-1, gamma - 1))


@dataclasses.dataclass(frozen=True)
class Tree:
    """Static buffers of a round's tree (root = the pending token, index 0)."""

    parents: np.ndarray     # int32 [N + 1], root -1
    depth: np.ndarray       # int32 [N + 1]
    retrieve: np.ndarray    # int32 [N + 1, D + 1] root path of each node (root first)
    children: np.ndarray    # int32 [N + 1, C] children in node order, -1 padded
    is_chain: bool

    @classmethod
    def of(cls, node_parents: tuple) -> "Tree":
        parents = np.asarray([-1] + [p + 1 for p in node_parents], np.int32)
        n = len(parents)
        depth = np.zeros(n, np.int32)
        for i in range(1, n):
            if not 0 <= parents[i] < i:
                raise ValueError(f"node {i - 1}'s parent {parents[i] - 1} does not precede it")
            depth[i] = depth[parents[i]] + 1
        d = int(depth.max())
        retrieve = np.zeros((n, d + 1), np.int32)
        for i in range(n):
            path, j = [], i
            while j >= 0:
                path.append(j)
                j = parents[j]
            retrieve[i, :len(path)] = path[::-1]
        kids = [[i for i in range(1, n) if parents[i] == a] for a in range(n)]
        children = np.full((n, max(max(len(k) for k in kids), 1)), -1, np.int32)
        for a, k in enumerate(kids):
            children[a, :len(k)] = k
        is_chain = all(parents[i] == i - 1 for i in range(n))
        return cls(parents, depth, retrieve, children, is_chain)


@flax.struct.dataclass
class SpecState:
    """The round loop's carry: ``out`` (buffers ``max_new_tokens + depth + 1`` wide;
    ``out.step`` counts the prefill and rounds), the target ``cache``, ``seen``/``keys``
    as in plain decoding, ``prev`` int32 [B] the token before the pending one,
    ``hidden`` [B, D] (see :class:`Context`), the ``drafter``'s state, ``forwards``
    int32 [B] target forwards while the row ran, ``proposed``/``accepted`` int32 [D]
    per depth, how often a running row proposed / accepted a node there; ``widths``
    int32 [N + 2]: rounds by the number of tokens the target verified (N + 1 unless the
    drafter's drafts vary in length, :func:`verify_longest`); ``rows`` per-row sampler
    settings (from ``Batch.rows``) or None."""

    out: Emitted
    cache: Any
    seen: jax.Array | None
    keys: jax.Array | None
    prev: jax.Array
    hidden: jax.Array
    drafter: Any
    forwards: jax.Array
    proposed: jax.Array
    accepted: jax.Array
    widths: jax.Array
    rows: Any = None


def round_keys(keys, step):
    """Per-row keys of round ``step`` (``fold_in(row_key, step)``), or None when greedy."""
    if keys is None:
        return None
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


@dataclasses.dataclass(frozen=True)
class Speculative(MethodBase):
    """The speculative method: ``forward`` (the target), ``drafter``, ``spec``.

    Params: ``(target params, draft params)``.
    """

    forward: Any
    drafter: Any
    spec: SamplingSpec
    name: str = "speculative"

    @property
    def tree(self) -> Tree:
        return Tree.of(tuple(self.drafter.parents))

    @property
    def depth(self) -> int:
        return int(self.tree.depth.max())

    @property
    def slots(self) -> int:
        return len(self.drafter.parents) + 1

    def model_configs(self):
        return [self.forward.config]

    def prefill(self, params, batch: Batch) -> SpecState:
        """Prompts -> state with the first token chosen (one target forward)."""
        tparams, dparams = params
        logits, hidden, cache = first_logits(self.forward, tparams, batch)
        vocab = logits.shape[-1]
        seen = seen_mask(batch, vocab) if self.spec.uses_history else None
        rows = batch.rows
        keys = (sampling.row_keys(batch.seeds) if self.spec.method == "sample" or rows is not None
                else None)
        out = Emitted.create(batch, extra=self.depth + 1)
        logp = sampling.log_probs(logits, self.spec, seen, rows)
        tok, lp = sampling.select(logp, self.spec, keys, out.step, rows)
        one = jnp.ones_like(batch.lengths)
        out = out.append(tok[:, None], lp[:, None], one, not_finite(logits))
        d = self.depth
        prev = jnp.take_along_axis(batch.tokens, (batch.lengths - 1)[:, None], axis=1)[:, 0]
        pre = Prefilled(batch=batch, first=tok, hidden=hidden, forward=self.forward)
        return SpecState(
            out=out, cache=cache, seen=mark_seen(seen, tok[:, None], one, ~out.done), keys=keys,
            prev=prev, hidden=hidden, drafter=self.drafter.init(dparams, pre),
            forwards=jnp.zeros_like(batch.lengths), proposed=jnp.zeros((d,), jnp.int32),
            accepted=jnp.zeros((d,), jnp.int32), widths=jnp.zeros((self.slots + 1,), jnp.int32),
            rows=rows)

    def step(self, params, s: SpecState) -> SpecState:
        """One round: propose, verify once, accept, emit, observe."""
        tparams, dparams = params
        tree, out = self.tree, s.out
        b = out.tokens.shape[0]
        rows = jnp.arange(b)
        pending = out.last
        lengths = s.cache.lengths
        tokens_cached = lengths - prefix_slots(self.forward)
        keys = round_keys(s.keys, out.step)
        ctx = Context(prev=s.prev, pending=pending, lengths=tokens_cached, hidden=s.hidden,
                      seen=s.seen, keys=keys, spec=self.spec, forward=self.forward,
                      cache=s.cache, rows=s.rows)
        prop, dstate = self.drafter.propose(dparams, s.drafter, ctx)
        if tuple(prop.parents) != tuple(self.drafter.parents):
            raise ValueError(f"the proposal's parents {prop.parents} differ from the drafter's "
                             f"{self.drafter.parents}")
        nodes = jnp.concatenate([pending[:, None], prop.tokens], axis=1)          # [B, N+1]
        valid = jnp.concatenate([jnp.ones((b, 1), bool), prop.valid], axis=1)
        depth = jnp.asarray(tree.depth)
        anc = tree_mask(tree.parents)
        positions = lengths[:, None] + depth[None, :]
        if tree.is_chain and getattr(self.drafter, "variable_length", False):
            logits, hidden, cache, width = verify_longest(
                self.forward, tparams, s.cache, nodes, positions, valid & ~out.done[:, None],
                empty=getattr(self.drafter, "empty_drafts", False))
        else:
            logits, hidden, cache = verify(
                self.forward, tparams, s.cache, nodes, positions=positions,
                tail_mask=None if tree.is_chain else jnp.asarray(anc))
            width = nodes.shape[1]
        n_nodes, v = nodes.shape[1], logits.shape[-1]
        seen = None
        if s.seen is not None:            # a node has seen the tokens on its root path
            hot = jax.nn.one_hot(nodes, v, dtype=jnp.float32)
            on_path = jnp.einsum("ik,bkv->biv", jnp.asarray(anc, jnp.float32), hot) > 0
            seen = (s.seen[:, None] | on_path).reshape(b * n_nodes, v)
        rows_n = None if s.rows is None else s.rows.repeat(n_nodes)
        logp = sampling.log_probs(logits.reshape(b * n_nodes, v), self.spec, seen, rows_n
                                  ).reshape(b, n_nodes, v)
        win, y = self._accept(nodes, logp, prop, valid, keys, s.rows)
        n = depth[win]
        path = jnp.asarray(tree.retrieve)[win]                                   # [B, D+1]
        d = path.shape[1] - 1
        j = jnp.arange(d + 1)[None, :]
        on = jnp.take_along_axis(nodes, jnp.minimum(jnp.roll(path, -1, axis=1), n_nodes - 1),
                                 axis=1)
        emitted = jnp.where(j < n[:, None], on, jnp.where(j == n[:, None], y[:, None], 0))
        lp = jnp.take_along_axis(jnp.take_along_axis(logp, path[..., None], axis=1),
                                 emitted[..., None], axis=-1)[..., 0]
        active = ~out.done
        if not tree.is_chain:
            cache = compact(cache, path)
        obs = Observation(logits=logits, hidden=hidden, path=path, n=n, emitted=emitted,
                          active=active, lengths=tokens_cached)
        act = active[:, None]
        pos = jnp.arange(1, d + 1)[None, :]
        has = jnp.any(valid[:, None, :] & (depth[None, None, :] == pos[..., None]), axis=-1)
        return SpecState(
            out=out.append(emitted, lp, n + 1, not_finite(logits)),
            cache=cache.advance(jnp.where(active, n + 1, 0)),
            seen=mark_seen(s.seen, emitted, n + 1, active), keys=s.keys,
            prev=jnp.where(active, nodes[rows, win], s.prev),
            hidden=jnp.where(act, hidden[rows, win], s.hidden),
            drafter=self.drafter.observe(dparams, dstate, obs),
            forwards=s.forwards + active.astype(jnp.int32),
            proposed=s.proposed + jnp.sum(act & has, axis=0, dtype=jnp.int32),
            accepted=s.accepted + jnp.sum(act & (pos <= n[:, None]), axis=0, dtype=jnp.int32),
            widths=s.widths.at[width].add(jnp.any(active).astype(jnp.int32)), rows=s.rows)

    def _accept(self, nodes, logp, prop, valid, keys, rows):
        """``(win, y)``: greedy or exact-sampling acceptance (per row with ``rows``)."""
        tree = self.tree
        if rows is None and self.spec.method == "greedy":
            return tree_greedy_accept(nodes, logp, tree.parents, tree.depth, valid)
        if prop.q is not None:
            if not tree.is_chain:
                raise ValueError("draft distributions q are supported for chains only")
            win, y = exact_accept(prop.tokens, logp, prop.q,
                                  jnp.sum(jnp.cumprod(prop.valid, axis=1), axis=1), keys)
        else:
            win, y = tree_sample_accept(nodes, logp, tree.children, tree.depth, keys, valid)
        if rows is None:
            return win, y
        g_win, g_y = tree_greedy_accept(nodes, logp, tree.parents, tree.depth, valid)
        return jnp.where(rows.greedy, g_win, win), jnp.where(rows.greedy, g_y, y)

    def extras(self, state: SpecState) -> dict:
        return {"forwards": state.forwards, "proposed": state.proposed,
                "accepted": state.accepted, "widths": state.widths}

    def host_stats(self, params, harvest, decoded: int) -> dict:
        """The speculative statistics (see the module docstring)."""
        e = harvest.extras
        forwards = int(np.asarray(e["forwards"]).sum())
        proposed, accepted = np.asarray(e["proposed"]), np.asarray(e["accepted"])
        per_forward = decoded / forwards if forwards else 0.0
        mean_draft = float(proposed.sum() / forwards) if forwards else 0.0
        c = self.drafter.cost_ratio(params[0], params[1])
        widths = np.asarray(e["widths"])
        return {"method": self.drafter.name, "gamma": self.depth, "target_forwards": forwards,
                "mean_accepted_per_forward": per_forward,
                "acceptance_per_position": [float(a / p) if p else None
                                            for a, p in zip(accepted, proposed)],
                "mean_draft_length": mean_draft,
                "verify_widths": {int(w): int(k) for w, k in enumerate(widths) if k},
                "cost_ratio": c, "predicted_speedup": per_forward / (mean_draft * c + 1.0)}


def verify_widths(t: int, empty: bool = False) -> tuple:
    """The widths :func:`verify_longest` compiles for a chain of ``t`` tokens: a quarter, a
    half and all of them, rounded up, and 1 (the pending token alone: a plain step) when
    ``empty`` (drafters whose rounds may draft nothing, e.g. prompt lookup without a match).
    Each width is one more copy of the target's forward to compile; on CPU a forward over 3
    tokens costs about what one over 4 does, and one over 2 tokens clearly more than one
    over 1 (one token runs matrix-vector products, two or more matrix-matrix products,
    which took about twice the CPU time at 2 rows in XLA's CPU backend)."""
    return tuple(sorted({-(-t // 4), -(-t // 2), t} | ({1} if empty else set())))


def verify_longest(forward, params, cache, nodes, positions, valid, empty: bool = False):
    """:func:`~cadenza.decode.verify.verify` of a chain over only as many tokens as its
    longest running draft needs (rounded up to one of :func:`verify_widths`).

    Args: ``nodes`` int32 [B, T] (the pending token, then the drafts); ``positions`` int32
    [B, T]; ``valid`` bool [B, T] (a row counts its tokens up to the first invalid one;
    rows that are done may be all False); ``empty``: also compile width 1, for rounds where
    no running row drafted anything.

    Returns ``(logits float32 [B, T, V], hidden [B, T, D], cache, width int32)``. Only the
    chosen width's branch runs (``lax.switch``); logits and hidden states past it are
    zeros and keys/values are written only up to it (those drafts are invalid, so never
    accepted)."""
    t = nodes.shape[1]
    widths = verify_widths(t, empty)
    need = jnp.max(jnp.sum(jnp.cumprod(valid, axis=1), axis=1))
    index = jnp.sum(jnp.asarray(widths) < need)          # the smallest width >= need

    def branch(w):
        def run(cache):
            logits, hidden, cache = verify(forward, params, cache, nodes[:, :w],
                                           positions=positions[:, :w])
            pad = ((0, 0), (0, t - w), (0, 0))
            return jnp.pad(logits, pad), jnp.pad(hidden, pad), cache
        return run

    logits, hidden, cache = jax.lax.switch(index, [branch(w) for w in widths], cache)
    return logits, hidden, cache, jnp.asarray(widths, jnp.int32)[index]


def param_count(params) -> int:
    """Number of parameters in a pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def speculative_method(target, drafter, config, draft_params=None, rules=None) -> Speculative:
    """The :class:`Speculative` method for ``target`` (a model or forward) and ``drafter``,
    validated (vocabularies, ``top_k``) before anything compiles."""
    forward = as_forward(target, rules)
    spec = config.sampling_spec()
    check_top_k(spec, forward.config.vocab_size)
    drafter.check(forward, draft_params)
    method = Speculative(forward=forward, drafter=drafter, spec=spec)
    field = getattr(drafter, "depth_field", None)      # drafters whose depth is a setting
    if field and method.depth > config.max_new_tokens:
        raise CadenzaError(
            f"the {drafter.name} tree is {method.depth} tokens deep but decode.max_new_tokens "
            f"is {config.max_new_tokens}: no round could use it", where=field,
            fix=f"use a tree at most {config.max_new_tokens} deep, or raise max_new_tokens")
    return method


def speculative_generate(target, params, prompts, config=None, *, drafter, draft_params=None,
                         tokenizer=None, seeds=None, cost_ratio: float | None = None, mesh=None,
                         rules=None):
    """Decode a ragged batch with speculative decoding; lossless w.r.t. the target.

    Args:
      target, params: the target model (Transformer, PeftModel or forward) and its params.
      prompts, config, tokenizer, seeds, mesh, rules: as :func:`cadenza.decode.generate`
        (greedy unless ``config.sampling_spec()`` samples: method sample, or a
        speculative method with ``decode.speculative.sample``).
      drafter: a :class:`Drafter` (:class:`DraftModel` with ``draft_params`` = (draft
        params, head params or None), :class:`~cadenza.decode.prompt_lookup.PromptLookup`,
        :class:`~cadenza.decode.medusa.Medusa` with its head params,
        :class:`~cadenza.decode.token_recycling.TokenRecycling` (None or a warm-start
        matrix), :class:`~cadenza.decode.layer_skip.LayerSkip` with
        :func:`~cadenza.decode.layer_skip.skip_params`, or your own).
      cost_ratio: overrides the drafter's estimate of t_draft / t_target in the stats.

    Returns a :class:`~cadenza.decode.driver.GenerateResult`. Greedy output equals
    plain greedy token for token (up to float ties); sampled outputs follow the
    target's distribution. Raises CadenzaError before compiling on invalid input.
    """
    from cadenza.decode.config import DecodeConfig

    config = config or DecodeConfig()
    method = speculative_method(target, drafter, config, draft_params, rules)
    res = generate_with(method, (params, draft_params), prompts, config, tokenizer=tokenizer,
                        seeds=seeds, mesh=mesh)
    if cost_ratio is not None:
        s = res.stats
        s["cost_ratio"] = cost_ratio
        s["predicted_speedup"] = s["mean_accepted_per_forward"] / (
            s["mean_draft_length"] * cost_ratio + 1.0)
    return res


def check_draft_vocab(target_config, draft_config) -> None:
    """Raise (before compiling) unless the draft model shares the target's vocabulary size."""
    tv, dv = target_config.vocab_size, draft_config.vocab_size
    if tv != dv:
        raise CadenzaError(
            f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv} tokens)",
            where="--draft", fix="use a draft model trained with the target's tokenizer")


def draft_chain(forward, params, cache, logits, ctx: Context, gamma: int, stop=None,
                head_params=None):
    """Draft a chain of up to ``gamma`` tokens autoregressively with ``forward``.

    Args:
      forward, params: the drafting model (a forward) and its params.
      cache: its KVCache with everything up to the pending token written, ``lengths``
        counting the pending token (drafts are written after it).
      logits: float32 [B, V] the drafting model's next-token logits after the pending token.
      ctx: the round's :class:`Context` (``spec``, ``keys`` and ``seen`` warp and draw the
        drafts as the target's tokens are, so ``q`` is the draft's warped distribution).
      gamma: the most drafts per row; stop: None (always ``gamma``) or a
        :class:`cadenza.decode.specdec_head.StopRule` ending a row's draft early;
        head_params: the rule's head params (kind ``head``).

    Returns ``(Proposal, cache)``: a chain with ``q`` float32 [B, gamma, V] and a row's
    drafts past its stop marked invalid; the cache with the drafts' keys/values written
    (``lengths`` advanced by the drafts fed, all but the last).
    """
    spec, g = ctx.spec, gamma
    b, v = logits.shape
    keys = ctx.keys

    def pick(i, lg, hid, carry):
        drafts, q, dlen, active, prod, seen = carry
        logp = sampling.log_probs(lg, spec, seen, ctx.rows)
        tok, _ = sampling.select(logp, spec, keys, 2 + i, ctx.rows)
        drafts = drafts.at[:, i].set(tok)
        q = q.at[:, i].set(jnp.exp(logp))
        dlen = dlen + active.astype(jnp.int32)
        if seen is not None:
            seen = seen | jax.nn.one_hot(tok, v, dtype=bool)
        if stop is not None:
            conf = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
            prod, halt = stop.step(head_params, i, hid, conf, prod)
            active = active & ~halt
        active = active & (i + 1 < g)
        return drafts, q, dlen, active, prod, seen

    carry = (jnp.zeros((b, g), jnp.int32), jnp.zeros((b, g, v), jnp.float32),
             jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), jnp.ones((b,), jnp.float32),
             ctx.seen)
    carry = pick(0, logits, None, carry)

    def cond(st):
        i, _, carry = st
        return (i < g) & jnp.any(carry[3])

    def body(st):
        i, cache, carry = st
        tok = jax.lax.dynamic_index_in_dim(carry[0], i - 1, axis=1, keepdims=True)
        lg, hid, cache = forward(params, tok, cache=cache)
        return i + 1, cache.advance(1), pick(i, lg[:, 0], hid[:, 0], carry)

    _, cache, carry = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, carry))
    drafts, q, dlen = carry[:3]
    valid = jnp.arange(g)[None, :] < dlen[:, None]
    return Proposal(tokens=drafts, valid=valid, q=q, parents=chain(g)), cache


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """Drafter: a small model with its own KV cache proposing a chain of ``gamma`` tokens.

    ``config``: the draft's ModelConfig. ``stop``: None for a fixed length, else
    a :class:`cadenza.decode.specdec_head.StopRule` (SpecDec++ head or confidence
    rule) that ends a row's draft early (``gamma`` is then the maximum). Draft
    params: ``(draft model params, head params or None)``.

    Cache bookkeeping: each round the draft re-feeds ``[prev, pending]`` at
    ``[L - 1, L + 1)`` (rolling back to ``L - 1``), so its cache is valid up to
    the target's whatever was accepted (it never saw d_gamma when all were
    accepted; re-feeding ``prev`` covers that case uniformly).
    """

    config: Any
    gamma: int
    stop: Any = None
    name: str = "speculative"

    @property
    def parents(self) -> tuple:
        return chain(self.gamma)

    @property
    def variable_length(self) -> bool:
        """Whether drafts end early (a stop rule): the round then verifies only up to the
        longest draft (:func:`verify_longest`)."""
        return self.stop is not None

    def check(self, forward, draft_params) -> None:
        check_draft_vocab(forward.config, self.config)

    def cost_ratio(self, params, draft_params) -> float:
        """Estimate of t_draft / t_target: the parameter-count ratio."""
        return param_count(draft_params[0]) / max(param_count(params), 1)

    def decode_layout(self, draft_params):
        """``(drafter, draft_params)`` in the layout decoding uses
        (:func:`cadenza.models.decode_layout`: on CPU a scanned draft becomes the same model
        unrolled, so its steps inside the round read the layer weights in place instead of
        copying every layer's slice per drafted token); elsewhere unchanged. Same logits."""
        from cadenza.models import Transformer, decode_layout

        model, params = decode_layout(Transformer(self.config), draft_params[0])
        return dataclasses.replace(self, config=model.config), (params, draft_params[1])

    def _forward(self, target_forward):
        return ModelForward(self.config, getattr(target_forward, "rules", None))

    def init(self, draft_params, pre: Prefilled):
        """The draft's cache with the prompts cached."""
        f, batch = self._forward(pre.forward), pre.batch
        cache = f.init_cache(draft_params[0], batch.tokens.shape[0], batch.max_len)
        _, _, cache = f(draft_params[0], batch.tokens, cache=cache,
                        logits_at=jnp.zeros_like(batch.lengths)[:, None])
        return cache.with_lengths(batch.lengths)

    def propose(self, draft_params, cache, ctx: Context):
        """A chain of up to ``gamma`` sampled (or argmax) drafts with their q."""
        dparams, head_params = draft_params
        f = self._forward(ctx.forward)
        lengths = ctx.lengths
        logits, _, cache = f(dparams, jnp.stack([ctx.prev, ctx.pending], axis=1),
                             cache=cache.with_lengths(lengths - 1),
                             logits_at=jnp.ones_like(lengths)[:, None])
        return draft_chain(f, dparams, cache.with_lengths(lengths + 1), logits[:, -1], ctx,
                           self.gamma, self.stop, head_params)

    def observe(self, draft_params, cache, obs: Observation):
        """Nothing to learn: the next round re-feeds ``[prev, pending]``."""
        return cache
