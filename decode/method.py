"""The decoding-method interface and the device state every method shares.

A method is a frozen (hashable) dataclass holding its static settings and a
forward-function object (:mod:`cadenza.decode.forward`); the driver
(:mod:`cadenza.decode.driver`) compiles and runs it:

- ``prefill(params, batch: Batch) -> state``: prompts in, first token(s) chosen;
- ``step(params, state) -> state``: one decode step (or speculative round), run
  by the driver in a jitted ``lax.while_loop`` with the state donated;
- ``done(state) -> bool [B]`` and ``harvest(state) -> Harvest`` (defaults read
  ``state.out``, an :class:`Emitted`);
- ``slots``: cache slots a step may write beyond the emitted tokens (0 for
  plain decoding, ``nodes + 1`` for a speculative round, ``2m + 1`` for LUD);
- ``streams``: whether the driver may stop and resume it in chunks (streaming,
  stop strings; the state's ``out.step`` counts steps).

Every state carries ``out``: the emitted tokens, their log-probabilities and
the rows' progress, appended to with :meth:`Emitted.append` (which cuts at a
stop id and at ``max_new_tokens``).
"""

from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp

FILL = 0     # token id written in unused output slots (never returned)


@flax.struct.dataclass
class Batch:
    """The prompts of one call, on device (built by the driver).

    tokens: int32 [B, T] right-padded (T a multiple of 16 where limits allow);
    lengths: int32 [B] >= 1; seeds: int32 [B]; stop_ids: int32 [S] or, per row,
    [B, S] (-1 padded); num_new: max_new_tokens (static); max_len: cache slots per
    row beyond the forward's prefix slots (static). Optional per-row data (the
    serving engine, :mod:`cadenza.decode.engine`): ``rows`` a
    :class:`~cadenza.decode.sampling.RowSampling` (sampler settings per row,
    overriding the method's static spec) and ``limits`` int32 [B] (tokens per row,
    at most ``num_new``).
    """

    tokens: jax.Array
    lengths: jax.Array
    seeds: jax.Array
    stop_ids: jax.Array
    num_new: int = flax.struct.field(pytree_node=False)
    max_len: int = flax.struct.field(pytree_node=False)
    rows: Any = None
    limits: jax.Array | None = None


@flax.struct.dataclass
class Emitted:
    """Emitted tokens per row (all on device).

    tokens: int32 [B, W] (W >= num_new; extra room for a round's overshoot);
    logprobs: float32 [B, W]; num_generated: int32 [B]; done: bool [B];
    step: int32 [] steps run; stop_ids: int32 [S] or [B, S] per row; error: bool [B]
    rows stopped because the model produced NaN or infinite logits; num_new
    (static); limit: int32 [B] per-row token limits (<= num_new) or None.
    """

    tokens: jax.Array
    logprobs: jax.Array
    num_generated: jax.Array
    done: jax.Array
    step: jax.Array
    stop_ids: jax.Array
    error: jax.Array
    num_new: int = flax.struct.field(pytree_node=False)
    limit: jax.Array | None = None

    @classmethod
    def create(cls, batch: Batch, extra: int = 0) -> "Emitted":
        """Empty buffers ``num_new + extra`` wide for ``batch``'s rows."""
        b, w = batch.tokens.shape[0], batch.num_new + extra
        return cls(tokens=jnp.full((b, w), FILL, jnp.int32),
                   logprobs=jnp.zeros((b, w), jnp.float32),
                   num_generated=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                   step=jnp.zeros((), jnp.int32), stop_ids=batch.stop_ids,
                   error=jnp.zeros((b,), bool), num_new=batch.num_new, limit=batch.limits)

    @property
    def last(self) -> jax.Array:
        """int32 [B] each row's last emitted token (the pending one)."""
        idx = jnp.maximum(self.num_generated - 1, 0)[:, None]
        return jnp.take_along_axis(self.tokens, idx, axis=1)[:, 0]

    def append(self, tokens, logprobs, count, bad=None) -> "Emitted":
        """Append ``tokens[:, :count]`` (int32 [B, K], log-probs float32 [B, K]) to running rows.

        A row ends after its first stop id among them or at ``num_new`` tokens
        (its ``limit`` when set);
        finished rows are unchanged. ``step`` advances by one. ``bad`` (bool [B],
        optional): rows whose logits were not finite: they append nothing and
        stop with ``error`` set.
        """
        if bad is not None:
            bad = bad & ~self.done
            count = jnp.where(bad, 0, count)
        k = tokens.shape[1]
        j = jnp.arange(k)[None, :]
        stops = self.stop_ids[None] if self.stop_ids.ndim == 1 else self.stop_ids
        is_stop = jnp.any(tokens[..., None] == stops[:, None, :], axis=-1) & (
            j < count[:, None])
        first_stop = jnp.min(jnp.where(is_stop, j, k), axis=1)
        kept = jnp.minimum(count, first_stop + 1)
        active = ~self.done
        cap = self.num_new if self.limit is None else self.limit
        ng = jnp.minimum(self.num_generated + kept, cap)
        write = jax.vmap(lambda buf, x, at: jax.lax.dynamic_update_slice(buf, x, (at,)))
        keep = active[:, None]
        return self.replace(
            tokens=jnp.where(keep, write(self.tokens, tokens, self.num_generated), self.tokens),
            logprobs=jnp.where(keep, write(self.logprobs, logprobs, self.num_generated),
                               self.logprobs),
            num_generated=jnp.where(active, ng, self.num_generated), step=self.step + 1,
            done=self.done | (active & ((first_stop < count) | (ng >= cap))) | (
                False if bad is None else bad),
            error=self.error if bad is None else self.error | bad)


def not_finite(logits) -> jax.Array:
    """bool [B]: rows of ``logits`` float [B, ..., V] holding a NaN or an infinity."""
    return ~jnp.all(jnp.isfinite(logits.reshape(logits.shape[0], -1)), axis=-1)


@flax.struct.dataclass
class Harvest:
    """What a finished state hands the host: ``tokens`` int32 [B, W], ``logprobs``
    float32 [B, W], ``num_generated`` int32 [B], ``extras`` (arrays, method-specific),
    ``error`` bool [B] (rows stopped by non-finite logits) or None."""

    tokens: jax.Array
    logprobs: jax.Array
    num_generated: jax.Array
    extras: dict
    error: jax.Array | None = None


class Method(Protocol):
    """A decoding method (see the module docstring); a frozen, hashable dataclass."""

    name: str
    slots: int
    streams: bool

    def prefill(self, params, batch: Batch) -> Any: ...

    def step(self, params, state) -> Any: ...

    def done(self, state) -> jax.Array: ...

    def harvest(self, state) -> Harvest: ...


class MethodBase:
    """Defaults for :class:`Method`: ``done`` and ``harvest`` read ``state.out``."""

    slots = 0
    streams = True

    def done(self, state) -> jax.Array:
        """bool [B]: rows that are finished."""
        return state.out.done

    def harvest(self, state) -> Harvest:
        """The emitted tokens; ``extras`` from :meth:`extras`."""
        o = state.out
        return Harvest(o.tokens, o.logprobs, o.num_generated, self.extras(state), o.error)

    def extras(self, state) -> dict:
        """Method-specific arrays for the result's ``extras`` (none by default)."""
        return {}
