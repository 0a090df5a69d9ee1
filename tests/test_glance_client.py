"""The operator's Glance client (novacache.glance) against a real Glance on loopback.

The facts asserted on (ids, hashes, sizes) come from the testbed's uploads and from hashes computed
here, never from the code under test.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from openstack.image.v2.image import Image

from conftest import free_port, needs_glance, sha512
from novacache.glance import CloudConfigError, GlanceImages, ImageError, ImageInfo, ResolutionError
from novacache.testbed.glance import GlanceServer
from novacache.testbed.images import SampleImage, glance_connection, make_sample_images, upload_images

from novacache.policy import ImageRef

SIZE = 1 << 20
SMALL = 64 << 10
SECRET = "hunter2-Sup3rSecret-value"


def _clouds_yaml(clouds: dict) -> bytes:
    return yaml.safe_dump({"clouds": clouds}).encode()


def _noauth_cloud(endpoint: str) -> dict:
    """A cloud as the testbed writes it into its clouds.yaml secret."""
    return {"auth_type": "none", "auth": {"endpoint": endpoint}, "image_endpoint_override": endpoint}


def _keystone_cloud(auth_url: str) -> dict:
    return {"auth": {"auth_url": auth_url, "username": "novacache", "password": SECRET,
                     "project_name": "admin", "user_domain_name": "Default", "project_domain_name": "Default"},
            "regions": ["RegionTwo", "RegionOne"], "interface": "internal", "identity_api_version": 3}


@dataclass
class Images:
    """What the module's Glance holds, by role in the tests."""
    raw: SampleImage
    qcow2: SampleImage
    twins: list[SampleImage]      # two active images with the same name
    mixed: SampleImage            # the one active image of a name that a queued image shares
    queued_mixed: str
    queued: str                   # no data; its name is its own
    deactivated: str
    dcn: SampleImage              # uploaded to the dcn0 store only


@pytest.fixture(scope="module")
def images(glance: GlanceServer, tmp_path_factory: pytest.TempPathFactory) -> Images:
    directory = tmp_path_factory.mktemp("images")
    raw, qcow2 = upload_images(glance.endpoint, make_sample_images(directory, SIZE))

    def small(name: str) -> tuple[str, str, Path]:
        path = directory / f"{name}-{os.urandom(4).hex()}.raw"
        path.write_bytes(os.urandom(SMALL))
        return name, "raw", path

    twins = upload_images(glance.endpoint, [small("twin"), small("twin")])
    mixed, deactivated = upload_images(glance.endpoint, [small("mixed"), small("deactivated")])
    [dcn] = upload_images(glance.endpoint, [small("dcn-only")], store="dcn0")
    conn = glance_connection(glance.endpoint)
    queued_mixed = Image.new(name="mixed", disk_format="raw", container_format="bare").create(conn.image).id
    queued = Image.new(name="empty", disk_format="qcow2", container_format="bare").create(conn.image).id
    conn.image.deactivate_image(deactivated.id)
    return Images(raw, qcow2, twins, mixed, queued_mixed, queued, deactivated.id, dcn)


@pytest.fixture(scope="module")
def client(glance: GlanceServer) -> GlanceImages:
    return GlanceImages(glance_connection(glance.endpoint))


# --- pure data -----------------------------------------------------------------------------------

def _info(**changes: object) -> ImageInfo:
    facts = dict(id="0f1e2d3c-0000-4000-8000-000000000001", name="cirros", status="active", disk_format="raw",
                 container_format="bare", size=10, virtual_size=None, checksum="a" * 32, hash_algo="sha512",
                 hash_value="b" * 128, stores=("central",))
    facts.update(changes)
    return ImageInfo(**facts)  # type: ignore[arg-type]


def test_digest_prefers_glance_multihash_and_names_its_algorithm() -> None:
    assert _info().digest() == ("sha512", "b" * 128)
    assert _info(hash_algo="sha256", hash_value="c" * 64).digest() == ("sha256", "c" * 64)
    assert _info(hash_algo="sha384", hash_value="d" * 96).digest() == ("sha384", "d" * 96)


def test_digest_falls_back_to_md5_and_fails_without_either() -> None:
    assert _info(hash_algo=None, hash_value=None).digest() == ("md5", "a" * 32)
    assert _info(hash_algo="blake2b", hash_value="e" * 128).digest() == ("md5", "a" * 32)
    with pytest.raises(ImageError, match="no checksum") as caught:
        _info(hash_algo="blake2b", hash_value="e" * 128, checksum=None).digest()
    assert caught.value.image_id == _info().id


def test_resolution_error_carries_every_problem_with_its_path() -> None:
    error = ResolutionError(("spec.images[0].id", "first"), ("spec.images[2].name", "second"))
    assert isinstance(error, ImageError)
    assert error.path == "spec.images[0].id"
    assert error.problems == [("spec.images[0].id", "first"), ("spec.images[2].name", "second")]
    assert str(error) == "spec.images[0].id: first; spec.images[2].name: second"


def test_module_stays_within_its_boundaries() -> None:
    code = ("import sys, novacache.glance\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('kopf', 'asyncssh') "
            "or m.startswith('novacache.testbed')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- resolve -------------------------------------------------------------------------------------

@needs_glance
def test_resolve_by_id_and_by_name(client: GlanceImages, images: Images) -> None:
    raw, qcow2 = images.raw, images.qcow2
    got = client.resolve([ImageRef("spec.images[0]", id=raw.id), ImageRef("spec.images[1]", name=qcow2.name)])
    assert [info.id for info in got] == [raw.id, qcow2.id]
    for info, sample in zip(got, [raw, qcow2]):
        assert (info.name, info.status, info.disk_format, info.container_format) == \
               (sample.name, "active", sample.disk_format, "bare")
        assert (info.size, info.checksum, info.hash_algo, info.hash_value) == \
               (sample.size, sample.checksum, "sha512", sample.sha512)
        assert info.stores == ("central",)
        assert info.digest() == ("sha512", sha512(sample.path))


@needs_glance
def test_resolve_skips_non_active_images_of_the_same_name(client: GlanceImages, images: Images) -> None:
    [info] = client.resolve([ImageRef("spec.images[0]", name="mixed")])
    assert info.id == images.mixed.id


@needs_glance
def test_same_image_twice_is_returned_once_at_its_first_position(client: GlanceImages, images: Images) -> None:
    refs = [ImageRef("spec.images[0]", name=images.qcow2.name), ImageRef("spec.images[1]", id=images.raw.id),
            ImageRef("spec.images[2]", id=images.qcow2.id), ImageRef("spec.images[3]", name=images.raw.name)]
    assert [info.id for info in client.resolve(refs)] == [images.qcow2.id, images.raw.id]


@needs_glance
def test_stores_lists_every_store_holding_the_image(glance: GlanceServer, client: GlanceImages,
                                                     images: Images) -> None:
    [info] = client.resolve([ImageRef("spec.images[0]", id=images.dcn.id)])
    assert info.stores == ("dcn0",)
    # copy it into central too (Glance's copy-image import); Glance then says "dcn0,central" or so
    conn = glance_connection(glance.endpoint)
    conn.image.import_image(conn.image.get_image(images.dcn.id), method="copy-image", stores=["central"])
    deadline = time.monotonic() + 10
    while True:
        image = conn.image.get_image(images.dcn.id)
        if "os_glance_import_task" not in image.properties and "central" in image.properties.get("stores", ""):
            break
        assert time.monotonic() < deadline, f"copy-image did not finish: {image.properties}"
        time.sleep(0.05)
    [info] = client.resolve([ImageRef("spec.images[0]", id=images.dcn.id)])
    assert sorted(info.stores) == ["central", "dcn0"]


@needs_glance
def test_ambiguous_name_lists_the_candidate_ids(client: GlanceImages, images: Images) -> None:
    with pytest.raises(ResolutionError) as caught:
        client.resolve([ImageRef("spec.images[3]", name="twin")])
    error = caught.value
    assert error.path == "spec.images[3].name"
    assert "ambiguous: 2 active images are named 'twin'" in str(error)
    assert "name the one you mean by id" in str(error)
    for twin in images.twins:
        assert twin.id in str(error)


@needs_glance
def test_unknown_name_and_id_errors_name_the_field(client: GlanceImages, images: Images) -> None:
    with pytest.raises(ResolutionError) as caught:
        client.resolve([ImageRef("spec.images[1]", name="x")])
    assert caught.value.path == "spec.images[1].name"
    assert str(caught.value) == ("spec.images[1].name: no active image named 'x' in Glance; "
                                 "check the name with `openstack image list` or give its id")
    missing = "6a0b8a4e-9d7e-4c3b-8f6e-000000000000"
    with pytest.raises(ResolutionError) as caught:
        client.resolve([ImageRef("spec.images[0]", id=missing)])
    assert caught.value.path == "spec.images[0].id"
    assert f"no image with id {missing} in Glance" in str(caught.value)


@needs_glance
def test_non_active_images_are_refused_with_their_status(client: GlanceImages, images: Images) -> None:
    with pytest.raises(ResolutionError) as caught:
        client.resolve([ImageRef("spec.images[0]", id=images.queued),
                        ImageRef("spec.images[1]", id=images.deactivated),
                        ImageRef("spec.images[2]", name="empty")])
    (path0, queued), (path1, deactivated), (path2, by_name) = caught.value.problems
    assert (path0, path1, path2) == ("spec.images[0].id", "spec.images[1].id", "spec.images[2].name")
    assert "is queued, not active" in queued and images.queued in queued
    assert "is deactivated, not active" in deactivated
    assert "no active image named 'empty'" in by_name and f"{images.queued} is queued" in by_name


@needs_glance
def test_every_bad_reference_is_reported_at_once(client: GlanceImages, images: Images) -> None:
    missing = "6a0b8a4e-9d7e-4c3b-8f6e-000000000001"
    with pytest.raises(ResolutionError) as caught:
        client.resolve([ImageRef("spec.images[0]", id=images.raw.id), ImageRef("spec.images[1]", name="nope"),
                        ImageRef("spec.images[2]", name="twin"), ImageRef("spec.images[3]", id=missing),
                        ImageRef("spec.images[4]", name=images.qcow2.name)])
    assert [path for path, _ in caught.value.problems] == \
           ["spec.images[1].name", "spec.images[2].name", "spec.images[3].id"]


@needs_glance
def test_names_glance_would_read_as_an_operator_are_matched_literally(glance: GlanceServer,
                                                                      client: GlanceImages) -> None:
    conn = glance_connection(glance.endpoint)
    image = Image.new(name="in:odd", disk_format="raw", container_format="bare").create(conn.image)
    try:
        with pytest.raises(ResolutionError, match=f"{image.id} is queued"):
            client.resolve([ImageRef("spec.images[0]", name="in:odd")])
    finally:
        conn.image.delete_image(image.id)


def test_glance_down_is_an_image_error_not_a_resolution_error() -> None:
    client = GlanceImages(glance_connection(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ImageError) as caught:
        client.resolve([ImageRef("spec.images[0]", name="cirros")])
    assert not isinstance(caught.value, ResolutionError)
    assert "cannot talk to Glance while looking up images named 'cirros' (spec.images[0].name)" in str(caught.value)


# --- stream --------------------------------------------------------------------------------------

@needs_glance
def test_stream_yields_the_bytes_glance_hashed(client: GlanceImages, images: Images) -> None:
    for sample in [images.raw, images.qcow2]:
        digest, length, sizes = hashlib.sha512(), 0, []
        for chunk in client.stream(sample.id, chunk_size=256 << 10):
            digest.update(chunk)
            length += len(chunk)
            sizes.append(len(chunk))
        assert (length, digest.hexdigest()) == (sample.size, sample.sha512)
        assert len(sizes) > 1 and max(sizes) <= 256 << 10


@needs_glance
def test_early_close_releases_the_response(client: GlanceImages, images: Images,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    responses = []
    download = client._conn.image.download_image

    def recording(*args, **kwargs):
        response = download(*args, **kwargs)
        responses.append(response)
        return response

    monkeypatch.setattr(client._conn.image, "download_image", recording)
    stream = client.stream(images.raw.id, chunk_size=64 << 10)
    assert len(next(stream)) > 0
    assert not responses[0].raw.closed
    stream.close()
    assert responses[0].raw.closed
    digest = hashlib.sha512()
    for chunk in client.stream(images.raw.id):
        digest.update(chunk)
    assert digest.hexdigest() == images.raw.sha512
    assert responses[1].raw.closed   # also closed after a full read


@needs_glance
def test_streams_in_parallel_threads(client: GlanceImages, images: Images) -> None:
    samples = [images.raw, images.qcow2, images.raw, *images.twins]
    results: dict[int, str] = {}

    def pump(index: int, sample: SampleImage) -> None:
        digest = hashlib.sha512()
        for chunk in client.stream(sample.id, chunk_size=32 << 10):
            digest.update(chunk)
        results[index] = digest.hexdigest()

    threads = [threading.Thread(target=pump, args=item) for item in enumerate(samples)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {index: sample.sha512 for index, sample in enumerate(samples)}


@needs_glance
def test_stream_errors_carry_image_id_and_status(client: GlanceImages, images: Images) -> None:
    missing = "6a0b8a4e-9d7e-4c3b-8f6e-000000000002"
    stream = client.stream(missing)   # a generator: nothing asked yet
    with pytest.raises(ImageError) as caught:
        next(stream)
    assert (caught.value.image_id, caught.value.status) == (missing, 404)
    assert missing in str(caught.value) and "404" in str(caught.value)
    with pytest.raises(ImageError) as caught:
        list(client.stream(images.queued))
    assert (caught.value.image_id, caught.value.status) == (images.queued, 204)
    assert "no data" in str(caught.value)


# --- from_clouds_yaml ----------------------------------------------------------------------------

@needs_glance
def test_from_clouds_yaml_with_the_testbed_secret(glance: GlanceServer, images: Images) -> None:
    content = _clouds_yaml({"central": _noauth_cloud(glance.endpoint),
                            "elsewhere": _keystone_cloud("http://127.0.0.1:9/v3")})
    client = GlanceImages.from_clouds_yaml(content, "central")
    [info] = client.resolve([ImageRef("spec.images[0]", name=images.raw.name)])
    assert info.id == images.raw.id
    assert hashlib.sha512(b"".join(client.stream(info.id))).hexdigest() == images.raw.sha512


@needs_glance
def test_from_clouds_yaml_ignores_environment_and_local_files(glance: GlanceServer, images: Images,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoy = tmp_path / "clouds.yaml"
    decoy.write_bytes(_clouds_yaml({"central": _noauth_cloud(f"http://127.0.0.1:{free_port()}")}))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(decoy))
    monkeypatch.setenv("OS_CLOUD", "central")
    monkeypatch.setenv("OS_AUTH_URL", "http://127.0.0.1:9/v3")
    monkeypatch.setenv("OS_IMAGE_ENDPOINT_OVERRIDE", f"http://127.0.0.1:{free_port()}")
    client = GlanceImages.from_clouds_yaml(_clouds_yaml({"central": _noauth_cloud(glance.endpoint)}), "central")
    assert [info.id for info in client.resolve([ImageRef("spec.images[0]", id=images.raw.id)])] == [images.raw.id]


def test_unknown_cloud_names_the_field_and_the_clouds_only() -> None:
    content = _clouds_yaml({"central": _keystone_cloud("http://127.0.0.1:9/v3"),
                            "dcn0": _noauth_cloud("http://127.0.0.1:9")})
    with pytest.raises(CloudConfigError) as caught:
        GlanceImages.from_clouds_yaml(content, "centrl")
    error = caught.value
    assert isinstance(error, ResolutionError) and isinstance(error, ImageError)
    assert error.path == "spec.cloud.cloudName"
    assert str(error) == ("spec.cloud.cloudName: no cloud named 'centrl' in the clouds.yaml secret; "
                          "it defines: 'central', 'dcn0'")
    _assert_no_leak(error, content)


@pytest.mark.parametrize("content", [
    f"clouds:\n  central:\n    auth: {{password: {SECRET}\n".encode(),   # broken YAML
    f"clouds: [{SECRET}]\n".encode(),
    f"{SECRET}\n".encode(),
    b"\xff\xfe" + SECRET.encode(),
], ids=["broken-yaml", "clouds-not-a-mapping", "scalar", "not-utf8"])
def test_unusable_clouds_yaml_never_quotes_its_content(content: bytes) -> None:
    with pytest.raises(CloudConfigError) as caught:
        GlanceImages.from_clouds_yaml(content, "central")
    assert caught.value.path == "spec.cloud.secretRef"
    _assert_no_leak(caught.value, content)


def test_invalid_cloud_settings_never_quote_values() -> None:
    cloud = _keystone_cloud("http://127.0.0.1:9/v3")
    del cloud["auth"]["auth_url"]
    cloud["auth_type"] = "password"
    cloud["regions"] = ["RegionOne"]
    for content, name in [(_clouds_yaml({"central": cloud}), "central"),
                          (_clouds_yaml({"central": {**cloud, "auth_type": f"no-such-{SECRET}"}}), "central"),
                          (_clouds_yaml({"central": SECRET}), "central")]:
        with pytest.raises(CloudConfigError) as caught:
            GlanceImages.from_clouds_yaml(content, name)
        assert caught.value.path == "spec.cloud.secretRef"
        _assert_no_leak(caught.value, content)


def test_keystone_cloud_is_built_without_contacting_anything() -> None:
    with _RecordingServer() as keystone:
        content = _clouds_yaml({"central": _keystone_cloud(f"{keystone.url}/v3")})
        client = GlanceImages.from_clouds_yaml(content, "central")
        config = client._conn.config
        assert keystone.requests == []
        assert config.get_region_name() == "RegionTwo"   # the first of `regions`, as openstack.config does
        assert config.get_interface("image") == "internal"
        assert config.get_auth_args()["auth_url"] == f"{keystone.url}/v3"
        # the first real request goes to Keystone, which refuses it: a Glance failure, without the password
        with pytest.raises(ImageError) as caught:
            client.resolve([ImageRef("spec.images[0]", name="cirros")])
        assert any(request.startswith("POST /v3/auth/tokens") for request in keystone.requests)
        assert not isinstance(caught.value, ResolutionError)
        assert caught.value.status == 401
        _assert_no_leak(caught.value, content)


def _assert_no_leak(error: BaseException, content: bytes) -> None:
    shown = "".join(traceback.format_exception(error)) + repr(error) + repr(error.args)
    assert SECRET not in shown
    assert content.decode(errors="replace") not in shown


class _RecordingServer:
    """A stand-in Keystone on loopback: it records each request, serves its v3 version document and
    refuses every token request with 401.

    (Its version document must be served: keystoneauth 5.18 retries a discovery answered with 401 as
    an authenticated request, which waits for the lock its own token request holds, forever.)
    """

    def __init__(self) -> None:
        self.requests: list[str] = []
        recorded = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, document: dict) -> None:
                recorded.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                host = self.headers.get("Host")
                self._answer(200, {"version": {
                    "id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
                    "links": [{"rel": "self", "href": f"http://{host}/v3/"}],
                    "media-types": [{"base": "application/json",
                                     "type": "application/vnd.openstack.identity-v3+json"}]}})

            def do_POST(self) -> None:
                self._answer(401, {"error": {"code": 401, "title": "Unauthorized",
                                             "message": "The request you have made requires authentication."}})

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> _RecordingServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
