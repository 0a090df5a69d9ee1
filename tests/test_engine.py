"""The cache engine against the real testbed: what lands on each node is what Nova would have cached."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import yaml

from conftest import MiB, cache_file, needs_glance, policy_for, run, sha512, ssh
from novacache import cacherules, credentials
from novacache.engine import reconcile
from novacache.glance import GlanceImages, ImageError
from novacache.node import Hop, HopResult, Node, SshCredentials
from novacache.report import State
from novacache.testbed import Testbed

pytestmark = needs_glance


def test_cold_fill_puts_on_every_node_what_nova_would_store(bed: Testbed, raw_equivalents: dict) -> None:
    report = run(bed, policy_for(bed))
    assert report.ok, report.table()
    assert report.count(State.FILLED) == len(bed.nodes) * len(bed.images)
    assert report.bytes_moved == len(bed.nodes) * sum(image.size for image in bed.images)
    for node in bed.nodes:
        for image in bed.images:
            path = cache_file(node, image.id)
            assert sha512(path) == raw_equivalents[image.id]
            info = path.stat()
            assert (info.st_uid, info.st_gid) == (42436, 42436)
            assert info.st_mode & 0o777 == 0o644
            assert abs(info.st_mtime - time.time()) < 120
        assert [p.name for p in Path(node["cacheDir"]).iterdir() if cacherules.is_temp(p.name)] == []


def test_a_second_run_moves_no_bytes_and_only_resets_ages(bed: Testbed) -> None:
    policy = policy_for(bed)
    assert run(bed, policy).ok
    old = time.time() - 20 * 3600
    inodes = {}
    for node in bed.nodes:
        for image in bed.images:
            path = cache_file(node, image.id)
            os.utime(path, (old, old))
            inodes[path] = path.stat().st_ino
    report = run(bed, policy)
    assert report.ok, report.table()
    assert report.bytes_moved == 0
    assert report.count(State.REFRESHED) == len(bed.nodes) * len(bed.images)
    for path, inode in inodes.items():
        assert path.stat().st_ino == inode            # the same file, not a new copy
        assert time.time() - path.stat().st_mtime < 120


def test_a_dry_run_changes_nothing_and_says_what_is_missing(bed: Testbed) -> None:
    report = run(bed, policy_for(bed), dry_run=True)
    assert not report.ok
    assert report.count(State.MISSING) == len(bed.nodes) * len(bed.images)
    assert all(not any(Path(node["cacheDir"]).iterdir()) for node in bed.nodes)


def test_a_truncated_cache_file_is_found_by_size_and_replaced(bed: Testbed, raw_equivalents: dict) -> None:
    policy = policy_for(bed)
    assert run(bed, policy).ok
    node, image = bed.nodes[0], bed.images[1]
    path = cache_file(node, image.id)
    with open(path, "r+b") as damaged:
        damaged.truncate(path.stat().st_size // 2)
    report = run(bed, policy)
    assert report.ok, report.table()
    assert report.count(State.FILLED) == 1 and report.count(State.REFRESHED) == len(bed.nodes) * 2 - 1
    assert sha512(path) == raw_equivalents[image.id]


def test_a_corrupted_raw_file_is_found_by_checksum_when_asked(bed: Testbed) -> None:
    policy = policy_for(bed)
    assert run(bed, policy).ok
    node = bed.nodes[1]
    image = next(i for i in bed.images if i.disk_format == "raw")
    path = cache_file(node, image.id)
    with open(path, "r+b") as damaged:
        damaged.seek(12345)
        damaged.write(b"\xff" * 16)
    assert run(bed, policy).count(State.FILLED) == 0    # size alone cannot tell
    report = run(bed, policy_for(bed, verify="checksum"))
    assert report.ok
    filled = [(n.node, r.image_id) for n in report.nodes for r in n.images if r.state is State.FILLED]
    assert filled == [(node["name"], image.id)]
    assert sha512(path) == image.sha512


class CutSource:
    """Glance, but every stream breaks after `limit` bytes, as a dropped WAN link would."""

    def __init__(self, inner: GlanceImages, limit: int):
        self.inner, self.limit = inner, limit

    def resolve(self, refs):  # noqa: ANN001, ANN201 - the ImageSource protocol
        return self.inner.resolve(refs)

    def stream(self, image_id: str) -> Iterator[bytes]:
        sent = 0
        for chunk in self.inner.stream(image_id):
            if sent + len(chunk) > self.limit:
                raise ImageError(f"connection to Glance lost after {sent} bytes of {image_id}")
            sent += len(chunk)
            yield chunk


def test_a_transfer_cut_in_the_middle_leaves_nothing_and_the_next_run_completes(bed: Testbed) -> None:
    policy = policy_for(bed)
    creds = credentials.load(policy, credentials.directory_reader(bed.secrets_dir))
    glance = GlanceImages.from_clouds_yaml(creds.clouds_yaml, policy.cloud.cloud_name)
    report = run(bed, policy, source=CutSource(glance, 3 * MiB))
    assert not report.ok
    assert report.count(State.FAILED) == len(bed.nodes) * len(bed.images)
    assert all("lost after" in r.reason for n in report.nodes for r in n.images)
    for node in bed.nodes:
        assert list(Path(node["cacheDir"]).iterdir()) == []
    assert run(bed, policy).ok


def test_stale_temp_files_of_ours_are_removed_and_nova_files_are_not(bed: Testbed) -> None:
    node = bed.nodes[0]
    cache = Path(node["cacheDir"])
    stale = cache / f"{cacherules.TEMP_PREFIX}{'0' * 40}.dead"
    fresh = cache / f"{cacherules.TEMP_PREFIX}{'1' * 40}.live"
    foreign = cache / ("a" * 40)           # an image Nova cached that the policy does not name
    for path in (stale, fresh, foreign):
        path.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(foreign, (old, old))
    assert run(bed, policy_for(bed)).ok
    assert not stale.exists()
    assert fresh.exists() and foreign.exists()
    assert foreign.stat().st_mtime == pytest.approx(old, abs=1)   # not ours to refresh


def test_the_disk_reserve_is_honoured(bed: Testbed) -> None:
    report = run(bed, policy_for(bed, limits={"diskReserve": "1000TiB"}))
    assert not report.ok
    assert all(r.state is State.FAILED and "spec.limits.diskReserve" in r.reason
               for n in report.nodes for r in n.images)
    assert report.bytes_moved == 0
    assert all(list(Path(node["cacheDir"]).iterdir()) == [] for node in bed.nodes)


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    """A qcow2 image that names a backing file: Nova refuses to cache such an image."""
    base, overlay = tmp_path / "base.raw", tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
                   check=True)
    return overlay


@pytest.mark.parametrize("declared, convert, message", [
    ("qcow2", True, "backing file"),
    ("qcow2", False, "backing file"),
    ("raw", False, "declared raw but its bytes are in another disk format"),
])
def test_images_nova_would_refuse_are_refused_by_the_node(bed: Testbed, overlay: Path, declared: str,
                                                          convert: bool, message: str) -> None:
    # Glance 33 itself refuses to store these, but older Glances do not, so the node checks too:
    # the bytes go straight to the node here.
    policy = policy_for(bed)
    creds = credentials.load(policy, credentials.directory_reader(bed.secrets_dir))
    spec = policy.nodes[0]
    data = overlay.read_bytes()

    async def attempt() -> HopResult:
        async def chunks() -> AsyncIterator[bytes]:
            yield data
        hop = Hop(spec.name, spec.address, spec.port, "/var/lib/nova/instances/_base", convert)
        async with Node(spec.name, spec.address, spec.port, creds.ssh) as node:
            return (await node.chain("0c8fd6ec-5a0b-4e53-8f53-0e0c1e8d7c3a", [hop], chunks(), size=len(data),
                                     digest=("sha512", hashlib.sha512(data).hexdigest()),
                                     disk_format=declared, reserve=0))[spec.name]

    outcome = asyncio.run(attempt())
    assert not outcome.ok and message in outcome.message
    assert list(Path(bed.nodes[0]["cacheDir"]).iterdir()) == []


def test_a_node_that_caches_in_rbd_is_not_applicable(bed: Testbed) -> None:
    node = bed.sites[1]["nodes"][0]
    conf = Path(node["root"]) / "etc-nova" / "nova.conf"
    original = conf.read_text()
    conf.write_text(original.replace("images_type = qcow2", "images_type = rbd"))
    try:
        report = run(bed, policy_for(bed))
    finally:
        conf.write_text(original)
    assert report.ok, report.table()
    result = next(n for n in report.nodes if n.node == node["name"])
    assert {r.state for r in result.images} == {State.NOT_APPLICABLE}
    assert list(Path(node["cacheDir"]).iterdir()) == []


def test_nova_conf_decides_where_the_cache_is(bed: Testbed) -> None:
    node = bed.sites[0]["nodes"][1]
    root = Path(node["root"])
    conf = root / "etc-nova" / "nova.conf"
    original = conf.read_text()
    custom = root / "var-lib-nova" / "custom" / "_images"
    custom.mkdir(parents=True)
    os.chown(custom, 42436, 42436)
    conf.write_text(original.replace("instances_path = /var/lib/nova/instances",
                                     "state_path = /var/lib/nova\ninstances_path = $state_path/custom")
                    .replace("subdirectory_name = _base", "subdirectory_name = _images"))
    try:
        report = run(bed, policy_for(bed))
        assert report.ok, report.table()
        result = next(n for n in report.nodes if n.node == node["name"])
        assert result.cache_dir == "/var/lib/nova/custom/_images"
        assert sorted(p.name for p in custom.iterdir()) == sorted(cacherules.cache_name(i.id) for i in bed.images)
        assert list(Path(node["cacheDir"]).iterdir()) == []
    finally:
        conf.write_text(original)
        for path in custom.iterdir():
            path.unlink()
        custom.rmdir()
        custom.parent.rmdir()


def test_an_unknown_or_wrong_host_key_is_refused(bed: Testbed) -> None:
    policy = policy_for(bed)
    creds = credentials.load(policy, credentials.directory_reader(bed.secrets_dir))
    node = bed.nodes[0]
    lines = creds.ssh.known_hosts.decode().splitlines()
    unknown = SshCredentials(creds.ssh.user, creds.ssh.private_key,
                             "\n".join(line for line in lines if not line.startswith(node["address"] + " ")).encode())
    swapped_key = bed.nodes[1]["hostKey"].split()[:2]
    wrong = SshCredentials(creds.ssh.user, creds.ssh.private_key,
                           f"{node['address']} {' '.join(swapped_key)}\n".encode())
    glance = GlanceImages.from_clouds_yaml(creds.clouds_yaml, policy.cloud.cloud_name)
    for bad, message in ((unknown, "no host key"), (wrong, "does not match")):
        report = asyncio.run(reconcile(policy, glance, bad))
        result = next(n for n in report.nodes if n.node == node["name"])
        assert message in result.error
        assert not result.ready
    assert list(Path(node["cacheDir"]).iterdir()) == []


def test_remote_commands_pass_hostile_values_as_data(bed: Testbed) -> None:
    from novacache.node import TOUCH, command
    node = bed.nodes[0]
    hostile = "x; touch /tmp/novacache-pwned; $(touch /tmp/novacache-pwned2) `id`"
    proc = ssh(bed, node, command(TOUCH, "/var/lib/nova/instances/_base", hostile), check=False)
    assert proc.returncode == 0
    assert ssh(bed, node, "ls -A /var/lib/nova/instances/_base").stdout.decode().strip() == ""
    assert ssh(bed, node, "ls /tmp/novacache-pwned /tmp/novacache-pwned2", check=False).returncode != 0


def test_cli_reconcile_exits_zero_when_everything_is_cached(bed: Testbed, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = [str(Path(os.sys.executable).with_name("novacache")), "reconcile", "-f", str(bed.dir / "policy.yaml"),
            "--report-json", str(out)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "filled" in first.stdout
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0
    assert "refreshed" in second.stdout and "0 B moved" in second.stdout
    data = yaml.safe_load(out.read_text())
    assert data["ok"] is True and data["bytesMoved"] == 0


def test_a_missing_cache_directory_is_created_as_nova_would(bed: Testbed) -> None:
    node = bed.nodes[0]
    cache = Path(node["cacheDir"])
    cache.rmdir()
    try:
        report = run(bed, policy_for(bed))
        assert report.ok, report.table()
        info = cache.stat()
        assert (info.st_uid, info.st_gid) == (42436, 42436)     # the owner of instances_path
        assert sorted(p.name for p in cache.iterdir()) == sorted(cacherules.cache_name(i.id) for i in bed.images)
    finally:
        cache.mkdir(exist_ok=True)
        os.chown(cache, 42436, 42436)
