"""No secret on a command line: the gateway refuses API keys as a flag value, and `tandem bench`
never records its --api-key in result.json."""

from __future__ import annotations

import argparse

import pytest

from loadtest.run_info import command_line
from services.common.config import add_config_args, load_config


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_args(parser, "gateway")
    return parser.parse_args(list(argv))


def test_api_keys_on_the_command_line_are_refused_with_the_alternatives():
    with pytest.raises(ValueError) as err:
        load_config("gateway", parse("--api-keys", "sk-secret-1,sk-secret-2"), environ={})
    message = str(err.value)
    assert "--api-keys @FILE" in message and "TANDEM_API_KEYS" in message
    assert "sk-secret" not in message  # the refusal does not echo the key into logs


def test_api_keys_from_a_file_flag_or_the_environment_are_accepted(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    assert load_config("gateway", parse("--api-keys", f"@{keys}"), environ={}).api_keys == f"@{keys}"
    assert load_config("gateway", parse(), environ={"TANDEM_API_KEYS": "k1,k2"}).api_keys == "k1,k2"


@pytest.mark.parametrize("argv", [["--api-key", "sk-bench-key", "-n", "3"], ["--api-key=sk-bench-key", "-n", "3"]])
def test_bench_results_never_record_the_api_key(argv):
    recorded = command_line(argv)
    assert "sk-bench-key" not in recorded
    assert "--api-key" in recorded and "-n 3" in recorded
