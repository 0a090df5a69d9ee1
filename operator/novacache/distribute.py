"""A site's fan-out: each image crosses the site's WAN link once, then spreads node to node.

Strategies (per site):
- direct: every node streams from Glance, as the TripleO playbook does by default.
- proxy: one seed node streams from Glance; the others copy from it, a few at a time (the
  playbook's proxy mode, whose copies Ansible's forks bound).
- pipeline: the seed streams from Glance, and every node writes its copy while relaying the
  stream to the next node, so the whole site is done in about the time of one copy.

A node of the site that already holds a verified copy is the source: zero WAN bytes. A node that
fails mid-chain never starves the nodes after it: they are served again from a node that now holds
a verified copy, and whatever is still missing after that falls back to direct. Every node verifies
its own copy end to end. One fill per node at a time: a chain holds the locks of all its nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

from . import cacherules
from .glance import ImageError, ImageInfo
from .node import Hop, HopResult, Node, NodeError, NodeFacts, RelaySsh
from .policy import NodeSpec, Policy, SiteSpec
from .report import ImageResult, NodeResult, State

log = logging.getLogger(__name__)


@dataclass
class Target:
    """A healthy node of a site as observed this reconcile, and what it still needs."""

    spec: NodeSpec
    facts: NodeFacts
    result: NodeResult
    needs: dict[str, str]          # image id -> why it must be filled
    holds: dict[str, int]          # image id -> size of the verified copy it holds
    free: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Resources:
    """What the site fan-outs of one reconcile share: limits, sessions, the Glance stream."""

    policy: Policy
    streams: asyncio.Semaphore                       # concurrent Glance streams (all sites)
    connect: Callable[[NodeSpec], contextlib.AbstractAsyncContextManager[Node]]
    glance: Callable[[str], AsyncIterator[bytes]]    # image id -> its bytes
    clock: Callable[[], float]


async def fill_site(res: Resources, site: SiteSpec, targets: Sequence[Target], images: Sequence[ImageInfo]) -> None:
    """Fill every image that some node of the site needs, by the site's strategy; record the outcomes."""
    chains = asyncio.Semaphore(res.policy.limits.chains_per_site)

    async def one(image: ImageInfo) -> None:
        needing = [t for t in targets if image.id in t.needs]
        if needing:
            async with chains:
                await _SiteImage(res, site, image, targets, needing).fill()

    await asyncio.gather(*(one(image) for image in images))


class _SiteImage:
    """One image at one site: who needs it, who holds it, and the chains that bring it to them."""

    def __init__(self, res: Resources, site: SiteSpec, image: ImageInfo, targets: Sequence[Target],
                 needing: list[Target]):
        self.res, self.site, self.image = res, site, image
        self.targets = targets
        self.pending = self._within_reserve(needing)
        ssh = res.policy.node_ssh
        self.relay = RelaySsh(ssh.user, ssh.identity_file, ssh.known_hosts_file, ssh.strict_host_key_checking)

    @property
    def holders(self) -> list[Target]:
        return [t for t in self.targets if self.image.id in t.holds]

    async def fill(self) -> None:
        strategy = self.site.strategy
        if strategy != "direct" and self.pending and not self.holders:
            seed = self._seed()
            first = [seed] + ([t for t in self.pending if t is not seed] if strategy == "pipeline" else [])
            await self._chain(first)
        if strategy != "direct" and self.pending and self.holders:
            source = self.holders[0]
            if strategy == "pipeline":
                await self._chain(list(self.pending), source)
            else:
                copies = asyncio.Semaphore(self.res.policy.limits.glance_streams)

                async def copy(target: Target) -> None:
                    async with copies:
                        await self._chain([target], source)

                await asyncio.gather(*(copy(t) for t in list(self.pending)))
        fallback = strategy != "direct"
        await asyncio.gather(*(self._chain([t], fallback=fallback) for t in list(self.pending)))
        for target in self.pending:   # what even direct could not fill
            self._record(target, State.FAILED, reason=target.needs[self.image.id])

    def _seed(self) -> Target:
        """The configured seed node when it needs the image, else the first node that does."""
        for target in self.pending:
            if target.name == self.site.seed_node:
                return target
        return self.pending[0]

    def _within_reserve(self, needing: list[Target]) -> list[Target]:
        """Nodes that can take the image without going below the disk reserve; the others fail now."""
        ok, reserve = [], self.res.policy.limits.disk_reserve
        for target in needing:
            convert = cacherules.converts(self.image.disk_format, target.facts.config)
            needed = self.image.size + ((self.image.virtual_size or 0) if convert else 0)
            if target.free - needed < reserve:
                self._record(target, State.FAILED, reason=(
                    f"needs {needed} bytes but only {target.free} are free and {reserve} must stay free "
                    f"(spec.limits.diskReserve)"))
            else:
                ok.append(target)
        return ok

    async def _chain(self, hops: list[Target], source: Target | None = None, fallback: bool = False) -> None:
        """One stream, from Glance or from a node's verified copy, through hops; record every hop."""
        image = self.image
        if source is not None and cacherules.converts(image.disk_format, source.facts.config):
            # The source holds a raw conversion: only nodes that store raw can take it from there.
            hops = [t for t in hops if cacherules.converts(image.disk_format, t.facts.config)]
            if not hops:
                return
        started = self.res.clock()
        wan = 0
        try:
            async with contextlib.AsyncExitStack() as stack:
                for target in sorted(hops, key=lambda t: t.name):   # one order everywhere: no deadlock
                    await stack.enter_async_context(target.lock)
                if source is None:
                    await stack.enter_async_context(self.res.streams)
                head = source or hops[0]
                node = await stack.enter_async_context(self.res.connect(head.spec))
                if source is None:
                    chunks, streamed = self.res.glance(image.id), image.size

                    async def counted() -> AsyncIterator[bytes]:
                        nonlocal wan
                        async for chunk in chunks:
                            wan += len(chunk)
                            yield chunk

                    outcome = await node.chain(
                        image.id, [self._hop(t) for t in hops], counted(), size=image.size,
                        digest=image.digest(), disk_format=cacherules.qemu_format(image.disk_format),
                        reserve=self.res.policy.limits.disk_reserve, relay=self.relay)
                else:
                    outcome, streamed = await self._send(node, source, hops)
        except (NodeError, ImageError, ValueError) as error:
            outcome, streamed = {t.name: HopResult(t.name, False, message=str(error)) for t in hops}, 0
        seconds = self.res.clock() - started
        origin = "glance" if source is None else f"relay from {source.name}"
        blamed = False
        for position, target in enumerate(hops):
            result = outcome[target.name]
            via = origin if position == 0 else f"relay from {hops[position - 1].name}"
            if result.ok:
                target.holds[image.id] = result.size
                target.free -= result.size
                self.pending.remove(target)
                why = target.needs[image.id] + ("; direct fallback" if fallback else "")
                self._record(target, State.FILLED, bytes_moved=streamed,
                             wan_bytes=wan if source is None and position == 0 else 0,
                             seconds=seconds, source=via, reason=why)
                log.info("%s: cached %s (%s) from %s in %.1fs", target.name, image.name, image.id, via, seconds)
            else:
                target.needs[image.id] = f"{target.needs[image.id].split('; ')[0]}; {via}: {result.message}"
                if not blamed:
                    # The first hop that failed is served last from now on, so that a node that keeps
                    # failing does not cut off the nodes after it again; the ones after it were not reached.
                    blamed = True
                    self.pending.remove(target)
                    self.pending.append(target)
                log.warning("%s: %s (%s) from %s failed: %s", target.name, image.name, image.id, via,
                            result.message)

    async def _send(self, node: Node, source: Target, hops: list[Target]) -> tuple[dict[str, HopResult], int]:
        """Relay the source node's own cached copy; a converted copy is raw, checked by its own digest."""
        image, config = self.image, source.facts.config
        size = source.holds[image.id]
        if cacherules.converts(image.disk_format, config):
            name = cacherules.cache_name(image.id)
            digest = ("sha512", (await node.checksums(config.cache_dir, [name], "sha512"))[name])
            disk_format, hops_spec = "raw", [self._hop(t, convert=False) for t in hops]
        else:
            digest, disk_format = image.digest(), cacherules.qemu_format(image.disk_format)
            hops_spec = [self._hop(t) for t in hops]
        outcome = await node.chain(image.id, hops_spec, None, size=size, digest=digest, disk_format=disk_format,
                                   reserve=self.res.policy.limits.disk_reserve, relay=self.relay,
                                   send_from=config.cache_dir)
        return outcome, size

    def _hop(self, target: Target, convert: bool | None = None) -> Hop:
        """How the node before it reaches target: the relay port (nodeSsh.port, else the node's own)."""
        if convert is None:
            convert = cacherules.converts(self.image.disk_format, target.facts.config)
        return Hop(target.name, target.spec.address, self.res.policy.node_ssh.port or target.spec.port,
                   target.facts.config.cache_dir, convert)

    def _record(self, target: Target, state: State, **fields: object) -> None:
        target.result.images.append(ImageResult(self.image.id, self.image.name, state, **fields))
