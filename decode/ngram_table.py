"""N-gram tables for Superposed Decoding: built from a token corpus, memory-mapped, probed in jit.

A table directory holds, for n-gram orders 2..``max_order`` (context of
j = n - 1 tokens, then the next token):

- ``context_keys.npy`` uint64 [Nc], sorted; ``context_counts.npy`` uint32 [Nc]:
  how often each context occurs followed by some token.
- ``pair_keys.npy`` uint64 [Np], sorted; ``pair_counts.npy`` uint32 [Np]: how
  often each (context, next token) occurs.
- ``manifest.json``: format, orders, vocab size, tokenizer identity, corpus
  statistics and per-order entry counts. Nothing is pickled.

Keys are 64-bit hashes: two independent 32-bit lanes (murmur3's finaliser
chained over the tokens, seeded by lane and order). Two distinct n-grams
share a key with probability about 2**-64 per pair; a collision would merge
their counts. ``P_j(c | ctx) = count(ctx, c) / count(ctx)``, no backoff; an
unseen context gives 0 (as the reference code's ``-1`` that adds nothing).

On device (:class:`DeviceNgramTable`) each key is split into uint32 halves,
since JAX without x64 has no uint64, and looked up by a vectorised
lexicographic binary search (``ceil(log2(N + 1))`` gather rounds per probe).
Limits that implies: 12 bytes of device memory per entry and per table
(``(Nc + Np) * 12`` bytes in all, e.g. 100M entries = 1.2 GB), at most
2**31 - 1 entries per table (int32 indices), and counts below 2**32.
"""

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cadenza.errors import CadenzaError
from cadenza.inputs import load_npy

FORMAT = "cadenza-ngram"
VERSION = 1
HASH_NAME = "fmix32x2-v1"
_LANE_SEEDS = (0x243F6A88, 0x85A308D3)
_MULT = 0x9E3779B1
_FILES = ("context_keys", "context_counts", "pair_keys", "pair_counts")


# --- hashing: the same uint32 arithmetic in NumPy (build) and JAX (probe) ---------------------

def _fmix32(h, xp):
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _seed(lane: int, order: int) -> int:
    h = np.array([_LANE_SEEDS[lane] ^ (order * 0x01000193)], np.uint32)
    return int(_fmix32(h, np)[0])


def _step(h, token, xp):
    """Absorb one token (any int array) into lane hashes ``h`` (uint32)."""
    return _fmix32((h * xp.uint32(_MULT)) ^ token.astype(xp.uint32), xp)


def _context_hash_np(windows: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Both lanes for contexts ``windows`` [N, order-1] (oldest token first)."""
    lanes = []
    for lane in range(2):
        h = np.full(windows.shape[0], _seed(lane, order), np.uint32)
        for i in range(windows.shape[1]):
            h = _step(h, windows[:, i], np)
        lanes.append(h)
    return lanes[0], lanes[1]


def _join(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)


def context_key(tokens: Sequence[int]) -> int:
    """The uint64 key of a context (its order is ``len(tokens) + 1``); for tests and tools."""
    hi, lo = _context_hash_np(np.asarray([tokens], np.int64).reshape(1, -1), len(tokens) + 1)
    return int(_join(hi, lo)[0])


def pair_key(tokens: Sequence[int], next_token: int) -> int:
    """The uint64 key of (context ``tokens``, ``next_token``)."""
    hi, lo = _context_hash_np(np.asarray([tokens], np.int64).reshape(1, -1), len(tokens) + 1)
    nxt = np.asarray([next_token], np.int64)
    return int(_join(_step(hi, nxt, np), _step(lo, nxt, np))[0])


# --- building --------------------------------------------------------------------------------

def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum the counts of equal keys over (keys, counts) parts; keys sorted and unique."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    keys = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    if keys.size == 0:
        return keys, counts
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.add.reduceat(counts, starts)


class _Counter:
    """Accumulates (key, count) pairs in sorted, merged chunks to bound memory."""

    def __init__(self, chunk: int = 1 << 22):
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.chunk = chunk

    def add(self, keys: np.ndarray):
        self.pending.append(keys)
        self.pending_size += keys.size
        if self.pending_size >= self.chunk:
            self._flush()

    def _flush(self):
        if self.pending:
            keys, counts = np.unique(np.concatenate(self.pending), return_counts=True)
            self.parts = [_merge(self.parts + [(keys, counts.astype(np.int64))])]
            self.pending, self.pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        return _merge(self.parts)


def build_ngram_table(documents: Iterable[Sequence[int]], out_dir, *, vocab_size: int,
                      max_order: int = 6, tokenizer: dict | None = None,
                      sources: list[str] | None = None, corpus_info: dict | None = None) -> dict:
    """Count the 2..``max_order``-grams of ``documents`` and write a table directory.

    Args:
      documents: token-id sequences (each a list or 1-D int array); n-grams
        never cross a document boundary.
      out_dir: directory to create (files are overwritten).
      vocab_size: every id must lie in [0, vocab_size).
      max_order: highest n-gram order (2..8).
      tokenizer: JSON-serialisable identity of the tokenizer (stored as is).
      sources: corpus file names, recorded in the manifest.
      corpus_info: extra JSON-serialisable corpus facts for the manifest,
        serialised after ``documents`` is consumed.

    Returns the manifest dict (also written to ``manifest.json``).
    """
    if not 2 <= max_order <= 8:
        raise CadenzaError(f"max_order must be in 2..8, got {max_order}", where="ngram build",
                           fix="pass --max-order between 2 and 8 (the reference uses 6)")
    contexts, pairs = _Counter(), _Counter()
    n_docs = n_tokens = 0
    per_order = {n: 0 for n in range(2, max_order + 1)}
    for doc in documents:
        ids = np.asarray(doc, np.int64).reshape(-1)
        n_docs += 1
        n_tokens += ids.size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise CadenzaError(f"document {n_docs - 1} has token ids outside [0, {vocab_size})",
                               where="ngram build",
                               fix="pass the vocab size of the tokenizer that made the ids")
        for n in range(2, max_order + 1):
            if ids.size < n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ids, n)
            hi, lo = _context_hash_np(windows[:, :-1], n)
            contexts.add(_join(hi, lo))
            pairs.add(_join(_step(hi, windows[:, -1], np), _step(lo, windows[:, -1], np)))
            per_order[n] += windows.shape[0]
    ctx_keys, ctx_counts = contexts.result()
    pair_keys_, pair_counts = pairs.result()
    for name, counts in (("context", ctx_counts), ("pair", pair_counts)):
        if counts.size and counts.max() >= 2**32:
            raise CadenzaError(f"a {name} count exceeds 2**32 - 1", where="ngram build",
                               fix="build from a smaller corpus (counts are stored as uint32)")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = (ctx_keys, ctx_counts.astype(np.uint32), pair_keys_, pair_counts.astype(np.uint32))
    for name, arr in zip(_FILES, arrays):
        np.save(out / f"{name}.npy", arr, allow_pickle=False)
    manifest = {
        "format": FORMAT, "version": VERSION, "hash": HASH_NAME,
        "orders": list(range(2, max_order + 1)), "max_order": max_order,
        "vocab_size": int(vocab_size), "tokenizer": tokenizer or {},
        "corpus": {"documents": n_docs, "tokens": int(n_tokens), "sources": sources or [],
                   "ngrams_per_order": {str(n): int(c) for n, c in per_order.items()},
                   **(corpus_info or {})},
        "entries": {"contexts": int(ctx_keys.size), "pairs": int(pair_keys_.size)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


BYTE_OFFSET = 3  # byte-level ids: byte + 3, with 0 = pad, 1 = BOS, 2 = EOS
BYTE_LEVEL = {"kind": "byte-level", "offset": BYTE_OFFSET, "vocab_size": 256 + BYTE_OFFSET,
              "bos_id": 1, "eos_id": 2}


def corpus_files(inputs: Sequence[str]) -> list[pathlib.Path]:
    """Files named in ``inputs``; a directory contributes all its files (recursive, sorted)."""
    files = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise CadenzaError("no such file or directory", where=str(path),
                               fix="pass existing corpus files or directories to --input")
    if not files:
        raise CadenzaError("no corpus files found", where=", ".join(map(str, inputs)),
                           fix="pass a directory that contains text files")
    return files


def build_from_files(inputs: Sequence[str], out_dir, *, tokenizer=None, tokenizer_id=None,
                     max_order: int = 6, add_bos: bool = True, add_eos: bool = True,
                     doc_per_line: bool = False) -> dict:
    """Tokenise text files and build a table (:func:`build_ngram_table`).

    Each file (or each non-empty line with ``doc_per_line``) is one document.
    ``tokenizer``: an object with ``encode(text, add_bos=...)``, ``vocab_size``,
    ``bos_id``, ``eos_id``; None means byte-level ids (:data:`BYTE_LEVEL`).
    ``tokenizer_id``: identity stored in the manifest (e.g. with
    :func:`tokenizer_fingerprint`). Files that are not UTF-8 are skipped and
    counted in the manifest (``corpus.skipped_files``); byte level reads raw bytes.
    """
    files = corpus_files(inputs)
    if tokenizer is None:
        vocab, bos, eos, tokenizer_id = 256 + BYTE_OFFSET, 1, 2, dict(BYTE_LEVEL)
    else:
        vocab, bos, eos = tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id
    skipped = []

    def encode(data: bytes) -> list[int]:
        if tokenizer is None:
            ids = (np.frombuffer(data, np.uint8).astype(np.int64) + BYTE_OFFSET).tolist()
            ids = ([bos] if add_bos else []) + ids
        else:
            ids = list(tokenizer.encode(data.decode("utf-8"), add_bos=add_bos and bos is not None))
        return ids + ([eos] if add_eos and eos is not None else [])

    def documents():
        for file in files:
            data = file.read_bytes()
            if tokenizer is not None:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    skipped.append(str(file))
                    continue
            for part in (data.splitlines() if doc_per_line else [data]):
                if part.strip() or not doc_per_line:
                    yield encode(part)

    info = {"skipped_files": skipped, "add_bos": add_bos, "add_eos": add_eos,
            "doc_per_line": doc_per_line}
    return build_ngram_table(documents(), out_dir, vocab_size=vocab, max_order=max_order,
                             tokenizer=tokenizer_id, sources=[str(f) for f in files],
                             corpus_info=info)


def tokenizer_fingerprint(tokenizer_dir) -> str:
    """sha256 over the file names and contents of a tokenizer directory."""
    digest = hashlib.sha256()
    root = pathlib.Path(tokenizer_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- loading ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NgramTable:
    """A table opened from disk: memory-mapped arrays plus the manifest."""

    manifest: dict
    context_keys: np.ndarray
    context_counts: np.ndarray
    pair_keys: np.ndarray
    pair_counts: np.ndarray

    @property
    def max_order(self) -> int:
        return int(self.manifest["max_order"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def to_device(self) -> "DeviceNgramTable":
        """Copy the table to the default device as uint32 halves (12 bytes per entry)."""
        return DeviceNgramTable.from_arrays(self.context_keys, self.context_counts,
                                            self.pair_keys, self.pair_counts, self.max_order)


def load_ngram_table(path) -> NgramTable:
    """Open a table directory written by :func:`build_ngram_table` (arrays memory-mapped)."""
    root = pathlib.Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise CadenzaError("not an n-gram table (no manifest.json)", where=str(root),
                           fix="build one with `cadenza ngram build --out DIR`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("hash") != HASH_NAME:
        raise CadenzaError(f"unsupported n-gram table format {manifest.get('format')!r} / hash "
                           f"{manifest.get('hash')!r}", where=str(manifest_path),
                           fix="rebuild the table with this version of cadenza")
    arrays = {}
    for name in _FILES:
        file = root / f"{name}.npy"
        if not file.is_file():
            raise CadenzaError(f"missing {file.name}", where=str(root),
                               fix="rebuild the table with `cadenza ngram build`")
        arrays[name] = load_npy(file)  # cadenza.inputs: memory-mapped, never unpickled
    return NgramTable(manifest=manifest, **arrays)


# --- probing inside jit ----------------------------------------------------------------------

@flax.struct.dataclass
class DeviceNgramTable:
    """Device-resident sorted keys (uint32 halves) and counts; a pytree usable under jit.

    Each table ends with a sentinel (all-ones key, count 0), so an empty
    table still has one entry and an unseen key always reads count 0.
    """

    context_hi: jax.Array
    context_lo: jax.Array
    context_counts: jax.Array
    pair_hi: jax.Array
    pair_lo: jax.Array
    pair_counts: jax.Array
    max_order: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_arrays(cls, context_keys, context_counts, pair_keys, pair_counts,
                    max_order: int) -> "DeviceNgramTable":
        """Build from sorted uint64 keys and uint32 counts (host or memory-mapped arrays)."""
        def split(keys, counts):
            keys = np.concatenate([np.asarray(keys, np.uint64), [np.uint64(2**64 - 1)]])
            counts = np.concatenate([np.asarray(counts, np.uint32), [np.uint32(0)]])
            if keys.size >= 2**31:
                raise CadenzaError(f"n-gram table has {keys.size} entries; at most 2**31 - 1 "
                                   "fit int32 indices", where="ngram table",
                                   fix="build with a lower --max-order or a smaller corpus")
            return (jnp.asarray((keys >> np.uint64(32)).astype(np.uint32)),
                    jnp.asarray(keys.astype(np.uint32)), jnp.asarray(counts))

        ch, cl, cc = split(context_keys, context_counts)
        ph, pl, pc = split(pair_keys, pair_counts)
        return cls(ch, cl, cc, ph, pl, pc, max_order=int(max_order))

    @property
    def max_context(self) -> int:
        return self.max_order - 1


def _lookup(hi: jax.Array, lo: jax.Array, counts: jax.Array, qhi: jax.Array,
            qlo: jax.Array) -> jax.Array:
    """Counts (uint32, 0 if absent) of keys (qhi, qlo) [any shape] in a sorted (hi, lo) table."""
    n = hi.shape[0]
    left = jnp.zeros(qhi.shape, jnp.int32)
    right = jnp.full(qhi.shape, n, jnp.int32)

    def body(_, state):
        left, right = state
        mid = jnp.minimum((left + right) // 2, n - 1)
        mh, ml = hi[mid], lo[mid]
        less = (mh < qhi) | ((mh == qhi) & (ml < qlo))
        active = left < right
        return (jnp.where(active & less, mid + 1, left),
                jnp.where(active & ~less, mid, right))

    left, _ = jax.lax.fori_loop(0, int(n).bit_length(), body, (left, right))
    idx = jnp.minimum(left, n - 1)
    found = (hi[idx] == qhi) & (lo[idx] == qlo)
    return jnp.where(found, counts[idx], jnp.uint32(0))


def ngram_probs(table: DeviceNgramTable, history: jax.Array, history_len: jax.Array,
                candidates: jax.Array, weights: Sequence[float]) -> jax.Array:
    """Interpolated n-gram probability ``g = sum_j weights[j-1] * P_j(c | last j tokens)``.

    Args:
      table: the device table.
      history: int32 [..., m] the last m tokens (newest last), m >= len(weights).
      history_len: int32 [...] how many real tokens precede (absolute
        position); context length j is used only if j <= history_len.
      candidates: int32 [..., C] next tokens to score.
      weights: static λ for context lengths 1..J (J <= table.max_context).

    Returns float32 [..., C]. No backoff: an unseen context adds 0.
    """
    n_ctx = len(weights)
    if n_ctx > table.max_context:
        raise CadenzaError(f"{n_ctx} n-gram weights need contexts up to {n_ctx} tokens but the "
                           f"table stops at order {table.max_order}", where="superposed decoding",
                           fix="pass fewer weights or build the table with a higher --max-order")
    m = history.shape[-1]
    total = jnp.zeros(candidates.shape, jnp.float32)
    for j in range(1, n_ctx + 1):
        window = history[..., m - j:]
        lanes = []
        for lane in range(2):
            h = jnp.full(window.shape[:-1], _seed(lane, j + 1), jnp.uint32)
            for i in range(j):
                h = _step(h, window[..., i], jnp)
            lanes.append(h)
        ctx_count = _lookup(table.context_hi, table.context_lo, table.context_counts, *lanes)
        pair_lanes = [_step(h[..., None], candidates, jnp) for h in lanes]
        pair_count = _lookup(table.pair_hi, table.pair_lo, table.pair_counts, *pair_lanes)
        seen = (ctx_count > 0) & (history_len >= j)
        prob = jnp.where(seen[..., None], pair_count.astype(jnp.float32)
                         / jnp.maximum(ctx_count, 1).astype(jnp.float32)[..., None], 0.0)
        total = total + jnp.float32(weights[j - 1]) * prob
    return total
