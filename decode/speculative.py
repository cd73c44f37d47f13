"""Speculative decoding on device: a drafter proposes, the target verifies, rows advance raggedly.

``speculative_generate(target, params, prompts, config, drafter=...)`` runs
one jitted prefill (the plain loop's, :mod:`cadenza.decode.loop`) and one
jitted ``lax.while_loop`` of *rounds*. Per round and row ``b`` (``L_b`` = the
target's cached length, ``y`` = the pending token, emitted but not cached):

1. the drafter proposes ``g_b <= gamma`` tokens d_1..d_g (a draft model
   with a fixed or adaptive length, or prompt lookup), with the draft
   distributions q_i they were drawn from (after the *same* warpers);
2. the target scores ``[y, d_1..d_gamma]`` at ``[L_b, L_b + gamma]`` in one
   :func:`~cadenza.decode.verify.verify` call (row i scores d_{i+1});
3. greedy: the longest prefix equal to the target's argmax, then the
   argmax after it; sampling: the exact rule with residual and bonus token
   (:func:`~cadenza.decode.verify.exact_accept`), so outputs are distributed
   as the target's own samples;
4. the row emits d_1..d_n and a new pending token (cut at a stop token or
   ``max_new_tokens``), its cache length becomes ``L_b + n + 1`` (rollback =
   lengths), and the drafter updates its own state.

Finished rows keep computing (static shapes) but nothing of theirs changes.
Stop strings are matched on the host after the loop (the outputs are
identical; a row only decodes past its stop string). The result is a
:class:`~cadenza.decode.loop.GenerateResult` whose ``stats`` add
``target_forwards``, ``mean_accepted_per_forward`` (tokens emitted per row
per target forward, bonus included), ``acceptance_per_position``,
``mean_draft_length``, ``cost_ratio`` and ``predicted_speedup``.
"""

import dataclasses
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.decode import loop, sampling
from cadenza.decode.config import DecodeConfig, SamplingSpec
from cadenza.decode.prompt_lookup import PromptLookup
from cadenza.decode.specdec_head import StopRule
from cadenza.decode.verify import exact_accept, greedy_accept, verify
from cadenza.errors import CadenzaError
from cadenza.models.cache import KVCache
from cadenza.models.transformer import Transformer


@flax.struct.dataclass
class SpecState:
    """The round loop's carry.

    core: the plain loop's :class:`~cadenza.decode.loop.DecodeState` with a
      token buffer ``max_new_tokens + gamma + 1`` wide (``step`` = rounds
      run), ``caches = (target cache,)``;
    drafter: the drafter's own state (draft cache, context buffer, ...);
    prev: int32 [B] the token before the pending one (last prompt token at first);
    forwards: int32 [B] target forwards while the row was running;
    proposed, accepted: int32 [gamma] per draft position, how often a running
      row proposed / accepted a token there.
    """

    core: loop.DecodeState
    drafter: Any
    prev: jax.Array
    forwards: jax.Array
    proposed: jax.Array
    accepted: jax.Array


def round_keys(keys, step):
    """Per-row keys of round ``step`` (``fold_in(row_key, step)``), or None when greedy."""
    if keys is None:
        return None
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def draw(logits, spec: SamplingSpec, seen, keys, salt: int):
    """Warp ``logits`` [B, V] with ``spec`` and pick one token per row.

    ``keys`` are round keys (None when greedy); the draw uses ``fold_in(key, salt)``.
    Returns ``(tokens int32 [B], log-probs float32 [B, V])``.
    """
    logp = sampling.log_probs(logits, spec, seen)
    tok, _ = sampling.select(logp, spec, keys, salt)
    return tok, logp


@dataclasses.dataclass(frozen=True)
class _Program:
    """Static description of one compiled speculative loop (hashable)."""

    target: Any            # ModelConfig
    drafter: Any           # a drafter (DraftModel, PromptLookup, ...): frozen dataclass
    spec: SamplingSpec
    num_new: int
    max_len: int
    rules: Any

    @property
    def gamma(self) -> int:
        return self.drafter.gamma

    def _plain(self) -> loop._Program:
        return loop._Program(model_configs=(self.target,), spec=self.spec,
                             num_new=self.num_new + self.gamma + 1, max_len=self.max_len,
                             rules=self.rules)

    def prefill(self, params, tokens, lengths, seeds, stop_ids) -> SpecState:
        """Prompts int32 [B, T] right-padded, lengths [B] -> state with the first token chosen."""
        tparams, dparams = params
        core = self._plain().prefill((tparams,), jnp.float32(0.0), tokens, lengths, seeds,
                                     stop_ids)
        core = core.replace(done=core.done | (core.num_generated >= self.num_new))
        prev = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
        g = self.gamma
        return SpecState(
            core=core, prev=prev,
            drafter=self.drafter.init(self, dparams, tokens, lengths, core.tokens[:, 0]),
            forwards=jnp.zeros_like(lengths), proposed=jnp.zeros((g,), jnp.int32),
            accepted=jnp.zeros((g,), jnp.int32))

    def _seen_per_position(self, seen, drafts):
        """seen [B, V] -> [B, G+1, V]: position i also counts d_1..d_i (repetition penalty)."""
        if seen is None:
            return None
        v = seen.shape[-1]
        hot = jnp.cumsum(jax.nn.one_hot(drafts, v, dtype=jnp.int32), axis=1) > 0
        return jnp.concatenate([seen[:, None], seen[:, None] | hot], axis=1)

    def _round(self, params, s: SpecState) -> SpecState:
        tparams, dparams = params
        c = s.core
        b, g = c.tokens.shape[0], self.gamma
        rows = jnp.arange(b)
        pending = c.tokens[rows, c.num_generated - 1]
        cache = c.caches[0]
        lengths = cache.lengths
        keys = round_keys(c.keys, c.step)
        drafts, q, dlen, dstate = self.drafter.propose(
            self, dparams, s.drafter, s.prev, pending, lengths, c.seen, keys)
        dlen = jnp.minimum(dlen, g)
        model = Transformer(self.target)
        logits, _, cache = verify(model, tparams, cache,
                                  jnp.concatenate([pending[:, None], drafts], axis=1),
                                  rules=self.rules)
        seen_i = self._seen_per_position(c.seen, drafts)
        v = logits.shape[-1]
        logp = sampling.log_probs(logits.reshape(b * (g + 1), v), self.spec,
                                  None if seen_i is None else seen_i.reshape(b * (g + 1), v)
                                  ).reshape(b, g + 1, v)
        if self.spec.method == "greedy":
            n, y = greedy_accept(drafts, logp, dlen)
        else:
            n, y = exact_accept(drafts, logp, q, dlen, keys)
        # emitted: d_1..d_n, y  (n + 1 tokens), written at slots num_generated..
        j = jnp.arange(g + 1)[None, :]
        padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
        emitted = jnp.where(j < n[:, None], padded, jnp.where(j == n[:, None], y[:, None], 0))
        lp = jnp.take_along_axis(logp, emitted[..., None], axis=-1)[..., 0]
        active = ~c.done
        prev = jnp.where(active, jnp.where(n > 0, padded[rows, jnp.maximum(n - 1, 0)], pending),
                         s.prev)
        pos = jnp.arange(g)[None, :]
        act = active[:, None]
        return SpecState(
            core=self.advance(c, cache, emitted, lp, n), prev=prev,
            drafter=self.drafter.update(dstate, emitted, lengths, n, active),
            forwards=s.forwards + active.astype(jnp.int32),
            proposed=s.proposed + jnp.sum(act & (pos < dlen[:, None]), axis=0, dtype=jnp.int32),
            accepted=s.accepted + jnp.sum(act & (pos < n[:, None]), axis=0, dtype=jnp.int32))

    def advance(self, c: loop.DecodeState, cache: KVCache, emitted, lp, n) -> loop.DecodeState:
        """Emit ``emitted[:, :n+1]`` (int32 [B, W], log-probs ``lp`` [B, W]) for running rows.

        Cuts at the first stop token and at ``max_new_tokens``; keeps ``n + 1``
        more slots of ``cache`` (the target's) for running rows; finished rows
        are left unchanged.
        """
        w = emitted.shape[1]
        j = jnp.arange(w)[None, :]
        is_stop = jnp.any(emitted[..., None] == c.stop_ids[None, None, :], axis=-1) & (
            j <= n[:, None])
        first_stop = jnp.min(jnp.where(is_stop, j, w), axis=1)
        count = jnp.minimum(n + 1, first_stop + 1)
        active = ~c.done
        ng = jnp.minimum(c.num_generated + count, self.num_new)
        write = jax.vmap(lambda buf, x, at: jax.lax.dynamic_update_slice(buf, x, (at,)))
        tokens = jnp.where(active[:, None], write(c.tokens, emitted, c.num_generated), c.tokens)
        logprobs = jnp.where(active[:, None], write(c.logprobs, lp, c.num_generated), c.logprobs)
        seen = c.seen
        if seen is not None:
            hot = jax.nn.one_hot(emitted, seen.shape[-1], dtype=bool) & (j <= n[:, None])[..., None]
            seen = seen | (jnp.any(hot, axis=1) & active[:, None])
        return c.replace(
            tokens=tokens, logprobs=logprobs, seen=seen, step=c.step + 1,
            num_generated=jnp.where(active, ng, c.num_generated),
            done=c.done | (active & ((first_stop <= n) | (ng >= self.num_new))),
            caches=(cache.advance(jnp.where(active, n + 1, 0)),))

    def decode(self, params, state: SpecState) -> SpecState:
        """Run rounds until every row is done."""
        return jax.lax.while_loop(lambda s: ~jnp.all(s.core.done),
                                  lambda s: self._round(params, s), state)


def check_draft_vocab(target: Transformer, draft: Transformer) -> None:
    """Raise (before compiling) unless the draft model shares the target's vocabulary size."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise CadenzaError(
            f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv} tokens)",
            where="--draft", fix="use a draft model trained with the target's tokenizer")


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def speculative_generate(target: Transformer, params, prompts, config: DecodeConfig | None = None,
                         *, drafter, draft_params=None, tokenizer=None, seeds=None,
                         cost_ratio: float | None = None, mesh=None,
                         rules=None) -> loop.GenerateResult:
    """Decode a ragged batch with speculative decoding; lossless w.r.t. the target.

    Args:
      target, params: the target model and its params.
      prompts, config, tokenizer, seeds, mesh, rules: as :func:`cadenza.decode.generate`.
      drafter: a :class:`DraftModel` (``draft_params`` = (draft params, head params
        or None)), :class:`cadenza.decode.prompt_lookup.PromptLookup`, ...
      cost_ratio: c = time of one draft forward / one target forward, for the
        predicted speedup (default: the drafter's estimate, e.g. the parameter ratio).

    Greedy output equals :func:`cadenza.decode.generate`'s token for token
    (up to float ties); sampled outputs follow the target's distribution.
    Raises CadenzaError before compiling as ``generate`` does, and when the
    draft model's vocabulary differs from the target's.
    """
    config = config or DecodeConfig()
    models = [target] + list(drafter.models())
    for m in models[1:]:
        check_draft_vocab(target, m)
    ids = loop._prompt_ids(prompts, tokenizer, target.config.vocab_size)
    if config.stop and tokenizer is None:
        raise CadenzaError("stop strings need a tokenizer (they are matched on text)",
                           where="decode.stop", fix="pass tokenizer=..., or use stop_token_ids")
    padded_len, max_len = loop._check_models(models[:1], config, max(len(p) for p in ids))
    # Room for a round's drafts, rounded up to a multiple of 16 slots (odd cache sizes
    # measured slower on CPU; slots past a row's length are masked, so outputs are unchanged).
    max_len = -(-(max_len + getattr(drafter, "slots", drafter.gamma + 1)) // 16) * 16
    b, n_new = len(ids), config.max_new_tokens
    seeds = [config.seed + i for i in range(b)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != b:
        raise CadenzaError(f"{len(seeds)} seeds for {b} prompts", where="generate(seeds=...)",
                           fix="give one seed per prompt")
    spec = config.sampling_spec()
    if hasattr(drafter, "check_spec"):
        drafter.check_spec(spec)
    program = getattr(drafter, "program", _Program)(
        target=target.config, drafter=drafter, spec=spec, num_new=n_new, max_len=max_len,
        rules=None if rules is None else tuple(rules))
    lengths = np.array([len(p) for p in ids], np.int32)
    tokens = np.zeros((b, padded_len), np.int32)
    for i, p in enumerate(ids):
        tokens[i, :len(p)] = p
    stop_ids = loop._stop_ids(target, config, tokenizer)
    stop_arr = np.full(-(-max(len(stop_ids), 1) // loop._STOP_BUCKET) * loop._STOP_BUCKET, -1,
                       np.int32)
    stop_arr[:len(stop_ids)] = stop_ids
    all_params = (params, draft_params)

    t_start = time.perf_counter()
    args = (all_params, jnp.asarray(tokens), jnp.asarray(lengths),
            jnp.asarray(seeds, jnp.int32), jnp.asarray(stop_arr))
    prefill, compile_s = loop._compiled(program, "prefill", mesh, args)
    t0 = time.perf_counter()
    state = jax.block_until_ready(prefill(*args))
    prefill_s = time.perf_counter() - t0
    dargs = (all_params, state)
    decode, c_s = loop._compiled(program, "decode", mesh, dargs, donate=(1,))
    t0 = time.perf_counter()
    state = jax.block_until_ready(decode(*dargs))
    decode_s = time.perf_counter() - t0

    rows = loop._Rows(ids, stop_ids, config.stop, tokenizer)
    rows.pull(state.core, 0, n_new)
    num = np.asarray(state.core.num_generated)
    forwards = int(np.asarray(state.forwards).sum())
    decoded = int(num.sum()) - b
    proposed = np.asarray(state.proposed)
    accepted = np.asarray(state.accepted)
    per_position = [float(a / p) if p else None for a, p in zip(accepted, proposed)]
    per_forward = decoded / forwards if forwards else 0.0
    mean_draft = float(proposed.sum() / forwards) if forwards else 0.0
    c = drafter.cost_ratio(params, draft_params) if cost_ratio is None else cost_ratio
    stats = {
        "method": drafter.name, "gamma": drafter.gamma, "batch": b, "max_len": max_len,
        "prompt_tokens": int(lengths.sum()), "generated_tokens": sum(len(t) for t in rows.ids),
        "compile_s": compile_s + c_s, "prefill_s": prefill_s, "decode_s": decode_s,
        "steps": int(state.core.step), "chunks": 1,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
        "wall_s": time.perf_counter() - t_start,
        "target_forwards": forwards, "mean_accepted_per_forward": per_forward,
        "acceptance_per_position": per_position, "mean_draft_length": mean_draft,
        "cost_ratio": c, "predicted_speedup": per_forward / (mean_draft * c + 1.0),
    }
    return rows.result(stats)


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """Drafter: a small model with its own KV cache proposing ``gamma`` tokens per round.

    ``config``: the draft's ModelConfig. ``stop``: None for a fixed length, else
    an :class:`cadenza.decode.specdec_head.StopRule` (SpecDec++ head or confidence
    rule) that ends a row's draft early (``gamma`` is then the maximum).

    Cache bookkeeping: each round the draft re-feeds ``[prev, pending]`` at
    ``[L - 1, L + 1)`` (rolling back to ``L - 1``), so its cache is valid up to
    the target's whatever was accepted (it never saw d_gamma when all were
    accepted; re-feeding ``prev`` covers that case uniformly).
    """

    config: Any
    gamma: int
    stop: Any = None
    name: str = "speculative"

    def models(self):
        return [Transformer(self.config)]

    def cost_ratio(self, params, draft_params) -> float:
        """Estimate of t_draft / t_target: the parameter-count ratio."""
        return param_count(draft_params[0]) / max(param_count(params), 1)

    def init(self, program: _Program, draft_params, tokens, lengths, first):
        b = tokens.shape[0]
        cache = KVCache.create(self.config, b, program.max_len)
        _, _, cache = verify(Transformer(self.config), draft_params[0], cache, tokens,
                             rules=program.rules)
        return cache.with_lengths(lengths)

    def propose(self, program: _Program, draft_params, cache, prev, pending, lengths, seen, keys):
        """-> drafts int32 [B, G], q float32 [B, G, V], draft lengths int32 [B], cache."""
        dparams, head_params = draft_params
        model = Transformer(self.config)
        spec, g = program.spec, self.gamma
        b, v = prev.shape[0], self.config.vocab_size
        logits, hidden, cache = verify(model, dparams, cache.with_lengths(lengths - 1),
                                       jnp.stack([prev, pending], axis=1), rules=program.rules)
        cache = cache.with_lengths(lengths + 1)

        def pick(i, lg, hid, carry):
            drafts, q, dlen, active, prod, seen = carry
            tok, logp = draw(lg, spec, seen, keys, 2 + i)
            drafts = drafts.at[:, i].set(tok)
            q = q.at[:, i].set(jnp.exp(logp))
            dlen = dlen + active.astype(jnp.int32)
            if seen is not None:
                seen = seen | jax.nn.one_hot(tok, v, dtype=bool)
            if self.stop is not None:
                conf = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
                prod, stop = self.stop.step(head_params, i, hid, conf, prod)
                active = active & ~stop
            active = active & (i + 1 < g)
            return drafts, q, dlen, active, prod, seen

        carry = (jnp.zeros((b, g), jnp.int32), jnp.zeros((b, g, v), jnp.float32),
                 jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), jnp.ones((b,), jnp.float32),
                 seen)
        carry = pick(0, logits[:, -1], None, carry)

        def cond(st):
            i, _, carry = st
            return (i < g) & jnp.any(carry[3])

        def body(st):
            i, cache, carry = st
            tok = jax.lax.dynamic_index_in_dim(carry[0], i - 1, axis=1, keepdims=True)
            lg, hid, cache = verify(model, dparams, cache, tok, rules=program.rules)
            return i + 1, cache.advance(1), pick(i, lg[:, 0], hid[:, 0], carry)

        _, cache, carry = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, carry))
        drafts, q, dlen = carry[:3]
        return drafts, q, dlen, cache

    def update(self, cache, emitted, lengths, n, active):
        return cache


def drafter_from_config(config: DecodeConfig, draft_config=None, head_blocks: int = 3):
    """The drafter ``config.speculative`` names: :class:`DraftModel` (``draft_config`` =
    the draft's ModelConfig; adaptive per ``config.adaptive``, ``head_blocks`` = the
    SpecDec++ head's residual blocks) or a prompt-lookup drafter."""
    if config.speculative == "ngram":
        return PromptLookup(gamma=config.gamma, max_ngram=config.ngram_max,
                            min_ngram=config.ngram_min)
    if config.speculative != "draft":
        raise CadenzaError(f"decode.speculative={config.speculative!r} names no drafter",
                           where="decode.speculative", fix="use 'draft' or 'ngram'")
    if config.adaptive == "none":
        return DraftModel(draft_config, config.gamma)
    rule = StopRule(config.adaptive, config.adaptive_threshold, config.adaptive_min,
                    blocks=head_blocks)
    return DraftModel(draft_config, config.gamma, stop=rule,
                      name="specdec++" if config.adaptive == "head" else "adaptive-confidence")
