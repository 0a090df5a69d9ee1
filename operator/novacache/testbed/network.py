"""Builds and removes the testbed's network: namespaces, veth links, a bridge per site, tbf shaping.

Everything is done with iproute2 (`ip`, `tc`), as an administrator would, so what the tests measure
is the kernel's real forwarding and shaping. Removing the namespaces removes every link in them,
the root namespace's end of the host link and its route included.
"""

from __future__ import annotations

import re
import subprocess

from .processes import run
from .topology import NETNS_PREFIX, Plan

# tbf counts link-layer bytes: a full-size TCP segment (1448 payload bytes with timestamps) costs
# 1514 bytes on an Ethernet veth, so TCP payload tops out at this fraction of the configured rate.
TCP_PAYLOAD_FRACTION = 1448 / 1514

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_rate(text: str) -> int | None:
    """'80mbit' -> 80_000_000 bits/s; '0', 'none' or 'unshaped' -> None (no shaping)."""
    if text.strip().lower() in ("0", "none", "unshaped", "off"):
        return None
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"rate {text!r} is not a rate: write it like 80mbit, 800mbit or 1gbit, "
                         f"or 'none' for an unshaped link")
    number, unit, kind = match.groups()
    bits = float(number) * _RATE_UNITS[unit.lower()] * (8 if (kind or "").lower() == "bps" else 1)
    if bits < 100_000:
        raise ValueError(f"rate {text!r} is below 100kbit; tbf cannot shape a link that slowly")
    return int(bits)


def payload_ceiling(rate_bits: int) -> float:
    """The TCP payload bytes per second a tbf-shaped link of this rate can carry at most."""
    return rate_bits / 8 * TCP_PAYLOAD_FRACTION


def netns_available() -> bool:
    """True when this process may create network namespaces (root, iproute2 present, kernel support)."""
    probe = f"{NETNS_PREFIX}-probe"
    try:
        added = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
    if added:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return added


def existing_namespaces() -> set[str]:
    """Names of the network namespaces `ip netns` knows."""
    out = run(["ip", "netns", "list"]).stdout.decode()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def free_slot(max_slots: int) -> int:
    """The first address slot whose namespaces do not exist yet."""
    taken = existing_namespaces()
    for slot in range(max_slots):
        if not any(name.startswith(f"{NETNS_PREFIX}{slot}-") for name in taken):
            return slot
    raise RuntimeError(f"all {max_slots} testbed slots are in use; bring a testbed down first")


def shape(netns: str | None, device: str, rate_bits: int | None) -> None:
    """Limit a device's egress with tbf; burst is at least rate/HZ so tbf can keep up at any HZ."""
    if rate_bits is None:
        return
    burst = max(rate_bits // 8 // 50, 64 * 1024)
    run(["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{rate_bits}bit",
         "burst", str(burst), "latency", "50ms"], netns=netns)


def build(plan: Plan, wan_rate: int | None, lan_rate: int | None) -> None:
    """Create every namespace and link of a namespace plan; on failure remove what was made."""
    try:
        _build(plan, wan_rate, lan_rate)
    except BaseException:
        destroy(plan.namespaces, plan.host_interface)
        raise


def _ip(netns: str | None, *args: str) -> None:
    run(["ip", *args], netns=netns)


def _build(plan: Plan, wan_rate: int | None, lan_rate: int | None) -> None:
    central = plan.central_netns
    for name in plan.namespaces:
        _ip(None, "netns", "add", name)
        _ip(name, "link", "set", "lo", "up")
    for name in [central] + [site.router_netns for site in plan.sites]:
        run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], netns=name)

    # The host link lets processes in the root namespace (tests, the operator under test) reach
    # central and, through it, every site.
    _ip(None, "link", "add", plan.host_interface, "type", "veth", "peer", "name", "host", "netns", central)
    _ip(None, "addr", "add", f"{plan.host_address}/30", "dev", plan.host_interface)
    _ip(None, "link", "set", plan.host_interface, "up")
    _ip(central, "addr", "add", f"{plan.central_address}/30", "dev", "host")
    _ip(central, "link", "set", "host", "up")
    _ip(None, "route", "add", plan.route, "via", plan.central_address, "dev", plan.host_interface)

    for site in plan.sites:
        router, wan = site.router_netns, f"wan{site.index + 1}"
        _ip(None, "link", "add", wan, "netns", central, "type", "veth", "peer", "name", "wan", "netns", router)
        _ip(central, "addr", "add", f"{site.wan_central_address}/30", "dev", wan)
        _ip(central, "link", "set", wan, "up")
        _ip(central, "route", "add", site.lan_network, "via", site.wan_router_address)
        _ip(router, "addr", "add", f"{site.wan_router_address}/30", "dev", "wan")
        _ip(router, "link", "set", "wan", "up")
        _ip(router, "route", "add", "default", "via", site.wan_central_address)
        shape(central, wan, wan_rate)
        shape(router, "wan", wan_rate)

        router_lan = site.lan_network.split("/")[0].rsplit(".", 1)[0] + ".1"
        _ip(router, "link", "add", "lan", "type", "bridge")
        _ip(router, "addr", "add", f"{router_lan}/24", "dev", "lan")
        _ip(router, "link", "set", "lan", "up")
        for node in site.nodes:
            port = f"n{node.index}"
            _ip(None, "link", "add", port, "netns", router, "type", "veth", "peer", "name", "eth0",
                "netns", node.netns)
            _ip(router, "link", "set", port, "master", "lan", "up")
            _ip(node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip(node.netns, "link", "set", "eth0", "up")
            _ip(node.netns, "route", "add", "default", "via", router_lan)
            shape(router, port, lan_rate)
            shape(node.netns, "eth0", lan_rate)


def namespace_pids(name: str) -> list[int]:
    """PIDs of the processes in a namespace (none if it does not exist)."""
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(pid) for pid in proc.stdout.split()] if proc.returncode == 0 else []


def destroy(namespaces: list[str], host_interface: str | None) -> None:
    """Remove the namespaces (and so every link in them); missing ones are fine."""
    present = existing_namespaces()
    for name in namespaces:
        if name in present:
            run(["ip", "netns", "del", name], check=False)
    if host_interface and run(["ip", "link", "show", host_interface], check=False).returncode == 0:
        # Normally gone with central's end of the pair; this covers a build that failed half-way.
        run(["ip", "link", "del", host_interface], check=False)
