"""The prompts the base model answers to make graft training data, read from a data file.

``assets/graft/prompts.json`` holds named sets of prompts in a fixed order; their concatenation
is the prompt list, whose every 10th prompt is held out, so the held-out split is the same on
every machine. Existing prompts are never edited or reordered; new sets are appended (and
``PROMPTS_SHA256`` updated with them). The digest guards against an edited or truncated file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "graft", "prompts.json")
PROMPTS_SHA256 = "a40eaade8fdc5b01994fbe3280b93bac6c2a3ae986547c998921e31fce32ead2"


@functools.cache
def prompt_sets() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, prompts) of every set, in order; raises ValueError if the file was altered."""
    with open(PROMPTS_FILE, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PROMPTS_SHA256:
        raise ValueError(f"{PROMPTS_FILE} has sha256 {digest[:12]}..., not the recorded "
                         f"{PROMPTS_SHA256[:12]}...: restore it (the held-out split depends on it)")
    return tuple((s["name"], tuple(s["prompts"])) for s in json.loads(raw)["sets"])


def graft_prompts() -> list[str]:
    """All prompts, set after set."""
    return [p for _, prompts in prompt_sets() for p in prompts]


def split_prompts(held_out_every: int = 10, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``held_out_every``-th prompt is held out; ``limit``: of the
    first ``limit`` prompts only (each keeps its side of the split)."""
    prompts = graft_prompts()[:limit]
    held = [p for i, p in enumerate(prompts) if i % held_out_every == held_out_every - 1]
    train = [p for i, p in enumerate(prompts) if i % held_out_every != held_out_every - 1]
    return train, held
