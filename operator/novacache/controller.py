"""Keeps every ImageCachePolicy's nodes cached: one runner per policy, independent of the others.

A runner reconciles when its policy appears, whenever its spec changes, and every refreshInterval
after that (sooner, when nodes failed). A spec change interrupts a running reconcile at once: the
nodes keep only what was complete and verified, and the new spec is reconciled without waiting for
a long fill to end. Each policy has its own runner, so one policy's long fill never holds up
another's refresh. Knows Kubernetes through `kube`, not kopf.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
from typing import Any, Callable

from . import credentials, status
from .credentials import SecretError
from .engine import reconcile
from .glance import GlanceImages, ImageError, ResolutionError
from .kube import Kube
from .policy import PolicyError, load_policy_spec
from .report import Report, State

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE = 300.0   # seconds; a failed node or an unreachable Glance is tried again this soon
RETRY_STALLED = 600.0         # a missing secret or an unknown image may be fixed without a spec change
MAX_FAILURE_EVENTS = 5

Clock = Callable[[], datetime.datetime]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class PolicyRunner:
    """One policy's reconcile loop."""

    def __init__(self, kube: Kube, body: dict[str, Any], clock: Clock = _now):
        self.kube = kube
        self.body = copy.deepcopy(body)
        self.clock = clock
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._status: dict[str, Any] = copy.deepcopy(body.get("status") or {})

    @property
    def namespace(self) -> str:
        return self.body["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def generation(self) -> int | None:
        return self.body["metadata"].get("generation")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"policy {self.namespace}/{self.name}")

    def update(self, body: dict[str, Any]) -> None:
        """A new version of the policy: a new spec interrupts whatever the runner is doing."""
        changed = body["metadata"].get("generation") != self.generation or body.get("spec") != self.body.get("spec")
        self.body = copy.deepcopy(body)
        if changed:
            self._changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            self._changed.clear()
            work = asyncio.create_task(self._reconcile(copy.deepcopy(self.body)))
            change = asyncio.create_task(self._changed.wait())
            try:
                await asyncio.wait({work, change}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                change.cancel()
            if not work.done():
                log.info("%s/%s: spec changed during a reconcile; starting over", self.namespace, self.name)
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                continue
            try:
                delay = work.result()
            except Exception:   # a bug or an API outage must not end the policy's loop
                log.exception("%s/%s: reconcile failed", self.namespace, self.name)
                delay = RETRY_AFTER_FAILURE
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay)

    async def _patch(self, new_status: dict[str, Any]) -> None:
        self._status.update(new_status)
        await self.kube.patch_status(self.namespace, self.name, new_status)

    async def _reconcile(self, body: dict[str, Any]) -> float:
        """One reconcile with its status; returns the seconds until the next one."""
        generation = body["metadata"].get("generation")
        previous = copy.deepcopy(self._status)
        try:
            policy = load_policy_spec(body.get("spec") or {}, self.name, self.namespace)
        except PolicyError as error:
            await self._stall(previous, generation, "InvalidSpec", str(error))
            return float("inf")   # nothing to do until the spec changes
        await self._patch(status.reconciling(previous, generation, self.clock(),
                                             f"reconciling {len(policy.nodes)} nodes"))
        try:
            creds = await asyncio.to_thread(credentials.load, policy, self.kube.secret_reader(self.namespace))
            source = await asyncio.to_thread(GlanceImages.from_clouds_yaml, creds.clouds_yaml,
                                             policy.cloud.cloud_name)
            report = await reconcile(policy, source, creds.ssh)
        except SecretError as error:
            await self._stall(previous, generation, "SecretNotFound", str(error))
            return RETRY_STALLED
        except ResolutionError as error:
            await self._stall(previous, generation, "ImageNotFound", str(error))
            return RETRY_STALLED
        except ImageError as error:
            report = Report(policy=policy.name, started_at=0.0, error=f"Glance: {error}")
        delay = float(policy.refresh_interval) if report.ok else min(RETRY_AFTER_FAILURE, policy.refresh_interval)
        now = self.clock()
        new_status = status.finished(report, previous, generation, now,
                                     now + datetime.timedelta(seconds=delay), retrying=not report.ok)
        await self._patch(new_status)
        await self._announce(report, previous, new_status)
        return delay

    async def _stall(self, previous: dict[str, Any], generation: int | None, reason: str, message: str) -> None:
        log.warning("%s/%s: %s: %s", self.namespace, self.name, reason, message)
        was_stalled = any(c.get("type") == status.STALLED and c.get("status") == "True" and c.get("reason") == reason
                          for c in previous.get("conditions") or [])
        await self._patch(status.stalled(previous, generation, self.clock(), reason, message))
        if not was_stalled:
            await self.kube.post_event(self.body, "Warning", reason, message)

    async def _announce(self, report: Report, previous: dict[str, Any], new: dict[str, Any]) -> None:
        """Events for what a person wants to hear about: sites filled, nodes failing, Ready changing."""
        was_ready = any(c.get("type") == status.READY and c.get("status") == "True"
                        for c in previous.get("conditions") or [])
        for site in new["sites"]:
            filled = [n for n in report.nodes if n.site == site["name"]
                      and any(r.state is State.FILLED for r in n.images)]
            if filled and site["nodesReady"] == site["nodes"]:
                await self.kube.post_event(self.body, "Normal", "SiteFilled",
                                           f"site {site['name']}: {len(filled)} nodes filled, "
                                           f"{site['wanBytes']} bytes over the WAN")
        failed = [n for n in report.nodes if not n.ready]
        for node in failed[:MAX_FAILURE_EVENTS]:
            reason = node.error or next((r.reason for r in node.images if r.state is State.FAILED), "not ready")
            await self.kube.post_event(self.body, "Warning", "NodeFailed", f"{node.node}: {reason}")
        if len(failed) > MAX_FAILURE_EVENTS:
            await self.kube.post_event(self.body, "Warning", "NodeFailed",
                                       f"{len(failed) - MAX_FAILURE_EVENTS} more nodes not ready; see status.failures")
        if report.ok and not was_ready:
            await self.kube.post_event(self.body, "Normal", "PolicyReady", new["conditions"][0]["message"])


class Controller:
    """The runners of every policy this operator serves."""

    def __init__(self, kube: Kube, clock: Clock = _now):
        self.kube = kube
        self.clock = clock
        self.runners: dict[tuple[str, str], PolicyRunner] = {}

    def apply(self, body: dict[str, Any]) -> None:
        """A policy was created, changed or found at start-up."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = PolicyRunner(self.kube, body, self.clock)
            runner.start()
        else:
            runner.update(body)

    async def forget(self, namespace: str, name: str) -> None:
        """A policy was deleted: stop its work and leave the nodes' caches as they are."""
        runner = self.runners.pop((namespace, name), None)
        if runner is not None:
            await runner.stop()

    async def shutdown(self) -> None:
        await asyncio.gather(*(runner.stop() for runner in self.runners.values()))
        self.runners.clear()
