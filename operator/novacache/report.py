"""What one reconcile did, per site, node and image: the engine's output, the CLI's table and JSON.

Plain data with no Kubernetes in it; `status` folds it into a bounded CR status.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from .units import format_size


class State(str, enum.Enum):
    """The outcome for one image on one node."""

    CACHED = "cached"                 # present, verified, and fresh; nothing needed doing
    FILLED = "filled"                 # transferred, verified and renamed into place by this run
    REFRESHED = "refreshed"           # present and verified; its age was reset by this run
    MISSING = "missing"               # absent and not filled (a dry run)
    FAILED = "failed"                 # absent or bad, and this run could not fix it: see reason
    NOT_APPLICABLE = "not-applicable"  # the node does not use Nova's image cache (RBD)

    @property
    def ready(self) -> bool:
        return self in (State.CACHED, State.FILLED, State.REFRESHED, State.NOT_APPLICABLE)


@dataclass
class ImageResult:
    image_id: str
    image_name: str
    state: State
    bytes_moved: int = 0     # bytes this node received
    wan_bytes: int = 0       # of those, bytes that came from Glance over the site's WAN link
    seconds: float = 0.0
    source: str = ""         # "glance", or "relay from <node>"
    reason: str = ""


@dataclass
class NodeResult:
    site: str
    node: str
    address: str
    images: list[ImageResult] = field(default_factory=list)
    cache_dir: str = ""
    nova_conf: str | None = None
    free_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    error: str = ""   # why the node as a whole could not be handled

    @property
    def ready(self) -> bool:
        return not self.error and all(result.state.ready for result in self.images)


@dataclass
class Report:
    policy: str
    started_at: float
    finished_at: float = 0.0
    images: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[NodeResult] = field(default_factory=list)
    error: str = ""   # why the reconcile as a whole could not run (bad spec, Glance unreachable)

    @property
    def ok(self) -> bool:
        """Every target node holds every image, verified and fresh (or does not use the cache)."""
        return not self.error and all(node.ready for node in self.nodes)

    @property
    def bytes_moved(self) -> int:
        return sum(result.bytes_moved for node in self.nodes for result in node.images)

    def wan_bytes(self, site: str | None = None) -> int:
        """Bytes that crossed a site's WAN link from Glance (all sites when site is None)."""
        return sum(result.wan_bytes for node in self.nodes if site in (None, node.site) for result in node.images)

    def count(self, state: State) -> int:
        return sum(result.state is state for node in self.nodes for result in node.images)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["bytesMoved"] = self.bytes_moved
        data["wanBytes"] = {site: self.wan_bytes(site) for site in dict.fromkeys(n.site for n in self.nodes)}
        return data

    def summary(self) -> str:
        ready = sum(node.ready for node in self.nodes)
        counts = ", ".join(f"{self.count(state)} {state.value}" for state in State if self.count(state))
        return (f"{ready}/{len(self.nodes)} nodes ready; {counts or 'no images'}; "
                f"{format_size(self.bytes_moved)} moved ({format_size(self.wan_bytes())} over WAN links) "
                f"in {self.finished_at - self.started_at:.1f}s")

    def table(self) -> str:
        """A table for people: one row per node and image, then the summary."""
        rows = [("SITE", "NODE", "IMAGE", "STATE", "MOVED", "TIME", "SOURCE", "REASON")]
        for node in self.nodes:
            if node.error and not node.images:
                rows.append((node.site, node.node, "-", "failed", "", "", "", node.error))
            for result in node.images:
                rows.append((node.site, node.node, result.image_name or result.image_id, result.state.value,
                             format_size(result.bytes_moved) if result.bytes_moved else "",
                             f"{result.seconds:.1f}s" if result.seconds else "", result.source, result.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                 for row in rows]
        if self.error:
            lines.append(f"error: {self.error}")
        warnings = [f"warning: {node.node}: {warning}" for node in self.nodes for warning in node.warnings]
        return "\n".join([line.rstrip() for line in lines] + warnings + [self.summary()])
