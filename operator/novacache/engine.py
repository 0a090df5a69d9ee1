"""One reconcile of a policy: observe and refresh every node, fill what each site lacks, report.

No Kubernetes here. The engine owns the order of things and the limits: concurrent Glance streams
are bounded (`limits.glanceStreams`, like Ansible's forks), a node takes one fill at a time,
refreshes are done before fills so a long transfer never lets another image age out, and a failure
on one node or image is recorded and never stops the others. How an image spreads within a site
is `distribute`'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Iterator, Protocol, Sequence

from . import cacherules
from .distribute import Resources, Target, fill_site
from .glance import ImageError, ImageInfo, ResolutionError
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


async def reconcile(policy: Policy, source: ImageSource, credentials: SshCredentials, *,
                    dry_run: bool = False, node_factory: NodeFactory = default_node_factory,
                    clock: Callable[[], float] = time.time) -> Report:
    """Bring every node of the policy to holding every image, verified and fresh; report what happened.

    First every node is observed and refreshed (one SSH session each, many at once); then each site
    fills what its nodes lack, by its distribution strategy, all sites at once.
    """
    report = Report(policy=policy.name, started_at=clock())
    try:
        images = await asyncio.to_thread(source.resolve, policy.images)
    except ResolutionError:
        raise   # the policy names images that are not there: the caller's to report
    except ImageError as error:
        report.error = str(error)
        report.finished_at = clock()
        return report
    report.images = [{"id": i.id, "name": i.name, "diskFormat": i.disk_format, "size": i.size} for i in images]
    sessions = asyncio.Semaphore(NODE_CONCURRENCY)

    @contextlib.asynccontextmanager
    async def connect(spec: NodeSpec) -> AsyncIterator[Node]:
        async with sessions, node_factory(spec, credentials) as node:
            yield node

    with concurrent.futures.ThreadPoolExecutor(policy.limits.glance_streams,
                                               thread_name_prefix="glance-stream") as pumps:
        res = Resources(policy=policy, streams=asyncio.Semaphore(policy.limits.glance_streams), connect=connect,
                        glance=lambda image_id: _pump(lambda: source.stream(image_id), pumps), clock=clock)
        observer = _Observer(res, images, dry_run)
        observed = await asyncio.gather(*(observer.observe(spec) for spec in policy.nodes))
        report.nodes = [result for result, _ in observed]
        if not dry_run:
            targets = {target.name: target for _, target in observed if target is not None}
            await asyncio.gather(*(
                fill_site(res, site, [targets[n.name] for n in site.nodes if n.name in targets], images)
                for site in policy.sites))
    report.finished_at = clock()
    return report


class _Observer:
    """Observes one node: what it caches and what it lacks; refreshes what it holds."""

    def __init__(self, res: Resources, images: list[ImageInfo], dry_run: bool):
        self.res = res
        self.policy = res.policy
        self.images = images
        self.dry_run = dry_run

    async def observe(self, spec: NodeSpec) -> tuple[NodeResult, Target | None]:
        """The node's result so far, and the node as a fill target (None when it is not one)."""
        result = NodeResult(site=spec.site, node=spec.name, address=spec.address)
        try:
            async with self.res.connect(spec) as node:
                return result, await self._observe(node, spec, result)
        except NodeError as error:
            log.warning("%s", error)
            result.error = str(error)
            done = {r.image_id for r in result.images}
            result.images += [ImageResult(i.id, i.name, State.FAILED, reason=str(error))
                              for i in self.images if i.id not in done]
            return result, None

    async def _observe(self, node: Node, spec: NodeSpec, result: NodeResult) -> Target | None:
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
            return None
        if config.remove_unused_original_minimum_age_seconds <= self.policy.refresh_interval:
            result.warnings.append(
                f"nova.conf removes unused images after {config.remove_unused_original_minimum_age_seconds}s, "
                f"not longer than refreshInterval ({self.policy.refresh_interval}s): images may be removed "
                f"between refreshes; shorten refreshInterval")
        if "qemu-img" not in facts.tools:
            result.warnings.append("qemu-img is not installed: images other than raw cannot be checked or "
                                   "converted, and will fail")
        await self._remove_stale_temps(node, facts)
        present, needs = await self._plan(node, facts)
        if self.dry_run:
            self._judge(facts, present, needs, result)
            return None
        if present:
            started = self.res.clock()
            await node.touch(config.cache_dir, [cacherules.cache_name(i.id) for i in present])
            result.images += [ImageResult(i.id, i.name, State.REFRESHED, seconds=self.res.clock() - started)
                              for i in present]
        holds = {i.id: facts.files[cacherules.cache_name(i.id)].size for i in present}
        return Target(spec=spec, facts=facts, result=result, needs=needs, holds=holds, free=facts.free_bytes)

    def _judge(self, facts: NodeFacts, present: list[ImageInfo], needs: dict[str, str],
               result: NodeResult) -> None:
        """A dry run's verdict: cached when young enough to outlive Nova's age limit, else missing."""
        now = self.res.clock()
        ttl = min(self.policy.ttl, facts.config.remove_unused_original_minimum_age_seconds)
        for image in present:
            age = now - facts.files[cacherules.cache_name(image.id)].mtime
            fresh = age < ttl
            result.images.append(ImageResult(image.id, image.name, State.CACHED if fresh else State.MISSING,
                                             reason="" if fresh else f"stale: {age:.0f}s old"))
        result.images += [ImageResult(i.id, i.name, State.MISSING, reason=needs[i.id])
                          for i in self.images if i.id in needs]

    async def _remove_stale_temps(self, node: Node, facts: NodeFacts) -> None:
        """Temp files whose writer is gone (a cut transfer, a killed operator) are ours to remove."""
        now = self.res.clock()
        stale = [t.name for t in facts.temps if now - t.mtime > self.policy.limits.stale_temp_age]
        await node.remove(facts.config.cache_dir, stale)

    async def _plan(self, node: Node, facts: NodeFacts) -> tuple[list[ImageInfo], dict[str, str]]:
        """Which images are present and verified (to refresh), which must be (re)filled and why."""
        present: list[ImageInfo] = []
        needs: dict[str, str] = {}
        for image in self.images:
            cached = facts.files.get(cacherules.cache_name(image.id))
            expected = _expected_size(image, facts)
            if cached is None:
                needs[image.id] = "not cached"
            elif expected is not None and cached.size != expected:
                needs[image.id] = f"cached file has {cached.size} bytes, expected {expected}: replaced"
            else:
                present.append(image)
        if self.policy.verify == "checksum":
            by_algo: dict[str, list[ImageInfo]] = {}
            for image in present:
                if not cacherules.converts(image.disk_format, facts.config):
                    by_algo.setdefault(image.digest()[0], []).append(image)
            for algo, group in by_algo.items():
                names = [cacherules.cache_name(i.id) for i in group]
                sums = await node.checksums(facts.config.cache_dir, names, algo)
                for image in group:
                    if sums.get(cacherules.cache_name(image.id)) != image.digest()[1]:
                        present.remove(image)
                        needs[image.id] = f"cached file's {algo} differs from Glance's: replaced"
        return present, needs


def _expected_size(image: ImageInfo, facts: NodeFacts) -> int | None:
    try:
        return cacherules.cached_size(image.size, image.virtual_size, image.disk_format, facts.config)
    except ValueError:
        return None


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
