"""Prompts from a JSONL file, one request per line: real prompts, or token counts to fill randomly.

    {"prompt": "Explain KV caching."}                          text, tokenized by the gateway
    {"messages": [{"role": "user", "content": "Hi"}]}          chat, through the chat template
    {"prompt_token_ids": [1, 2, 3]}                            token ids as they are
    {"input_len": 512}                                         512 random token ids
    any of them with "output_len": 128 (or "max_tokens")       else the --output-len distribution

Lines are sent in file order (or shuffled with the seed, every pass), and the file is cycled when
a run needs more requests than it has lines. Bad lines are reported with their line number when
the file is loaded, before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..distributions import Distribution
from .base import DEFAULT_VOCAB_SIZE, Job, RequestSpec, SingleRequest, check_vocab_size, random_token_ids

_PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids", "input_len")


@dataclass(frozen=True)
class FileEntry:
    kind: str  # one of _PROMPT_KEYS
    value: object
    output_len: int | None


def parse_line(line: str, where: str) -> FileEntry:
    """One JSONL line → FileEntry; raises ValueError starting with `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    keys = [k for k in _PROMPT_KEYS if k in obj]
    if len(keys) != 1:
        raise ValueError(f"{where}: a line needs exactly one of {', '.join(_PROMPT_KEYS)}")
    kind, value = keys[0], obj[keys[0]]
    if kind == "prompt" and not (isinstance(value, str) and value):
        raise ValueError(f"{where}: prompt must be a non-empty string")
    if kind == "messages":
        if not (
            isinstance(value, list)
            and value
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
        ):
            raise ValueError(f'{where}: messages must be a non-empty list of {{"role": str, "content": str}}')
        value = [(m["role"], m["content"]) for m in value]
    if kind == "prompt_token_ids" and not (isinstance(value, list) and value and all(isinstance(t, int) and t >= 0 for t in value)):
        raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of non-negative integers")
    if kind == "input_len" and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{where}: input_len must be an integer >= 1")
    out = obj.get("output_len", obj.get("max_tokens"))
    if out is not None and not (isinstance(out, int) and out >= 1):
        raise ValueError(f"{where}: output_len must be an integer >= 1")
    return FileEntry(kind, value, out)


def load_entries(path: Path) -> list[FileEntry]:
    entries = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                entries.append(parse_line(line, f"{path}:{n}"))
    if not entries:
        raise ValueError(f"{path}: no prompts (one JSON object per line)")
    return entries


@dataclass(frozen=True)
class FileWorkload:
    path: Path
    output_len: Distribution  # for lines without their own
    vocab_size: int = DEFAULT_VOCAB_SIZE
    shuffle: bool = False
    seed: int = 0
    name: str = "file"
    entries: list[FileEntry] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_vocab_size(self.vocab_size)
        if not self.entries:
            object.__setattr__(self, "entries", load_entries(Path(self.path)))

    def _spec(self, entry: FileEntry, rng: np.random.Generator) -> RequestSpec:
        n_out = entry.output_len if entry.output_len is not None else self.output_len.sample_int(rng)
        if entry.kind == "prompt":
            return RequestSpec(n_out, text=entry.value)
        if entry.kind == "messages":
            return RequestSpec(n_out, messages=list(entry.value))
        if entry.kind == "prompt_token_ids":
            return RequestSpec(n_out, token_ids=list(entry.value))
        return RequestSpec(n_out, token_ids=random_token_ids(rng, entry.value, self.vocab_size))

    def jobs(self) -> Iterator[Job]:
        rng = np.random.default_rng(self.seed)
        while True:
            order = rng.permutation(len(self.entries)).tolist() if self.shuffle else range(len(self.entries))
            for i in order:
                spec = self._spec(self.entries[i], rng)
                spec.tags["line"] = i + 1
                yield SingleRequest(spec)

    def describe(self) -> dict:
        return {
            "workload": self.name,
            "path": str(self.path),
            "num_lines": len(self.entries),
            "output_len": str(self.output_len),
            "shuffle": self.shuffle,
            "vocab_size": self.vocab_size,
            "seed": self.seed,
        }
