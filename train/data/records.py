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

Problems (malformed JSON, non-UTF-8 bytes, unknown roles, no assistant turn,
missing fields, empty records) go to a :class:`Problems` counter that either
raises at the first one (``on_error="stop"``) or counts and logs them
(``"skip"``), always with file and line.
"""

import collections
import glob
import json
import logging
import pathlib

from cadenza.errors import CadenzaError

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
    "identical_pair": "give a rejected response that differs from the chosen one",
}


class Problems:
    """Counts bad records by reason; ``stop`` raises at the first one.

    ``report(reason, where, detail)`` raises :class:`CadenzaError` under the stop
    policy, else counts it and logs the first few of each reason.
    """

    def __init__(self, on_error: str = "skip", log_first: int = 3):
        self.on_error = on_error
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self._log_first = log_first

    def report(self, reason: str, where: str, detail: str) -> None:
        if self.on_error == "stop":
            raise CadenzaError(f"{reason}: {detail}", where=where,
                               fix=FIXES.get(reason, "fix the record") +
                               " (or set on_error=skip to skip and count such records)")
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self._log_first:
            seen.append(f"{where}: {detail}")
            log.warning("skipped record (%s) at %s: %s", reason, where, detail)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())


def expand_paths(pattern: str) -> list[pathlib.Path]:
    """The files named by ``pattern`` (a path, a directory or a glob), sorted."""
    p = pathlib.Path(pattern).expanduser()
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
    elif p.is_file():
        files = [p]
    else:
        files = sorted(pathlib.Path(q) for q in glob.glob(str(p), recursive=True))
    if not files:
        raise CadenzaError("no input files found", where=pattern,
                           fix="give an existing file, directory or glob")
    return files


def _json_objects(path: pathlib.Path, problems: Problems, counts: collections.Counter):
    """Yield ``(line, object)`` from a JSON array file or a JSONL file; ``counts["read"]``
    counts every non-blank line (or array item; a broken array counts once)."""
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":  # one JSON array
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


def read_records(format: str, files, problems: Problems, counts: collections.Counter):
    """Yield canonical records from ``files`` in ``format`` (see the module docstring).

    ``counts["read"]`` counts every record seen (good or bad); bad ones go to ``problems``.
    """
    for path in files:
        path = pathlib.Path(path)
        if format == "text" and path.suffix != ".jsonl":
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
        for line, obj in _json_objects(path, problems, counts):
            where = f"{path}:{line}"
            if format == "text":
                text = _string_field(obj, "text", where, problems)
                if text is not None and not text.strip():
                    problems.report("empty", where, "empty text")
                elif text is not None:
                    yield {"messages": [], "text": text, "source": where}
                continue
            if format == "preference":
                pair = _preference(obj, where, problems)
                if pair is not None:
                    yield {"messages": pair[0], "text": "", "source": where,
                           "chosen": pair[1], "rejected": pair[2]}
                continue
            messages = CHAT_PARSERS[format](obj, where, problems)
            if messages is None:
                continue
            if not any(m["role"] == "assistant" for m in messages):
                problems.report("no_assistant_turn", where, "conversation has no assistant turn")
                continue
            yield {"messages": messages, "text": "", "source": where}
