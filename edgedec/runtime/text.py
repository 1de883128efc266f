"""Tokenizer, chat template and incremental detokenization for the runtime (tokenizers + jinja2).

A chat template comes from the bundle, so it is untrusted code: it renders in Jinja's immutable sandbox,
extended so that its work is bounded (:func:`render_template`): ``range`` yields at most
:data:`MAX_RANGE` items, no string, list or number it builds may exceed :data:`MAX_VALUE` characters or
items (``'x' * 10**10`` is refused before it is built), the output is capped, and the whole render has a
time budget (:data:`RENDER_SECONDS`). Any failure is one :class:`GenerationError` line.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from pathlib import Path

from ..errors import BundleError, GenerationError

RENDER_SECONDS = 2.0  # time budget of one chat-template render
MAX_RANGE = 10_000  # items range() may yield in a template
MAX_VALUE = 1 << 20  # characters (or items) of any value a template builds, and of its output ...
OUTPUT_PER_INPUT = 4  # ... plus this many characters per character of the messages
MAX_INT_BITS = 4096  # integers a template computes
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\d{6,}|\*)|%[-+ #0]*\d*\.\d{6,}|\{[^{}]*:[^{}]*\d{6,}[^{}]*\}")
_env_class = None


def _bounded_environment_class():
    """Jinja's ImmutableSandboxedEnvironment with sizes bounded (built on first use: jinja2 loads lazily)."""
    global _env_class
    if _env_class is not None:
        return _env_class
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def sized(value, what="a value"):
        if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_VALUE:
            raise SecurityError(f"{what} of {len(value):,} items exceeds the chat template limit of {MAX_VALUE:,}")
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise SecurityError(f"an integer of {value.bit_length():,} bits exceeds the chat template limit")
        return value

    def check_args(args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_VALUE:
                raise SecurityError(f"argument {a} exceeds the chat template limit of {MAX_VALUE:,}")

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: the joined string is checked
            self.write("environment.sized(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def sized(self, value):
            return sized(value)

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > MAX_VALUE:
                        raise SecurityError(f"repeating {len(a):,} items {b:,} times exceeds the chat template limit")
                if all(isinstance(x, int) for x in (left, right)) and \
                        abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
                    raise SecurityError("an integer product exceeds the chat template limit")
            if operator == "**" and all(isinstance(x, int) for x in (left, right)) and abs(left) > 1 and \
                    right * abs(left).bit_length() > MAX_INT_BITS:
                raise SecurityError("a power exceeds the chat template limit")
            if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise SecurityError("a format width exceeds the chat template limit")
            return sized(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            check_args(args, kwargs)
            return sized(super().call(__context, __obj, *args, **kwargs))

        def format_string(self, s, args, kwargs, format_func=None):
            if _WIDE_FORMAT.search(str(s)):
                raise SecurityError("a format width exceeds the chat template limit")
            return sized(super().format_string(s, args, kwargs, format_func))

    def bounded_range(*args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise SecurityError(f"range of {len(r):,} items exceeds the chat template limit of {MAX_RANGE:,}")
        return r

    def bounded_filter(f):
        @functools.wraps(f)  # keeps jinja's pass_context/pass_eval_context markers
        def run(*args, **kwargs):
            check_args(args[2:] if getattr(f, "jinja_pass_arg", None) else args[1:], kwargs)
            return sized(f(*args, **kwargs))
        return run

    BoundedSandbox.bounded_range = staticmethod(bounded_range)
    BoundedSandbox.bounded_filter = staticmethod(bounded_filter)
    _env_class = BoundedSandbox
    return _env_class


def make_environment():
    """A bounded sandbox for chat templates (the Hugging Face conventions: trim_blocks, lstrip_blocks,
    ``raise_exception``)."""
    cls = _bounded_environment_class()
    env = cls(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise GenerationError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = cls.bounded_range
    env.filters = {name: cls.bounded_filter(f) for name, f in env.filters.items()}
    return env


def check_template(template: str) -> None:
    """Refuse a chat template that does not compile (a BundleError naming the manifest field)."""
    from jinja2 import TemplateError

    try:
        make_environment().from_string(template)
    except TemplateError as exc:
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise BundleError(f"manifest: tokenizer.chat_template is not a valid Jinja template: "
                          f"{_one_line(exc)}{line}") from exc
    except (RecursionError, MemoryError, ValueError, SyntaxError) as exc:
        raise BundleError(f"manifest: tokenizer.chat_template cannot be compiled: {_one_line(exc)}") from exc


def render_template(template, max_chars: int, seconds: float = RENDER_SECONDS, **context) -> str:
    """Render a compiled template within ``seconds`` and ``max_chars`` of output, or raise GenerationError.

    The time budget is kept by a trace function on the template's own frames (every line it runs checks
    the clock), so loops that print nothing are bounded too; it is removed when the render ends."""
    deadline = time.monotonic() + seconds

    def over():
        from jinja2.sandbox import SecurityError

        raise SecurityError(f"rendering took longer than {seconds:g} s")

    def local(frame, event, arg):
        if time.monotonic() > deadline:
            over()
        return local

    def calls(frame, event, arg):
        if time.monotonic() > deadline:
            over()
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        pieces, n = [], 0
        for piece in template.generate(**context):
            n += len(piece)
            if n > max_chars:
                raise GenerationError(f"chat template: the rendered prompt exceeds {max_chars:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except GenerationError:
        raise
    except Exception as exc:  # the template is the bundle's code: whatever it raises is bad input, not a bug
        raise GenerationError(f"chat template failed to render: {type(exc).__name__}: {_one_line(exc)}") from exc
    finally:
        sys.settrace(previous)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def valid_text(text: str, what: str = "text") -> str:
    """``text`` if it can be encoded as UTF-8 (no lone surrogates, as undecodable argv or files give)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GenerationError(f"{what} is not valid Unicode: a lone surrogate {text[exc.start]!r} at "
                              f"character {exc.start} (undecodable bytes in the input?)") from None
    return text


class TextCodec:
    def __init__(self, tokenizer_file: Path, info: dict):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise BundleError(f"cannot read tokenizer {tokenizer_file.name}: {exc}") from exc
        self.info = info
        self.eos_ids = frozenset(info.get("eos_token_ids") or [])
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(valid_text(text, "the prompt"), add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.info.get("chat_template")
        if not template:
            raise GenerationError("this bundle has no chat template; use generate() with a plain prompt")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for m in messages:
            valid_text(str(m["content"]), f"the {m['role']!r} message")
        if not isinstance(template, str):
            raise GenerationError("this bundle's chat template is not a string")
        if self._template is None:
            from jinja2 import TemplateError

            try:
                self._template = make_environment().from_string(template)
            except TemplateError as exc:
                raise GenerationError(f"chat template does not compile: {_one_line(exc)}") from exc
        size = sum(len(str(m["content"])) for m in messages)
        return render_template(
            self._template, MAX_VALUE + OUTPUT_PER_INPUT * size,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.info.get("bos_token") or "",
            eos_token=self.info.get("eos_token") or "",
        )


class StreamDecoder:
    """Turns a growing list of token ids into text deltas without re-decoding the whole sequence.

    Decodes a small window ending at the newest token and emits what it adds beyond the previous
    window, holding text back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.prefix = 0  # start of the window
        self.read = 0  # tokens already turned into text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.codec.decode(self.ids[self.prefix : self.read])
        now = self.codec.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """The text of tokens pushed but not yet returned (an incomplete UTF-8 sequence decodes to U+FFFD)."""
        before = self.codec.decode(self.ids[self.prefix : self.read])
        now = self.codec.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]
