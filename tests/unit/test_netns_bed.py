"""The multi-host test bed (tests/helpers/netns.py): hosts reach each other by name and nothing else,
and everything it made is gone afterwards, even when the test fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.netns import NETNS_ETC, NetnsBed, unavailable_reason

_UNAVAILABLE = unavailable_reason()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"no network namespaces here: {_UNAVAILABLE}")

CONNECT = "import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close(); print('connected')\nexcept OSError as e:\n    print(type(e).__name__, e.errno)\n"  # fmt: skip
LISTEN = "import socket, sys, time\ns = socket.socket(); s.bind((sys.argv[1], 7000)); s.listen(); print('up', flush=True); time.sleep(60)\n"


def namespaces() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines() if line}


def test_hosts_reach_each_other_by_name_and_nothing_else():
    with NetnsBed(["alpha", "beta"]) as bed:
        server = subprocess.Popen(bed.command("beta", [sys.executable, "-c", LISTEN, bed.address("beta")]), stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "up"
            assert bed.run("alpha", [sys.executable, "-c", CONNECT, "beta", "7000"]).stdout.strip() == "connected"
            # no default route: an address outside the bed is unreachable at once, never tried
            outside = bed.run("alpha", [sys.executable, "-c", CONNECT, "192.0.2.1", "80"]).stdout
            assert outside.startswith("OSError 101"), f"ENETUNREACH expected, got {outside!r}"
            assert bed.run("alpha", ["ip", "route", "show", "default"]).stdout == ""
            assert bed.address("alpha").startswith("198.18.")
            bed.partition("beta")
            assert bed.run("alpha", [sys.executable, "-c", CONNECT, "beta", "7000"]).stdout.strip() != "connected"
            bed.heal("beta")
        finally:
            server.kill()
            server.wait()


def test_everything_is_removed_when_the_test_fails():
    before = namespaces()
    with pytest.raises(RuntimeError, match="the test failed"):
        with NetnsBed(["alpha", "beta"]) as bed:
            made = namespaces() - before
            assert made == {bed.netns("alpha"), bed.netns("beta"), bed.bridge_ns}
            # a process left running inside a host is killed with the bed
            straggler = subprocess.Popen(bed.command("alpha", ["sleep", "60"]))
            raise RuntimeError("the test failed")
    assert straggler.wait(10) == -9
    assert namespaces() == before
    assert not any((NETNS_ETC / ns).exists() for ns in made)


def test_two_beds_at_once_do_not_collide():
    with NetnsBed(["alpha"]) as one, NetnsBed(["alpha"]) as two:
        assert one.netns("alpha") != two.netns("alpha")
        assert one.address("alpha") == two.address("alpha")  # same address, separate networks
