"""LiveSchedulingConfig: the scheduling config, changed at run time through one etcd key.

    /tandem/<cluster>/config/scheduling   a scheduling document (JSON or TOML, see
                                          scheduling_config.py), merged over the gateway's own
                                          config (settings < file); deleting the key reverts

Every gateway of the cluster watches the key (snapshot, then watch from the next revision, as
the worker registry does), so one `tandem scheduling set` retunes them all within a moment. A
document that does not validate is logged and ignored: the gateway keeps the last good config.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.common.registry import RegistryWatcher, WatchEvent, make_client

from .scheduling_config import SchedulingConfig, parse_document

log = logging.getLogger(__name__)


def scheduling_key(cluster: str) -> str:
    return f"/tandem/{cluster}/config/scheduling"


class LiveSchedulingConfig:
    """Applies the etcd key over `base` and calls `on_change(config)` with each valid result."""

    def __init__(self, etcd: str, cluster: str, base: SchedulingConfig, on_change: Callable[[SchedulingConfig], None]):
        self.base = base
        self.current = base
        self.key = scheduling_key(cluster)
        self.num_rejected = 0
        self._on_change = on_change
        self._watcher = RegistryWatcher(etcd, cluster, self._apply, prefix=self.key, decode=lambda key, value: value)

    @property
    def synced(self) -> asyncio.Event:
        return self._watcher.synced

    def start(self) -> None:
        self._watcher.start()

    async def stop(self) -> None:
        await self._watcher.stop()

    def _apply(self, event: WatchEvent) -> None:
        if event.kind == "snapshot":
            value = (event.registrations or {}).get(self.key)
        elif event.key != self.key:
            return  # a longer key that merely shares the prefix
        else:
            value = event.registration if event.kind == "put" else None
        if value is None:
            config = self.base
        else:
            try:
                config = self.base.merged(parse_document(value))
            except (ValueError, TypeError) as e:
                self.num_rejected += 1
                log.error("ignoring the scheduling config at %s (keeping the last good one): %s", self.key, e)
                return
        if config != self.current:
            log.info(
                "scheduling config from %s: policy %s, picker %s", self.key if value is not None else "the gateway's settings", config.policy, config.picker
            )
        self.current = config
        self._on_change(config)


async def put_scheduling_document(etcd: str, cluster: str, text: str, base: SchedulingConfig | None = None) -> SchedulingConfig:
    """Validate a scheduling document and store it at the cluster's key. Returns the config it
    makes over `base` (defaults). Raises ValueError before writing anything invalid."""
    config = (base or SchedulingConfig()).merged(parse_document(text))
    client = make_client(etcd)
    try:
        await client.put(scheduling_key(cluster).encode(), text.encode())
    finally:
        await client.close()
    return config


async def delete_scheduling_document(etcd: str, cluster: str) -> None:
    client = make_client(etcd)
    try:
        await client.delete(scheduling_key(cluster).encode())
    finally:
        await client.close()


async def get_scheduling_document(etcd: str, cluster: str) -> str | None:
    client = make_client(etcd)
    try:
        result = await client.get(scheduling_key(cluster).encode())
    finally:
        await client.close()
    return None if result is None else result.value.decode()
