"""The training input pipeline: TFDS data sources -> grain -> packed host-local batches.

Per source: ``tfds`` data source -> this host's share (every
``process_count``-th record, or whole array_record files with
``shard_by=files``) -> shuffle by ``seed`` (reshuffled each epoch) -> repeat
(train only) -> format (tokens + loss mask, bad records skipped or stopped) ->
with ``truncation=chunk``: long text examples cut into ``seq_len`` pieces
(shuffled in windows of ``shuffle_window`` pieces, train only) ->
weighted mixture of the sources -> first-fit / best-fit packing (or padding)
-> batches of ``train.batch_size // process_count`` rows.

Batches are dicts of numpy arrays ``[rows, seq_len]``: ``inputs``/``targets``
int32, ``loss_mask`` float32, ``segment_ids`` int32 (0 = padding, 1.. = packed
examples), ``positions`` int32 (restarting at 0 in every segment); with
``data.balance: sources`` also ``source_ids`` int32 (the mixture source of each
position, for the task-balanced loss, :mod:`cadenza.train.loss_shaping`).

Preference data (``format: preference``) packs whole pairs: the k-th pair of a row has
segment ids ``2k - 1`` (prompt + chosen) and ``2k`` (prompt + rejected), positions
restart in each; the preference tasks (:mod:`cadenza.train.preference_task`) read the
pairs from that layout.
"""

import pathlib
import sys

import grain
import grain.experimental as grain_experimental
import numpy as np

from cadenza.errors import CadenzaError, ConfigError
from cadenza.models.hf_folder import has_tokenizer
from cadenza.models.tokenizer import load_tokenizer, train_tokenizer
from cadenza.train.data import builders, stdlib
from cadenza.train.data.formatting import PAIR_KEYS, Formatter, split_into_pieces
from cadenza.train.data.records import Problems
from cadenza.train.loss_shaping import SOURCE_KEY

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def resolve_tokenizer(config):
    """The tokenizer of ``config``: ``data.tokenizer`` if set, else the tokenizer of the
    ``train.init_from`` model (a model directory's tokenizer/ or a Hugging Face folder's
    files) if it has one, else a byte-level BPE trained on the stdlib code
    (``data.stdlib_modules``) to ``model.vocab_size``, cached under the data dir."""
    data = config.data
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if config.train.init_from:
        from cadenza.models.checkpoint import tokenizer_dir

        tdir = tokenizer_dir(config.train.init_from)
        if tdir is not None and has_tokenizer(tdir):
            return load_tokenizer(tdir)
    base = pathlib.Path(data.data_dir).expanduser() if data.data_dir \
        else builders.default_data_dir()
    key = builders._fingerprint(sys.version, data.stdlib_modules, config.model.vocab_size)
    out = base / "tokenizers" / f"stdlib-bpe-{config.model.vocab_size}-{key}"
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(out)
    root = stdlib.stdlib_root()
    texts = [(root / rel).read_text(encoding="utf-8", errors="replace")
             for rel in stdlib.stdlib_files(data.stdlib_modules)]
    return train_tokenizer(texts, config.model.vocab_size, out)


class _Indexed:
    """A random-access view of ``source`` at ``indices``."""

    def __init__(self, source, indices):
        self.source, self.indices = source, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def host_share(source, shard_lengths, data, process_index, process_count, name):
    """This host's records of ``source`` as a grain MapDataset.

    ``shard_by=records``: records ``process_index::process_count``.
    ``shard_by=files``: the records of files ``process_index::process_count``.

    Raises:
      CadenzaError: fewer files than hosts (files mode) or an empty share.
    """
    if data.shard_by == "files":
        if len(shard_lengths) < process_count:
            raise CadenzaError(
                f"dataset {name} has {len(shard_lengths)} file(s) but there are "
                f"{process_count} hosts", where="data.shard_by=files",
                fix=f"rebuild with data.num_shards={process_count} (or a multiple), or use "
                    "data.shard_by=records")
        starts = np.concatenate([[0], np.cumsum(shard_lengths)])
        indices = np.concatenate([np.arange(starts[f], starts[f + 1])
                                  for f in range(process_index, len(shard_lengths),
                                                 process_count)])
        share = grain.MapDataset.source(_Indexed(source, indices))
    else:
        share = grain.MapDataset.source(source)[process_index::process_count]
    if len(share) == 0:
        raise CadenzaError(f"host {process_index} of {process_count} gets no records of {name}",
                           where="data", fix="use fewer hosts or a larger dataset")
    return share


def _pad_example(ex, seq_len):
    n = len(ex["inputs"])
    pad = seq_len - n
    out = {k: np.pad(v, (0, pad)) for k, v in ex.items()}
    return {**out, "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
            "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad))}


def _from_packed(b):
    out = {k: b[k] for k in ("inputs", "targets", "loss_mask", SOURCE_KEY, *PAIR_KEYS) if k in b}
    return {**out, "segment_ids": b["inputs_segment_ids"], "positions": b["inputs_positions"]}


def pair_layout(batch: dict) -> dict:
    """Rows of packed preference pairs (segment ``k`` = pair ``k``, with ``pair_side`` and
    ``pair_positions``) as segment ids ``2k - 1`` (chosen) / ``2k`` (rejected) and
    positions restarting in each side (module docstring); the pair keys are dropped."""
    seg, side = batch["segment_ids"], batch["pair_side"]
    out = {k: v for k, v in batch.items() if k not in PAIR_KEYS}
    out["segment_ids"] = np.where(seg > 0, 2 * seg - (side == 1), 0).astype(np.int32)
    out["positions"] = np.where(seg > 0, batch["pair_positions"], 0).astype(np.int32)
    return out


class _Pieces:
    """grain flat-map transform: an example -> its :func:`split_into_pieces`. On resume
    grain re-reads (and re-formats) the current record and skips the pieces already
    given, so the iterator state stays a small JSON dict."""

    def __init__(self, seq_len):
        self.seq_len = seq_len

    def flat_map(self, example):
        return split_into_pieces(example, self.seq_len)


class _SourceIds:
    """Tag every position of an example with its mixture source index (``source_ids``)."""

    def __init__(self, index):
        self.index = index

    def __call__(self, example):
        return {**example, SOURCE_KEY: np.full(len(example["inputs"]), self.index, np.int32)}


class _Finalize:
    """Fix dtypes and pad a short (final, eval) batch to ``rows`` with padding rows."""

    def __init__(self, rows, packed, pairs=False):
        self.rows, self.packed, self.pairs = rows, packed, pairs

    def __call__(self, batch):
        batch = _from_packed(batch) if self.packed else batch
        batch = pair_layout(batch) if self.pairs else batch
        dtypes = {"loss_mask": np.float32}
        out = {}
        for k in BATCH_KEYS + ((SOURCE_KEY,) if SOURCE_KEY in batch else ()):
            v = np.asarray(batch[k], dtypes.get(k, np.int32))
            if v.shape[0] < self.rows:
                v = np.pad(v, ((0, self.rows - v.shape[0]), (0, 0)))
            out[k] = v
        return out


class DataIterator:
    """Host-local batches with exact resume.

    ``next(it)`` -> batch dict (module docstring); ``get_state()`` ->
    JSON-serialisable dict; ``set_state(state)`` resumes exactly there (same
    config, same process index/count). ``stats()`` reports counts (examples,
    kept, truncated, chunked documents and their pieces, tokens, trained tokens,
    skipped by reason) of *this* iterator since it was created (not part of the
    state; a resumed iterator re-formats the record it stopped in, counting it again).
    """

    def __init__(self, dataset, formatters, problems, tokenizer, reports):
        self._dataset = dataset
        self._it = iter(dataset)
        self.formatters = formatters
        self.problems = problems
        self.tokenizer = tokenizer
        self.build_reports = reports

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def stats(self) -> dict:
        total = {}
        for f in self.formatters:
            for k, v in f.counts.items():
                total[k] = total.get(k, 0) + v
        return {**total, "skipped": dict(self.problems.counts)}


def build_iterator(config, *, split: str = "train", process_index: int = 0,
                   process_count: int = 1) -> DataIterator:
    """The input iterator of ``config`` (an ExperimentConfig) for this host.

    Yields batches of ``train.batch_size // process_count`` rows of
    ``train.seq_len`` positions. ``split="train"`` repeats forever (shuffled
    per epoch if ``data.shuffle``); other splits (``"test"``: held out) run one
    pass in order and pad the last batch with padding rows.

    Raises:
      ConfigError: batch size not divisible by the host count, bad host index.
      CadenzaError: missing/empty datasets, fewer files than hosts, bad records
        under ``on_error=stop``.
    """
    data, train = config.data, config.train
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} not in [0, {process_count})",
                          where="build_iterator", fix="pass jax.process_index()/process_count()")
    if train.batch_size % process_count:
        raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by "
                          f"{process_count} hosts", where="train.batch_size",
                          fix="use a multiple of the number of hosts")
    rows = train.batch_size // process_count
    is_train = split == "train"
    tokenizer = resolve_tokenizer(config)
    problems = Problems(data.on_error)
    formatters, streams, weights, reports = [], [], [], []
    for i, source in enumerate(data.sources()):
        name = source.name or source.path or source.format
        ds, shard_lengths, report = builders.open_split(source, data, split)
        reports.append(report)
        share = host_share(ds, shard_lengths, data, process_index, process_count, name)
        pass_length = len(share)
        if is_train:
            if data.shuffle:
                share = share.shuffle(seed=data.seed + i)
            share = share.repeat(None)
        formatter = Formatter(tokenizer, train.seq_len, config.model.vocab_size,
                              data.truncation, problems, data.end_of_turn, pass_length, name)
        formatters.append(formatter)
        stream = share.map(formatter).filter(lambda x: x is not None)
        if data.balance == "sources":
            stream = stream.map(_SourceIds(i))
        # one reader thread and a small read-ahead: formatting stays in step with use
        read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * rows)
        stream = stream.to_iter_dataset(read)
        if data.truncation == "chunk":
            stream = grain_experimental.FlatMapIterDataset(stream, _Pieces(train.seq_len))
            if is_train and data.shuffle and data.shuffle_window:
                stream = grain_experimental.WindowShuffleIterDataset(
                    stream, window_size=data.shuffle_window, seed=data.seed + i)
        streams.append(stream)
        weights.append(source.weight)
    stream = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
    pairs = data.is_preference
    if data.packing:
        packer = (grain_experimental.FirstFitPackIterDataset if data.packing_method == "first_fit"
                  else grain_experimental.BestFitPackIterDataset)
        keys = ("inputs", "targets", "loss_mask") + (PAIR_KEYS if pairs else ()) + (
            (SOURCE_KEY,) if data.balance == "sources" else ())
        length = {k: train.seq_len for k in keys}
        stream = packer(stream, length_struct=length, num_packing_bins=data.packing_bins,
                        seed=data.seed, shuffle_bins=is_train)
    else:
        stream = stream.map(lambda ex: _pad_example(ex, train.seq_len))
    stream = stream.batch(rows, drop_remainder=is_train).map(_Finalize(rows, data.packing, pairs))
    if data.worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return DataIterator(stream, formatters, problems, tokenizer, reports)
