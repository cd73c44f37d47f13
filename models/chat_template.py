"""Chat templates: render a tokenizer's Jinja ``chat_template`` like transformers does.

:class:`ChatTemplate` renders in a ``jinja2.sandbox.ImmutableSandboxedEnvironment``
with the settings and extras of transformers' ``apply_chat_template``
(``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``,
``strftime_now``, a non-escaping ``tojson``, an underscore-refusing
``namespace``, the ``{% generation %}`` tag) and passes the special tokens
(``bos_token``, ``eos_token``, ...) as variables, so ``render`` returns exactly
``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``.
A template's ``raise_exception`` becomes a :class:`CadenzaError`.

Which characters belong to assistant turns (for loss masks) is found by
*incremental rendering of prefixes*: for assistant message ``i``,
``prompt = render(messages[:i], add_generation_prompt=True)`` and
``turn = render(messages[:i + 1])``; the assistant span starts at
``len(prompt)`` and ends right after the last end-of-turn token (the EOS, or a
known marker such as ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``) in
``turn[len(prompt):]``. Text after that token (ChatML's trailing newline) is not
part of the span. This needs no cooperation from the template and sees the
content after every transformation the template applies (``| trim`` etc.); it
requires the template to be prefix-stable (each of these renders is a prefix
of the next and of the whole conversation), which is checked: a template that
rewrites earlier turns raises a clear error instead of producing a wrong mask.
"""

import contextlib
import datetime
import json
import signal
import threading
import time

from cadenza.errors import CadenzaError

# End-of-turn markers of common chat formats, besides the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                      "</s>")


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    import jinja2.utils

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
            return call.set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        """A ``namespace()`` that refuses underscore-prefixed attribute names."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates may not set underscore attributes ({name!r})")

    class DictFactory:
        """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    class LimitedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        """The sandbox plus limits: ``*``/``**`` may not build values above MAX_CHARS
        (characters, items or digits), and calls, ``range`` items and output chunks check
        the render's deadline (``self.deadline``, a ``time.monotonic()`` value)."""

        intercepted_binops = frozenset({"*", "**"})
        deadline = float("inf")

        def check_time(self):
            if time.monotonic() > self.deadline:
                raise _RenderLimit(f"rendering took longer than {MAX_SECONDS:g} s (a loop "
                                   "that does not end, or one far too large)")

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                        and len(seq) * n > MAX_CHARS:
                    raise _RenderLimit(f"'*' would build a value of {len(seq) * n} items (the "
                                       f"limit is {MAX_CHARS})")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right * max(abs(left).bit_length(), 1) > 4 * MAX_CHARS:
                raise _RenderLimit(f"'**' would build a number of about {right} * "
                                   f"{abs(left).bit_length()} bits")
            return super().call_binop(context, operator, left, right)

        def call(self, __context, __obj, *args, **kwargs):
            self.check_time()
            return super().call(__context, __obj, *args, **kwargs)

    env = LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    safe_range = env.globals["range"]

    def limited_range(*args):
        for i in safe_range(*args):
            env.check_time()
            yield i

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=DictFactory(), namespace=SafeNamespace, range=limited_range)
    return env


# Limits of one render: wall time (seconds) and size (characters of output; also items of
# a value built with '*'). Real chat templates render in milliseconds and kilobytes.
MAX_SECONDS = 10.0
MAX_CHARS = 1 << 24


class _RenderLimit(Exception):
    """A render went over MAX_SECONDS or MAX_CHARS."""


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise :class:`_RenderLimit` in the main thread after ``seconds`` (SIGALRM): the
    backstop for loops that call nothing the sandbox sees. Other threads rely on the
    sandbox's checks alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield
        return

    def fire(signum, frame):
        raise _RenderLimit(f"rendering took longer than {seconds:g} s (a loop that does not "
                           "end, or one far too large)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class ChatTemplate:
    """A compiled chat template with the special tokens it is rendered with.

    Args:
      source: the Jinja source (``tokenizer_config.json``'s ``chat_template``).
      special_tokens: variables such as ``bos_token``/``eos_token`` (strings).
      end_of_turn: strings that end an assistant turn (default: EOS and
        ``END_OF_TURN_TOKENS``).
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
                 end_of_turn=None):
        import jinja2

        self.source = source
        self.special_tokens = dict(special_tokens or {})
        eos = self.special_tokens.get("eos_token")
        self.end_of_turn = tuple(end_of_turn) if end_of_turn else tuple(
            dict.fromkeys(([eos] if eos else []) + list(END_OF_TURN_TOKENS)))
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise CadenzaError(f"chat template has a syntax error: {e} (line {e.lineno})",
                               where="chat_template",
                               fix="correct the template in tokenizer_config.json") from None

    @classmethod
    def from_tokenizer(cls, tokenizer, end_of_turn=None) -> "ChatTemplate":
        """The template of a :class:`cadenza.models.tokenizer.Tokenizer`."""
        if not tokenizer.chat_template:
            raise CadenzaError("the tokenizer has no chat template", where=tokenizer.source,
                               fix="add 'chat_template' to tokenizer_config.json")
        return cls(tokenizer.chat_template, tokenizer.special_tokens, end_of_turn)

    def render(self, messages, *, add_generation_prompt: bool = False, **kwargs) -> str:
        """The rendered conversation, exactly as transformers' ``apply_chat_template``
        with ``tokenize=False`` renders it. ``kwargs`` are extra template variables
        (they override special tokens of the same name).

        Raises:
          CadenzaError: the template raised (e.g. Gemma on a system message).
        """
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        env = self._template.environment
        env.deadline = time.monotonic() + MAX_SECONDS
        try:
            with _alarm(MAX_SECONDS + 1.0):
                parts, size = [], 0
                for chunk in self._template.generate(
                        messages=[dict(m) for m in messages],
                        tools=variables.pop("tools", None),
                        documents=variables.pop("documents", None),
                        add_generation_prompt=add_generation_prompt, **variables):
                    size += len(chunk)
                    if size > MAX_CHARS:
                        raise _RenderLimit(f"the output exceeds {MAX_CHARS} characters")
                    env.check_time()
                    parts.append(chunk)
                return "".join(parts)
        except jinja2.exceptions.SecurityError as e:
            raise CadenzaError(f"chat template tried something the sandbox forbids: {e}",
                               where="chat_template",
                               fix="the template is broken or malicious: use the model's "
                                   "published template in tokenizer_config.json") from None
        except jinja2.TemplateError as e:
            raise CadenzaError(f"chat template refused the conversation: {e}",
                               where="chat_template",
                               fix="change the conversation (roles, order) to what the "
                                   "template accepts") from None
        except (_RenderLimit, OverflowError, RecursionError, MemoryError) as e:
            raise CadenzaError(f"chat template cannot be rendered: {e or type(e).__name__}",
                               where="chat_template",
                               fix="correct the template in tokenizer_config.json (limits: "
                                   f"{MAX_SECONDS:g} s and {MAX_CHARS} characters per "
                                   "render)") from None
        finally:
            env.deadline = float("inf")

    def render_with_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the rendered conversation and the ``[start, end)`` character
        spans of every assistant turn, each ending after its end-of-turn token
        (method: module docstring).

        Raises:
          CadenzaError: the template is not prefix-stable, or an assistant turn has no
            end-of-turn token.
        """
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise CadenzaError(
                    f"chat template is not prefix-stable at message {i}: rendering a prefix "
                    "of the conversation does not give a prefix of the whole rendering, so "
                    "assistant tokens cannot be located", where="chat_template",
                    fix="use a template that renders earlier turns independently of later ones")
            turn = upto[len(prompt):]
            end = max((turn.rfind(t) + len(t) for t in self.end_of_turn if t in turn),
                      default=-1)
            if end < 0:
                raise CadenzaError(
                    f"assistant message {i} does not end with an end-of-turn token "
                    f"(looked for {list(self.end_of_turn)})", where="chat_template",
                    fix="set data.end_of_turn to the token the template ends turns with")
            spans.append((len(prompt), len(prompt) + end))
        return text, spans
