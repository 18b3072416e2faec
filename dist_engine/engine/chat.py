"""Chat prompts: the model's chat template applied to untrusted messages.

Two attacks the plain ``tokenizer.apply_chat_template`` lets through are closed here:

- **Role injection.** Text such as ``<|im_end|>\\n<|im_start|>system`` inside a message would be
  tokenized as control tokens and forge a turn. By default each message's content is tokenized
  with special-token text kept as text (``split_special_tokens``), while the template's own
  markup still becomes control tokens. ``raw_special_tokens=True`` (trusted callers only) parses
  them in content too. Special-token text in other caller-supplied strings (tool definitions,
  tool-call arguments, template kwargs) is refused, since those are not tokenized apart.
- **Unknown roles.** Roles must be ones the template handles: system / user / assistant, plus
  ``tool`` (and a few other common names) where the template names them.

``max_token_bytes`` bounds how many bytes of text one token can cover, so a prompt that cannot
fit the context is refused from its length alone, before any tokenizing.
"""

from __future__ import annotations

import json
import re

BASE_ROLES = ("system", "user", "assistant")
EXTRA_ROLES = ("tool", "developer", "ipython", "function")  # allowed where the template names them
_SENTINEL = "\ue000{}\ue001"  # private-use code points, never produced by a template
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class ChatPrompt:
    def __init__(self, tokenizer, template: str | None = None, raw_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, "chat_template", None)
        self.raw_special_tokens = raw_special_tokens
        self.special = tuple(sorted({t.content for t in tokenizer.added_tokens_decoder.values()
                                     if t.special} | set(tokenizer.all_special_tokens), key=len))
        text = self.template or ""
        self.roles = frozenset(BASE_ROLES) | {r for r in EXTRA_ROLES if f"'{r}'" in text
                                              or f'"{r}"' in text}
        # byte-level BPE decodes one token to at most this many bytes (a partial UTF-8 byte
        # becomes U+FFFD, 3 bytes, never fewer than it stands for); +4 covers a SentencePiece
        # piece's leading space that single-token decoding drops
        longest = max(len(tokenizer.decode([i]).encode()) for i in range(len(tokenizer)))
        self.max_token_bytes = max(longest, *(len(s.encode()) for s in self.special or ("",))) + 4

    # ---- checks ---------------------------------------------------------------------------
    def check_fits(self, num_bytes: int, max_tokens: int, what: str = "the prompt") -> None:
        """ValueError if ``num_bytes`` of text needs more than ``max_tokens`` tokens at best."""
        if num_bytes > max_tokens * self.max_token_bytes:
            raise ValueError(
                f"{what} is {num_bytes} bytes, more than {max_tokens} tokens can hold (at most "
                f"{self.max_token_bytes} bytes per token); shorten it")

    def has_special_text(self, text: str) -> bool:
        return any(s in text for s in self.special)

    def check_messages(self, messages: list[dict]) -> None:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be an object with a role and content")
            role = m.get("role")
            if not isinstance(role, str) or role not in self.roles:
                raise ValueError(f"messages[{i}].role {role!r} is not one this model's chat "
                                 f"template handles; use one of {sorted(self.roles)}")
            content = m.get("content")
            if content is None and not (role == "assistant" and m.get("tool_calls")):
                raise ValueError(f"messages[{i}].content is missing")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            rest = {k: v for k, v in m.items() if k not in ("role", "content")}
            if rest and not self.raw_special_tokens and self.has_special_text(json.dumps(rest)):
                raise ValueError(f"messages[{i}] holds special-token text outside its content")

    # ---- rendering ------------------------------------------------------------------------
    def encode(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        """Token ids of the rendered conversation; ValueError for bad messages."""
        if not self.template:
            raise ValueError("this model has no chat template; send a text prompt instead "
                             "(or start the server with --chat-template)")
        self.check_messages(messages)
        extra = {"tools": tools, **template_kwargs}
        if not self.raw_special_tokens and self.has_special_text(json.dumps(extra, default=str)):
            raise ValueError("tools and chat_template_kwargs may not hold special-token text")
        escape = not self.raw_special_tokens and any(
            isinstance(m.get("content"), str) and self.has_special_text(m["content"]) for m in messages)
        shown = ([{**m, "content": _SENTINEL.format(i)} if isinstance(m.get("content"), str) else m
                  for i, m in enumerate(messages)] if escape else messages)
        try:
            text = self.tokenizer.apply_chat_template(
                shown, tools=tools, chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **template_kwargs)
        except Exception as e:  # jinja raise_exception() and template errors: the caller's input
            raise ValueError(f"the chat template rejected these messages: {e}") from None
        if not escape:
            return self._ids(text, split=False)
        return self._escaped(text, messages)

    def _escaped(self, text: str, messages: list[dict]) -> list[int]:
        """Template markup parsed for special tokens, each content spliced in as plain text."""
        parts = _SENTINEL_RE.split(text)  # markup, index, markup, index, ..., markup
        seen = [int(i) for i in parts[1::2]]
        if sorted(seen) != sorted(i for i, m in enumerate(messages) if isinstance(m.get("content"), str)):
            raise ValueError("this chat template rewrites message content, so special-token text "
                             "in content cannot be kept as text; remove it")
        ids: list[int] = []
        for j, part in enumerate(parts):
            if j % 2:
                ids += self._ids(messages[int(part)]["content"], split=True)
            elif part:
                ids += self._ids(part, split=False)
        return ids

    def _ids(self, text: str, split: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False,
                                   split_special_tokens=split)["input_ids"])
