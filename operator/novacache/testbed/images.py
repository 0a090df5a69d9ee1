"""Sample images for the testbed Glance: made locally, uploaded, and checked against what Glance reports.

Tests of the cache must know, independently of the code under test, which bytes each image holds:
the facts here are computed locally and cross-checked with Glance (md5 `checksum`, sha512
`os_hash_value`) at upload time, so a later mismatch points at the operator, not at the fixture.
One raw and one qcow2 image, because Nova converts qcow2 to raw in its cache (`force_raw_images`)
and the operator must cope with both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import openstack
from openstack import exceptions
from openstack.image.v2.image import Image

from novacache.testbed import processes

_CHUNK = 1 << 20


@dataclass(frozen=True)
class SampleImage:
    """An uploaded image and the facts about it that tests assert on.

    `virtual_size` is the size of the raw file Nova keeps in its cache once it has converted the image.
    """

    name: str
    id: str
    disk_format: str
    size: int
    checksum: str
    sha512: str
    path: Path
    virtual_size: int

    def to_dict(self) -> dict[str, str | int]:
        """JSON-ready form, for handing the facts to other processes (testbed state files)."""
        return {"name": self.name, "id": self.id, "diskFormat": self.disk_format, "size": self.size,
                "checksum": self.checksum, "sha512": self.sha512, "path": str(self.path),
                "virtualSize": self.virtual_size}

    @classmethod
    def from_dict(cls, data: dict[str, str | int]) -> SampleImage:
        """The inverse of to_dict, for the process that reads the facts back."""
        return cls(name=str(data["name"]), id=str(data["id"]), disk_format=str(data["diskFormat"]),
                   size=int(data["size"]), checksum=str(data["checksum"]), sha512=str(data["sha512"]),
                   path=Path(str(data["path"])), virtual_size=int(data["virtualSize"]))


def glance_connection(endpoint: str) -> openstack.connection.Connection:
    """An openstacksdk connection to a Keystone-less Glance (our testbed's, which trusts every request)."""
    return openstack.connection.Connection(auth_type="none", auth={"endpoint": endpoint},
                                           image_endpoint_override=endpoint)


def make_sample_images(workdir: Path, size: int) -> list[tuple[str, str, Path]]:
    """Write a raw and a qcow2 image of virtual size `size` under workdir; return (name, disk_format, path).

    The raw one is all random bytes. The qcow2 one is converted by qemu-img from a raw file random in
    its first half and zero after, so it is a real qcow2 with both allocated and unallocated clusters.
    """
    if size <= 0 or size % 512:
        raise ValueError(f"image size must be a positive multiple of 512 (qemu-img's sector), not {size}")
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "cirros-raw.raw"
    _write_random(raw, size, size)
    qcow2 = workdir / "cirros-qcow2.qcow2"
    source = workdir / "cirros-qcow2.source.raw"
    _write_random(source, size // 2 // 512 * 512, size)
    try:
        processes.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source), str(qcow2)])
    finally:
        source.unlink()
    return [("cirros-raw", "raw", raw), ("cirros-qcow2", "qcow2", qcow2)]


def upload_images(endpoint: str, images: list[tuple[str, str, Path]], store: str = "central") -> list[SampleImage]:
    """Upload each image into one Glance store and return the facts Glance reports, checked against ours.

    Each file is streamed, never read whole into memory; on any mismatch the image is deleted again.
    """
    with glance_connection(endpoint) as conn:
        return [_upload(conn, name, disk_format, path, store) for name, disk_format, path in images]


def _upload(conn: openstack.connection.Connection, name: str, disk_format: str, path: Path,
            store: str) -> SampleImage:
    md5, sha512 = _file_hashes(path)
    # The resource itself, not conn.image.create_image(): that one would take `name` for a local file
    # name if such a file existed, and adds owner_specified.openstack.* properties.
    image = Image.new(name=name, disk_format=disk_format, container_format="bare").create(conn.image)
    try:
        # A plain upload names its store in a header (Image.upload() cannot); it is synchronous, and
        # on 256 MiB 2.5 times faster than glance-direct, which writes the data twice (staging, store).
        with open(path, "rb") as data:
            exceptions.raise_from_response(conn.image.put(
                f"/images/{image.id}/file", data=data,
                headers={"Content-Type": "application/octet-stream", "X-Image-Meta-Store": store}))
        image = conn.image.get_image(image.id)
        _check(image, path, md5, sha512, store)
    except Exception:
        conn.image.delete_image(image.id, ignore_missing=True)
        raise
    return SampleImage(name=name, id=image.id, disk_format=disk_format, size=image.size, checksum=image.checksum,
                       sha512=image.hash_value, path=path, virtual_size=_virtual_size(path, disk_format))


def _check(image: Image, path: Path, md5: str, sha512: str, store: str) -> None:
    """Fail loudly when Glance's facts differ from the file's, so that no test asserts on a bad fixture."""
    stores = (image.properties or {}).get("stores")   # a fresh upload: that one store, nothing else
    facts = [("status", image.status, "active"), ("stores", stores, store),
             ("size", image.size, path.stat().st_size), ("checksum", image.checksum, md5),
             ("os_hash_algo", image.hash_algo, "sha512"), ("os_hash_value", image.hash_value, sha512)]
    wrong = [f"{key}: Glance says {got!r}, expected {want!r}" for key, got, want in facts if got != want]
    if wrong:
        raise RuntimeError(f"Glance's image {image.id} does not match {path}: {'; '.join(wrong)}")


def _file_hashes(path: Path) -> tuple[str, str]:
    """md5 and sha512 of a file in one pass: Glance's `checksum` and `os_hash_value`."""
    md5, sha512 = hashlib.md5(usedforsecurity=False), hashlib.sha512()
    with open(path, "rb") as data:
        while chunk := data.read(_CHUNK):
            md5.update(chunk)
            sha512.update(chunk)
    return md5.hexdigest(), sha512.hexdigest()


def _virtual_size(path: Path, disk_format: str) -> int:
    """The image's disk size as qemu-img sees it: the length of the raw file Nova converts it to."""
    info = processes.run(["qemu-img", "info", "--output=json", "-f", disk_format, str(path)]).stdout
    return int(json.loads(info)["virtual-size"])


def _write_random(path: Path, random_bytes: int, length: int) -> None:
    """A file of `length` bytes, random up to `random_bytes` and sparse zeros after."""
    with open(path, "wb") as out:
        for offset in range(0, random_bytes, _CHUNK):
            out.write(os.urandom(min(_CHUNK, random_bytes - offset)))
        out.truncate(length)


def list_images(endpoint: str) -> list[dict[str, str | int]]:
    """What Glance holds now, for people reading the testbed's description."""
    return [{"id": image.id, "name": image.name, "disk_format": image.disk_format, "size": image.size or 0,
             "stores": image.properties.get("stores", ""), "sha512": image.hash_value or ""}
            for image in glance_connection(endpoint).image.images()]
