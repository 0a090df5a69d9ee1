"""The testbed's shape: sites, nodes, their names and addresses. Pure data, no side effects.

Addresses come from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking networks, so they
never collide with a real network. Each testbed takes one /20 "slot" of it, so several testbeds
can run on one machine:

    base+1 / base+2          root namespace <-> central (the host link)
    base+4s+1 / base+4s+2    central <-> router of site s (the WAN link, s = 1..15)
    base+256s+1              router of site s on the site's LAN bridge
    base+256s+10+i           compute node i of site s
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

ADDRESS_RANGE = ipaddress.ip_network("198.18.0.0/15")
SLOT_SIZE = 4096
MAX_SLOTS = ADDRESS_RANGE.num_addresses // SLOT_SIZE
MAX_SITES = 15
MAX_NODES_PER_SITE = 200
NETNS_PREFIX = "nc"


@dataclass(frozen=True)
class NodePlan:
    """One compute node: where it lives and how to reach it."""

    name: str
    site: str
    index: int
    netns: str | None
    address: str
    port: int = 22


@dataclass(frozen=True)
class SitePlan:
    """One edge site: its router, its WAN link from central, its nodes."""

    name: str
    index: int
    router_netns: str | None
    wan_central_address: str | None
    wan_router_address: str | None
    lan_network: str | None
    nodes: list[NodePlan] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """Names and addresses of a whole testbed in namespace mode (slot >= 0) or loopback mode."""

    slot: int | None
    central_netns: str | None
    host_interface: str | None
    host_address: str
    central_address: str
    route: str | None
    sites: list[SitePlan]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the testbed, central first."""
        if self.central_netns is None:
            return []
        names = [self.central_netns]
        for site in self.sites:
            names.append(site.router_netns)
            names.extend(node.netns for node in site.nodes)
        return [name for name in names if name]


def site_name(index: int) -> str:
    """Sites are named like DCN stacks: dcn0, dcn1, ..."""
    return f"dcn{index}"


def node_name(site: str, index: int) -> str:
    """Compute nodes are named like TripleO's: dcn0-compute-0, ..."""
    return f"{site}-compute-{index}"


def _check_size(sites: int, nodes: int) -> None:
    if not 1 <= sites <= MAX_SITES:
        raise ValueError(f"sites must be between 1 and {MAX_SITES}, got {sites}")
    if not 1 <= nodes <= MAX_NODES_PER_SITE:
        raise ValueError(f"nodes per site must be between 1 and {MAX_NODES_PER_SITE}, got {nodes}")


def netns_plan(slot: int, sites: int, nodes: int) -> Plan:
    """The plan for a namespace testbed in the given address slot."""
    _check_size(sites, nodes)
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be between 0 and {MAX_SLOTS - 1}, got {slot}")
    base = ADDRESS_RANGE.network_address + slot * SLOT_SIZE
    prefix = f"{NETNS_PREFIX}{slot}-"
    site_plans = []
    for s in range(1, sites + 1):
        name = site_name(s - 1)
        lan = base + 256 * s
        site_plans.append(SitePlan(
            name=name, index=s - 1, router_netns=f"{prefix}r{s}",
            wan_central_address=str(base + 4 * s + 1), wan_router_address=str(base + 4 * s + 2),
            lan_network=f"{lan}/24",
            nodes=[NodePlan(name=node_name(name, i), site=name, index=i, netns=f"{prefix}s{s}n{i}",
                            address=str(lan + 10 + i)) for i in range(nodes)]))
    return Plan(slot=slot, central_netns=f"{prefix}central", host_interface=f"{NETNS_PREFIX}{slot}host",
                host_address=str(base + 1), central_address=str(base + 2),
                route=f"{base}/20", sites=site_plans)


def loopback_plan(sites: int, nodes: int, ports: list[int]) -> Plan:
    """The plan for a testbed without namespaces: every node an sshd on its own loopback port."""
    _check_size(sites, nodes)
    if len(ports) != sites * nodes:
        raise ValueError("loopback_plan needs one port per node")
    free = iter(ports)
    site_plans = []
    for s in range(sites):
        name = site_name(s)
        site_plans.append(SitePlan(
            name=name, index=s, router_netns=None, wan_central_address=None, wan_router_address=None,
            lan_network=None,
            nodes=[NodePlan(name=node_name(name, i), site=name, index=i, netns=None, address="127.0.0.1",
                            port=next(free)) for i in range(nodes)]))
    return Plan(slot=None, central_netns=None, host_interface=None, host_address="127.0.0.1",
                central_address="127.0.0.1", route=None, sites=site_plans)
