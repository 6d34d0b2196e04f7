"""Incremental detokenization: text for each delta without re-decoding the whole output."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Holds back text while it ends in an incomplete character (a partial UTF-8 sequence)."""

    WINDOW = 6   # tokens of context kept before the unread part (enough for merges to settle)

    def __init__(self, tokenizer, already_read: list[int] | None = None) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(already_read or [])   # a resumed stream: text sent before
        self.read = len(self.ids)                         # tokens whose text was already emitted
        self.prefix = max(0, self.read - self.WINDOW)     # start of the decoding window

    def add(self, token_ids: list[int], final: bool = False) -> str:
        self.ids.extend(token_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        new = text[len(prefix_text):]
        self.read = len(self.ids)
        self.prefix = max(0, self.read - self.WINDOW)
        return new
