"""Turning canonical records into token sequences with loss masks.

Chat records are rendered with the tokenizer's chat template; assistant
character spans (every assistant turn including its end-of-turn token, see
:mod:`cadenza.models.chat_template`) become the loss mask: a token counts when
its character span overlaps an assistant span. The whole rendering is
tokenized at once (as transformers does), with exactly one BOS (added only if
the template does not write it). Text records get one BOS, the text and an EOS,
all trained.

A record's ``weights`` (one per assistant turn, or one for a text record) scale its
trained tokens: ``loss_mask`` holds each token's weight (1 when the record gives none,
0 for untrained tokens), so the masked-mean loss is the weighted mean and a weight of 0
is exactly a masked token. ``weight_spans`` (character spans of an assistant turn's
content with their own weight) refine that per token: every character of a turn's span
has the span's weight where one covers it, else the turn's weight, and a trained token's
weight is the mean over its characters inside the turn (a token wholly inside one span
gets that span's weight exactly; one straddling a span edge the character-weighted mean).

An example of ``n`` tokens becomes ``inputs = tokens[:-1]``, ``targets =
tokens[1:]``, ``loss_mask = mask[1:]`` (``n - 1`` positions). Longer than
``seq_len`` positions: ``truncate`` keeps the first ``seq_len``; ``drop``
skips the example (reason ``too_long``); ``chunk`` keeps a text example whole
and the pipeline cuts it into consecutive pieces of ``seq_len`` positions
(:func:`split_into_pieces`: BOS only in the first piece, EOS only in the last,
every token a target exactly once). Chat examples are never chunked (a reply
would lose its prompt): under ``chunk`` a long one is dropped (``too_long``).
Counted in every case.

A preference record (``chosen`` / ``rejected`` turn lists after the prompt in
``messages``) becomes one *pair* example: the prompt + chosen sequence followed by the
prompt + rejected sequence (each with its own BOS), only the chosen / rejected
assistant turns trained (earlier assistant turns of the prompt are context).
``pair_side`` (int32: 1 chosen, 2 rejected) and ``pair_positions`` (restarting at 0 in
each side) say which positions belong to which side; the pipeline turns them into
segment ids ``2k - 1`` (chosen) and ``2k`` (rejected) for the k-th pair of a row, so
the two sides never attend to each other. A pair always fits one row: longer than
``seq_len`` positions together, ``truncate`` cuts the longer response(s) (each side
keeps at least half the row when it needs it, see :func:`pair_budget`), ``drop`` and
``chunk`` skip it (``too_long``).
"""

import collections

import numpy as np

from cadenza.errors import CadenzaError
from cadenza.models.chat_template import ChatTemplate


def decode_record(raw) -> dict:
    """A record from a TFDS data source (bytes) as Python strings."""
    def s(x):
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)

    def turns(m):
        m = m or {"role": [], "content": []}
        return [{"role": s(r), "content": s(c)}
                for r, c in zip(list(m.get("role", [])), list(m.get("content", [])))]

    record = {"messages": turns(raw.get("messages")), "text": s(raw.get("text", b"")),
              "source": s(raw.get("source", b"?"))}
    if "chosen" in raw:
        record["chosen"], record["rejected"] = turns(raw["chosen"]), turns(raw["rejected"])
    if "weights" in raw:
        record["weights"] = [float(w) for w in raw["weights"]]
    if "weight_spans" in raw:
        spans = raw["weight_spans"]
        if isinstance(spans, dict):   # a TFDS sequence of dicts: one array per field
            spans = [dict(zip(spans, values)) for values in zip(*spans.values())]
        record["weight_spans"] = [{"turn": int(x["turn"]), "begin": int(x["begin"]),
                                   "end": int(x["end"]), "weight": float(x["weight"])}
                                  for x in spans]
    return record


PAIR_KEYS = ("pair_side", "pair_positions")


def pair_budget(chosen: int, rejected: int, seq_len: int) -> tuple[int, int]:
    """Positions kept of a pair's chosen and rejected sequences so that they fill at most
    ``seq_len`` positions together: a side shorter than half the row stays whole and the
    other gets the rest; otherwise each keeps half (the chosen side the odd one)."""
    half = seq_len // 2
    if chosen + rejected <= seq_len:
        return chosen, rejected
    if chosen <= seq_len - half:
        return chosen, seq_len - chosen
    if rejected <= half:
        return seq_len - rejected, rejected
    return seq_len - half, half


def split_into_pieces(example: dict, seq_len: int) -> list[dict]:
    """``example`` (``inputs``/``targets``/``loss_mask`` arrays of ``n`` positions) as
    ``ceil(n / seq_len)`` consecutive pieces of ``seq_len`` positions (the last one
    shorter unless ``seq_len`` divides ``n``).

    Piece ``k`` holds positions ``[k * seq_len, (k + 1) * seq_len)``: concatenating
    the pieces' arrays gives the example's arrays back, so the document's first token
    (BOS) is an input of the first piece only and its last (EOS) a target of the last
    piece only. Deterministic; the pieces are views of the example's arrays.
    """
    n = len(example["inputs"])
    return [{k: v[start:start + seq_len] for k, v in example.items()}
            for start in range(0, n, seq_len)]


class Formatter:
    """Record -> ``{"inputs", "targets", "loss_mask"}`` numpy arrays, or None if skipped.

    At most ``seq_len`` positions, except under ``truncation="chunk"``: a text
    example longer than that comes whole, for :func:`split_into_pieces`.

    Args:
      tokenizer: a :class:`cadenza.models.tokenizer.Tokenizer`.
      seq_len: positions per example (the row length).
      vocab_size: the model's vocabulary; ids at or beyond it are an error.
      truncation: "truncate", "drop" or "chunk".
      problems: a :class:`cadenza.train.data.records.Problems` (skip/stop policy).
      end_of_turn: strings ending assistant turns (default: the template's default).
      pass_length: records in one pass over the data; if that many records in a row
        are all skipped, raise (a repeating iterator would otherwise spin forever).
      name: the dataset's name for that error.
    """

    def __init__(self, tokenizer, seq_len: int, vocab_size: int, truncation: str, problems,
                 end_of_turn=None, pass_length=None, name="dataset"):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.truncation = truncation
        self.problems = problems
        self.end_of_turn = end_of_turn
        self.pass_length = pass_length
        self.name = name
        self._failed_in_a_row = 0
        self._template = None
        self.counts: collections.Counter = collections.Counter()

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate.from_tokenizer(self.tokenizer, self.end_of_turn)
        return self._template

    def tokens_and_mask(self, record: dict) -> tuple[list[int], list[bool]]:
        """All tokens of ``record`` and which of them are trained (no truncation)."""
        tok = self.tokenizer
        if not record["messages"]:
            ids = tok.encode(record["text"], add_bos=True)
            if tok.eos_id is not None:
                ids = ids + [tok.eos_id]
            return ids, [True] * len(ids)
        return self._chat_tokens(record["messages"])

    def side_tokens_and_mask(self, record: dict, side: str) -> tuple[list[int], list[bool]]:
        """Tokens of a preference record's prompt followed by its ``side`` ("chosen" or
        "rejected") turns, and which are trained (the side's assistant turns only)."""
        skip = sum(m["role"] == "assistant" for m in record["messages"])
        return self._chat_tokens(record["messages"] + record[side], skip)

    def tokens_and_weights(self, record: dict) -> tuple[list[int], list[float]]:
        """All tokens of ``record`` and each one's loss weight: 0 for untrained tokens, else
        the record's ``weights`` entry of the assistant turn it belongs to (text: its one
        entry), 1 when the record gives no weights, refined by its ``weight_spans``
        (module docstring).

        Raises:
          CadenzaError: the template cannot render the record, or (where
            ``weight_spans``) does not keep a weighted reply's text verbatim.
        """
        weights = record.get("weights") or []
        if not record["messages"]:
            ids, mask = self.tokens_and_mask(record)
            w = weights[0] if weights else 1.0
            return ids, [w if m else 0.0 for m in mask]
        text, spans, ids, offsets, turns = self._chat_tokens_and_turns(record["messages"])
        out = [0.0 if t < 0 else weights[t] if weights else 1.0 for t in turns]
        if not record.get("weight_spans"):
            return ids, out
        chars = self._character_weights(record, text, spans, weights)
        for i, (t, (a, b)) in enumerate(zip(turns, offsets)):
            lo, hi = (max(a, spans[t][0]), min(b, spans[t][1])) if t >= 0 else (0, 0)
            if hi > lo:
                w = chars[lo:hi]
                out[i] = float(w[0]) if np.all(w == w[0]) else float(w.mean())
        return ids, out

    def _character_weights(self, record, text, spans, weights) -> np.ndarray:
        """float64 [len(text)]: each assistant-turn character's weight (its weight span's,
        else its turn's); 0 elsewhere.

        Raises:
          CadenzaError (where ``weight_spans``): the template does not write a turn's
            content verbatim, so its spans cannot be placed.
        """
        chars = np.zeros(len(text))
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        starts = []
        for k, (s, e) in enumerate(spans):
            chars[s:e] = weights[k] if weights else 1.0
            starts.append(text.find(replies[k], s, e))
        for span in record["weight_spans"]:
            start = starts[span["turn"]]
            if start < 0:
                raise CadenzaError(f"the chat template does not write assistant turn "
                                   f"{span['turn']}'s content verbatim, so its weight spans "
                                   "cannot be placed", where="weight_spans",
                                   fix="give per-turn 'weights' instead, or use a template "
                                       "that keeps the reply text as is")
            chars[start + span["begin"]:start + span["end"]] = span["weight"]
        return chars

    def _chat_tokens_and_turns(self, messages, skip_turns: int = 0):
        """``(text, spans, ids, offsets, turns)``: the rendered ``messages``, its assistant
        turns' character spans (after the first ``skip_turns``), its tokens with their
        character offsets and, per token, the index of the assistant turn its characters
        overlap, or -1."""
        text, spans = self.template.render_with_spans(messages)
        spans = spans[skip_turns:]
        ids, offsets = self.tokenizer.encode_with_offsets(text, add_bos=True)
        turns = [next((k for k, (s, e) in enumerate(spans) if a < e and b > s), -1)
                 for a, b in offsets]
        return text, spans, ids, offsets, turns

    def _chat_tokens(self, messages, skip_turns: int = 0):
        _, _, ids, _, turns = self._chat_tokens_and_turns(messages, skip_turns)
        return ids, [t >= 0 for t in turns]

    def _valid_ids(self, ids, where) -> bool:
        """False (reported) for a second BOS or ids outside the model vocab."""
        bos = self.tokenizer.bos_id
        if bos is not None and ids.count(bos) > 1:
            self.problems.report("extra_bos", where,
                                 f"{ids.count(bos)} BOS tokens (text contains the BOS string)")
            return False
        bad = [i for i in ids if i >= self.vocab_size or i < 0]
        if bad:
            self.problems.report("token_out_of_vocab", where,
                                 f"token id {bad[0]} is outside the model vocab "
                                 f"(size {self.vocab_size})")
            return False
        return True

    def __call__(self, raw):
        out = self._format(raw)
        self._failed_in_a_row = 0 if out is not None else self._failed_in_a_row + 1
        if self.pass_length and self._failed_in_a_row >= self.pass_length:
            raise CadenzaError(
                f"no usable example in {self._failed_in_a_row} records (a full pass); skipped "
                f"by reason: {dict(self.problems.counts)}", where=self.name,
                fix="check the skipped reasons (data inspect) and the tokenizer / model vocab")
        return out

    def _format(self, raw):
        record = decode_record(raw) if not isinstance(raw.get("source"), str) else raw
        where = record["source"]
        self.counts["examples"] += 1
        if "chosen" in record:
            return self._format_pair(record, where)
        try:
            ids, mask = self.tokens_and_weights(record)
        except CadenzaError as e:
            reason = "bad_weights" if e.where == "weight_spans" else "template_error"
            self.problems.report(reason, where, e.what)
            return None
        if not self._valid_ids(ids, where):
            return None
        positions = len(ids) - 1
        chunk = self.truncation == "chunk" and not record["messages"]
        if positions > self.seq_len and not chunk:
            if self.truncation != "truncate":
                kind = "chat record (chat is never chunked)" if record["messages"] else "record"
                self.problems.report("too_long", where, f"{kind} of {positions} positions > "
                                                        f"seq_len {self.seq_len}")
                return None
            self.counts["truncated"] += 1
            self.counts["truncated_tokens"] += len(ids) - 1 - self.seq_len
            ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
        if not any(mask[1:]):
            self.problems.report("no_trained_tokens", where,
                                 "no token left to train on (after truncation)")
            return None
        if chunk:
            pieces = -(-positions // self.seq_len)
            self.counts["pieces"] += pieces
            self.counts["chunked"] += int(pieces > 1)
        self.counts["kept"] += 1
        self.counts["tokens"] += len(ids) - 1
        self.counts["trained_tokens"] += sum(m > 0 for m in mask[1:])
        if any(w != 1.0 for w in record.get("weights") or []) or record.get("weight_spans"):
            self.counts["weighted_records"] += 1
        arr = np.asarray(ids, np.int32)
        return {"inputs": arr[:-1], "targets": arr[1:],
                "loss_mask": np.asarray(mask[1:], np.float32)}

    def _format_pair(self, record, where):
        """A preference record as one pair example (module docstring), or None."""
        sides = []
        for side in ("chosen", "rejected"):
            try:
                ids, mask = self.side_tokens_and_mask(record, side)
            except CadenzaError as e:
                self.problems.report("template_error", where, f"{side}: {e.what}")
                return None
            if not self._valid_ids(ids, where):
                return None
            sides.append((ids, mask))
        lengths = [len(ids) - 1 for ids, _ in sides]
        if sum(lengths) > self.seq_len:
            if self.truncation != "truncate":
                self.problems.report("too_long", where, f"preference pair of {lengths[0]} + "
                                     f"{lengths[1]} positions > seq_len {self.seq_len}")
                return None
            kept = pair_budget(*lengths, self.seq_len)
            self.counts["truncated"] += 1
            self.counts["truncated_tokens"] += sum(lengths) - sum(kept)
            sides = [(ids[:k + 1], mask[:k + 1]) for (ids, mask), k in zip(sides, kept)]
            lengths = list(kept)
        for side, (_, mask) in zip(("chosen", "rejected"), sides):
            if not any(mask[1:]):
                self.problems.report("no_trained_tokens", where,
                                     f"the {side} response has no token left to train on "
                                     "(after truncation)")
                return None
        self.counts["kept"] += 1
        self.counts["tokens"] += sum(lengths)
        self.counts["trained_tokens"] += sum(int(sum(mask[1:])) for _, mask in sides)
        arrays = [np.asarray(ids, np.int32) for ids, _ in sides]
        return {"inputs": np.concatenate([a[:-1] for a in arrays]),
                "targets": np.concatenate([a[1:] for a in arrays]),
                "loss_mask": np.concatenate([np.asarray(m[1:], np.float32) for _, m in sides]),
                "pair_side": np.repeat(np.int32([1, 2]), lengths),
                "pair_positions": np.concatenate([np.arange(n, dtype=np.int32)
                                                  for n in lengths])}
