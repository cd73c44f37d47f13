"""Lexical Unit Decoding data: unit marking and packed placeholder rows (docs/decoding.md, LUD).

LUD (Sun et al., 2024) has no reference code; this module implements cadenza's
reconstruction. Each choice the paper leaves open is flagged ``[choice]``:

1. **Confidence** (:func:`token_confidences`): teacher-force the model on a window
   y_0..y_n; c_t = p(y_t | y_<t) for t >= 1 (c_0 is undefined and never confident).
   [choice] the context is the window itself, which is also the context of the
   packed training row built from it, so marking and training see the same prefix.
2. **Units** (:func:`mark_units`): ``marking="run"`` [choice, the default] a unit is a
   maximal run of tokens with c >= alpha, split into consecutive chunks of at most k
   (``max_unit``) tokens; ``marking="head"`` is the alternative reading: the token before
   a run (any confidence) plus the run, chunked the same way. Only units of >= 2 tokens
   produce placeholders (a 1-token unit is ordinary next-token prediction).
3. **Rows** (:func:`build_rows`): for a unit y_a..y_b, b - a placeholders are inserted
   right after y_{a-1} (the real token that predicts y_a). Placeholder j (1..b-a) has
   position pos(y_{a-1}) + j and target y_{a+j}. Real tokens keep their positions
   and next-token targets. [choice] one window per row (segment id 1, padding 0); the
   window holds ``real_fraction * seq_len`` real tokens; a row that overflows is cut at
   the last real token or group that fits, and what was cut is counted in the stats.
   [choice] placeholder targets weigh ``placeholder_weight`` in ``loss_mask``.
4. **Mask** (:func:`lud_attention_mask`): rows carry ``lud_group`` int32 [B, T]: 0 for real
   tokens and padding, g >= 1 for the placeholders of the g-th unit of the row. Query i
   sees key j <= i iff j is real or both are placeholders of the same group. So a
   placeholder sees the real tokens before its group (its group follows its predictor
   directly) and the earlier placeholders of its own group; real tokens never see
   placeholders (their logits equal those of the row without placeholders).

The placeholder token id must be a dedicated id, never the pad id (see
``LudConfig.placeholder_id``). The corpus is byte-level stdlib code
(:func:`stdlib_byte_tokens`) [choice: the data pipeline's BPE tokenizer uses every
vocabulary id, leaving none free for the placeholder].
"""

import dataclasses
import pathlib
import sysconfig
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cadenza.errors import CadenzaError

BATCH_ARRAYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "lud_group")


# Stdlib modules of the default LUD fine-tuning corpus (pure-Python, present in every
# CPython 3.12 install).
LUD_MODULES = ("textwrap.py", "string/__init__.py", "bisect.py", "heapq.py", "fnmatch.py",
               "colorsys.py", "shlex.py", "glob.py")


def stdlib_byte_tokens(modules: Sequence[str] | None = None) -> np.ndarray:
    """Byte-level stdlib source as int32 token ids (byte + 3: 0 = pad, 1 = BOS, 2 = EOS,
    as for byte-level n-gram tables).

    ``modules`` are paths under the running Python's stdlib directory (default:
    :data:`LUD_MODULES`); missing files are skipped.
    """
    from cadenza.decode.ngram_table import BYTE_OFFSET

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    names = LUD_MODULES if modules is None else modules
    text = b"".join((root / m).read_bytes() for m in names if (root / m).is_file())
    return np.frombuffer(text, np.uint8).astype(np.int32) + BYTE_OFFSET


def lm_rows(tokens: np.ndarray, seq_len: int, pad_id: int = 0) -> tuple[dict, "RowStats"]:
    """Plain next-token rows (no placeholders) of ``seq_len`` tokens, in the same format."""
    windows = make_windows(tokens, seq_len)
    return build_rows(windows, [[] for _ in windows], seq_len=seq_len, placeholder_id=-1,
                      pad_id=pad_id)


def token_confidences(model_config, params, windows: np.ndarray, batch_size: int = 16
                      ) -> np.ndarray:
    """Teacher-forced confidences c[w, t] = p(y_t | y_<t) of every window token.

    Args:
      model_config: the ModelConfig of ``params``.
      windows: int [N, L] token windows (each a separate context starting at its first token).
      batch_size: windows per jitted forward pass (the last batch is padded, then cut).

    Returns float32 [N, L]; column 0 is 0 (the first token has no prediction).
    """
    from cadenza.models import Transformer

    model = Transformer(model_config)

    @jax.jit
    def conf(params, tokens):
        logits, _, _ = model.apply({"params": params}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        c = jnp.exp(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0])
        return jnp.pad(c, ((0, 0), (1, 0)))

    windows = np.asarray(windows, np.int32)
    n = len(windows)
    out = []
    for i in range(0, n, batch_size):
        chunk = windows[i:i + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(conf(params, jnp.asarray(chunk)))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros(windows.shape, np.float32)


def _chunks(start: int, end: int, max_unit: int) -> list[tuple[int, int]]:
    """[start, end] inclusive cut into consecutive pieces of at most ``max_unit`` tokens."""
    return [(s, min(s + max_unit - 1, end)) for s in range(start, end + 1, max_unit)]


def mark_units(conf: np.ndarray, *, alpha: float, max_unit: int, marking: str = "run"
               ) -> list[tuple[int, int]]:
    """Lexical units of one window: inclusive token spans (a, b) with 1 <= a < b.

    Args:
      conf: float [L] confidences from :func:`token_confidences` (conf[0] is ignored).
      alpha: a token is confident when conf >= alpha.
      max_unit: k, the longest unit; longer runs are split into consecutive chunks.
      marking: "run" (a unit is a maximal confident run) or "head" (the token before a
        run plus the run; a run starting at token 1 has no head and is used as is).

    Only units of at least 2 tokens are returned (1-token units need no placeholders).
    """
    confident = np.asarray(conf) >= alpha
    confident[:1] = False
    units = []
    t, n = 1, len(confident)
    while t < n:
        if not confident[t]:
            t += 1
            continue
        end = t
        while end + 1 < n and confident[end + 1]:
            end += 1
        start = t - 1 if marking == "head" and t >= 2 else t
        units += [(a, b) for a, b in _chunks(start, end, max_unit) if b > a]
        t = end + 1
    return units


@dataclasses.dataclass
class RowStats:
    """What :func:`build_rows` kept and cut (nothing is dropped silently)."""

    rows: int = 0
    real_tokens: int = 0
    placeholders: int = 0
    units: int = 0
    truncated_real_tokens: int = 0
    truncated_units: int = 0
    pad_slots: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_rows(windows: np.ndarray, units: list[list[tuple[int, int]]], *, seq_len: int,
               placeholder_id: int, pad_id: int = 0, placeholder_weight: float = 1.0
               ) -> tuple[dict, RowStats]:
    """Packed training rows with placeholders (the module docstring gives the layout).

    Args:
      windows: int [N, n + 1]: real tokens y_0..y_n of each row (y_n is only a target).
      units: per window, the spans from :func:`mark_units` (empty lists give plain LM rows).
      seq_len: T, slots per row.
      placeholder_id: the token id fed at placeholder slots (must differ from ``pad_id``).

    Returns ``(batch, stats)``: ``batch`` maps each of :data:`BATCH_ARRAYS` to an [N, T]
    numpy array (int32; ``loss_mask`` float32).
    """
    if placeholder_id == pad_id:
        raise CadenzaError(f"the placeholder id {placeholder_id} equals the pad id",
                           where="lud.placeholder_id", fix="use a dedicated, unused token id")
    windows = np.asarray(windows, np.int32)
    n_rows, n = windows.shape[0], windows.shape[1] - 1
    out = {k: np.zeros((n_rows, seq_len), np.float32 if k == "loss_mask" else np.int32)
           for k in BATCH_ARRAYS}
    out["inputs"][:] = pad_id
    stats = RowStats(rows=n_rows)
    for r in range(n_rows):
        y = windows[r]
        starts = {a: b for a, b in units[r]}
        slot, group = 0, 0
        for i in range(n):
            if slot >= seq_len:
                stats.truncated_real_tokens += n - i
                stats.truncated_units += sum(1 for a in starts if a > i)
                break
            out["inputs"][r, slot], out["targets"][r, slot] = y[i], y[i + 1]
            out["positions"][r, slot], out["loss_mask"][r, slot] = i, 1.0
            out["segment_ids"][r, slot] = 1
            slot += 1
            stats.real_tokens += 1
            b = starts.get(i + 1)
            if b is None:
                continue
            a, size = i + 1, b - (i + 1)
            if slot + size > seq_len:
                stats.truncated_units += 1
                continue
            group += 1
            stats.units += 1
            stats.placeholders += size
            sl = slice(slot, slot + size)
            out["inputs"][r, sl] = placeholder_id
            out["targets"][r, sl] = y[a + 1:b + 1]
            out["positions"][r, sl] = i + np.arange(1, size + 1)
            out["loss_mask"][r, sl] = placeholder_weight
            out["segment_ids"][r, sl] = 1
            out["lud_group"][r, sl] = group
            slot += size
        stats.pad_slots += seq_len - slot
    return out, stats


def lud_attention_mask(lud_group: jax.Array) -> jax.Array:
    """bool [B, T, T] visibility of packed LUD rows from ``lud_group`` int32 [B, T].

    Query i sees key j iff j <= i and (j is a real token or i, j are placeholders of the
    same group). Segments are separated by the model's ``segment_ids``, not here.
    """
    t = lud_group.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    real_key = (lud_group == 0)[:, None, :]
    same_group = (lud_group[:, :, None] == lud_group[:, None, :]) & (lud_group > 0)[:, :, None]
    return causal[None] & (real_key | same_group)


class RowIterator:
    """Cycles through precomputed rows in batches of ``batch_size`` (the ``fit`` data API).

    State (JSON): ``{"batch": k}``, the index of the next batch; batch k holds rows
    ``(k * batch_size + i) mod N`` of a fixed seeded shuffle.
    """

    def __init__(self, rows: dict, batch_size: int, seed: int = 0):
        n = len(rows["inputs"])
        if n == 0:
            raise CadenzaError("no LUD training rows", where="lud data",
                               fix="give a corpus of at least one window")
        order = np.random.default_rng(seed).permutation(n)
        self.rows = {k: v[order] for k, v in rows.items()}
        self.batch_size, self._batch, self._n = batch_size, 0, n

    def get_state(self) -> dict:
        return {"batch": self._batch}

    def set_state(self, state: dict) -> None:
        self._batch = int(state["batch"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx = (self._batch * self.batch_size + np.arange(self.batch_size)) % self._n
        self._batch += 1
        return {k: v[idx] for k, v in self.rows.items()}


def make_windows(tokens: np.ndarray, real_tokens: int) -> np.ndarray:
    """Consecutive windows of ``real_tokens + 1`` tokens (stride ``real_tokens``) over a stream;
    the stream's tail that does not fill a window is left out (its length is
    ``len(tokens) - 1 - len(windows) * real_tokens``)."""
    tokens = np.asarray(tokens, np.int32)
    count = (len(tokens) - 1) // real_tokens
    idx = np.arange(count)[:, None] * real_tokens + np.arange(real_tokens + 1)[None]
    return tokens[idx]


def prepare_lud_rows(model_config, params, tokens: np.ndarray, lud, *, seq_len: int,
                     pad_id: int = 0) -> tuple[dict, RowStats]:
    """Mark units with ``params`` on a token stream and build the placeholder rows.

    Args:
      model_config, params: the (fine-tuned) model that marks the units.
      tokens: int [S] token stream, cut into windows of ``int(lud.real_fraction * seq_len)``
        real tokens.
      lud: the :class:`~cadenza.decode.lud_config.LudConfig`.
    """
    windows = make_windows(tokens, max(1, int(lud.real_fraction * seq_len)))
    conf = token_confidences(model_config, params, windows)
    units = [mark_units(c, alpha=lud.alpha, max_unit=lud.max_unit, marking=lud.marking)
             for c in conf]
    return build_rows(windows, units, seq_len=seq_len,
                      placeholder_id=lud.placeholder_for(model_config),
                      pad_id=pad_id, placeholder_weight=lud.placeholder_weight)
