"""Tokenizers: Hugging Face ``tokenizer.json`` and SentencePiece ``.model`` files.

:func:`load_tokenizer` reads a tokenizer directory as written by
``save_pretrained`` (``tokenizer.json`` or ``tokenizer.model``, plus
``tokenizer_config.json`` / ``special_tokens_map.json`` for the special tokens
and the chat template). :func:`train_tokenizer` trains a byte-level BPE
tokenizer (the project's default, e.g. on the stdlib corpus) and writes such a
directory.

BOS policy: :meth:`Tokenizer.encode` never applies the tokenizer's own
post-processor; it adds one BOS in front when ``add_bos`` is true, the
tokenizer has a BOS token and the text does not already start with it (a chat
template that writes ``<bos>`` itself therefore gets exactly one). Special token
strings inside the text (``<|im_start|>``, ``<s>``) become their special ids,
as in transformers.
"""

import functools
import json
import pathlib
import re

from cadenza.errors import CadenzaError

# Special tokens of tokenizers trained by cadenza: ids 0, 1, 2 match the tiny preset's
# pad/bos/eos ids; the role tokens serve the default chat template below.
TRAINED_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")

# The chat template written by train_tokenizer: one BOS, a role token per turn, each turn
# ends with EOS (so EOS is trained at the end of every assistant turn).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                  "mask_token")


def _token_content(value):
    """A special token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class _HFBackend:
    def __init__(self, path: pathlib.Path):
        import tokenizers

        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exceptions on bad files
            raise CadenzaError(f"cannot read tokenizer: {e}", where=str(path),
                               fix="give a tokenizer.json written by the tokenizers library"
                               ) from None

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str):
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int):
        return self.tok.id_to_token(i)

    def special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids, skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class _SPBackend:
    def __init__(self, path: pathlib.Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # OSError or RuntimeError depending on the failure
            raise CadenzaError(f"cannot read SentencePiece model: {e}", where=str(path),
                               fix="give a .model file written by sentencepiece") from None
        self.special_re = None

    def split_on(self, specials) -> None:
        """Treat these strings (those in the vocabulary) and the model's user-defined
        symbols as special tokens inside text (transformers makes both added tokens)."""
        user = [p.piece for p in self._proto.pieces
                if p.type == p.Type.Value("USER_DEFINED")]
        known = [s for s in list(specials) + user if s and self.token_to_id(s) is not None]
        self.special_re = (re.compile("|".join(re.escape(s) for s in sorted(set(known), key=len,
                                                                            reverse=True)))
                           if known else None)

    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def token_to_id(self, token: str):
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    def id_to_token(self, i: int):
        return self.sp.IdToPiece(i) if 0 <= i < self.sp.GetPieceSize() else None

    def special_ids(self) -> set[int]:
        return {i for i in range(self.sp.GetPieceSize())
                if self.sp.IsControl(i) or self.sp.IsUnknown(i)}

    def _encode_plain(self, text: str, base: int, ids: list, offsets: list,
                      dummy_prefix: bool) -> None:
        """Append the pieces of ``text`` (no special tokens inside); without
        ``dummy_prefix`` the model's dummy-prefix "▁" is not added in front (text after
        a special token, as transformers encodes it)."""
        if not text:
            return
        sentinel = "" if dummy_prefix else self._sentinel
        proto = self.sp.Encode(sentinel + text, return_type="proto")
        skip = 0
        if sentinel:
            skip = len(self._sentinel_ids)
            if [p.id for p in proto.pieces[:skip]] != self._sentinel_ids or (
                    len(proto.pieces) > skip and proto.pieces[skip].begin < len(sentinel.encode())):
                proto, skip, sentinel = self.sp.Encode(text, return_type="proto"), 0, ""
        shift = len(sentinel.encode("utf-8"))
        # piece offsets are byte offsets into ``sentinel + text``; map them to characters
        char_of_byte = []
        for ci, ch in enumerate(text):
            char_of_byte.extend([ci] * len(ch.encode("utf-8")))
        char_of_byte.append(len(text))
        for p in proto.pieces[skip:]:
            ids.append(p.id)
            offsets.append((base + char_of_byte[max(p.begin - shift, 0)],
                            base + char_of_byte[p.end - shift]))

    @functools.cached_property
    def _proto(self):
        """The model's ModelProto (pieces with their types, normalizer options)."""
        from sentencepiece import sentencepiece_model_pb2

        return sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())

    @functools.cached_property
    def _sentinel(self) -> str:
        """A prefix whose pieces absorb the dummy prefix (transformers uses the unk piece
        the same way); empty when the model adds no dummy prefix."""
        adds = self._proto.normalizer_spec.add_dummy_prefix
        text = self.sp.IdToPiece(self.sp.unk_id()) if adds else ""
        self._sentinel_ids = list(self.sp.EncodeAsIds(text)) if text else []
        return text

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``text``. Special tokens (and user-defined
        symbols) in the text become their ids; the model's dummy prefix "▁" is added at
        the start of the text only (not after a special token, not before one), as
        transformers' tokenizers encode; otherwise the pieces are sentencepiece's (also
        for text that starts with a space, which keeps ``decode(encode(t)) == t``)."""
        ids, offsets, pos = [], [], 0
        if self.special_re is not None:
            for m in self.special_re.finditer(text):
                self._encode_plain(text[pos:m.start()], pos, ids, offsets, pos == 0)
                ids.append(self.sp.PieceToId(m.group()))
                offsets.append((m.start(), m.end()))
                pos = m.end()
        self._encode_plain(text[pos:], pos, ids, offsets, pos == 0)
        return ids, offsets

    def decode(self, ids, skip_special_tokens: bool) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.DecodeIds(ids)
        out, run = [], []
        for i in ids:
            if self.sp.IsControl(i):
                out.append(self._decode_run(run, first=not out) + self.sp.IdToPiece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self._decode_run(run, first=not out)

    def _decode_run(self, run: list[int], first: bool) -> str:
        """Text of ``run``; after a special token (not ``first``) a leading "▁" is a real
        space, not a dummy prefix to drop (see :meth:`encode`)."""
        if first or not run or not self._sentinel:
            return self.sp.DecodeIds(run)
        prefix = self.sp.DecodeIds(self._sentinel_ids)
        text = self.sp.DecodeIds(self._sentinel_ids + run)
        return text[len(prefix):] if text.startswith(prefix) else self.sp.DecodeIds(run)


class Tokenizer:
    """Text <-> token ids with the special tokens of a model.

    Attributes: ``vocab_size`` (including added tokens), ``bos_id``, ``eos_id``,
    ``pad_id`` (int or None), the token strings ``bos_token``/``eos_token``/
    ``pad_token``, ``special_tokens`` (name -> string, what chat templates see)
    ``chat_template`` (Jinja source or None) and ``directory`` (the folder it was
    loaded from: copy it next to a model).
    """

    def __init__(self, backend, special_tokens: dict[str, str], chat_template, source: str):
        self._backend = backend
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self.source = source
        self.directory = pathlib.Path(source).parent
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.pad_token = special_tokens.get("pad_token")
        self.bos_id = self._id_of(self.bos_token, "bos_token")
        self.eos_id = self._id_of(self.eos_token, "eos_token")
        self.pad_id = self._id_of(self.pad_token, "pad_token")
        self._special_ids = frozenset(backend.special_ids())

    def _id_of(self, token, name):
        if token is None:
            return None
        i = self._backend.token_to_id(token)
        if i is None:
            raise CadenzaError(f"{name} {token!r} is not in the vocabulary", where=self.source,
                               fix=f"fix {name} in tokenizer_config.json")
        return i

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    def token_to_id(self, token: str):
        """The id of ``token`` (a vocabulary entry), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int):
        """The vocabulary entry of id ``i``, or None."""
        return self._backend.id_to_token(int(i))

    def encode_with_offsets(self, text: str, *, add_bos: bool = True):
        """``(ids, offsets)``: token ids and each token's ``(start, end)`` character span.

        A BOS added by this method gets the empty span ``(0, 0)``.
        """
        ids, offsets = self._backend.encode(text)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
        return ids, offsets

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``: at most one leading BOS (see the module docstring)."""
        return self.encode_with_offsets(text, add_bos=add_bos)[0]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ``decode(encode(t)) == t`` for text without special tokens.

        With ``skip_special_tokens=False`` special tokens appear as their strings.
        """
        return self._backend.decode(ids, skip_special_tokens)

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is a special (control/added-special) token."""
        return int(i) in self._special_ids


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CadenzaError(f"invalid JSON: {e}", where=str(path),
                           fix="repair or delete the file") from None
    if not isinstance(data, dict):
        raise CadenzaError("expected a JSON object", where=str(path), fix="repair the file")
    return data


def load_tokenizer(directory) -> Tokenizer:
    """Load the tokenizer in ``directory`` (a ``save_pretrained``-style folder).

    Prefers ``tokenizer.json``; otherwise ``tokenizer.model`` (or the only
    ``*.model`` file) via SentencePiece. Special tokens come from
    ``tokenizer_config.json`` then ``special_tokens_map.json`` (the latter wins,
    as in transformers' legacy loading); for SentencePiece without either, from
    the model's own bos/eos/pad/unk ids.

    Raises:
      CadenzaError: no tokenizer file, unreadable files, special tokens not in the vocab.
    """
    d = pathlib.Path(directory)
    if not d.is_dir():
        raise CadenzaError("tokenizer directory not found", where=str(d),
                           fix="give the folder holding tokenizer.json or tokenizer.model")
    config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() \
        else {}
    specials = {n: _token_content(config.get(n)) for n in _SPECIAL_NAMES}
    if (d / "special_tokens_map.json").is_file():
        for n, v in _read_json(d / "special_tokens_map.json").items():
            if n in _SPECIAL_NAMES and _token_content(v) is not None:
                specials[n] = _token_content(v)
    template = config.get("chat_template")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: use "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    models = sorted(d.glob("*.model"))
    if (d / "tokenizer.json").is_file():
        backend = _HFBackend(d / "tokenizer.json")
        source = str(d / "tokenizer.json")
    elif models:
        path = d / "tokenizer.model" if (d / "tokenizer.model").is_file() else models[0]
        extra = [_token_content(t.get("content") if isinstance(t, dict) else t)
                 for t in config.get("added_tokens_decoder", {}).values()]
        backend = _SPBackend(path)
        sp = backend.sp
        for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                        ("pad_token", sp.pad_id()), ("unk_token", sp.unk_id())):
            if specials.get(name) is None and i >= 0 and name not in config:
                specials[name] = sp.IdToPiece(i)
        backend.split_on(list(specials.values()) + extra)
        source = str(path)
    else:
        raise CadenzaError("no tokenizer.json or *.model file", where=str(d),
                           fix="copy the tokenizer files of the model into this folder")
    return Tokenizer(backend, {k: v for k, v in specials.items() if v is not None}, template,
                     source)


def train_tokenizer(texts, vocab_size: int, out_dir, *, chat_template: str = DEFAULT_CHAT_TEMPLATE
                    ) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Ids 0..5 are ``TRAINED_SPECIAL_TOKENS`` (``<pad>``=0, ``<s>``=1, ``</s>``=2,
    then the role tokens); 256 byte tokens follow, then merges up to
    ``vocab_size`` (fewer if the texts offer fewer merges). Writes
    ``tokenizer.json``, ``tokenizer_config.json`` (with
    ``chat_template``) and ``special_tokens_map.json``; returns the loaded tokenizer.
    Deterministic for the same texts and size.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(TRAINED_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise CadenzaError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer",
                           where="train_tokenizer", fix=f"use vocab_size >= {minimum}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=list(TRAINED_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "chat_template": chat_template, "model_max_length": 1 << 30,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return load_tokenizer(out)
