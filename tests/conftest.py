"""Shared fixtures: a real testbed (sshd nodes in shaped namespaces, real Glance) per test session."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from novacache import cacherules, credentials
from novacache.engine import reconcile
from novacache.glance import GlanceImages
from novacache.policy import Policy, load_policy
from novacache.report import Report
from novacache.testbed import Options, Testbed
from novacache.testbed.glance import GlanceServer, default_glance_venv
from novacache.testbed.network import netns_available

pytest_plugins = ["k8s"]   # the `kube` fixture: an emulated Kubernetes API

MiB = 1024 * 1024

IS_ROOT = os.geteuid() == 0
HAS_NETNS = IS_ROOT and netns_available()
HAS_GLANCE = (default_glance_venv() / "bin" / "gunicorn").exists()

needs_netns = pytest.mark.skipif(
    not HAS_NETNS, reason="needs root and network namespaces (shaped links exist only in netns mode)")
needs_glance = pytest.mark.skipif(
    not HAS_GLANCE, reason=f"no Glance virtualenv at {default_glance_venv()}: run `make deps`")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha512(path: Path) -> str:
    """A file's sha512, computed by the test itself rather than trusted from the code under test."""
    with open(path, "rb") as data:
        return hashlib.file_digest(data, "sha512").hexdigest()


@pytest.fixture(scope="module")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    """A real Glance on 127.0.0.1 with stores central and dcn0, one per test module."""
    if not HAS_GLANCE:
        pytest.skip(f"no Glance virtualenv at {default_glance_venv()}: run `make deps`")
    server = GlanceServer(tmp_path_factory.mktemp("glance"), ["central", "dcn0"], "127.0.0.1", free_port())
    server.start()
    yield server
    server.stop()


def policy_for(bed: Testbed, **spec_changes: object) -> Policy:
    document = yaml.safe_load((bed.dir / "policy.yaml").read_text())
    document["spec"].update(spec_changes)
    return load_policy(document)


def run(bed: Testbed, policy: Policy, source: object = None, **kwargs: object) -> Report:
    creds = credentials.load(policy, credentials.directory_reader(bed.secrets_dir))
    source = source or GlanceImages.from_clouds_yaml(creds.clouds_yaml, policy.cloud.cloud_name)
    return asyncio.run(reconcile(policy, source, creds.ssh, **kwargs))


def cache_file(node: dict, image_id: str) -> Path:
    return Path(node["cacheDir"]) / cacherules.cache_name(image_id)


@pytest.fixture
def bed(testbed: Testbed) -> Iterator[Testbed]:
    """The session's testbed with every node's image cache emptied before and after the test."""
    def empty() -> None:
        for node in testbed.nodes:
            for entry in Path(node["cacheDir"]).iterdir():
                entry.unlink()
    empty()
    yield testbed
    empty()


@pytest.fixture(scope="session")
def raw_equivalents(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """sha512 of what Nova would store for each sample image: raw bytes as they are, qcow2 converted."""
    out = {}
    for image in testbed.images:
        if image.disk_format == "raw":
            out[image.id] = image.sha512
        else:
            converted = tmp_path_factory.mktemp("raw") / f"{image.id}.raw"
            subprocess.run(["qemu-img", "convert", "-f", image.disk_format, "-O", "raw", str(image.path),
                            str(converted)], check=True)
            out[image.id] = sha512(converted)
    return out


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
