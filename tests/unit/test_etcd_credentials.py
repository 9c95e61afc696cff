"""Where a service's etcd password comes from (etcd_auth.py): a file or the environment, never a
flag; every misconfiguration is a ValueError naming the setting and never echoing the password."""

from __future__ import annotations

import argparse

import pytest

from services.common.config import add_config_args, load_config
from services.common.etcd_auth import EtcdAuthError, EtcdCredentials, credentials_from_config, explain_refusal

SECRET = "s3cret-pw-4711"


def config(tmp_path, *argv: str, environ=None):
    parser = argparse.ArgumentParser()
    add_config_args(parser, "decode")
    return load_config("decode", parser.parse_args(list(argv)), environ=environ or {})


def password_file(tmp_path, text=SECRET + "\n"):
    path = tmp_path / "etcd-password"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_the_password_comes_from_the_file_without_its_final_newline(tmp_path):
    c = config(tmp_path, "--etcd-username", "tandem", "--etcd-password-file", str(password_file(tmp_path)))
    creds = credentials_from_config(c, environ={})
    assert creds == EtcdCredentials("tandem", SECRET)
    assert SECRET not in repr(creds) and SECRET not in repr(c)


def test_the_password_comes_from_the_environment(tmp_path):
    c = config(tmp_path, environ={"TANDEM_ETCD_USERNAME": "tandem"})
    assert credentials_from_config(c, environ={"TANDEM_ETCD_PASSWORD": SECRET}) == EtcdCredentials("tandem", SECRET)


def test_no_user_means_no_authentication(tmp_path):
    assert credentials_from_config(config(tmp_path), environ={}) is None


def test_a_password_flag_is_refused_without_echoing_it(tmp_path, capsys):
    """Not taken as an abbreviation of --etcd-password-file, which would print the password as a file name."""
    with pytest.raises(ValueError) as err:
        config(tmp_path, "--etcd-password", SECRET)
    assert "--etcd-password-file" in str(err.value) and "TANDEM_ETCD_PASSWORD" in str(err.value) and SECRET not in str(err.value)
    from tandem.cli import main

    assert main(["scheduling", "--etcd-username", "tandem", "--etcd-password", SECRET, "show"]) == 2
    err = capsys.readouterr().err
    assert "--etcd-password-file" in err and SECRET not in err


@pytest.mark.parametrize("argv, environ, fragment", [
    (["--etcd-username", "tandem"], {}, "has no password: set etcd_password_file"),
    (["--etcd-password-file", "/x"], {}, "etcd_username is not"),
    ([], {"TANDEM_ETCD_PASSWORD": SECRET}, "etcd_username is not"),
    (["--etcd-username", "tandem", "--etcd-password-file", "/nonexistent/pw"], {}, "etcd_password_file: cannot read '/nonexistent/pw'"),
    (["--etcd-username", "tandem", "--etcd-password-file", "PWFILE"], {"TANDEM_ETCD_PASSWORD": SECRET}, "keep one"),
    (["--etcd-username", "tandem", "--etcd-password-file", "EMPTY"], {}, "is empty"),
])  # fmt: skip
def test_misconfiguration_names_the_setting_and_not_the_password(tmp_path, argv, environ, fragment):
    files = {"PWFILE": str(password_file(tmp_path)), "EMPTY": str(password_file(tmp_path, "\n"))}
    c = config(tmp_path, *[files.get(a, a) for a in argv])
    with pytest.raises(ValueError) as err:
        credentials_from_config(c, environ=environ)
    assert fragment in str(err.value) and SECRET not in str(err.value)


class FakeRpcError(Exception):
    def __init__(self, details):
        self._details = details

    def details(self):
        return self._details


@pytest.mark.parametrize("details, fragment", [
    ("etcdserver: authentication failed, invalid user ID or password", "wrong password or no such user"),
    ("etcdserver: user name is empty", "requires authentication"),
    ("etcdserver: permission denied", "permission to register /k"),
])  # fmt: skip
def test_refusals_are_explained_whether_raw_or_wrapped_by_aetcd(details, fragment):
    for error in (FakeRpcError(details), _wrapped(details)):
        refusal = explain_refusal(error, "etcd:2379", "register /k")
        assert isinstance(refusal, EtcdAuthError) and fragment in str(refusal) and "etcd:2379" in str(refusal)


def test_outages_and_stale_tokens_are_not_refusals():
    for details in ("failed to connect to all addresses", "etcdserver: invalid auth token", "etcdserver: request timed out"):
        assert explain_refusal(FakeRpcError(details), "etcd:2379", "x") is None


def _wrapped(details):
    try:
        try:
            raise FakeRpcError(details)
        except FakeRpcError as e:
            raise RuntimeError("") from e  # aetcd's ClientError(details) from AioRpcError, but with an empty message
    except RuntimeError as outer:
        return outer
