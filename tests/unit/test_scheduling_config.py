"""SchedulingConfig: documents merged over defaults, validated field by field, from file or etcd text."""

from __future__ import annotations

import pytest

from gateway.scheduling.scheduling_config import SchedulingConfig, load_file, parse_document


def test_defaults_are_prefix_aware_max_score():
    c = SchedulingConfig()
    assert (c.policy, c.picker, c.session_header) == ("prefix-aware", "max-score", "x-session-id")
    assert c.weights.prefix_affinity > 0 and c.disaggregation.min_uncached_tokens == 512


def test_merge_keeps_what_the_document_leaves_out():
    base = SchedulingConfig(policy="round-robin")
    c = base.merged({"weights": {"kv_usage": 0.0}, "disaggregation": {"min_uncached_tokens": 128}})
    assert c.policy == "round-robin" and c.weights.kv_usage == 0.0 and c.weights.queue_depth == base.weights.queue_depth
    assert c.disaggregation.min_uncached_tokens == 128 and c.disaggregation.prefill_max_pending_tokens == base.disaggregation.prefill_max_pending_tokens
    assert base.weights.kv_usage == 0.5  # merging does not mutate


@pytest.mark.parametrize(
    "document, message",
    [
        ({"policy": "fastest"}, "policy must be one of"),
        ({"picker": "best"}, "picker must be one of"),
        ({"polcy": "random"}, "unknown scheduling setting 'polcy'"),
        ({"weights": {"prefix": 1.0}}, r"unknown scheduling setting weights\.'prefix'"),
        ({"weights": 3}, "weights must be a table"),
        ({"weights": {"queue_depth": -1}}, "weights.queue_depth must be >= 0"),
        ({"weights": {"queue_depth": "high"}}, "weights.queue_depth must be a number"),
        ({"thresholds": {"queue_saturation": 0}}, "thresholds.queue_saturation must be >= 1"),
        ({"thresholds": {"queue_saturation": 2.5}}, "thresholds.queue_saturation must be an integer"),
        ({"thresholds": {"overload_kv_usage": 1.5}}, "thresholds.overload_kv_usage must be between 0.0 and 1.0"),
        ({"disaggregation": {"min_uncached_tokens": True}}, "disaggregation.min_uncached_tokens must be an integer"),
        ({"disaggregation": {"prefill_max_pending_tokens": 0}}, "prefill_max_pending_tokens must be >= 1"),
        ({"session_header": "X-Session"}, "session_header must be a non-empty lower-case"),
    ],
)
def test_invalid_documents_name_the_field(document, message):
    with pytest.raises(ValueError, match=message):
        SchedulingConfig().merged(document)


def test_documents_parse_from_json_or_toml():
    toml = 'policy = "random"\n[weights]\nqueue_depth = 1.5\n'
    assert parse_document(toml) == {"policy": "random", "weights": {"queue_depth": 1.5}}
    assert parse_document(b'{"picker": "weighted-random"}') == {"picker": "weighted-random"}
    assert parse_document("  ") == {}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_document("{policy")
    with pytest.raises(ValueError, match="not valid TOML"):
        parse_document("policy = ")


def test_load_file_names_the_file(tmp_path):
    path = tmp_path / "scheduling.toml"
    path.write_text("[thresholds]\nqueue_saturation = 16\n")
    assert load_file(str(path), SchedulingConfig()).thresholds.queue_saturation == 16
    path.write_text("[thresholds]\nqueue_saturation = -2\n")
    with pytest.raises(ValueError, match=f"{path}: thresholds.queue_saturation"):
        load_file(str(path), SchedulingConfig())
    with pytest.raises(ValueError, match="cannot read the scheduling config"):
        load_file(str(tmp_path / "missing.toml"), SchedulingConfig())


def test_to_json_round_trips():
    c = SchedulingConfig().merged({"policy": "least-loaded", "weights": {"in_flight": 1.0}})
    import json

    assert SchedulingConfig().merged(json.loads(c.to_json())) == c
