"""Text <-> token ids for ``adp run --prompt``: the checkpoint's own tokenizer, or, for the
random-weight presets (which have none), a byte-level one."""

from __future__ import annotations

from pathlib import Path

from adp_pass.errors import UsageError


class ByteTokenizer:
    """UTF-8 bytes 0-255 are the ids; an id above 255 decodes as U+FFFD (the presets' vocabularies
    are larger than 256, and random weights generate any id)."""

    name = "byte-level (built in)"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for token in ids:
            if 0 <= token < 256:
                pending.append(token)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append("\ufffd")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    @staticmethod
    def ends_mid_character(ids: list[int]) -> bool:
        """The ids end inside a UTF-8 character: the last 1-3 bytes are the start of one whose
        other bytes may still come."""
        for size in (1, 2, 3):
            tail = ids[-size:]
            if len(tail) < size or not all(0 <= t < 256 for t in tail):
                return False
            try:
                bytes(tail).decode("utf-8")
            except UnicodeDecodeError as err:
                if err.start == 0 and err.reason == "unexpected end of data":
                    return True
        return False

    eos_token_ids: tuple[int, ...] = ()  # random weights: no end-of-text token

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A compact role-tagged prompt (the presets have no chat template of their own; every
        byte is a token, so shorter is cheaper)."""
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return self.encode(text + "<|assistant|>")


class HFTokenizer:
    """The checkpoint's tokenizer through transformers' ``AutoTokenizer``."""

    # Without one of these, AutoTokenizer may build an empty tokenizer from config.json alone.
    FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

    def __init__(self, checkpoint: str | Path) -> None:
        if not any((Path(checkpoint) / name).is_file() for name in self.FILES):
            raise UsageError(
                f"--checkpoint {checkpoint} has no tokenizer ({', '.join(self.FILES)}), which "
                "--prompt needs", flag="--checkpoint",
                hint="copy the tokenizer files into it (tokenizer.save_pretrained(dir)), or "
                "drop --prompt for random prompts")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(checkpoint))
        except (OSError, ValueError) as err:
            raise UsageError(
                f"cannot load a tokenizer from {checkpoint}: {str(err).splitlines()[0]}",
                flag="--checkpoint",
                hint="the checkpoint needs tokenizer.json / tokenizer_config.json for --prompt",
            ) from None
        self.name = f"{type(self._tok).__name__} from {checkpoint}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self._tok.eos_token_id
        return () if eos is None else (eos,)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The checkpoint's own chat template (tokenizer_config.json), with the assistant turn
        opened; a ChatML-style prompt when the checkpoint has no template."""
        if getattr(self._tok, "chat_template", None):
            ids = self._tok.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer versions
                ids = ids["input_ids"]
            return list(ids)
        return ByteTokenizer.chat_prompt(self, messages)  # type: ignore[arg-type]


def load_tokenizer(checkpoint: str | Path | None) -> ByteTokenizer | HFTokenizer:
    return HFTokenizer(checkpoint) if checkpoint else ByteTokenizer()
