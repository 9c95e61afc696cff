"""API keys: the setting's forms, and what a presented Authorization value gets."""

from __future__ import annotations

import pytest

from gateway.api_keys import ApiKeys, KeyCheck


def test_no_keys_means_open():
    keys = ApiKeys.from_setting("")
    assert not keys.enabled
    assert keys.check(None) is KeyCheck.OK and keys.check("Bearer anything") is KeyCheck.OK


@pytest.mark.parametrize(
    "authorization, expected",
    [
        (None, KeyCheck.MISSING),
        ("", KeyCheck.MISSING),
        ("Bearer key-one", KeyCheck.OK),
        ("bearer key-two", KeyCheck.OK),
        ("Bearer  key-two ", KeyCheck.OK),
        ("Bearer key-three", KeyCheck.INVALID),
        ("Basic key-one", KeyCheck.INVALID),
        ("key-one", KeyCheck.INVALID),
        ("Bearer ", KeyCheck.INVALID),
        ("Bearer key-on", KeyCheck.INVALID),
    ],
)
def test_comma_separated_keys(authorization, expected):
    assert ApiKeys.from_setting("key-one, key-two").check(authorization) is expected


def test_a_key_file_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team a\nalpha\n\n  beta  \n")
    keys = ApiKeys.from_setting(f"@{path}")
    assert keys.check("Bearer alpha") is KeyCheck.OK and keys.check("Bearer beta") is KeyCheck.OK
    assert keys.check("Bearer # team a") is KeyCheck.INVALID


@pytest.mark.parametrize("setting, says", [("a,,b", "empty key"), ("@/no/such/file", "cannot read"), ("a b", "no spaces")])
def test_bad_settings_say_what_is_wrong(setting, says):
    with pytest.raises(ValueError, match=says):
        ApiKeys.from_setting(setting)


def test_an_empty_key_file_is_an_error(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_setting(f"@{path}")
