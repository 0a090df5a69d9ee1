"""The testbed is real: reachable nodes with checked host keys, private caches, shaped links, Glance."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IS_ROOT, MiB, host_snapshot, needs_glance, needs_netns, ssh
from novacache.testbed import Options, Testbed
from novacache.testbed.images import glance_connection
from novacache.testbed.network import payload_ceiling

pytestmark = needs_glance


@needs_netns
def test_every_node_is_reachable_from_central_with_strict_host_key_checking(testbed: Testbed) -> None:
    for node in testbed.nodes:
        out = ssh(testbed, node, "hostname -I", in_central=True).stdout.decode().split()
        assert node["address"] in out


def test_nodes_are_reachable_from_the_root_namespace_too(testbed: Testbed) -> None:
    for node in testbed.nodes:
        assert ssh(testbed, node, "echo ok").stdout == b"ok\n"


def test_an_unknown_host_key_is_refused(testbed: Testbed, tmp_path: Path) -> None:
    node = testbed.nodes[0]
    other_key = tmp_path / "known_hosts"
    # A known_hosts that names this address with another node's key: the login must fail.
    impostor = testbed.nodes[1]["hostKey"].split()[:2]
    host = node["address"] if node["port"] == 22 else f"[{node['address']}]:{node['port']}"
    other_key.write_text(f"{host} {' '.join(impostor)}\n")
    argv = [arg.replace(str(testbed.known_hosts), str(other_key)) for arg in testbed.ssh_argv(node, "true")]
    proc = subprocess.run(argv, capture_output=True, timeout=30)
    assert proc.returncode == 255
    assert b"HOST IDENTIFICATION HAS CHANGED" in proc.stderr or b"verification failed" in proc.stderr


def test_each_node_has_nova_conf_and_a_cache_dir_of_its_own(testbed: Testbed) -> None:
    for node in testbed.nodes:
        marker = f"marker-{node['name']}"
        conf = ssh(testbed, node, f"cat {node['novaConf']}").stdout.decode()
        assert "instances_path = /var/lib/nova/instances" in conf
        assert "remove_unused_original_minimum_age_seconds = 86400" in conf
        assert "images_type = qcow2" in conf
        ssh(testbed, node, f"touch /var/lib/nova/instances/_base/{marker}")
    for node in testbed.nodes:
        listing = ssh(testbed, node, "ls /var/lib/nova/instances/_base").stdout.decode().split()
        assert listing == [f"marker-{node['name']}"]
        assert sorted(p.name for p in Path(node["cacheDir"]).iterdir()) == listing
        # The node owns nothing else of the testbed: other nodes' trees and the keys are hidden.
        assert ssh(testbed, node, f"ls -A {testbed.dir / 'nodes'} {testbed.dir / 'keys'}").stdout.strip() == \
            f"{testbed.dir / 'keys'}:\n\n{testbed.dir / 'nodes'}:".encode()
        ssh(testbed, node, f"rm /var/lib/nova/instances/_base/marker-{node['name']}")


def test_cache_dir_is_owned_by_the_nova_user(testbed: Testbed) -> None:
    for node in testbed.nodes:
        assert ssh(testbed, node, "stat -c %u:%g /var/lib/nova/instances/_base").stdout == b"42436:42436\n"


def test_nodes_of_a_site_trust_each_other_and_no_one_else(testbed: Testbed) -> None:
    migration = ("ssh -F none -i /etc/nova/migration/identity -o BatchMode=yes -o StrictHostKeyChecking=yes "
                 "-o UserKnownHostsFile=/etc/nova/migration/known_hosts -o ConnectTimeout=5 -p {port} root@{address} hostname -I")
    first, second = testbed.sites[0]["nodes"][:2]
    out = ssh(testbed, first, migration.format(**second)).stdout.decode().split()
    assert second["address"] in out
    stranger = testbed.sites[1]["nodes"][0]
    proc = ssh(testbed, first, migration.format(**stranger), check=False)
    assert proc.returncode == 255


@needs_netns
def test_the_wan_link_carries_its_payload_ceiling(testbed: Testbed) -> None:
    node = testbed.sites[0]["nodes"][0]

    def send(size: int) -> float:
        started = time.monotonic()
        ssh(testbed, node, "cat > /dev/null", input=b"\0" * size)
        return time.monotonic() - started

    # The slope between a small and a large transfer: handshake and slow start cancel out.
    small, large = 4 * MiB, 36 * MiB
    measured = (large - small) / (send(large) - send(small))
    ceiling = payload_ceiling(testbed.wan_rate())
    print(f"WAN: {measured * 8 / 1e6:.1f} Mbit/s of payload, ceiling {ceiling * 8 / 1e6:.1f} Mbit/s")
    assert abs(measured - ceiling) / ceiling < 0.15


def test_glance_serves_the_sample_images_with_their_sha512(testbed: Testbed) -> None:
    conn = glance_connection(testbed.glance_endpoint)
    formats = set()
    for sample in testbed.images:
        local = hashlib.sha512(sample.path.read_bytes()).hexdigest()
        image = conn.image.get_image(sample.id)
        assert image.hash_algo == "sha512"
        assert image.hash_value == local == sample.sha512
        assert image.checksum == hashlib.md5(sample.path.read_bytes()).hexdigest()
        streamed = hashlib.sha512()
        for chunk in conn.image.download_image(image, stream=True).iter_content(1 << 20):
            streamed.update(chunk)
        assert streamed.hexdigest() == local
        formats.add(image.disk_format)
    assert formats == {"raw", "qcow2"}


def test_the_qcow2_sample_is_a_real_qcow2(testbed: Testbed) -> None:
    qcow2 = next(image for image in testbed.images if image.disk_format == "qcow2")
    info = subprocess.run(["qemu-img", "info", "--output=json", str(qcow2.path)], capture_output=True,
                          text=True, check=True).stdout
    assert '"format": "qcow2"' in info
    assert f'"virtual-size": {qcow2.virtual_size}' in info


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "novacache.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(not IS_ROOT, reason="the testbed needs root")
@pytest.mark.parametrize("mode", [pytest.param("netns", marks=needs_netns), "loopback"])
def test_cli_up_then_down_leaves_the_machine_as_it_was(tmp_path: Path, mode: str) -> None:
    before = host_snapshot()
    directory = tmp_path / "bed"
    up = _cli("testbed", "up", "--dir", str(directory), "--sites", "1", "--nodes", "2",
              "--image-size", "1MiB", "--mode", mode)
    assert up.returncode == 0, up.stderr
    assert "dcn0-compute-1" in up.stdout and "cirros-qcow2" in up.stdout
    bed = Testbed.load(directory)
    assert bed.state["mode"] == mode
    assert host_snapshot() != before
    for node in bed.nodes:
        assert ssh(bed, node, "cat /etc/nova/nova.conf").returncode == 0
    exec_out = _cli("testbed", "exec", "--dir", str(directory), "--", "ip", "-o", "-4", "addr")
    assert exec_out.returncode == 0
    assert (bed.state["central"]["address"] in exec_out.stdout)
    down = _cli("testbed", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr
    assert host_snapshot() == before
    assert not directory.exists()


def test_up_refuses_a_directory_that_holds_a_running_testbed(testbed: Testbed) -> None:
    with pytest.raises(Exception, match="already up"):
        Testbed.up(testbed.dir, Options(sites=1, nodes=1))
