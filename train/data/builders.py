"""TFDS builders (no TensorFlow: array_record files, read back with ``tfds.data_source``).

- :class:`LocalFiles`: alpaca / sharegpt / messages / text / preference files (builder
  configs named after the format; preference records add ``chosen`` and ``rejected``
  turn lists to the features).
- :class:`Stdlib`: the running interpreter's standard library (configs ``code``
  and ``instruct``).

Both write the canonical record features (``messages``, ``text``, ``source``, and
``weights`` and ``weight_spans`` except for preference records)
into splits ``train`` and ``test`` (held out, ``heldout_fraction``), and a
``build_report.json`` next to the data with the counts read / written /
skipped by reason. :func:`prepare` builds a :class:`DataSource` once (reusing a
finished build), :func:`open_split` opens a split of a prepared or catalogued
dataset.
"""

import collections
import contextlib
import hashlib
import io
import json
import pathlib
import sys

import numpy as np
import tensorflow_datasets as tfds

from cadenza.errors import CadenzaError
from cadenza.outputs import atomic_file
from cadenza.train.data import stdlib
from cadenza.train.data.records import Problems, expand_paths, read_records


def _turns():
    return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})


FEATURES = {"messages": _turns(), "text": tfds.features.Text(), "source": tfds.features.Text()}
PREFERENCE_FEATURES = {**FEATURES, "chosen": _turns(), "rejected": _turns()}
# Loss weights per assistant turn (one for text); empty: every weight 1. Weight spans:
# character spans of an assistant turn's content with their own weight (records.py).
WEIGHTED_FEATURES = {**FEATURES, "weights": tfds.features.Sequence(np.float32),
                     "weight_spans": tfds.features.Sequence(
                         {"turn": np.int32, "begin": np.int32, "end": np.int32,
                          "weight": np.float32})}
# Part of every build's location: a change of the stored features makes a new build.
FEATURES_VERSION = 3
REPORT_FILE = "build_report.json"


def _split_of(key: str, fraction: float) -> str:
    return "test" if stdlib.is_heldout(key, fraction) else "train"


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared parts: features, two splits from one pass, the build report."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, on_error="skip", heldout_fraction=0.05, **kwargs):
        self.problems = Problems(on_error)
        self.counts = collections.Counter()
        self.heldout_fraction = heldout_fraction
        super().__init__(**kwargs)

    def _info(self):
        features = PREFERENCE_FEATURES if self.builder_config.name == "preference" \
            else WEIGHTED_FEATURES
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _keyed_records(self):
        """Yield ``(split_key, record)``; the split follows a hash of the key."""
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        splits = {"train": [], "test": []}
        for i, (key, record) in enumerate(self._keyed_records()):
            splits[_split_of(key, self.heldout_fraction)].append((f"{i:09d}", record))
        self.counts["written"] = sum(len(v) for v in splits.values())
        if not self.counts["written"]:
            raise CadenzaError(
                f"no usable records: read {self.counts['read']}, skipped "
                f"{dict(self.problems.counts)}", where=self.source_description(),
                fix="check the input format and the skipped reasons above")
        return {name: self._generate_examples(items) for name, items in splits.items() if items}

    def _generate_examples(self, items):
        if self.builder_config.name == "preference":
            yield from items
            return
        for key, record in items:
            yield key, {"weights": [], "weight_spans": [], **record}

    def source_description(self) -> str:
        raise NotImplementedError

    def report(self) -> dict:
        """Counts of this build: read, written, skipped by reason, per split."""
        return {"source": self.source_description(), "read": self.counts["read"],
                "written": self.counts["written"], "skipped": dict(self.problems.counts),
                "skipped_examples": self.problems.examples}


class LocalFiles(_Builder):
    """Local alpaca / sharegpt / messages / text / preference files as a TFDS dataset."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f) for f in
                       ("alpaca", "sharegpt", "messages", "text", "preference")]

    def __init__(self, *, paths=(), **kwargs):
        self.paths = [str(p) for p in paths]
        super().__init__(**kwargs)

    def source_description(self) -> str:
        return ", ".join(self.paths)

    def _keyed_records(self):
        # The split follows the record's content, not its file:line, so the held-out
        # records do not depend on how the input path is spelled (or where it lives).
        for record in read_records(self.builder_config.name, self.paths, self.problems,
                                   self.counts):
            content = {k: v for k, v in record.items() if k != "source"}
            yield json.dumps(content, sort_keys=True, ensure_ascii=False), record


class Stdlib(_Builder):
    """The running Python's standard library: ``code`` corpus or ``instruct`` pairs."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="code"),
                       tfds.core.BuilderConfig(name="instruct")]

    def __init__(self, *, modules=None, **kwargs):
        self.modules = list(modules) if modules is not None else None
        super().__init__(**kwargs)

    def source_description(self) -> str:
        return f"stdlib of Python {sys.version.split()[0]} at {stdlib.stdlib_root()}"

    def _keyed_records(self):
        for rel, record in stdlib.stdlib_records(self.builder_config.name, self.modules,
                                                 self.problems, self.counts):
            yield str(rel), record


def default_data_dir() -> pathlib.Path:
    return pathlib.Path("~/.cache/cadenza/datasets").expanduser()


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# Local files up to this size are keyed by their contents; larger ones by size + mtime.
CONTENT_KEY_BYTES = 256 * 2**20


def _file_stat(path) -> tuple:
    """What keys a prepared dataset to one input file: for a local file its absolute path,
    size and (up to :data:`CONTENT_KEY_BYTES`) the sha256 of its contents, else its
    modification time; for a URL path its size and modification time."""
    if isinstance(path, pathlib.Path):
        st = path.stat()
        if st.st_size <= CONTENT_KEY_BYTES:   # a same-size rewrite within the mtime's
            digest = hashlib.sha256()          # granularity must not reuse a stale build
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(2**20), b""):
                    digest.update(chunk)
            return str(path.resolve()), st.st_size, digest.hexdigest()
        return str(path.resolve()), st.st_size, st.st_mtime_ns
    st = path.stat()  # etils.epath: a StatResult with length and mtime
    return str(path), st.length, st.mtime


def source_location(source, data) -> tuple[pathlib.Path, str]:
    """``(data_dir, tfds_name)`` where ``source`` (a DataSource) is prepared.

    Local files get their own folder keyed by their paths, sizes and contents (mtimes
    past :data:`CONTENT_KEY_BYTES`), so a changed input is rebuilt; the stdlib folder is
    keyed by Python version and module selection.
    """
    base = pathlib.Path(data.data_dir).expanduser() if data.data_dir else default_data_dir()
    options = [data.heldout_fraction, data.num_shards, FEATURES_VERSION]
    if source.format in ("stdlib_code", "stdlib_instruct"):
        kind = source.format.split("_")[1]
        key = _fingerprint(sys.version, data.stdlib_modules, *options)
        return base / f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-{key}", \
            f"stdlib/{kind}"
    if source.format == "tfds":
        return base, source.name
    files = expand_paths(source.path)
    stats = [_file_stat(f) for f in files]
    return base / f"local-{source.format}-{_fingerprint(stats, *options)}", \
        f"local_files/{source.format}"


def build(source, data, data_dir=None, *, rebuild=False) -> dict:
    """Prepare ``source`` (unless already prepared) and return its build report.

    ``data_dir`` overrides the location from :func:`source_location`.

    Raises:
      CadenzaError: a bad record under ``on_error=stop``; no usable records.
    """
    where, name = source_location(source, data)
    where = pathlib.Path(data_dir) if data_dir else where
    report_path = where / name / REPORT_FILE
    if source.format == "tfds":
        raise CadenzaError("format 'tfds' names an already prepared dataset; nothing to build",
                           where=source.name, fix="build local files or the stdlib datasets")
    if report_path.is_file() and not rebuild:
        return json.loads(report_path.read_text())
    config = name.split("/")[1]
    tfds.disable_progress_bar()
    common = dict(data_dir=str(where), config=config, file_format="array_record",
                  on_error=data.on_error, heldout_fraction=data.heldout_fraction)
    if source.format.startswith("stdlib_"):
        builder = Stdlib(modules=data.stdlib_modules, **common)
    else:
        builder = LocalFiles(paths=expand_paths(source.path), **common)
    download_config = tfds.download.DownloadConfig(
        num_shards=data.num_shards,
        download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not rebuild
        else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading ..." there
        builder.download_and_prepare(download_config=download_config)
    report = {**builder.report(), "data_dir": str(where), "name": name,
              "splits": {k: v.num_examples for k, v in builder.info.splits.items()},
              "shards": {k: v.num_shards for k, v in builder.info.splits.items()}}
    with atomic_file(report_path, overwrite=True) as tmp:  # the build's completeness marker
        tmp.write_text(json.dumps(report, indent=2))
    return report


def open_split(source, data, split: str):
    """``(data_source, shard_lengths, report)`` for ``split`` of a prepared ``source``.

    Local and stdlib sources are built on first use.

    Raises:
      CadenzaError: the dataset or split does not exist, or is empty.
    """
    where, name = source_location(source, data)
    report = None if source.format == "tfds" else build(source, data)
    if report is not None and split not in report["splits"]:
        raise CadenzaError(f"dataset {name!r} has no {split!r} split: its {report['written']} "
                           f"records gave none to it (held-out fraction "
                           f"{data.heldout_fraction}; splits {report['splits']})",
                           where=str(where), fix="add records, raise data.heldout_fraction, or "
                           "train without held-out eval (train.eval_every=0)")
    try:
        builder = tfds.builder(name, data_dir=str(where))
        info = builder.info.splits[split]
        ds = builder.as_data_source(split=split)
    except CadenzaError:
        raise
    except Exception as e:  # tfds raises several types for unknown names/splits/versions
        raise CadenzaError(f"cannot open split {split!r} of dataset {name!r}: {e}",
                           where=str(where),
                           fix="prepare the dataset first (cadenza data build) or check "
                               "data.name / data.data_dir and the split name") from None
    if len(ds) == 0:
        raise CadenzaError(f"split {split!r} of dataset {name!r} is empty", where=str(where),
                           fix="add records, or lower/raise data.heldout_fraction")
    return ds, list(info.shard_lengths), report
