"""Without etcd installed, `tandem up` says how to install it."""

import pytest

import tandem.etcd_process as etcd_process


def test_missing_etcd_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(etcd_process.shutil, "which", lambda name: None)
    monkeypatch.setattr(etcd_process, "ETCD_FALLBACK_PATHS", ())
    with pytest.raises(etcd_process.EtcdNotFoundError, match=r"apt-get install -y etcd-server.*--etcd HOST:PORT"):
        etcd_process.find_etcd()


def test_cli_up_reports_missing_etcd_without_a_traceback(monkeypatch, tmp_path, capsys):
    from tandem.cli import main

    monkeypatch.setattr(etcd_process.shutil, "which", lambda name: None)
    monkeypatch.setattr(etcd_process, "ETCD_FALLBACK_PATHS", ())
    assert main(["up", "--workdir", str(tmp_path), "--base-port", "61000"]) == 1
    err = capsys.readouterr().err
    assert "tandem: error: etcd is not on PATH" in err and "Traceback" not in err
