"""The scheduling config changes live through the cluster's etcd key: a valid document is applied,
an invalid one is ignored (the last good config stays), deleting the key reverts to the gateway's
own settings; `tandem scheduling` writes only what validates."""

from __future__ import annotations

import asyncio

import pytest

from gateway.scheduling.live_config import LiveSchedulingConfig, delete_scheduling_document, get_scheduling_document, put_scheduling_document
from gateway.scheduling.scheduling_config import SchedulingConfig
from services.common.registry import make_client
from tandem.cli import main as tandem_main
from tests.helpers.waiting import eventually


async def test_live_config_applies_rejects_and_reverts(etcd):
    base = SchedulingConfig(policy="least-loaded")
    seen: list[SchedulingConfig] = []
    live = LiveSchedulingConfig(etcd, "c1", base, seen.append)
    live.start()
    try:
        await asyncio.wait_for(live.synced.wait(), 10)
        assert live.current == base and seen[-1] == base  # no key: the gateway's own settings

        await put_scheduling_document(etcd, "c1", 'policy = "round-robin"\n[weights]\nqueue_depth = 4.0\n')
        await eventually(lambda: live.current.policy == "round-robin", "the document to apply")
        assert live.current.weights.queue_depth == 4.0 and live.current.weights.kv_usage == base.weights.kv_usage

        client = make_client(etcd)  # an invalid document written behind the CLI's back
        await client.put(live.key.encode(), b'{"policy": "fastest"}')
        await client.put(b"/tandem/c1/config/scheduling-other", b"ignored")  # shares the prefix only
        await client.close()
        await eventually(lambda: live.num_rejected == 1, "the invalid document to be rejected")
        assert live.current.policy == "round-robin"  # the last good config stays

        await delete_scheduling_document(etcd, "c1")
        await eventually(lambda: live.current == base, "the delete to revert to the base config")
    finally:
        await live.stop()


async def test_put_validates_before_writing(etcd):
    with pytest.raises(ValueError, match="thresholds.queue_saturation must be >= 1"):
        await put_scheduling_document(etcd, "c2", '{"thresholds": {"queue_saturation": 0}}')
    assert await get_scheduling_document(etcd, "c2") is None


def test_tandem_scheduling_cli(etcd, tmp_path, capsys):
    doc = tmp_path / "sched.toml"
    doc.write_text('picker = "weighted-random"\n')
    assert tandem_main(["scheduling", "--etcd", etcd, "--cluster", "c3", "set", str(doc)]) == 0
    assert tandem_main(["scheduling", "--etcd", etcd, "--cluster", "c3", "show"]) == 0
    assert '"picker": "weighted-random"' in capsys.readouterr().out
    doc.write_text('picker = "best"\n')
    assert tandem_main(["scheduling", "--etcd", etcd, "--cluster", "c3", "set", str(doc)]) == 2
    assert "picker must be one of" in capsys.readouterr().err
    assert tandem_main(["scheduling", "--etcd", etcd, "--cluster", "c3", "reset"]) == 0
    assert tandem_main(["scheduling", "--etcd", etcd, "--cluster", "c3", "show"]) == 0
    assert "is not set" in capsys.readouterr().out
