"""Instruction-data selection: score every record of a built dataset, keep a budget.

Scores (one jitted, batch-sharded forward of the model ``train.init_from`` over the
records, each cut to ``train.seq_len`` positions):

- ``length``: trained (response) tokens; keeps the longest ("Long Is More").
- ``nll``: mean response NLL under the model; keeps the lowest (most likely).
- ``ifd``: NLL(response | instruction) / NLL(response alone) (the response's tokens after
  a BOS); keeps the lowest, the records whose response depends most on its instruction
  (a ratio near or above 1 marks a response the instruction does not explain).
- ``grape``: among records sharing one instruction (every turn before the last reply)
  only the response with the lowest NLL is eligible; then the lowest NLL first.
- ``rds`` (RDS+): cosine of the record's position-weighted mean final hidden state
  (weights 1..T over all its T tokens: instruction and response, through the last) to
  the nearest record of a target set; keeps the highest. It ranks by resemblance to the
  target, not by whether a response answers its instruction (see docs/data.md).
- ``random``: a uniform score from ``seed``.

Diversity (optional): ``kmeans`` clusters the embeddings (fixed-iteration k-means in JAX,
seeded) and fills the budget from each cluster in proportion to its size, best-ranked
first; ``deita`` walks the ranking and adds a record only if its cosine to every record
already kept is below ``threshold``. Ties keep the dataset order, so a selection is
deterministic under a seed.
"""

import dataclasses
import json
import math
import pathlib

import numpy as np

from cadenza.errors import CadenzaError, ConfigError
from cadenza.outputs import atomic_dir
from cadenza.validation import check_choice, check_range

METHODS = ("length", "nll", "ifd", "grape", "rds", "random")
DIVERSITY = ("none", "kmeans", "deita")
SELECTION_FILE = "selection.json"
RECORDS_FILE = "records.jsonl"
_HIGHEST_FIRST = {"length": True, "nll": False, "ifd": False, "grape": False, "rds": True,
                  "random": True}


@dataclasses.dataclass(frozen=True)
class SelectSpec:
    """What to keep: ``method``, ``budget`` (an int: that many records; a float in (0, 1]:
    that fraction of the eligible records, rounded up), optional ``diversity`` and its
    settings, ``seed``."""

    method: str
    budget: int | float
    diversity: str = "none"
    clusters: int | None = None      # kmeans: default round(sqrt(budget))
    threshold: float = 0.9           # deita: max cosine to an already kept record
    seed: int = 0
    batch_size: int = 16             # records per scoring forward

    def __post_init__(self):
        check_choice("select", "method", self.method, METHODS)
        check_choice("select", "diversity", self.diversity, DIVERSITY)
        check_range("select", "budget", self.budget, low=0.0, low_inclusive=False)
        if isinstance(self.budget, float) and self.budget > 1:
            raise ConfigError(f"budget {self.budget} is neither a record count nor a fraction",
                              where="select.budget",
                              fix="give a whole number of records, or a fraction 0 < f <= 1")
        check_range("select", "clusters", self.clusters, low=1, optional=True)
        check_range("select", "threshold", self.threshold, low=-1.0, high=1.0)
        check_range("select", "batch_size", self.batch_size, low=1)

    def count(self, pool: int) -> int:
        """The number of records to keep from ``pool`` scored records."""
        return self.budget if isinstance(self.budget, int) else math.ceil(self.budget * pool)

    def needs_model(self) -> bool:
        """Whether a forward of the model is needed (scores or diversity embeddings)."""
        return self.method not in ("length", "random") or self.diversity != "none"


# ---------------------------------------------------------------------------------------
# Scoring


def tokenize(formatter, records, seq_len: int):
    """``[(ids, mask)]`` per record, cut to ``seq_len + 1`` tokens (``seq_len`` positions),
    and the number of records that were cut."""
    out, cut = [], 0
    for r in records:
        ids, mask = formatter.tokens_and_mask(r)
        if len(ids) > seq_len + 1:
            cut += 1
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        out.append((ids, mask))
    return out, cut


def response_only(ids, mask, bos_id):
    """The trained tokens of a record alone after one BOS (for IFD's unconditioned NLL)."""
    rest = [i for i, m in zip(ids, mask) if m]
    if bos_id is None:
        return rest, [False] + [True] * (len(rest) - 1)
    return [bos_id] + rest, [False] + [True] * len(rest)


def rows(sequences, seq_len: int):
    """Pad ``[(ids, mask)]`` (each at most ``seq_len + 1`` tokens) to arrays ``inputs``/
    ``targets``/``loss_mask``/``segment_ids``/``positions`` of shape [N, seq_len + 1] (int32;
    loss_mask float32; padding segment 0). ``inputs`` holds every token of a record, so
    the embedding covers the whole example up to its last token; ``targets`` are the next
    tokens (the last real position has none: loss_mask 0 there)."""
    n, width = len(sequences), seq_len + 1
    arr = {k: np.zeros((n, width), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                       "positions")}
    arr["loss_mask"] = np.zeros((n, width), np.float32)
    for r, (ids, mask) in enumerate(sequences):
        t = len(ids)
        if t == 0:
            continue
        arr["inputs"][r, :t] = ids
        arr["targets"][r, :t - 1] = ids[1:]
        arr["loss_mask"][r, :t - 1] = mask[1:]
        arr["segment_ids"][r, :t] = 1
        arr["positions"][r, :t] = np.arange(t)
    return arr


def score_forward(model):
    """The per-row scoring function of ``model`` (a Transformer): ``(params, batch) ->
    (nll_sum [B], count [B], embedding [B, embed])`` float32, where ``nll_sum`` sums the
    masked next-token NLL, ``count`` the masked targets and ``embedding`` is the mean of
    the final hidden states weighted by position 1..T over the row's T tokens (RDS+: the
    whole formatted example, instruction and response, through its last token)."""
    import jax
    import jax.numpy as jnp

    def fn(params, batch):
        logits, hidden, _ = model.apply({"params": params}, batch["inputs"],
                                        positions=batch["positions"],
                                        segment_ids=batch["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"]
        real = (batch["segment_ids"] > 0).astype(jnp.float32)
        w = (batch["positions"] + 1).astype(jnp.float32) * real
        w = w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
        emb = jnp.einsum("bt,bte->be", w, hidden.astype(jnp.float32))
        return (nll * mask).sum(-1), mask.sum(-1), emb

    return fn


class Scorer:
    """Runs :func:`score_forward` of ``config.train.init_from`` over padded rows, batch
    sharded on ``mesh`` (default: a mesh of ``config.mesh`` over all devices)."""

    def __init__(self, config, *, mesh=None, batch_size: int = 16):
        import jax

        from cadenza.models import Transformer
        from cadenza.train.mesh import batch_sharding, make_mesh
        from cadenza.train.task import load_base_params

        if not config.train.init_from:
            raise ConfigError("scoring needs a model", where="train.init_from",
                              fix="set train.init_from=<model directory>")
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh)
        rules = config.mesh.rules()
        self.params = load_base_params(config.model, config.train.init_from, self.mesh, rules)
        self.sharding = batch_sharding(self.mesh, rules)
        spec = tuple(self.sharding.spec) + (None, None)
        rows_shards, self.length_shards = (
            math.prod(self.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
            for axes in (spec[0] or (), spec[1] or ()))
        self.batch_size = -(-batch_size // rows_shards) * rows_shards  # a multiple of shards
        fn = score_forward(Transformer(config.model))

        def scored(params, batch):
            import flax.linen as nn

            with nn.logical_axis_rules(rules):
                return fn(params, batch)

        self.fn = jax.jit(scored)

    def __call__(self, arrays, progress=None):
        """``(nll_sum [N], count [N], embedding [N, embed])`` NumPy float32 for the rows of
        ``arrays`` (from :func:`rows`), in batches (columns padded with masked positions to a
        multiple of the mesh's length shards); ``progress(done, total)`` after each."""
        import jax

        n, width = arrays["inputs"].shape
        extra = -width % self.length_shards
        outs = []
        for start in range(0, n, self.batch_size):
            chunk = {k: v[start:start + self.batch_size] for k, v in arrays.items()}
            pad = self.batch_size - len(chunk["inputs"])
            chunk = {k: np.pad(v, ((0, pad), (0, extra))) for k, v in chunk.items()}
            with jax.set_mesh(self.mesh):
                batch = jax.device_put(chunk, self.sharding)
                out = jax.device_get(self.fn(self.params, batch))
            outs.append([o[:self.batch_size - pad] for o in out])
            if progress:
                progress(min(start + self.batch_size, n), n)
        return tuple(np.concatenate([o[i] for o in outs]) for i in range(3))


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def instruction_key(record) -> str:
    """The instruction of a chat record: every turn before its last assistant turn."""
    msgs = record["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return json.dumps(msgs[:last], sort_keys=True)


# ---------------------------------------------------------------------------------------
# Selection


def rank(method: str, scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Indices of the eligible records, best first under ``method`` (ties: dataset order)."""
    idx = np.flatnonzero(eligible)
    key = -scores[idx] if _HIGHEST_FIRST[method] else scores[idx]
    return idx[np.argsort(key, kind="stable")]


def kmeans(x: np.ndarray, k: int, seed: int, iterations: int = 20) -> np.ndarray:
    """Cluster ids [N] of the rows of ``x`` [N, D] (cosine k-means in JAX: fixed
    ``iterations`` of assign + mean, centres seeded from ``k`` distinct rows)."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(_unit(np.asarray(x, np.float32)))
    k = min(k, x.shape[0])
    centres = x[jax.random.choice(jax.random.key(seed), x.shape[0], (k,), replace=False)]

    @jax.jit
    def step(c, _):
        assign = jnp.argmax(x @ c.T, axis=-1)
        one_hot = jax.nn.one_hot(assign, k, dtype=x.dtype)
        sums = one_hot.T @ x
        new = jnp.where(one_hot.sum(0)[:, None] > 0, sums, c)
        return new / jnp.maximum(jnp.linalg.norm(new, axis=-1, keepdims=True), 1e-12), None

    centres, _ = jax.lax.scan(step, centres, None, length=iterations)
    return np.asarray(jnp.argmax(x @ centres.T, axis=-1))


def choose(spec: SelectSpec, order: np.ndarray, embeddings, budget: int) -> np.ndarray:
    """The kept indices (sorted) from ``order`` (best first) under the spec's diversity."""
    if spec.diversity == "kmeans" and len(order):
        k = spec.clusters or max(1, round(math.sqrt(budget)))
        labels = kmeans(embeddings[order], k, spec.seed)
        sizes = np.bincount(labels, minlength=labels.max() + 1)
        quota = sizes * min(budget, len(order)) / len(order)
        take = np.floor(quota).astype(int)
        for c in np.argsort(-(quota - take), kind="stable")[:min(budget, len(order))
                                                            - take.sum()]:
            take[c] += 1
        kept = [i for c in range(len(sizes)) for i in order[labels == c][:take[c]]]
        return np.sort(np.asarray(kept, int))
    if spec.diversity == "deita":
        unit, kept = _unit(embeddings), []
        for i in order:
            if len(kept) >= budget:
                break
            if not kept or np.max(unit[kept] @ unit[i]) < spec.threshold:
                kept.append(int(i))
        return np.sort(np.asarray(kept, int))
    return np.sort(order[:budget])


def select(config, spec: SelectSpec, *, target=None, mesh=None, progress=None) -> dict:
    """Score the ``train`` split of ``config``'s dataset(s) and choose ``spec.budget``.

    ``target``: records (canonical dicts) for ``rds`` (default: the dataset's ``test``
    split). Returns ``{"records": [...], "scores": np.ndarray, "selected": sorted
    indices, "counts": {...}, "details": {name: array}}``.
    """
    from cadenza.train.data import builders
    from cadenza.train.data.formatting import Formatter, decode_record
    from cadenza.train.data.pipeline import resolve_tokenizer
    from cadenza.train.data.records import Problems

    say = progress or (lambda _: None)
    if spec.needs_model() and not config.train.init_from:
        raise ConfigError(f"method {spec.method!r} scores with a model but none is given",
                          where="train.init_from", fix="set train.init_from=<model directory>")
    if spec.method == "rds" and target is not None and not target:
        raise CadenzaError("the rds target set is empty", where="select.target",
                           fix="give target records (a file with at least one record)")
    records = []
    for source in config.data.sources():
        ds, _, _ = builders.open_split(source, config.data, "train")
        records += [decode_record(ds[i]) for i in range(len(ds))]
    if len({bool(r["messages"]) for r in records}) > 1:
        raise CadenzaError("the datasets mix chat and text records", where="data",
                           fix="select from chat and text datasets separately")
    if spec.method in ("ifd", "grape") and not records[0]["messages"]:
        raise CadenzaError(f"{spec.method} needs chat records (an instruction and a response)",
                           where="data", fix="select text datasets with length, nll, rds or "
                                             "random")
    tok = resolve_tokenizer(config)
    seq_len = config.train.seq_len
    formatter = Formatter(tok, seq_len, config.model.vocab_size, "truncate",
                          Problems("skip"), config.data.end_of_turn)
    seqs, cut = tokenize(formatter, records, seq_len)
    trained = np.asarray([sum(m[1:]) for _, m in seqs], np.float32)
    counts = {"pool": len(records), "truncated": cut, "unscorable": int((trained == 0).sum())}
    say(f"tokenized {len(records)} records ({cut} cut to {seq_len} positions)")
    details, embeddings = {"response_tokens": trained}, None
    if spec.needs_model():
        scorer = Scorer(config, mesh=mesh, batch_size=spec.batch_size)

        def run(sequences, what):
            return scorer(rows(sequences, seq_len),
                          lambda d, n: say(f"scoring {what}: {d}/{n} records"))

        nll_sum, count, embeddings = run(seqs, "records")
        details["nll"] = np.where(count > 0, nll_sum / np.maximum(count, 1), np.nan)
        if spec.method == "ifd":
            alone = [response_only(i, m, tok.bos_id) for i, m in seqs]
            a_sum, a_count, _ = run(alone, "responses alone")
            details["nll_alone"] = np.where(a_count > 0, a_sum / np.maximum(a_count, 1), np.nan)
            details["ifd"] = details["nll"] / details["nll_alone"]
        if spec.method == "rds":
            if target is None:
                ds, _, _ = builders.open_split(config.data.sources()[0], config.data, "test")
                target = [decode_record(ds[i]) for i in range(len(ds))]
            t_seqs, _ = tokenize(formatter, target, seq_len)
            _, _, t_emb = run(t_seqs, "target records")
            details["rds"] = np.max(_unit(embeddings) @ _unit(t_emb).T, axis=-1)
            counts["target"] = len(target)
    scores = {"length": trained, "nll": details.get("nll"), "grape": details.get("nll"),
              "ifd": details.get("ifd"), "rds": details.get("rds"),
              "random": np.random.default_rng(spec.seed).random(len(records))}[spec.method]
    eligible = (trained > 0) & np.isfinite(scores)
    if spec.method == "grape":
        best: dict[str, int] = {}
        for i in np.flatnonzero(eligible):
            key = instruction_key(records[i])
            if key not in best or scores[i] < scores[best[key]]:
                best[key] = int(i)
        counts["instructions"] = len(best)
        eligible = np.isin(np.arange(len(records)), list(best.values()))
    budget = spec.count(int(eligible.sum()))
    order = rank(spec.method, scores, eligible)
    selected = choose(spec, order, embeddings, budget)
    counts.update(eligible=int(eligible.sum()), budget=budget, selected=len(selected))
    if budget > len(selected):
        say(f"note: budget {budget} but only {len(selected)} records could be kept")
    return {"records": records, "scores": scores, "selected": selected, "counts": counts,
            "details": details}


def check_new_dir(out_dir) -> pathlib.Path:
    """The absolute path of ``out_dir``; fails if it exists (nothing is overwritten)."""
    out = pathlib.Path(out_dir).absolute()
    if out.exists():
        raise CadenzaError("the output directory already exists", where=str(out),
                           fix="choose a new output directory or delete the old one")
    return out


def write_selection(out_dir, result: dict, spec: SelectSpec, about: dict) -> pathlib.Path:
    """Write ``out_dir/records.jsonl`` (the kept records: ``messages`` format, or ``text``
    for text records) and ``out_dir/selection.json`` (settings, counts and every record's
    scores), as a temporary sibling renamed into place; ``out_dir`` must not exist."""
    out = check_new_dir(out_dir)
    records, chosen = result["records"], set(result["selected"].tolist())
    with atomic_dir(out) as tmp:  # a temporary sibling, renamed into place when complete
        tmp.mkdir(parents=True)
        with open(tmp / RECORDS_FILE, "w") as f:
            for i in sorted(chosen):
                r = records[i]
                f.write(json.dumps({"messages": r["messages"]} if r["messages"]
                                   else {"text": r["text"]}) + "\n")
        per_record = [{"source": r["source"], "score": _num(result["scores"][i]),
                       "selected": i in chosen,
                       **{k: _num(v[i]) for k, v in result["details"].items()}}
                      for i, r in enumerate(records)]
        (tmp / SELECTION_FILE).write_text(json.dumps(
            {**about, **dataclasses.asdict(spec), "counts": result["counts"],
             "format": "messages" if records[0]["messages"] else "text",
             "records": per_record}, indent=1))
    return out


def _num(x):
    x = float(x)
    return None if math.isnan(x) else x
