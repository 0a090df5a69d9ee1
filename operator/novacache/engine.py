"""One reconcile of a policy: observe every node, plan, fill and refresh, report. No Kubernetes.

The engine owns the order of things and the limits: concurrent Glance streams are bounded
(`limits.glanceStreams`, like Ansible's forks), a node takes one fill at a time, refreshes are done
before fills so a long transfer never lets another image age out, and a failure on one node or
image is recorded and never stops the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Protocol, Sequence

from . import cacherules
from .glance import ImageError, ImageInfo
from .node import Node, NodeError, NodeFacts, SshCredentials
from .policy import ImageRef, NodeSpec, Policy
from .report import ImageResult, NodeResult, Report, State

log = logging.getLogger(__name__)

# How many nodes are observed and worked on at once (SSH sessions), apart from Glance streams.
NODE_CONCURRENCY = 64
CHUNK_QUEUE_DEPTH = 8


class ImageSource(Protocol):
    """Where images come from: Glance, through `novacache.glance.GlanceImages`."""

    def resolve(self, refs: Sequence[ImageRef]) -> list[ImageInfo]: ...

    def stream(self, image_id: str) -> Iterator[bytes]: ...


NodeFactory = Callable[[NodeSpec, SshCredentials], Node]


def default_node_factory(spec: NodeSpec, credentials: SshCredentials) -> Node:
    return Node(spec.name, spec.address, spec.port, credentials)


@dataclass
class _Work:
    """One node's plan: what to refresh and what to fill, with the reason for each fill."""

    refresh: list[ImageInfo]
    fill: list[tuple[ImageInfo, str]]


async def reconcile(policy: Policy, source: ImageSource, credentials: SshCredentials, *,
                    dry_run: bool = False, node_factory: NodeFactory = default_node_factory,
                    clock: Callable[[], float] = time.time) -> Report:
    """Bring every node of the policy to holding every image, verified and fresh; report what happened."""
    report = Report(policy=policy.name, started_at=clock())
    try:
        images = await asyncio.to_thread(source.resolve, policy.images)
    except ImageError as error:
        report.error = str(error)
        report.finished_at = clock()
        return report
    report.images = [{"id": i.id, "name": i.name, "diskFormat": i.disk_format, "size": i.size} for i in images]
    streams = asyncio.Semaphore(policy.limits.glance_streams)
    sessions = asyncio.Semaphore(NODE_CONCURRENCY)
    with concurrent.futures.ThreadPoolExecutor(policy.limits.glance_streams,
                                               thread_name_prefix="glance-stream") as pumps:
        run = _Run(policy, source, credentials, images, streams, pumps, dry_run, node_factory, clock)

        async def one(spec: NodeSpec) -> NodeResult:
            async with sessions:
                return await run.node(spec)

        report.nodes = list(await asyncio.gather(*(one(spec) for spec in policy.nodes)))
    report.finished_at = clock()
    return report


class _Run:
    """The state shared by the nodes of one reconcile."""

    def __init__(self, policy: Policy, source: ImageSource, credentials: SshCredentials,
                 images: list[ImageInfo], streams: asyncio.Semaphore,
                 pumps: concurrent.futures.Executor, dry_run: bool, node_factory: NodeFactory,
                 clock: Callable[[], float]):
        self.policy = policy
        self.source = source
        self.credentials = credentials
        self.images = images
        self.streams = streams
        self.pumps = pumps
        self.dry_run = dry_run
        self.node_factory = node_factory
        self.clock = clock

    async def node(self, spec: NodeSpec) -> NodeResult:
        result = NodeResult(site=spec.site, node=spec.name, address=spec.address)
        try:
            async with self.node_factory(spec, self.credentials) as node:
                await self._node(node, spec, result)
        except NodeError as error:
            log.warning("%s", error)
            result.error = str(error)
            done = {r.image_id for r in result.images}
            result.images += [ImageResult(i.id, i.name, State.FAILED, reason=str(error))
                              for i in self.images if i.id not in done]
        return result

    async def _node(self, node: Node, spec: NodeSpec, result: NodeResult) -> None:
        facts = await node.inspect(spec.nova_conf)
        config = facts.config
        result.cache_dir, result.nova_conf, result.free_bytes = config.cache_dir, config.source, facts.free_bytes
        if not facts.host_key_checked:
            result.warnings.append("host key not in known_hosts; accepted because trustOnFirstUse is set")
        if config.source is None:
            result.warnings.append(f"no nova.conf at {', '.join(spec.nova_conf)}; assumed Nova's defaults")
        if not config.uses_image_cache:
            result.images = [ImageResult(i.id, i.name, State.NOT_APPLICABLE,
                                         reason="[libvirt] images_type = rbd: Nova clones from Ceph and does "
                                                "not use the image cache; the image must be in the site's "
                                                "Glance store") for i in self.images]
            return
        if config.remove_unused_original_minimum_age_seconds <= self.policy.refresh_interval:
            result.warnings.append(
                f"nova.conf removes unused images after {config.remove_unused_original_minimum_age_seconds}s, "
                f"not longer than refreshInterval ({self.policy.refresh_interval}s): images may be removed "
                f"between refreshes; shorten refreshInterval")
        await self._remove_stale_temps(node, facts)
        work = await self._plan(node, facts)
        if self.dry_run:
            now = self.clock()
            ttl = min(self.policy.ttl, config.remove_unused_original_minimum_age_seconds)
            for image in work.refresh:
                age = now - facts.files[cacherules.cache_name(image.id)].mtime
                state = State.CACHED if age < ttl else State.FAILED
                result.images.append(ImageResult(image.id, image.name, state,
                                                 reason="" if age < ttl else f"stale: {age:.0f}s old"))
            result.images += [ImageResult(i.id, i.name, State.MISSING, reason=why) for i, why in work.fill]
            return
        if work.refresh:
            started = self.clock()
            await node.touch(config.cache_dir, [cacherules.cache_name(i.id) for i in work.refresh])
            result.images += [ImageResult(i.id, i.name, State.REFRESHED, seconds=self.clock() - started)
                              for i in work.refresh]
        free = facts.free_bytes
        for image, why in work.fill:
            outcome = await self._fill(node, facts, image, why, free)
            if outcome.state is State.FILLED:
                free -= self._expected_size(image, facts) or outcome.bytes_moved
            result.images.append(outcome)

    async def _remove_stale_temps(self, node: Node, facts: NodeFacts) -> None:
        """Temp files whose writer is gone (a cut transfer, a killed operator) are ours to remove."""
        now = self.clock()
        stale = [t.name for t in facts.temps if now - t.mtime > self.policy.limits.stale_temp_age]
        await node.remove(facts.config.cache_dir, stale)

    async def _plan(self, node: Node, facts: NodeFacts) -> _Work:
        """Which images only need their age reset, which must be (re)filled, and why."""
        suspect: list[ImageInfo] = []
        fill: list[tuple[ImageInfo, str]] = []
        for image in self.images:
            present = facts.files.get(cacherules.cache_name(image.id))
            expected = self._expected_size(image, facts)
            if present is None:
                fill.append((image, "not cached"))
            elif expected is not None and present.size != expected:
                fill.append((image, f"cached file has {present.size} bytes, expected {expected}: replaced"))
            else:
                suspect.append(image)
        if self.policy.verify == "checksum":
            by_algo: dict[str, list[ImageInfo]] = {}
            for image in suspect:
                if not cacherules.converts(image.disk_format, facts.config):
                    by_algo.setdefault(image.digest()[0], []).append(image)
            for algo, group in by_algo.items():
                sums = await node.checksums(facts.config.cache_dir, [cacherules.cache_name(i.id) for i in group], algo)
                for image in group:
                    if sums.get(cacherules.cache_name(image.id)) != image.digest()[1]:
                        suspect.remove(image)
                        fill.append((image, f"cached file's {algo} differs from Glance's: replaced"))
        return _Work(refresh=suspect, fill=fill)

    @staticmethod
    def _expected_size(image: ImageInfo, facts: NodeFacts) -> int | None:
        try:
            return cacherules.cached_size(image.size, image.virtual_size, image.disk_format, facts.config)
        except ValueError:
            return None

    async def _fill(self, node: Node, facts: NodeFacts, image: ImageInfo, why: str, free: int) -> ImageResult:
        """Stream one image from Glance into the node, within the disk reserve and the stream limit."""
        config, reserve = facts.config, self.policy.limits.disk_reserve
        try:
            disk_format = cacherules.qemu_format(image.disk_format)
            convert = cacherules.converts(image.disk_format, config)
            digest = image.digest()
        except (ValueError, ImageError) as error:
            return ImageResult(image.id, image.name, State.FAILED, reason=str(error))
        needed = image.size + ((image.virtual_size or 0) if convert else 0)
        if free - needed < reserve:
            return ImageResult(image.id, image.name, State.FAILED,
                               reason=f"needs {needed} bytes but only {free} are free and {reserve} must stay "
                                      f"free (spec.limits.diskReserve)")
        async with self.streams:
            started = self.clock()
            moved = 0

            async def counted() -> AsyncIterator[bytes]:
                nonlocal moved
                async for chunk in _pump(lambda: self.source.stream(image.id), self.pumps):
                    moved += len(chunk)
                    yield chunk

            try:
                await node.receive(config.cache_dir, image.id, counted(), size=image.size, digest=digest,
                                   disk_format=disk_format, convert=convert, reserve=reserve)
            except (NodeError, ImageError) as error:
                log.warning("%s: %s (%s) not cached: %s", node.name, image.name, image.id, error)
                return ImageResult(image.id, image.name, State.FAILED, bytes_moved=moved,
                                   seconds=self.clock() - started, reason=f"{why}; fill failed: {error}")
        seconds = self.clock() - started
        log.info("%s: cached %s (%s), %d bytes in %.1fs", node.name, image.name, image.id, moved, seconds)
        return ImageResult(image.id, image.name, State.FILLED, bytes_moved=moved, seconds=seconds, reason=why)


async def _pump(make: Callable[[], Iterator[bytes]], executor: concurrent.futures.Executor,
                depth: int = CHUNK_QUEUE_DEPTH) -> AsyncIterator[bytes]:
    """Chunks of a blocking iterator (an HTTP download), read in a worker thread, bounded in memory.

    When the consumer stops early the thread stops at its next chunk and closes the iterator,
    which releases the HTTP connection.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(depth)
    stopped = False
    end = object()

    def put(item: object) -> None:
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def work() -> None:
        iterator = make()
        try:
            for chunk in iterator:
                if stopped:
                    return
                put(chunk)
            put(end)
        except Exception as error:  # handed to the consumer, which raises it
            if not stopped:
                put(error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = loop.run_in_executor(executor, work)
    try:
        while True:
            item = await queue.get()
            if item is end:
                break
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stopped = True
        while not worker.done():
            while not queue.empty():
                queue.get_nowait()
            await asyncio.sleep(0.01)
