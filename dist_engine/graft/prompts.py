"""A varied prompt set for self-distillation, built from templates so it lives in the repository.

The base model answers these prompts with its own generations (greedy and sampled); those
answers are the training data of a grafted MTP layer. Each template is crossed with a list of
subjects; the order is fixed, so the held-out split is the same on every machine, and new sets
are appended so earlier prompts keep their place.
"""

from __future__ import annotations

import itertools

from dist_engine.graft.casual_prompt_sets import CASUAL_TEMPLATES
from dist_engine.graft.chat_prompt_sets import CHAT_TEMPLATES
from dist_engine.graft.prompt_sets import EXTRA_TEMPLATES, MORE_TEMPLATES, TEMPLATES
from dist_engine.graft.user_prompt_sets import USER_TEMPLATES


def _interleave(templates: list[tuple[str, list]]) -> list[str]:
    per_template = [[template.format(*s) if isinstance(s, tuple) else template.format(s)
                     for s in subjects] for template, subjects in templates]
    out = []
    for row in itertools.zip_longest(*per_template):
        out.extend(p for p in row if p is not None)
    return out


def graft_prompts() -> list[str]:
    """All prompts, interleaved across templates so any prefix of each set is varied."""
    return (_interleave(TEMPLATES) + _interleave(MORE_TEMPLATES) + _interleave(EXTRA_TEMPLATES)
            + _interleave(USER_TEMPLATES) + _interleave(CASUAL_TEMPLATES) + _interleave(CHAT_TEMPLATES))


def split_prompts(held_out_every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``held_out_every``-th prompt is held out."""
    prompts = graft_prompts()
    held = [p for i, p in enumerate(prompts) if i % held_out_every == held_out_every - 1]
    train = [p for i, p in enumerate(prompts) if i % held_out_every != held_out_every - 1]
    return train, held
