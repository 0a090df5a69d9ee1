"""The testbed's real Glance (no Keystone) and its sample images, on loopback.

Every other Glance-facing test trusts these facts, so they are checked here against hashes computed
by the test itself, not by the code under test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import free_port, needs_glance, sha512
from novacache.testbed import processes
from novacache.testbed.glance import GlanceServer, default_glance_venv
from novacache.testbed.images import SampleImage, glance_connection, make_sample_images, upload_images

SIZE = 4 << 20
VENV = default_glance_venv()
pytestmark = needs_glance


def _children(pid: int) -> list[int]:
    """PIDs whose parent is pid (gunicorn's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _md5(path: Path) -> str:
    with open(path, "rb") as data:
        return hashlib.file_digest(data, "md5").hexdigest()


@pytest.fixture(scope="module")
def uploaded(glance: GlanceServer, tmp_path_factory: pytest.TempPathFactory) -> list[SampleImage]:
    return upload_images(glance.endpoint, make_sample_images(tmp_path_factory.mktemp("images"), SIZE))


def test_sample_images_are_raw_and_real_qcow2(uploaded: list[SampleImage]) -> None:
    by_name = {image.name: image for image in uploaded}
    assert sorted(by_name) == ["cirros-qcow2", "cirros-raw"]
    raw, qcow2 = by_name["cirros-raw"], by_name["cirros-qcow2"]
    assert (raw.disk_format, raw.size, raw.virtual_size) == ("raw", SIZE, SIZE)
    assert qcow2.disk_format == "qcow2" and qcow2.virtual_size == SIZE
    assert qcow2.path.read_bytes()[:4] == b"QFI\xfb"
    assert SIZE // 2 < qcow2.size < SIZE   # half random data: allocated clusters, not an empty qcow2
    assert [SampleImage.from_dict(image.to_dict()) for image in uploaded] == uploaded


def test_glance_reports_local_hashes_and_store(glance: GlanceServer, uploaded: list[SampleImage]) -> None:
    conn = glance_connection(glance.endpoint)
    for sample in uploaded:
        image = conn.image.get_image(sample.id)
        assert image.status == "active"
        assert image.size == sample.path.stat().st_size
        assert image.checksum == sample.checksum == _md5(sample.path)
        assert image.hash_algo == "sha512"
        assert image.hash_value == sample.sha512 == sha512(sample.path)
        assert image.properties["stores"] == "central"


def test_streamed_download_matches(glance: GlanceServer, uploaded: list[SampleImage]) -> None:
    conn = glance_connection(glance.endpoint)
    for sample in uploaded:
        digest, length = hashlib.sha512(), 0
        for chunk in conn.image.download_image(sample.id, stream=True).iter_content(1 << 20):
            digest.update(chunk)
            length += len(chunk)
        assert (length, digest.hexdigest()) == (sample.size, sha512(sample.path))


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    server = GlanceServer(tmp_path / "glance", ["central"], "127.0.0.1", free_port(), venv=VENV)
    pid = server.start()
    try:
        workers = _children(pid)
        assert workers and all(processes.alive(p) for p in workers)
        with glance_connection(server.endpoint) as conn:
            assert [store.id for store in conn.image.stores()] == ["central"]
    finally:
        server.stop()
    assert server.pid is None
    assert not [p for p in [pid, *workers] if processes.alive(p)]
    server.stop()   # idempotent
