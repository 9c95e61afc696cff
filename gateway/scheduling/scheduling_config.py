"""SchedulingConfig: the routing policy, scorer weights and thresholds, in one validated value.

Where it comes from, later wins:

    the gateway's settings (--routing-policy, --disagg-min-uncached-tokens)
      < the scheduling file (--scheduling-config PATH, TOML)
      < the live etcd key /tandem/<cluster>/config/scheduling (JSON or TOML; deleting it reverts)

The file and the key hold the same document, every field optional:

    policy = "prefix-aware"            # prefix-aware | least-loaded | random | round-robin (registry.py)
    picker = "max-score"               # max-score | weighted-random (prefix-aware's picker)
    session_header = "x-session-id"    # request metadata key that pins a session to a worker

    [weights]                          # prefix-aware scorers; 0 turns one off
    prefix_affinity = 1.0   prefill_work = 1.0   queue_depth = 2.0   kv_usage = 0.5
    in_flight = 0.0   session_affinity = 3.0

    [thresholds]
    queue_saturation = 8               # queue depth at which the queue-depth score reaches 0
    prefill_work_scale = 2048          # prompt tokens of prefill work worth the whole prefill-work score (at least)
    overload_queue_depth = 64          # filter out workers this deep (unless all are); 0 = off
    overload_kv_usage = 0.98           # ... or with this much KV in use; 1.0 = off

    [disaggregation]
    min_uncached_tokens = 512          # prefill first when the chosen decode worker lacks this many; 0 = never
    prefill_max_pending_tokens = 8192  # a prefill worker with this backlog (prompt tokens) takes no more

An invalid document raises ValueError naming the field; a live update that fails validation is
logged and ignored, so a typo in etcd cannot take routing down.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace

from .registry import PICKERS, POLICIES, unknown_choice


@dataclass(frozen=True)
class ScorerWeights:
    prefix_affinity: float = 1.0
    prefill_work: float = 1.0
    queue_depth: float = 2.0
    kv_usage: float = 0.5
    in_flight: float = 0.0
    session_affinity: float = 3.0


@dataclass(frozen=True)
class Thresholds:
    queue_saturation: int = 8
    prefill_work_scale: int = 2048
    overload_queue_depth: int = 64
    overload_kv_usage: float = 0.98


@dataclass(frozen=True)
class DisaggregationConfig:
    min_uncached_tokens: int = 512
    prefill_max_pending_tokens: int = 8192


@dataclass(frozen=True)
class SchedulingConfig:
    policy: str = "prefix-aware"
    picker: str = "max-score"
    session_header: str = "x-session-id"
    weights: ScorerWeights = field(default_factory=ScorerWeights)
    thresholds: Thresholds = field(default_factory=Thresholds)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)

    def __post_init__(self):
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("picker", self.picker, PICKERS)
        if not self.session_header or self.session_header != self.session_header.lower():
            raise ValueError(f"session_header must be a non-empty lower-case metadata key, got {self.session_header!r}")
        for f in fields(self.weights):
            _check_number(f"weights.{f.name}", getattr(self.weights, f.name), low=0.0)
        t, d = self.thresholds, self.disaggregation
        _check_number("thresholds.queue_saturation", t.queue_saturation, low=1, integer=True)
        _check_number("thresholds.prefill_work_scale", t.prefill_work_scale, low=1, integer=True)
        _check_number("thresholds.overload_queue_depth", t.overload_queue_depth, low=0, integer=True)
        _check_number("thresholds.overload_kv_usage", t.overload_kv_usage, low=0.0, high=1.0)
        _check_number("disaggregation.min_uncached_tokens", d.min_uncached_tokens, low=0, integer=True)
        _check_number("disaggregation.prefill_max_pending_tokens", d.prefill_max_pending_tokens, low=1, integer=True)

    def merged(self, document: Mapping) -> SchedulingConfig:
        """A new config: this one with `document`'s fields over it (does not mutate).
        Raises ValueError naming an unknown or invalid field."""
        top, sections = {}, {}
        nested = {"weights": ScorerWeights, "thresholds": Thresholds, "disaggregation": DisaggregationConfig}
        known = {f.name for f in fields(self)}
        for key, value in document.items():
            if key not in known:
                raise ValueError(f"unknown scheduling setting {key!r}; known: {', '.join(sorted(known))}")
            if key in nested:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{key} must be a table of settings, got {value!r}")
                names = {f.name for f in fields(nested[key])}
                for sub in value:
                    if sub not in names:
                        raise ValueError(f"unknown scheduling setting {key}.{sub!r}; known: {', '.join(sorted(names))}")
                sections[key] = replace(getattr(self, key), **value)
            else:
                top[key] = value
        return replace(self, **top, **sections)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def parse_document(text: str | bytes) -> dict:
    """A scheduling document from JSON or TOML text. Raises ValueError when it is neither."""
    if isinstance(text, bytes):
        text = text.decode()
    stripped = text.strip()
    if not stripped:
        return {}
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"scheduling document is not valid JSON: {e}") from None
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"scheduling document is not valid TOML: {e}") from None
    if not isinstance(document, dict):
        raise ValueError(f"scheduling document must be a table of settings, got {type(document).__name__}")
    return document


def load_file(path: str, base: SchedulingConfig) -> SchedulingConfig:
    """`base` with the TOML (or JSON) file at `path` over it. Raises ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the scheduling config {path}: {e.strerror}") from None
    try:
        return base.merged(parse_document(text))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:  # (a list from TOML is unhashable)
        raise ValueError(unknown_choice(name, value, choices))


def _check_number(name: str, value, low=None, high=None, integer: bool = False) -> None:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
