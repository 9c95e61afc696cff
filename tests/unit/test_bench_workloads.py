"""Workload generators: seeded and reproducible, lengths as asked, shared prefixes really shared in
token space (equal block hashes), conversations that resend their history, JSONL files."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from kvtransfer.block_hash import hash_blocks
from loadtest.distributions import Distribution, with_range_ratio
from loadtest.workloads import FileWorkload, MultiTurnWorkload, RandomWorkload, Reply, SharedPrefixWorkload
from loadtest.workloads.text import WORDS


def first_specs(workload, n: int):
    return [job.next_request(None) for job in itertools.islice(workload.jobs(), n)]


# ---- distributions ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["256", "uniform:128:512", "normal:256:64", "exponential:100", "lognormal:200:0.5"])
def test_distribution_specs_round_trip(spec):
    assert str(Distribution.parse(spec)) == spec


def test_uniform_integers_cover_both_ends_and_nothing_else():
    rng = np.random.default_rng(0)
    draws = {Distribution.parse("uniform:3:6").sample_int(rng) for _ in range(500)}
    assert draws == {3, 4, 5, 6}


@pytest.mark.parametrize("spec, mean", [("normal:200:20", 200), ("exponential:50", 50), ("lognormal:100:0.5", 100 * np.exp(0.125))])
def test_sampled_means_match(spec, mean):
    d = Distribution.parse(spec)
    rng = np.random.default_rng(1)
    assert np.mean([d.sample(rng) for _ in range(20_000)]) == pytest.approx(mean, rel=0.03)
    assert d.mean == pytest.approx(mean)


def test_integer_samples_never_go_below_the_minimum():
    rng = np.random.default_rng(2)
    assert min(Distribution.parse("normal:2:10").sample_int(rng) for _ in range(1000)) == 1


@pytest.mark.parametrize("bad", ["", "x", "uniform:5", "uniform:9:3", "normal:5:-1", "exponential:0", "gauss:1:2", "-3", "1:2:3"])
def test_bad_distribution_specs_say_what_is_wrong(bad):
    with pytest.raises(ValueError):
        Distribution.parse(bad)


def test_range_ratio_is_vllms():
    assert with_range_ratio(Distribution.parse("100"), 0.5) == Distribution("uniform", 50, 150)
    assert with_range_ratio(Distribution.parse("100"), 0) == Distribution.parse("100")
    with pytest.raises(ValueError):
        with_range_ratio(Distribution.parse("uniform:1:5"), 0.5)


# ---- random -----------------------------------------------------------------------------------


def test_random_prompts_have_the_asked_lengths_and_ids_in_the_vocabulary():
    w = RandomWorkload(Distribution.parse("uniform:10:20"), Distribution.parse("7"), vocab_size=500, seed=5)
    specs = first_specs(w, 200)
    assert all(10 <= len(s.token_ids) <= 20 and s.max_tokens == 7 for s in specs)
    ids = np.concatenate([s.token_ids for s in specs])
    assert ids.min() >= 0 and ids.max() < 500 and len(np.unique(ids)) > 400
    assert len({tuple(s.token_ids[:8]) for s in specs}) == 200  # no shared prefixes


def test_same_seed_same_prompts_other_seed_other_prompts():
    make = lambda seed: RandomWorkload(Distribution.parse("normal:50:10"), Distribution.parse("uniform:1:9"), seed=seed)  # noqa: E731
    a, b, c = first_specs(make(1), 30), first_specs(make(1), 30), first_specs(make(2), 30)
    assert [(s.token_ids, s.max_tokens) for s in a] == [(s.token_ids, s.max_tokens) for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_random_text_is_words_from_the_list():
    w = RandomWorkload(Distribution.parse("40"), Distribution.parse("5"), prompt_format="text", seed=0)
    (spec,) = first_specs(w, 1)
    words = spec.text.split(" ")
    assert spec.prompt_kind == "text" and len(words) == 40
    assert all(word.lower() in WORDS for word in words)
    assert first_specs(w, 1)[0].text == spec.text


# ---- shared prefix ----------------------------------------------------------------------------


def test_shared_prefix_groups_share_their_prefix_in_token_space():
    block = 16
    w = SharedPrefixWorkload(num_groups=4, prompts_per_group=5, system_prompt_len=4 * block, question_len=Distribution.parse("uniform:8:24"),
                             output_len=Distribution.parse("8"), vocab_size=49152, seed=9)  # fmt: skip
    specs = first_specs(w, 40)  # two rounds
    by_group: dict[int, list[list[int]]] = {}
    for s in specs:
        by_group.setdefault(s.tags["group"], []).append(s.token_ids)
    assert sorted(by_group) == [0, 1, 2, 3] and all(len(p) == 10 for p in by_group.values())
    prefix_hashes = {}
    for g, prompts in by_group.items():
        assert all(p[: 4 * block] == w.system_prompts()[g] for p in prompts)
        hashes = [hash_blocks(p, block, "model") for p in prompts]
        assert all(h[:4] == hashes[0][:4] for h in hashes)  # the prefix blocks hash identically: cache hits
        assert len({tuple(p[4 * block :]) for p in prompts}) == len(prompts)  # the questions differ
        prefix_hashes[g] = hashes[0][0]
    assert len(set(prefix_hashes.values())) == 4  # and groups share nothing


def test_each_round_sends_every_group_prompts_per_group_times_interleaved():
    w = SharedPrefixWorkload(3, 4, 32, Distribution.parse("4"), Distribution.parse("4"), seed=0)
    groups = [s.tags["group"] for s in first_specs(w, 24)]
    for rnd in (groups[:12], groups[12:]):
        assert sorted(rnd) == [0] * 4 + [1] * 4 + [2] * 4
    assert groups[:12] != sorted(groups[:12])  # shuffled, so groups interleave


# ---- multi-turn -------------------------------------------------------------------------------


def test_conversation_resends_its_history_with_the_answers():
    w = MultiTurnWorkload(Distribution.parse("3"), Distribution.parse("5"), Distribution.parse("4"), system_prompt_len=6,
                          turn_delay=Distribution.parse("0.5"), vocab_size=1000, seed=2)  # fmt: skip
    conv = next(w.jobs())
    t1 = conv.next_request(None)
    assert len(t1.token_ids) == 11 and t1.delay == 0 and t1.tags == {"conversation": 0, "turn": 0}
    t2 = conv.next_request(Reply([901, 902, 903, 904], "abcd"))
    assert t2.token_ids[:11] == t1.token_ids and t2.token_ids[11:15] == [901, 902, 903, 904] and len(t2.token_ids) == 20
    assert t2.delay == 0.5
    t3 = conv.next_request(Reply([905], "e"))
    assert t3.token_ids[:20] == t2.token_ids and t3.token_ids[20] == 905
    assert conv.next_request(Reply([1], "f")) is None


def test_text_conversation_is_chat_messages_with_the_streamed_text():
    w = MultiTurnWorkload(Distribution.parse("2"), Distribution.parse("6"), Distribution.parse("4"), system_prompt_len=3, prompt_format="text", seed=0)
    conv = next(w.jobs())
    t1 = conv.next_request(None)
    assert [role for role, _ in t1.messages] == ["system", "user"] and len(t1.messages[1][1].split()) == 6
    t2 = conv.next_request(Reply([1, 2], " Paris is"))
    assert [role for role, _ in t2.messages] == ["system", "user", "assistant", "user"]
    assert t2.messages[2] == ("assistant", " Paris is") and t2.messages[:2] == t1.messages


def test_conversations_differ_and_shared_system_prompts_are_shared():
    make = lambda shared: MultiTurnWorkload(Distribution.parse("uniform:1:5"), Distribution.parse("4"), Distribution.parse("4"),  # noqa: E731
                                            system_prompt_len=8, shared_system_prompt=shared, seed=4)  # fmt: skip
    own = first_specs(make(False), 10)
    shared = first_specs(make(True), 10)
    assert len({tuple(s.token_ids[:8]) for s in own}) == 10
    assert len({tuple(s.token_ids[:8]) for s in shared}) == 1
    turns = [conv.num_turns for conv in itertools.islice(make(False).jobs(), 200)]
    assert set(turns) == {1, 2, 3, 4, 5}


# ---- JSONL ------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_file_lines_become_requests_in_order_and_cycle(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Explain KV caching.", "output_len": 9},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"prompt_token_ids": [5, 6, 7], "max_tokens": 3},
        {"input_len": 12},
        "",
    ])  # fmt: skip
    w = FileWorkload(path, Distribution.parse("20"), vocab_size=100, seed=0)
    specs = first_specs(w, 8)
    assert specs[0].text == "Explain KV caching." and specs[0].max_tokens == 9
    assert specs[1].messages == [("user", "Hi")] and specs[1].max_tokens == 20
    assert specs[2].token_ids == [5, 6, 7] and specs[2].max_tokens == 3
    assert len(specs[3].token_ids) == 12 and max(specs[3].token_ids) < 100
    assert [s.tags["line"] for s in specs] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert specs[7].token_ids != specs[3].token_ids  # token counts are refilled each pass


def test_shuffled_file_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input_len": i + 1} for i in range(20)])
    order = lambda seed: [s.tags["line"] for s in first_specs(FileWorkload(path, Distribution.parse("4"), shuffle=True, seed=seed), 20)]  # noqa: E731
    assert order(1) == order(1) and sorted(order(1)) == list(range(1, 21)) and order(1) != list(range(1, 21))
    assert order(1) != order(2)


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"), ("[1, 2]", "JSON object"), ('{"output_len": 3}', "exactly one of"),
    ('{"prompt": "a", "input_len": 3}', "exactly one of"), ('{"prompt": ""}', "non-empty"),
    ('{"prompt_token_ids": [1, -2]}', "non-negative"), ('{"input_len": 0}', ">= 1"),
    ('{"messages": [{"role": "user"}]}', "messages"), ('{"prompt": "a", "output_len": 0}', "output_len"),
])  # fmt: skip
def test_bad_file_lines_are_reported_with_their_line_number(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        FileWorkload(path, Distribution.parse("4"))


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        FileWorkload(write_jsonl(tmp_path / "e.jsonl", [""]), Distribution.parse("4"))
