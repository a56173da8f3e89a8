"""One override syntax for every format: `--tensor-type REGEX=SCHEME`, in command-line order.

SCHEME is a ggml type for `gguf:` targets (matched against GGUF tensor names, case-insensitively, as
llama-quantize does) and a weight scheme for the HF-folder targets (`w8`, `w4g128`, `w4g32`, ... or `bf16` to keep
the tensor unquantized; matched against the checkpoint's tensor names, `model.layers.0.self_attn.q_proj.weight`).
An override applies to the targets whose format reads its scheme (`bf16` reads in both). Precedence, the same
everywhere: the first override in command-line order whose REGEX matches the tensor (`re.search`) and whose scheme
the target reads decides; named options (`--output-tensor-type`, `--token-embedding-type`) come before overrides
for GGUF, as in llama-quantize. An override that applies to no target, or matches no tensor of any target it
applies to, is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from quantkit.errors import ConfigError


@dataclass(frozen=True)
class Override:
    text: str  # REGEX=SCHEME as given
    pattern: str
    scheme: str

    def note(self) -> str:
        """The plan note of a tensor this override decided."""
        return f"--tensor-type {self.text}"


def parse_override(text: str) -> Override:
    pattern, sep, scheme = text.partition("=")
    if not sep or not pattern or not scheme:
        raise ConfigError(f"malformed --tensor-type {text!r}: expected REGEX=SCHEME, e.g. 'attn_v=q8_0' for gguf: "
                          "targets or 'self_attn=w8' for gptq/awq/ct targets")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--tensor-type {text!r}: {pattern!r} is not a valid regular expression: {e}") from None
    return Override(text, pattern, scheme.strip())


def parse_overrides(texts: Iterable[str]) -> list[Override]:
    return [parse_override(t) for t in texts]


def resolve(names: Iterable[str], overrides: list[Override], reads: Callable[[str], bool],
            ignore_case: bool = False) -> dict[str, Override]:
    """name -> the override that decides it (first matching one whose scheme `reads` accepts); names no override
    decides are left out."""
    flags = re.IGNORECASE if ignore_case else 0
    usable = [(re.compile(o.pattern, flags), o) for o in overrides if reads(o.scheme)]
    chosen = {}
    for name in names:
        match = next((o for p, o in usable if p.search(name)), None)
        if match is not None:
            chosen[name] = match
    return chosen


def check_all_used(overrides: list[Override], notes: Iterable[str], applicable: Callable[[Override], bool]) -> None:
    """Every override must decide at least one tensor of some target (its note in a plan); the error says why."""
    used = {part for note in notes for part in note.split(", ")}
    for o in overrides:
        if not applicable(o):
            raise ConfigError(f"--tensor-type {o.text}: {o.scheme!r} is not a scheme of any target of this command "
                              "(ggml types such as q8_0 for gguf: targets; w8, w4g128, w4g32 or bf16 for gptq:, "
                              "awq: and ct: targets)")
        if o.note() not in used:
            raise ConfigError(f"--tensor-type {o.text}: {o.pattern!r} matches no tensor it could apply to (an earlier "
                              "override may take them all); gguf: targets match GGUF names (blk.0.attn_q.weight), "
                              "the others checkpoint names (model.layers.0.self_attn.q_proj.weight)")
