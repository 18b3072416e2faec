"""A varied prompt set for self-distillation, built from templates so it lives in the repository.

The base model answers these prompts with its own (greedy) generations; those answers are the
training data of a grafted MTP layer. Each template is crossed with a list of subjects; the
order is fixed, so the held-out split is the same on every machine.
"""

from __future__ import annotations

import itertools

_TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "vaccines",
    "climate change", "the stock market", "plate tectonics", "the immune system", "blockchains",
    "the water cycle", "quantum computing", "inflation", "the Roman Empire", "DNA replication",
    "electric cars", "the internet", "volcanoes", "meditation", "supply and demand",
    "renewable energy", "the human heart", "compilers", "jazz music", "honey bees",
    "operating systems", "the Moon landing", "sleep", "coral reefs", "public key cryptography",
    "the printing press", "antibiotics", "rainbows", "databases", "the Silk Road", "gravity",
]
_TASKS = [
    "checks whether a number is prime", "reverses a linked list", "counts words in a text file",
    "merges two sorted lists", "computes the nth Fibonacci number", "validates an email address",
    "finds duplicates in a list", "converts Celsius to Fahrenheit", "flattens a nested list",
    "parses a CSV line", "computes a moving average", "checks for balanced parentheses",
    "implements binary search", "removes vowels from a string", "sorts a dictionary by value",
    "computes the greatest common divisor", "generates all permutations of a string",
    "reads a JSON file and prints its keys", "finds the longest word in a sentence",
    "implements a stack class", "counts the frequency of characters", "checks if a string is a palindrome",
    "transposes a matrix", "implements bubble sort",
]
_THINGS = [
    "a lighthouse keeper", "a lost robot", "a dragon who cannot fly", "a city under the sea",
    "a time traveller", "a talking cat", "the last tree on Earth", "a chef on Mars",
    "a detective in Paris", "an old violin", "a snowman in summer", "a friendly ghost",
    "a child who finds a map", "a spaceship crew", "a village baker", "a clockmaker",
]
_CHOICES = [
    ("cats", "dogs"), ("city life", "country life"), ("Python", "JavaScript"),
    ("working from home", "working in an office"), ("reading books", "watching films"),
    ("trains", "planes"), ("summer", "winter"), ("SQL", "NoSQL databases"),
    ("renting", "buying a home"), ("tea", "coffee"), ("public schools", "homeschooling"),
    ("solar power", "wind power"),
]
_SKILLS = [
    "learn a new language", "prepare for a job interview", "start running", "save money",
    "write a good essay", "improve my sleep", "learn to cook", "manage stress", "study for exams",
    "start a vegetable garden", "learn the guitar", "give a good presentation",
    "make new friends in a new city", "organise my week", "learn to draw", "train a puppy",
]

_TEMPLATES: list[tuple[str, list]] = [
    ("Explain {} to a ten-year-old.", _TOPICS),
    ("Write a short paragraph about {}.", _TOPICS),
    ("What are three interesting facts about {}?", _TOPICS),
    ("Summarise the history of {} in a few sentences.", _TOPICS),
    ("Write a Python function that {}.", _TASKS),
    ("How would you write code that {}? Explain briefly.", _TASKS),
    ("Write a short story about {}.", _THINGS),
    ("Write a poem about {}.", _THINGS),
    ("Compare {} and {}.", _CHOICES),
    ("What are the pros and cons of {} versus {}?", _CHOICES),
    ("How can I {}?", _SKILLS),
    ("Give me five tips to {}.", _SKILLS),
]


def graft_prompts() -> list[str]:
    """All prompts, interleaved across templates so any prefix of the list is varied."""
    per_template = []
    for template, subjects in _TEMPLATES:
        per_template.append([template.format(*s) if isinstance(s, tuple) else template.format(s)
                             for s in subjects])
    out = []
    for row in itertools.zip_longest(*per_template):
        out.extend(p for p in row if p is not None)
    return out


def split_prompts(held_out_every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``held_out_every``-th prompt is held out."""
    prompts = graft_prompts()
    held = [p for i, p in enumerate(prompts) if i % held_out_every == held_out_every - 1]
    train = [p for i, p in enumerate(prompts) if i % held_out_every != held_out_every - 1]
    return train, held
