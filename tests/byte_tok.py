"""A stand-in tokenizer for tests that export or evaluate tiny models: byte ids 0..255 and EOS
256, the shape of the framework's default tokenizer without its padding to 64."""

from __future__ import annotations


class ByteTok:
    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")
