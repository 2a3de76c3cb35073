"""Tokenizer, chat template and incremental detokenisation with stop strings.

`TextStream` turns a growing list of token ids into text pieces: it holds back text that
could still change (an incomplete UTF-8 sequence, or a prefix of a stop string) and ends the
stream at the first stop string, which is not emitted.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer


class Text:
    def __init__(self, engine_dir: Path):
        self.tokenizer = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        cfg_path = engine_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tpl = engine_dir / "chat_template.jinja"
        self.chat_template = tpl.read_text() if tpl.is_file() else self.config.get("chat_template")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _token(self, key: str) -> str:
        tok = self.config.get(key) or ""
        return tok.get("content", "") if isinstance(tok, dict) else tok

    def apply_chat(self, messages: list[dict]) -> str:
        if not self.chat_template:
            raise ValueError("this engine's tokenizer has no chat template; generate without chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=self._token("bos_token"), eos_token=self._token("eos_token"))

    def prompt_ids(self, prompt: str | list[dict], chat: bool) -> list[int]:
        if chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.encode(self.apply_chat(messages), add_special_tokens=False)
        return self.encode(prompt)


class TextStream:
    def __init__(self, text: Text, stop_strings: tuple[str, ...] = ()):
        self.text, self.stops = text, tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that became final (may be empty)."""
        self.ids.append(token)
        full = self.text.decode(self.ids)
        for s in self.stops:
            at = full.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.stopped = True
                return self._emit(full[:at])
        safe = len(full)
        if full.endswith("\ufffd"):
            safe = full.rfind("\ufffd")  # wait for the rest of the UTF-8 sequence
        for s in self.stops:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(full[:safe])

    def finish(self) -> str:
        return "" if self.stopped else self._emit(self.text.decode(self.ids))

    def _emit(self, final: str) -> str:
        piece = final[self.emitted:]
        self.emitted = max(self.emitted, len(final))
        return piece
