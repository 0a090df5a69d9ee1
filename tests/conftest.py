"""Shared fixtures: a real testbed (sshd nodes in shaped namespaces, real Glance) per test session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from novacache.testbed import Options, Testbed
from novacache.testbed.glance import default_glance_venv
from novacache.testbed.network import netns_available

MiB = 1024 * 1024

IS_ROOT = os.geteuid() == 0
HAS_NETNS = IS_ROOT and netns_available()
HAS_GLANCE = (default_glance_venv() / "bin" / "gunicorn").exists()

needs_netns = pytest.mark.skipif(
    not HAS_NETNS, reason="needs root and network namespaces (shaped links exist only in netns mode)")
needs_glance = pytest.mark.skipif(
    not HAS_GLANCE, reason=f"no Glance virtualenv at {default_glance_venv()}: run `make deps`")


def host_snapshot() -> dict[str, object]:
    """What a testbed may touch on the host: namespaces, links, routes, host paths, our processes."""
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout
    return {
        "namespaces": out("ip", "netns", "list"),
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in out("ip", "-o", "link").splitlines()),
        "routes": out("ip", "route"),
        "paths": {p: os.path.exists(p) for p in ("/etc/nova", "/var/lib/nova", "/run/sshd", "/run/novacache-testbed")},
        "processes": live_processes("sshd") + live_processes("gunicorn"),
    }


def live_processes(name: str) -> list[int]:
    """PIDs of live processes with this command name; zombies (exited, waiting for init) are gone."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,stat=,comm="], capture_output=True, text=True).stdout
    return sorted(int(pid) for pid, stat, comm in (line.split(None, 2) for line in out.splitlines())
                  if comm.strip() == name and not stat.startswith("Z"))


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """Two sites of three nodes behind 80 Mbit/s WAN links, Glance with a raw and a qcow2 image."""
    if not HAS_GLANCE:
        pytest.skip(f"no Glance virtualenv at {default_glance_venv()}: run `make deps`")
    if not IS_ROOT:
        pytest.skip("the testbed's compute nodes need root for their private filesystem views")
    directory = tmp_path_factory.mktemp("testbed")
    bed = Testbed.up(directory, Options(sites=2, nodes=3, image_size=16 * MiB))
    try:
        yield bed
    finally:
        bed.down()


def ssh(bed: Testbed, node: dict, command: str, in_central: bool = False,
        check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a command on a node as the operator would, from the root namespace or from central."""
    argv = bed.ssh_argv(node, command)
    if in_central:
        argv = bed.exec_argv(argv)
    proc = subprocess.run(argv, capture_output=True, input=input, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"ssh {node['name']} {command!r} failed: {proc.stderr.decode()}")
    return proc
