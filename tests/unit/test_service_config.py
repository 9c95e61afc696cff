"""load_config: defaults < TOML file < TANDEM_<FIELD> environment < flags, per role."""

from __future__ import annotations

import argparse
import re
import socket

import pytest

from services.common.config import (
    DEFAULT_GRPC_PORTS,
    DEFAULT_METRICS_PORTS,
    ROLES,
    ServiceConfig,
    add_config_args,
    load_config,
)

HOSTNAME = "node-7"


@pytest.fixture(autouse=True)
def fixed_hostname(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: HOSTNAME)


def flags(role, *argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser, role)
    return parser.parse_args(list(argv))


def write_toml(tmp_path, text, name="tandem.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_role_default_ports(role):
    cfg = load_config(role, flags(role), environ={})
    assert cfg.role == role
    assert cfg.port == DEFAULT_GRPC_PORTS[role]
    assert cfg.metrics_port == DEFAULT_METRICS_PORTS[role]
    assert cfg.address == f"127.0.0.1:{DEFAULT_GRPC_PORTS[role]}"
    assert cfg.bind_address == f"127.0.0.1:{DEFAULT_GRPC_PORTS[role]}"
    assert cfg.metrics_address == f"127.0.0.1:{DEFAULT_METRICS_PORTS[role]}"


def test_default_port_table_values():
    assert DEFAULT_GRPC_PORTS == {"gateway": 50050, "tokenizer": 50051, "prefill": 50052, "decode": 50053}
    assert DEFAULT_METRICS_PORTS == {"gateway": 9400, "tokenizer": 9401, "prefill": 9402, "decode": 9403}


def test_defaults_of_other_settings():
    cfg = load_config("decode", None, environ={})
    assert (cfg.host, cfg.cluster, cfg.etcd, cfg.lease_ttl, cfg.drain_timeout, cfg.log_level) == (
        "127.0.0.1",
        "default",
        "127.0.0.1:2379",
        10,
        30.0,
        "info",
    )
    assert (cfg.model, cfg.dtype, cfg.kv_cache_gb, cfg.block_size, cfg.max_num_seqs) == ("default", "auto", 1.0, 16, 128)


@pytest.mark.parametrize(
    "metrics_flag, expected",
    [(None, 9403), ("-1", 9403), ("0", 0), ("9999", 9999)],
)
def test_metrics_port_minus_one_is_default_zero_is_off(metrics_flag, expected):
    argv = [] if metrics_flag is None else [f"--metrics-port={metrics_flag}"]
    cfg = load_config("decode", flags("decode", *argv), environ={})
    assert cfg.metrics_port == expected
    assert cfg.metrics_address == ("" if expected == 0 else f"127.0.0.1:{expected}")


@pytest.mark.parametrize(
    "argv, advertise",
    [
        ([], "127.0.0.1"),
        (["--host", "10.1.2.3"], "10.1.2.3"),
        (["--host", "0.0.0.0"], HOSTNAME),
        (["--host", "::"], HOSTNAME),
        (["--host", "[::]"], HOSTNAME),
        (["--host", "0.0.0.0", "--advertise-host", "svc.example"], "svc.example"),
        (["--advertise-host", "pub.example"], "pub.example"),
    ],
)
def test_advertise_host(argv, advertise):
    cfg = load_config("prefill", flags("prefill", *argv), environ={})
    assert cfg.advertise_host == advertise
    assert cfg.address == f"{advertise}:50052"


@pytest.mark.parametrize("role", ROLES)
def test_worker_id_generated_with_role_prefix(role):
    a = load_config(role, flags(role), environ={})
    b = load_config(role, flags(role), environ={})
    assert re.fullmatch(rf"{role}-{HOSTNAME}-[0-9a-f]{{8}}", a.worker_id), a.worker_id
    assert a.worker_id != b.worker_id


def test_worker_id_given_is_kept():
    assert load_config("decode", flags("decode", "--worker-id", "decode-0"), environ={}).worker_id == "decode-0"


# ---- precedence ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toml_top, toml_table, env, flag, expected",
    [
        (None, None, None, None, 50053),
        (1001, None, None, None, 1001),
        (1001, 1002, None, None, 1002),
        (None, 1002, None, None, 1002),
        (1001, 1002, "1003", None, 1003),
        (1001, None, "1003", None, 1003),
        (None, None, "1003", None, 1003),
        (1001, 1002, "1003", "1004", 1004),
        (None, None, "1003", "1004", 1004),
        (1001, None, None, "1004", 1004),
        (None, None, None, "1004", 1004),
    ],
)
def test_precedence_default_toml_env_flag(tmp_path, toml_top, toml_table, env, flag, expected):
    text = ""
    if toml_top is not None:
        text += f"port = {toml_top}\n"
    text += "[gateway]\nport = 7\n"  # another role's table never applies
    if toml_table is not None:
        text += f"[decode]\nport = {toml_table}\n"
    path = write_toml(tmp_path, text)
    environ = {} if env is None else {"TANDEM_PORT": env}
    argv = ["--config", path] + ([] if flag is None else ["--port", flag])
    cfg = load_config("decode", flags("decode", *argv), environ=environ)
    assert cfg.port == expected
    assert isinstance(cfg.port, int)


def test_toml_file_from_tandem_config_env(tmp_path):
    path = write_toml(tmp_path, 'cluster = "blue"\nkv_cache_gb = 2.5\n[prefill]\nmax_num_seqs = 8\n')
    cfg = load_config("prefill", flags("prefill"), environ={"TANDEM_CONFIG": path})
    assert (cfg.cluster, cfg.kv_cache_gb, cfg.max_num_seqs) == ("blue", 2.5, 8)


def test_config_flag_wins_over_tandem_config_env(tmp_path):
    env_file = write_toml(tmp_path, 'cluster = "from-env-file"\n', "env.toml")
    flag_file = write_toml(tmp_path, 'cluster = "from-flag-file"\n', "flag.toml")
    cfg = load_config("decode", flags("decode", "--config", flag_file), environ={"TANDEM_CONFIG": env_file})
    assert cfg.cluster == "from-flag-file"


@pytest.mark.parametrize(
    "env, attr, expected",
    [
        ({"TANDEM_ETCD": "10.0.0.5:2379"}, "etcd", "10.0.0.5:2379"),
        ({"TANDEM_KV_CACHE_GB": "0.25"}, "kv_cache_gb", 0.25),
        ({"TANDEM_KV_CACHE_GB": "3"}, "kv_cache_gb", 3.0),
        ({"TANDEM_MAX_NUM_SEQS": "4"}, "max_num_seqs", 4),
        ({"TANDEM_DRAIN_TIMEOUT": "1.5"}, "drain_timeout", 1.5),
        ({"TANDEM_LOG_LEVEL": "debug"}, "log_level", "debug"),
        ({"tandem_log_level": "debug"}, "log_level", "info"),  # names are upper case
        ({"TANDEM_PORT": "6000", "TANDEM_METRICS_PORT": "0"}, "metrics_port", 0),
    ],
)
def test_environment_values_are_typed(env, attr, expected):
    cfg = load_config("decode", flags("decode"), environ=env)
    assert getattr(cfg, attr) == expected
    assert type(getattr(cfg, attr)) is type(expected)


def test_flag_types():
    cfg = load_config("decode", flags("decode", "--kv-cache-gb", "2", "--block-size", "32", "--dtype", "float32"), environ={})
    assert (cfg.kv_cache_gb, cfg.block_size, cfg.dtype) == (2.0, 32, "float32")
    assert type(cfg.kv_cache_gb) is float and type(cfg.block_size) is int


def test_load_config_without_args_uses_environ_only():
    cfg = load_config("gateway", None, environ={"TANDEM_DEFAULT_MAX_TOKENS": "17"})
    assert cfg.default_max_tokens == 17


def test_load_config_reads_os_environ_when_environ_is_none(monkeypatch):
    monkeypatch.setenv("TANDEM_CLUSTER", "from-os-environ")
    assert load_config("decode", flags("decode")).cluster == "from-os-environ"


# ---- settings of other roles -------------------------------------------------------------------------


def test_shared_file_with_worker_settings_is_fine_for_the_gateway(tmp_path):
    path = write_toml(tmp_path, "kv_cache_gb = 4.0\ndefault_max_tokens = 99\n[decode]\nmax_num_seqs = 3\n")
    gw = load_config("gateway", flags("gateway", "--config", path), environ={})
    assert gw.default_max_tokens == 99
    assert gw.kv_cache_gb == 1.0, "worker settings do not apply to the gateway"
    dec = load_config("decode", flags("decode", "--config", path), environ={})
    assert (dec.kv_cache_gb, dec.max_num_seqs, dec.default_max_tokens) == (4.0, 3, 256)


def test_worker_env_vars_are_ignored_by_the_gateway():
    cfg = load_config("gateway", flags("gateway"), environ={"TANDEM_KV_CACHE_GB": "not-a-number"})
    assert cfg.kv_cache_gb == 1.0


@pytest.mark.parametrize(
    "role, argv",
    [
        ("gateway", ["--kv-cache-gb", "2"]),
        ("gateway", ["--model", "x"]),
        ("gateway", ["--max-num-seqs", "4"]),
        ("tokenizer", ["--dtype", "float32"]),
        ("decode", ["--default-max-tokens", "5"]),
        ("prefill", ["--max-prompt-tokens", "5"]),
        ("decode", ["--port", "abc"]),
        ("decode", ["--kv-cache-gb", "lots"]),
    ],
)
def test_flags_not_for_the_role_or_badly_typed_exit(role, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        flags(role, *argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    "role, argv",
    [
        ("gateway", ["--default-max-tokens", "5", "--max-prompt-tokens", "100"]),
        ("tokenizer", ["--model", "/m"]),
        ("decode", ["--model", "/m", "--kv-cache-gb", "2"]),
        ("prefill", ["--num-kv-blocks", "64"]),
    ],
)
def test_flags_for_the_role_are_accepted(role, argv):
    flags(role, *argv)


# ---- errors ----------------------------------------------------------------------------------------


def test_unknown_role():
    with pytest.raises(ValueError, match=r"role must be one of gateway, tokenizer, prefill, decode, got 'robot'"):
        load_config("robot", None, environ={})


def test_unknown_role_in_dataclass():
    with pytest.raises(ValueError, match="role must be one of"):
        ServiceConfig(role="worker")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TANDEM_PORT": "abc"}, "environment variable TANDEM_PORT must be int, got 'abc'"),
        ({"TANDEM_PORT": "1.5"}, "environment variable TANDEM_PORT must be int, got '1.5'"),
        ({"TANDEM_LEASE_TTL": ""}, "environment variable TANDEM_LEASE_TTL must be int, got ''"),
        ({"TANDEM_KV_CACHE_GB": "big"}, "environment variable TANDEM_KV_CACHE_GB must be float, got 'big'"),
    ],
)
def test_bad_value_in_env_names_the_variable(env, message):
    with pytest.raises(ValueError) as exc:
        load_config("decode", flags("decode"), environ=env)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    "text, key",
    [
        ("prot = 1\n", "prot"),
        ("[decode]\nkv_cache = 2\n", "kv_cache"),
        ('role = "gateway"\n', "role"),
        ('config = "other.toml"\n', "config"),
    ],
)
def test_unknown_key_in_toml_names_file_and_key(tmp_path, text, key):
    path = write_toml(tmp_path, text)
    with pytest.raises(ValueError) as exc:
        load_config("decode", flags("decode", "--config", path), environ={})
    assert str(exc.value) == f"{path}: unknown setting {key!r}"


def test_bad_type_in_toml_names_the_setting(tmp_path):
    path = write_toml(tmp_path, 'port = "fifty"\n')
    with pytest.raises(ValueError, match=r"^setting port must be int, got 'fifty'$"):
        load_config("decode", flags("decode", "--config", path), environ={})


def test_int_in_toml_for_a_float_setting_is_fine(tmp_path):
    path = write_toml(tmp_path, "kv_cache_gb = 2\n")
    cfg = load_config("decode", flags("decode", "--config", path), environ={})
    assert cfg.kv_cache_gb == 2.0 and type(cfg.kv_cache_gb) is float


def test_bool_in_toml_for_an_int_setting_is_rejected(tmp_path):
    path = write_toml(tmp_path, "max_num_seqs = true\n")
    with pytest.raises(ValueError, match="max_num_seqs"):
        load_config("decode", flags("decode", "--config", path), environ={})


def test_fractional_float_in_toml_for_an_int_setting_is_rejected(tmp_path):
    path = write_toml(tmp_path, "max_num_seqs = 2.7\n")
    with pytest.raises(ValueError, match="max_num_seqs"):
        load_config("decode", flags("decode", "--config", path), environ={})


@pytest.mark.parametrize("cluster", ["a/b", "/", "prod/", ""])
def test_cluster_must_be_a_name_without_slash(cluster):
    with pytest.raises(ValueError, match=r"cluster must be a non-empty name without '/'"):
        load_config("decode", flags("decode", "--cluster", cluster), environ={})


@pytest.mark.parametrize("ttl, ok", [(-1, False), (0, False), (1, False), (2, True), (30, True)])
def test_lease_ttl_at_least_two(ttl, ok):
    environ = {"TANDEM_LEASE_TTL": str(ttl)}
    if ok:
        assert load_config("decode", flags("decode"), environ=environ).lease_ttl == ttl
    else:
        with pytest.raises(ValueError, match=rf"lease_ttl must be >= 2 seconds .*got {ttl}$"):
            load_config("decode", flags("decode"), environ=environ)


def test_missing_config_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config("decode", flags("decode", "--config", str(tmp_path / "nope.toml")), environ={})
