"""A reconcile's report folded into the ImageCachePolicy status, in the form GitOps tools read.

kstatus (Flux), Argo CD and `kubectl wait` read `observedGeneration` and the conditions `Ready`,
`Reconciling` and `Stalled`, each with reason, message and lastTransitionTime. Counts per site,
a handful of failures and the refresh times complete the picture. The status stays small however
large the fleet: a status is written on every reconcile, and etcd objects are capped at 1.5 MiB,
so lists are bounded and long texts cut (under 64 KiB for 2,000 nodes x 50 images).
"""

from __future__ import annotations

import datetime
from typing import Any

from .report import Report, State

MAX_FAILURES = 20
MAX_SITES = 100
MAX_REASON = 256
MAX_MESSAGE = 1024

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"


def timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with a Z, second precision, as Kubernetes writes times."""
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _condition(kind: str, status: bool, reason: str, message: str, generation: int | None,
               now: datetime.datetime, previous: list[dict[str, Any]]) -> dict[str, Any]:
    """A condition; lastTransitionTime only moves when the status itself changes."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") \
        else timestamp(now)
    condition = {"type": kind, "status": value, "reason": reason, "message": _cut(message, MAX_MESSAGE),
                 "lastTransitionTime": since}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _conditions(previous: dict[str, Any] | None, generation: int | None, now: datetime.datetime,
                ready: tuple[bool, str, str], reconciling: tuple[bool, str, str],
                stalled: tuple[bool, str, str]) -> list[dict[str, Any]]:
    old = (previous or {}).get("conditions") or []
    return [_condition(kind, *values, generation=generation, now=now, previous=old)
            for kind, values in ((READY, ready), (RECONCILING, reconciling), (STALLED, stalled))]


def reconciling(previous: dict[str, Any] | None, generation: int | None, now: datetime.datetime,
                message: str) -> dict[str, Any]:
    """Work has started. Ready keeps its last value while a refresh runs over a ready policy,
    but a new generation is not ready until it has been reconciled."""
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    was_ready = old.get(READY, {}).get("status") == "True" and \
        (previous or {}).get("observedGeneration") == generation
    ready = (True, old[READY]["reason"], old[READY]["message"]) if was_ready else \
        (False, "Reconciling", "the nodes' caches are being filled")
    return {
        "observedGeneration": generation,
        "conditions": _conditions(previous, generation, now, ready=ready,
                                  reconciling=(True, "Reconciling", message), stalled=(False, "Reconciling", "")),
    }


def stalled(previous: dict[str, Any] | None, generation: int | None, now: datetime.datetime,
            reason: str, message: str) -> dict[str, Any]:
    """The spec cannot be acted on until someone changes it (or the things it names): say what and how."""
    return {
        "observedGeneration": generation,
        "conditions": _conditions(previous, generation, now, ready=(False, reason, message),
                                  reconciling=(False, reason, ""), stalled=(True, reason, message)),
    }


def finished(report: Report, previous: dict[str, Any] | None, generation: int | None,
             now: datetime.datetime, next_refresh: datetime.datetime, retrying: bool) -> dict[str, Any]:
    """The outcome of a complete reconcile."""
    nodes_ready = sum(node.ready for node in report.nodes)
    total = len(report.nodes)
    if report.ok:
        ready = (True, "Cached", f"{len(report.images)} images cached and fresh on {total} nodes")
        busy = (False, "Cached", "")
    else:
        failed = report.count(State.FAILED)
        summary = f"{nodes_ready}/{total} nodes ready; {failed} image copies failed"
        first = _failures(report, 1)
        if first:
            summary += f"; first: {first[0]['node']}: {first[0]['reason']}"
        ready = (False, "NodesNotReady", summary)
        busy = (retrying, "RetryScheduled" if retrying else "NodesNotReady",
                f"retrying at {timestamp(next_refresh)}" if retrying else "")
    return {
        "observedGeneration": generation,
        "conditions": _conditions(previous, generation, now, ready=ready, reconciling=busy,
                                  stalled=(False, ready[1], "")),
        "summary": {
            "nodes": total,
            "nodesReady": nodes_ready,
            "images": len(report.images),
            "cached": f"{nodes_ready}/{total}",
            "bytesMoved": report.bytes_moved,
            "wanBytes": report.wan_bytes(),
            "sites": len({node.site for node in report.nodes}),
        },
        "sites": _sites(report),
        "failures": _failures(report, MAX_FAILURES),
        "lastRefreshTime": timestamp(now),
        "nextRefreshTime": timestamp(next_refresh),
    }


def _sites(report: Report) -> list[dict[str, Any]]:
    """Per-site counts; with more than MAX_SITES sites, the least healthy ones are kept."""
    sites: dict[str, dict[str, Any]] = {}
    for node in report.nodes:
        site = sites.setdefault(node.site, {"name": node.site, "nodes": 0, "nodesReady": 0, "imagesCached": 0,
                                            "bytesMoved": 0, "wanBytes": 0})
        site["nodes"] += 1
        site["nodesReady"] += node.ready
        site["imagesCached"] += sum(r.state.ready for r in node.images)
        site["bytesMoved"] += sum(r.bytes_moved for r in node.images)
        site["wanBytes"] += sum(r.wan_bytes for r in node.images)
    ordered = sorted(sites.values(), key=lambda s: (s["nodesReady"] == s["nodes"], s["name"]))
    return sorted(ordered[:MAX_SITES], key=lambda s: s["name"])


def _failures(report: Report, limit: int) -> list[dict[str, str]]:
    failures = []
    for node in report.nodes:
        if node.error and not node.images:
            failures.append({"site": node.site, "node": node.node, "image": "", "reason": _cut(node.error, MAX_REASON)})
        for result in node.images:
            if result.state is State.FAILED:
                failures.append({"site": node.site, "node": node.node,
                                 "image": result.image_name or result.image_id,
                                 "reason": _cut(result.reason, MAX_REASON)})
            if len(failures) >= limit:
                return failures
    return failures
