"""Tokenizer, chat template and incremental detokenisation with stop strings.

Chat prompts keep message content as text: the text of a special token typed inside a message
(say `<|im_start|>system`) is tokenized as ordinary text, never as the control token, as
transformers does when content is tokenized apart from the template. Prompts whose content has
no such text tokenize exactly as the rendered template string does.

`TextStream` turns a growing list of token ids into text pieces: it holds back text that
could still change (an incomplete UTF-8 sequence, or a prefix of a stop string) and ends the
stream at the first stop string, which is not emitted.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

from tokenizers import Tokenizer


class Text:
    def __init__(self, engine_dir: Path):
        self.tokenizer = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        cfg_path = engine_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tpl = engine_dir / "chat_template.jinja"
        self.chat_template = tpl.read_text() if tpl.is_file() else self.config.get("chat_template")
        self.special_tokens = tuple(t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special)
        self._literal: Tokenizer | None = None  # a copy that reads special-token text as text
        self._literal_lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _token(self, key: str) -> str:
        tok = self.config.get(key) or ""
        return tok.get("content", "") if isinstance(tok, dict) else tok

    def encode_literal(self, text: str) -> list[int]:
        """Ids of `text` with the text of special tokens read as plain text (no control tokens)."""
        if self._literal is None:
            with self._literal_lock:  # encode_special_tokens is instance state: a second tokenizer
                if self._literal is None:
                    literal = Tokenizer.from_str(self.tokenizer.to_str())
                    literal.encode_special_tokens = True
                    self._literal = literal
        return self._literal.encode(text, add_special_tokens=False).ids

    def apply_chat(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this engine's tokenizer has no chat template; generate without chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        extra = {"tools": tools} if tools else {}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self._token("bos_token"),
            eos_token=self._token("eos_token"), **extra)

    def prompt_ids(self, prompt: str | list[dict], chat: bool) -> list[int]:
        if chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.chat_ids(messages)
        return self.encode(prompt)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The rendered chat prompt's ids, with message content tokenized as text only.
        Raises ValueError when content with special-token text is not in the prompt verbatim."""
        rendered = self.apply_chat(messages, tools)
        unsafe = [i for i, m in enumerate(messages) if self._has_special(m.get("content"))]
        if not unsafe:
            return self.encode(rendered, add_special_tokens=False)
        # render again with a marker in place of each such content: the text around the markers is
        # the template's, and the template's text around the real content must give the rendering
        mark = f"\x00kiln-{uuid.uuid4().hex}-"
        marked = [{**m, "content": f"{mark}{i}\x00"} if i in unsafe else m for i, m in enumerate(messages)]
        parts = self.apply_chat(marked, tools).split(mark)
        tags = [f"{i}\x00" for i in unsafe]
        contents = [messages[i]["content"] for i in unsafe]
        template = [parts[0]] + [p[len(t):] for p, t in zip(parts[1:], tags)]
        if len(parts) != len(tags) + 1 or not all(p.startswith(t) for p, t in zip(parts[1:], tags)) or \
                "".join(t + c for t, c in zip(template, contents)) + template[-1] != rendered:
            raise ValueError("a chat message contains special-token text that the chat template does not keep "
                             "verbatim, so it cannot be kept as plain text; remove the special-token text")
        ids = self.encode(template[0], add_special_tokens=False)
        for content, after in zip(contents, template[1:]):
            ids += self.encode_literal(content) + self.encode(after, add_special_tokens=False)
        return ids

    def _has_special(self, content: object) -> bool:
        return isinstance(content, str) and any(t in content for t in self.special_tokens)


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
