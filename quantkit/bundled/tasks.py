"""A multiple-choice task made deterministically from the held-out text: given the preceding lines of a
standard-library module, pick its true next line among 4 candidates (3 drawn from other held-out modules).

Distractors are real code lines with the same indentation and nearly the same length (±15%), so neither
layout nor length gives the answer away: the task measures whether a model tracks the local code.
"""

from __future__ import annotations

import random

from quantkit.bundled import textsets

CONTEXT_LINES = 12
CHOICES = 4


def _candidate_lines(lines: list[str]) -> list[int]:
    """Indices of lines worth asking about: non-trivial code with enough context before them."""
    return [i for i, line in enumerate(lines)
            if i >= CONTEXT_LINES and 20 <= len(line.strip()) <= 100 and not line.strip().startswith("#")]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def next_line_items(count: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = [doc.split("\n") for doc in textsets.documents("heldout")]
    candidates = [_candidate_lines(lines) for lines in docs]
    by_indent: dict[int, list[tuple[int, str]]] = {}  # indentation -> (document, line)
    for d, indices in enumerate(candidates):
        for i in indices:
            by_indent.setdefault(_indent(docs[d][i]), []).append((d, docs[d][i]))
    items = []
    while len(items) < count:
        d = rng.randrange(len(docs))
        i = rng.choice(candidates[d])
        true_line = docs[d][i]
        pool = sorted({line for other, line in by_indent[_indent(true_line)]
                       if other != d and line != true_line
                       and abs(len(line) - len(true_line)) <= 0.15 * len(true_line)})
        if len(pool) < CHOICES - 1:
            continue  # no convincing distractors for this line: ask about another
        distractors = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [true_line] + distractors[label:]
        context = "\n".join(docs[d][i - CONTEXT_LINES:i]) + "\n"
        items.append({"id": len(items), "context": context, "choices": [c + "\n" for c in choices], "label": label})
    return items
