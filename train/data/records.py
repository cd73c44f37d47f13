"""Reading local files into canonical records, with every bad record reported.

A canonical record is ``{"messages": [{"role", "content"}...], "text": str,
"source": "file:line"}``: chat formats fill ``messages`` (roles ``system``,
``user``, ``assistant``), plain text fills ``text``. Formats:

- ``alpaca``: JSON array or JSONL of ``{"instruction", "input"?, "output", "system"?}``.
- ``sharegpt``: JSON array or JSONL of ``{"conversations": [{"from", "value"}...]}``
  (``human``/``user``, ``gpt``/``assistant``/``model``, ``system``).
- ``messages``: JSONL (or JSON array) of ``{"messages": [{"role", "content"}...]}``.
- ``text``: ``.jsonl`` files of ``{"text"}``; any other file is one document.
- ``preference``: JSON array or JSONL of ``{"prompt" | "messages", "chosen", "rejected",
  "system"?}``: the prompt is a string (one user turn) or a list of ``{"role", "content"}``
  turns; ``chosen`` / ``rejected`` are strings (one assistant turn) or lists of turns
  with at least one assistant turn. The record keeps the prompt in ``messages`` and the
  two continuations in ``chosen`` / ``rejected``.

Every format but ``preference`` takes an optional ``weights`` field: a number >= 0 (the
loss weight of every trained token of the record) or, for chat records, a list with one
number >= 0 per assistant turn (the weight of that turn's tokens; 0 leaves the turn
untrained). The canonical record keeps it as ``weights``: a list of floats, one per
assistant turn (one for text), or empty when the record gives none (every weight 1).

Chat records also take per-token weights as character spans of an assistant reply:
``weight_spans``, a list of ``{"begin_offset", "end_offset", "weight"}`` (``[begin, end)``
character offsets into the reply's content, non-overlapping, weight >= 0) on an assistant
turn of ``messages`` / ``sharegpt`` records, or at the top level of an ``alpaca`` record
(spans of ``output``). The canonical record keeps them as ``weight_spans``: a list of
``{"turn", "begin", "end", "weight"}`` (``turn``: the assistant turn's index), empty when
the record gives none.

Besides JSON, records (the same fields, one per row) come from Parquet files
(``.parquet``), Arrow files (``.arrow``) and Hugging Face ``datasets`` folders written
by ``save_to_disk`` (a ``Dataset`` folder: its arrow files in order; a ``DatasetDict``
folder: its ``train`` split), read locally with pyarrow.

Problems (malformed JSON, non-UTF-8 bytes, unknown roles, no assistant turn,
missing fields, empty records) go to a :class:`Problems` counter that either
raises at the first one (``on_error="stop"``) or counts and logs them
(``"skip"``), always with file and line.
"""

import collections
import glob
import json
import logging
import math
import pathlib

from cadenza.errors import CadenzaError
from cadenza.remote import as_path

log = logging.getLogger("cadenza.data")

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
FIXES = {
    "malformed_json": "repair the JSON on that line (one object per line for .jsonl)",
    "not_utf8": "re-encode the file as UTF-8",
    "unknown_role": f"use roles {ROLES} (ShareGPT: {sorted(SHAREGPT_ROLES)})",
    "no_assistant_turn": "give every conversation at least one assistant turn",
    "missing_field": "add the field the format requires",
    "empty": "remove empty records",
    "token_out_of_vocab": "use the tokenizer that matches the model (or a larger model vocab)",
    "extra_bos": "remove BOS token strings from the text",
    "too_long": "raise train.seq_len or set data.truncation=truncate",
    "no_trained_tokens": "raise train.seq_len (the reply was cut off) or drop the record",
    "malformed_source": "exclude the module (data.stdlib_modules)",
    "template_error": "make the conversation match what the chat template accepts",
    "unreadable_table": "rewrite the file (pandas.DataFrame.to_parquet, Dataset.save_to_disk)",
    "identical_pair": "give a rejected response that differs from the chosen one",
    "bad_weights": "give 'weights' as one number >= 0, or a list of numbers >= 0 with one "
                   "per assistant turn; 'weight_spans' as non-overlapping {begin_offset, "
                   "end_offset, weight} spans inside an assistant reply (neither in "
                   "preference or text records)",
}
TABLE_SUFFIXES = (".parquet", ".arrow")


class Problems:
    """Counts bad records by reason; ``stop`` raises at the first one.

    ``report(reason, where, detail)`` raises :class:`CadenzaError` under the stop
    policy, else counts it, keeps the first ``keep`` of each reason as examples and
    logs one warning per reason (the counts are reported at the end).
    """

    def __init__(self, on_error: str = "skip", keep: int = 3):
        self.on_error = on_error
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self._keep = keep

    def report(self, reason: str, where: str, detail: str) -> None:
        if self.on_error == "stop":
            raise CadenzaError(f"{reason}: {detail}", where=where,
                               fix=FIXES.get(reason, "fix the record") +
                               " (or set on_error=skip to skip and count such records)")
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if not seen:
            log.warning("skipped record (%s) at %s: %s (further ones are counted, not shown)",
                        reason, where, detail)
        if len(seen) < self._keep:
            seen.append(f"{where}: {detail}")

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())


def hf_dataset_files(directory: pathlib.Path) -> list[pathlib.Path] | None:
    """The arrow files of a ``datasets`` ``save_to_disk`` folder in order (a DatasetDict:
    its ``train`` split), or None when ``directory`` is not one.

    Raises:
      CadenzaError: a DatasetDict without a ``train`` split, or a listed file missing.
    """
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise CadenzaError(f"this datasets folder has no train split (splits: {splits})",
                               where=str(directory),
                               fix=f"point the path at one split's folder, e.g. "
                                   f"{directory / splits[0]}" if splits else "save a split")
        return hf_dataset_files(directory / "train")
    if not (directory / "state.json").is_file():
        return None
    state = json.loads((directory / "state.json").read_text())
    files = [directory / f["filename"] for f in state.get("_data_files", [])]
    missing = [f.name for f in files if not f.is_file()]
    if missing or not files:
        raise CadenzaError(f"datasets folder lists missing arrow files {missing[:3]}",
                           where=str(directory), fix="save the dataset again (save_to_disk)")
    return files


def _url_glob(pattern: str) -> list:
    """Files matching a glob in a URL: the part before the first wildcard is the root."""
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if first is None:
        return []
    root = as_path("/".join(parts[:first]))
    return [q for q in root.glob("/".join(parts[first:])) if q.is_file()] \
        if root.is_dir() else []


def _url_files(directory):
    """Every file below the URL path ``directory``, listed folder by folder."""
    for q in directory.iterdir():
        yield from _url_files(q) if q.is_dir() else [q]


def expand_paths(pattern: str) -> list[pathlib.Path]:
    """The files named by ``pattern`` (a path, a directory or a glob; local or a URL, see
    :func:`as_path`), sorted; for a ``datasets`` folder its arrow files
    (:func:`hf_dataset_files`)."""
    p = as_path(pattern)
    if p.is_dir() and (listed := hf_dataset_files(p)) is not None:
        files = listed
    elif p.is_dir() and isinstance(p, pathlib.Path):
        files = sorted(q for q in p.rglob("*") if q.is_file())
    elif p.is_dir():  # a URL (its file systems refuse recursive globs)
        files = sorted(_url_files(p), key=str)
    elif p.is_file():
        files = [p]
    elif "://" in str(pattern):
        files = sorted(_url_glob(str(pattern)), key=str)
    else:
        files = sorted(pathlib.Path(q) for q in glob.glob(str(p), recursive=True))
    if not files:
        raise CadenzaError("no input files found", where=pattern,
                           fix="give an existing file, directory or glob")
    return files


def _json_objects(path: pathlib.Path, problems: Problems, counts: collections.Counter):
    """Yield ``(line, object)`` from a JSON array file or a JSONL file; ``counts["read"]``
    counts every non-blank line (or array item; a broken array counts once). A ``.jsonl``
    file is always one record per line (a line holding an array is one bad record);
    other files starting with ``[`` are one JSON array."""
    data = path.read_bytes()
    if path.suffix != ".jsonl" and data.lstrip()[:1] == b"[":  # one JSON array
        counts["read"] += 1
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            problems.report("not_utf8", f"{path}:{line}", f"invalid UTF-8 byte at offset {e.start}")
            return
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            problems.report("malformed_json", f"{path}:{e.lineno}", e.msg)
            return
        counts["read"] += len(items) - 1
        yield from zip(_array_item_lines(text, len(items)), items)
        return
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        counts["read"] += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.report("not_utf8", f"{path}:{i}", f"invalid UTF-8 byte at column {e.start}")
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            problems.report("malformed_json", f"{path}:{i}", f"{e.msg} (column {e.colno})")


def _array_item_lines(text: str, n: int) -> list[int]:
    """Line numbers where each of the ``n`` items of a top-level JSON array starts."""
    decoder = json.JSONDecoder()
    lines, pos = [], text.index("[") + 1
    for _ in range(n):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def _string_field(obj, key, where, problems, required=True):
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problems.report("missing_field", where, f"field {key!r} must be a string")
        return None
    return value


def _alpaca(obj, where, problems):
    instruction = _string_field(obj, "instruction", where, problems)
    output = None if instruction is None else _string_field(obj, "output", where, problems)
    extra = None if output is None else _string_field(obj, "input", where, problems, False)
    system = None if extra is None else _string_field(obj, "system", where, problems, False)
    if system is None:
        return None
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _turns(obj, key, role_key, content_key, role_map, where, problems):
    turns = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(turns, list):
        problems.report("missing_field", where, f"field {key!r} must be a list of turns")
        return None
    messages = []
    for t in turns:
        role = t.get(role_key) if isinstance(t, dict) else None
        content = t.get(content_key) if isinstance(t, dict) else None
        if role not in role_map:
            problems.report("unknown_role", where, f"unknown role {role!r}")
            return None
        if not isinstance(content, str):
            problems.report("missing_field", where, f"turn field {content_key!r} must be a string")
            return None
        messages.append({"role": role_map[role], "content": content})
    return messages


def _sharegpt(obj, where, problems):
    return _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES, where, problems)


def _messages(obj, where, problems):
    return _turns(obj, "messages", "role", "content", {r: r for r in ROLES}, where, problems)


CHAT_PARSERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}


def _table_rows(path: pathlib.Path, problems: Problems, counts: collections.Counter):
    """Yield ``(row number, row dict)`` from a Parquet file or an Arrow (IPC stream or
    file) table; ``counts["read"]`` counts rows (an unreadable file counts once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            batches = pq.ParquetFile(path.open("rb")).iter_batches()
        else:
            with path.open("rb") as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:  # the random-access file format
                    table = pa.ipc.open_file(source).read_all()
            batches = table.to_batches()
        row = 0
        for batch in batches:
            for obj in batch.to_pylist():
                row += 1
                counts["read"] += 1
                yield row, obj
    except (pa.ArrowException, OSError) as e:
        counts["read"] += 1
        problems.report("unreadable_table", f"{path}", str(e).splitlines()[0])
def _response(obj, key, where, problems):
    """``chosen`` / ``rejected`` of a preference record as a list of turns, or None."""
    value = obj.get(key)
    if isinstance(value, str):
        turns = [{"role": "assistant", "content": value}]
    elif isinstance(value, list):
        turns = _turns(obj, key, "role", "content", {r: r for r in ROLES}, where, problems)
        if turns is None:
            return None
    else:
        problems.report("missing_field", where,
                        f"field {key!r} must be a string or a list of turns")
        return None
    if not any(t["role"] == "assistant" for t in turns):
        problems.report("no_assistant_turn", where, f"{key!r} has no assistant turn")
        return None
    if not any(t["content"].strip() for t in turns if t["role"] == "assistant"):
        problems.report("empty", where, f"{key!r} is empty")
        return None
    return turns


def _preference(obj, where, problems):
    """A preference record's ``(prompt turns, chosen turns, rejected turns)``, or None."""
    if not isinstance(obj, dict):
        problems.report("missing_field", where, "a preference record must be a JSON object")
        return None
    if "messages" in obj:
        prompt = _messages(obj, where, problems)
    else:
        text = _string_field(obj, "prompt", where, problems)
        prompt = None if text is None else [{"role": "user", "content": text}]
    system = None if prompt is None else _string_field(obj, "system", where, problems, False)
    if system is None:
        return None
    prompt = ([{"role": "system", "content": system}] if system else []) + prompt
    chosen = _response(obj, "chosen", where, problems)
    rejected = None if chosen is None else _response(obj, "rejected", where, problems)
    if rejected is None:
        return None
    if chosen == rejected:
        problems.report("identical_pair", where, "chosen and rejected are the same")
        return None
    return prompt, chosen, rejected


def _weights(obj, turns: int, where, problems):
    """The record's ``weights`` as one float per assistant turn (``turns``; 1 for text),
    ``[]`` when absent, or None (reported) when malformed."""
    value = obj.get("weights") if isinstance(obj, dict) else None
    if value is None:
        return []
    values = [value] * turns if isinstance(value, (int, float)) else value
    ok = (isinstance(values, list) and len(values) == turns
          and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                  and math.isfinite(w) and w >= 0 for w in values))
    if not ok:
        problems.report("bad_weights", where, f"'weights' {value!r} is not a number >= 0 or a "
                                              f"list of {turns} such numbers (one per "
                                              "assistant turn)")
        return None
    return [float(w) for w in values]


def _weight_spans(obj, format: str, messages, where, problems):
    """The record's ``weight_spans`` (module docstring) as canonical
    ``{"turn", "begin", "end", "weight"}`` dicts, ``[]`` when absent, or None (reported)
    when malformed: not a list of spans, a span outside its reply or overlapping another,
    a weight not a number >= 0, or spans on a turn that is not an assistant reply."""
    if format == "alpaca":   # top-level spans of the output, the one assistant turn
        raw = [{"weight_spans": obj.get("weight_spans")}] if "weight_spans" in obj else []
        indexed = [(len(messages) - 1, t) for t in raw]
    else:
        key = "conversations" if format == "sharegpt" else "messages"
        indexed = [(i, t) for i, t in enumerate(obj[key]) if "weight_spans" in t]
    out = []
    for i, turn in indexed:
        spans, content = turn["weight_spans"], messages[i]["content"]
        if messages[i]["role"] != "assistant":
            problems.report("bad_weights", where, f"'weight_spans' on turn {i}, a "
                                                  f"{messages[i]['role']} turn (only assistant "
                                                  "replies are trained)")
            return None
        k = sum(m["role"] == "assistant" for m in messages[:i])
        parsed = [_span(x, len(content)) for x in spans] if isinstance(spans, list) else [None]
        ends = sorted((p[0], p[1]) for p in parsed if p is not None)
        if None in parsed or any(b < e0 for (_, e0), (b, _) in zip(ends, ends[1:])):
            problems.report("bad_weights", where, f"'weight_spans' {spans!r} of turn {i} is not "
                                                  "a list of non-overlapping {begin_offset, "
                                                  "end_offset, weight} spans with 0 <= begin < "
                                                  f"end <= {len(content)} (the reply's length) "
                                                  "and weight >= 0")
            return None
        out += [{"turn": k, "begin": b, "end": e, "weight": w} for b, e, w in parsed]
    return out


def _span(value, length: int):
    """``(begin, end, weight)`` of one span dict within a reply of ``length`` characters,
    or None when malformed."""
    if not isinstance(value, dict) or set(value) != {"begin_offset", "end_offset", "weight"}:
        return None
    b, e, w = value["begin_offset"], value["end_offset"], value["weight"]
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (b, e))
    number = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
    if not (ints and number and 0 <= b < e <= length and w >= 0):
        return None
    return b, e, float(w)


def _has_spans(obj) -> bool:
    """Whether a preference or text record carries ``weight_spans`` anywhere."""
    if not isinstance(obj, dict):
        return False
    return "weight_spans" in obj or any(
        isinstance(t, dict) and "weight_spans" in t
        for key in ("prompt", "messages", "chosen", "rejected") if isinstance(obj.get(key), list)
        for t in obj[key])


def read_records(format: str, files, problems: Problems, counts: collections.Counter):
    """Yield canonical records from ``files`` in ``format`` (see the module docstring).

    ``counts["read"]`` counts every record seen (good or bad); bad ones go to ``problems``.
    """
    for path in files:
        path = as_path(path)
        if format == "text" and path.suffix not in (".jsonl", *TABLE_SUFFIXES):
            counts["read"] += 1
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                problems.report("not_utf8", f"{path}:1", f"invalid UTF-8 byte at offset {e.start}")
                continue
            if not text.strip():
                problems.report("empty", f"{path}:1", "empty document")
                continue
            yield {"messages": [], "text": text, "source": f"{path}:1"}
            continue
        rows = _table_rows(path, problems, counts) if path.suffix in TABLE_SUFFIXES \
            else _json_objects(path, problems, counts)
        for line, obj in rows:
            where = f"{path}:{line}"
            if format in ("text", "preference") and _has_spans(obj):
                problems.report("bad_weights", where, f"{format} records take no weight_spans")
                continue
            if format == "text":
                text = _string_field(obj, "text", where, problems)
                if text is not None and not text.strip():
                    problems.report("empty", where, "empty text")
                elif text is not None and (weights := _weights(obj, 1, where, problems)) \
                        is not None:
                    yield {"messages": [], "text": text, "source": where, "weights": weights}
                continue
            if format == "preference":
                if isinstance(obj, dict) and "weights" in obj:
                    problems.report("bad_weights", where, "preference records take no weights")
                    continue
                pair = _preference(obj, where, problems)
                if pair is not None:
                    yield {"messages": pair[0], "text": "", "source": where,
                           "chosen": pair[1], "rejected": pair[2]}
                continue
            messages = CHAT_PARSERS[format](obj, where, problems)
            if messages is None:
                continue
            replies = sum(m["role"] == "assistant" for m in messages)
            if not replies:
                problems.report("no_assistant_turn", where, "conversation has no assistant turn")
                continue
            weights = _weights(obj, replies, where, problems)
            spans = None if weights is None else _weight_spans(obj, format, messages, where,
                                                               problems)
            if spans is not None:   # no spans: no key (the split hash of the record stays)
                yield {"messages": messages, "text": "", "source": where, "weights": weights,
                       **({"weight_spans": spans} if spans else {})}
