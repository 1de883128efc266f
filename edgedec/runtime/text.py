"""Tokenizer, chat template and incremental detokenization for the runtime (tokenizers + jinja2)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BundleError, GenerationError


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
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.info.get("chat_template")
        if not template:
            raise GenerationError("this bundle has no chat template; use generate() with a plain prompt")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise GenerationError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(template)
        return self._template.render(
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
