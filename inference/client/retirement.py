"""Which model plugins a newer configuration supersedes, and unregistering them (adapter).

Every configuration registers its model under a plugin name of its own on every Dask worker.
After a rolling update the old configuration's plugin (and its model, in worker memory) would
stay forever; ``retire_superseded`` unregisters those of the same *lineage* (the same deployment)
once no batch used them for a while. Other lineages' plugins (a second configuration sharing the
cluster, a notebook client) are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from inference.worker.plugin import LEGACY_LINEAGE, ResidentModel, plugin_usage

log = logging.getLogger(__name__)


async def retire_superseded(client: Any, plugin: ResidentModel, idle_s: float, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Unregister the model plugins ``plugin`` superseded (``superseded``): the workers
    release the old model. Other configurations' and notebook clients' plugins stay, and so do
    those in ``keep`` (a canary's candidate)."""
    usage = await client.run(plugin_usage)
    retired = [name for name in superseded(usage, plugin.name, plugin.lineage, idle_s) if name not in keep]
    for name in retired:
        log.info("unregistering model plugin %s: superseded by %s (line %s)", name, plugin.name, plugin.lineage)
        await client.unregister_worker_plugin(name)
    return retired


def superseded(usage: Mapping[str, Mapping[str, Sequence[Any]]], own: str, lineage: str | None, idle_s: float) -> list[str]:
    """The plugins ``own`` supersedes, given ``plugin_usage`` of every worker: those of the same
    lineage (an earlier configuration of the same deployment, after a rolling update) and those a
    release without lineages registered, once no batch used them for ``idle_s`` on any worker.
    Another lineage's (two configurations sharing a cluster, a notebook client's) never are; a
    plugin without a lineage of its own (None) supersedes nothing. Workers of an earlier release
    report no lineage: their plugins count as legacy. Pure."""
    if lineage is None:
        return []
    busy: set[str] = set()
    lines: dict[str, set[Any]] = {}
    for per_plugin in usage.values():
        for name, report in per_plugin.items():
            active, idle = report[0], report[1]
            lines.setdefault(name, set()).add(report[2] if len(report) > 2 else LEGACY_LINEAGE)
            if active or idle < idle_s:
                busy.add(name)
    return sorted(name for name, found in lines.items() if name != own and name not in busy and found <= {lineage, LEGACY_LINEAGE})
