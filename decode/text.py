"""Host-side text of generated tokens: decoding in context and stop-string matching.

Stop strings are matched on decoded *text*, not on token ids, so a stop
string is found however the tokenizer split it (``"\\n\\n"`` as one token or
two, a word glued to a leading space). The generated text of a row is
decoded in the context of its prompt, ``decode(prompt + generated)`` minus
``decode(prompt)``, so tokenizers that drop a leading space at the start of
a decode (SentencePiece) give the same text as in a full transcript.
Matching looks only at the generated text, never at the prompt.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class StopMatch:
    """Where a stop string ends a row: keep ``num_tokens`` tokens and ``text`` (stop excluded)."""

    num_tokens: int
    text: str
    stop: str


class RowText:
    """The generated text of one row, decoded in the context of its prompt.

    ``tokenizer`` needs ``decode(ids) -> str``.
    """

    def __init__(self, tokenizer, prompt_ids):
        self._tok = tokenizer
        self._prompt = list(prompt_ids)
        self._prefix = tokenizer.decode(self._prompt)

    def text(self, generated_ids) -> str:
        """Text of ``generated_ids`` as it reads after the prompt."""
        ids = list(generated_ids)
        if not ids:
            return ""
        full = self._tok.decode(self._prompt + ids)
        if full.startswith(self._prefix):
            return full[len(self._prefix):]
        return self._tok.decode(ids)

    def find_stop(self, generated_ids, stops) -> StopMatch | None:
        """The earliest occurrence of any of ``stops`` in the text, or None.

        ``num_tokens`` is the fewest leading tokens whose text already
        contains that occurrence; ``text`` is cut just before it.
        """
        if not stops:
            return None
        text = self.text(generated_ids)
        hits = [(text.find(s), -len(s), s) for s in stops if s in text]
        if not hits:
            return None
        start, _, stop = min(hits)
        end = start + len(stop)
        lo, hi = 1, len(generated_ids)     # smallest n with the occurrence inside text(ids[:n])
        while lo < hi:
            mid = (lo + hi) // 2
            t = self.text(generated_ids[:mid])
            if len(t) >= end and t[start:end] == stop:
                hi = mid
            else:
                lo = mid + 1
        return StopMatch(num_tokens=lo, text=text[:start], stop=stop)


def stable_prefix_length(text: str, stops, finished: bool) -> int:
    """How much of a row's current text can be shown and will not change.

    While the row is running, hold back the last ``max(len(stop)) - 1``
    characters (they may begin a stop string) and a trailing U+FFFD (an
    incomplete multi-byte character).
    """
    if finished:
        return len(text)
    n = len(text) - max((len(s) - 1 for s in stops), default=0)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    return max(n, 0)
