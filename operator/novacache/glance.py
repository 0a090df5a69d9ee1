"""The operator's Glance client: resolve the policy's image references, read their facts, stream their bytes.

Everything Glance-specific lives here and goes through openstacksdk; the rest of the operator sees
`ImageInfo` (plain, frozen facts about one active image) and iterators of bytes.

Errors come in two kinds, so that callers can tell "the policy is wrong" from "Glance is not well":
- `ResolutionError`: one or more policy fields name something that is not there (no such image, an
  ambiguous name, an image that is not active, an unknown cloud). It carries every problem found, each
  with the field path it belongs to (`.problems`), so a status can list them all at once; retrying
  without changing the policy or Glance does not help.
- `ImageError` (the base class): anything else about images, e.g. Glance or Keystone unreachable or
  refusing while resolving, or a download refused or broken off. Its `.image_id` and `.status` (HTTP)
  are set when known.

No message built here carries a credential from clouds.yaml; connection errors may name endpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keystoneauth1.exceptions
import openstack.config
import openstack.connection
import requests
import urllib3.exceptions
import yaml
from openstack import exceptions as sdk_exceptions

from . import __version__

if TYPE_CHECKING:   # only the shape is used (path, id, name); keeps this module importable on its own
    from .policy import ImageRef

__all__ = ["CloudConfigError", "GlanceImages", "ImageError", "ImageInfo", "ResolutionError"]

# The os_hash_algo values whose os_hash_value digest() hands out; anything else falls back to md5.
DIGEST_ALGORITHMS = ("sha256", "sha384", "sha512")

_CLOUD_NAME_PATH = "spec.cloud.cloudName"
_CLOUD_SECRET_PATH = "spec.cloud.secretRef"


class ImageError(Exception):
    """A problem with an image, or with Glance while dealing with one.

    `image_id` and `status` (the HTTP status Glance answered with) are set when known.
    """

    def __init__(self, *args: object, image_id: str | None = None, status: int | None = None) -> None:
        super().__init__(*args)
        self.image_id = image_id
        self.status = status


class ResolutionError(ImageError):
    """Policy fields that name no usable image: every problem found, each as (field path, message).

    Raised once per `resolve()` with all of them, so that the caller can report every bad reference
    together. `path` is the first problem's path; str() is "path: message" for each, joined by "; ":
    `spec.images[1].name: no active image named 'x' in Glance; check the name with ...`.
    """

    def __init__(self, *problems: tuple[str, str]) -> None:
        if not problems:
            raise ValueError("ResolutionError needs at least one (path, message) problem")
        super().__init__(*problems)
        self.problems: list[tuple[str, str]] = [(str(path), str(message)) for path, message in problems]

    @property
    def path(self) -> str:
        return self.problems[0][0]

    def __str__(self) -> str:
        return "; ".join(f"{path}: {message}" for path, message in self.problems)


class CloudConfigError(ResolutionError):
    """clouds.yaml (a secret's content) cannot give a connection to the cloud the policy names.

    Its paths are `spec.cloud.cloudName` (no such cloud) or `spec.cloud.secretRef` (the content is
    unusable). Messages name clouds and option names only, never values from the file.
    """


@dataclass(frozen=True)
class ImageInfo:
    """What the operator needs to know about one active Glance image.

    `checksum` is Glance's md5; `hash_algo`/`hash_value` are its `os_hash_algo`/`os_hash_value`
    (multihash, sha512 by default). `stores` lists the Glance stores holding the data (multistore),
    empty when Glance does not say.
    """

    id: str
    name: str
    status: str
    disk_format: str
    container_format: str
    size: int
    virtual_size: int | None
    checksum: str | None
    hash_algo: str | None
    hash_value: str | None
    stores: tuple[str, ...]

    def digest(self) -> tuple[str, str]:
        """(algorithm, hex digest) to verify a copy with: Glance's multihash when it is sha256, sha384
        or sha512, else ("md5", checksum); ImageError when Glance has neither."""
        algo = (self.hash_algo or "").lower()
        if self.hash_value and algo in DIGEST_ALGORITHMS:
            return algo, self.hash_value.lower()
        if self.checksum:
            return "md5", self.checksum.lower()
        raise ImageError(f"image {self.id} ({self.name!r}) has no checksum in Glance "
                         f"(os_hash_algo {self.hash_algo!r}, no md5 checksum): its copies cannot be verified",
                         image_id=self.id)


class GlanceImages:
    """The images side of one OpenStack cloud, through an openstacksdk Connection.

    Methods block (HTTP); call them from a worker thread in async code. A stream may be consumed in a
    thread of its own: several streams can run at once on one instance.
    """

    def __init__(self, connection: openstack.connection.Connection) -> None:
        self._conn = connection

    @classmethod
    def from_clouds_yaml(cls, clouds_yaml: bytes, cloud_name: str) -> GlanceImages:
        """A client for cloud `cloud_name` of a clouds.yaml given as content (a Kubernetes secret's bytes).

        Nothing is written to disk and neither the process environment (OS_*) nor clouds.yaml files
        on this machine are consulted: the YAML is parsed here and handed to openstack.config, which
        applies its usual rules to that one cloud (regions, vendor profiles, auth plugins). Building the
        connection contacts nothing; Keystone is first asked at the first request.
        Raises CloudConfigError naming `spec.cloud.cloudName` (listing the clouds present) or
        `spec.cloud.secretRef`; its messages carry no value from the file.
        """
        clouds = _parse_clouds(clouds_yaml)
        if cloud_name not in clouds:
            present = ", ".join(repr(str(name)) for name in clouds) or "none"
            raise CloudConfigError((_CLOUD_NAME_PATH,
                                    f"no cloud named {cloud_name!r} in the clouds.yaml secret; "
                                    f"it defines: {present}"))
        entry = clouds[cloud_name]
        if not isinstance(entry, Mapping):
            raise CloudConfigError((_CLOUD_SECRET_PATH,
                                    f"cloud {cloud_name!r} in clouds.yaml is not a mapping of settings"))
        config = openstack.config.OpenStackConfig(load_yaml_config=False, load_envvars=False,
                                                  app_name="nova-image-cache-operator", app_version=__version__)
        # With load_yaml_config=False the loader holds no clouds; give it ours, so that get_one()
        # applies the same rules as to a clouds.yaml file it had read itself.
        config.cloud_config = {"clouds": {cloud_name: copy.deepcopy(dict(entry))}}
        failure: str | None = None
        try:
            region = config.get_one(cloud=cloud_name)
            connection = openstack.connection.Connection(config=region)
        except (sdk_exceptions.SDKException, keystoneauth1.exceptions.ClientException) as error:
            # These name options, plugins and regions; redact anyway, in case one quotes a value.
            failure = _redact(f"{type(error).__name__}: {error}", _secret_values(entry))
        except Exception as error:   # unknown wording: the type only
            failure = type(error).__name__
        if failure is not None:   # raised outside the except blocks: no chained exception to print
            raise CloudConfigError((_CLOUD_SECRET_PATH,
                                    f"cloud {cloud_name!r} in clouds.yaml gives no usable connection: {failure}"))
        return cls(connection)

    def resolve(self, refs: Sequence[ImageRef]) -> list[ImageInfo]:
        """The active images the references name, in order, each once (at its first position).

        A reference by id must name an existing, active image; by name, exactly one active image must
        bear that name (Glance's default listing, so hidden images do not count). All references are
        checked before raising one ResolutionError with every problem, paths suffixed with the field
        at fault (`spec.images[1].id` / `.name`). When Glance itself fails (unreachable, 5xx), a plain
        ImageError is raised at once: that is not the policy's fault.
        """
        infos: dict[str, ImageInfo] = {}
        problems: list[tuple[str, str]] = []
        for ref in refs:
            if ref.id is not None:
                info, problem = self._by_id(ref.path, ref.id)
            elif ref.name is not None:
                info, problem = self._by_name(ref.path, ref.name)
            else:
                info, problem = None, (ref.path, "names no image: give its id or its name")
            if problem is not None:
                problems.append(problem)
            elif info is not None:
                infos.setdefault(info.id, info)
        if problems:
            raise ResolutionError(*problems)
        return list(infos.values())

    def stream(self, image_id: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The image's bytes as Glance serves them, in chunks of at most chunk_size; never all in memory.

        A generator: nothing is requested before the first next(). The HTTP response is closed when
        the data ends, on error, and when the generator is closed early (close(), garbage collection).
        No checksum is verified here; compare ImageInfo.digest() with what arrives. Raises ImageError
        with image_id and, when Glance answered, status: not found (404), no data (204: queued or
        still importing), other HTTP errors, or a transfer broken off.
        """
        response: requests.Response | None = None
        received = 0
        try:
            try:
                response = self._conn.image.download_image(image_id, stream=True)
            except sdk_exceptions.NotFoundException:
                raise ImageError(f"image {image_id} cannot be downloaded: it is not in Glance (HTTP 404)",
                                 image_id=image_id, status=404) from None
            except (sdk_exceptions.SDKException, keystoneauth1.exceptions.ClientException) as error:
                raise _glance_failure(f"downloading image {image_id}", error, image_id) from None
            if response.status_code == 204:
                raise ImageError(f"image {image_id} cannot be downloaded: Glance holds no data for it (HTTP 204; "
                                 f"is it still queued or importing?)", image_id=image_id, status=204)
            if response.status_code != 200:
                raise ImageError(f"image {image_id} cannot be downloaded: Glance answered HTTP "
                                 f"{response.status_code}{_body_hint(response)}",
                                 image_id=image_id, status=response.status_code)
            chunks = response.iter_content(chunk_size)
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
                    raise ImageError(f"download of image {image_id} broke off after {received} bytes: "
                                     f"{type(error).__name__}: {error}", image_id=image_id) from None
                if chunk:
                    received += len(chunk)
                    yield chunk
        finally:
            if response is not None:
                response.close()

    def _by_id(self, path: str, image_id: str) -> tuple[ImageInfo | None, tuple[str, str] | None]:
        field = f"{path}.id"
        try:
            image = self._conn.image.get_image(image_id)
        except sdk_exceptions.NotFoundException:
            return None, (field, f"no image with id {image_id} in Glance; check the id with "
                                 f"`openstack image list`")
        except (sdk_exceptions.SDKException, keystoneauth1.exceptions.ClientException) as error:
            raise _glance_failure(f"looking up image {image_id} ({field})", error, image_id) from None
        if image.status != "active":
            return None, (field, f"image {image_id} ({image.name!r}) is {image.status}, not active: "
                                 f"only active images can be cached")
        return _info(image), None

    def _by_name(self, path: str, name: str) -> tuple[ImageInfo | None, tuple[str, str] | None]:
        field = f"{path}.name"
        try:
            named = [image for image in self._list_named(name) if image.name == name]
        except (sdk_exceptions.SDKException, keystoneauth1.exceptions.ClientException) as error:
            raise _glance_failure(f"looking up images named {name!r} ({field})", error, None) from None
        active = [image for image in named if image.status == "active"]
        if len(active) == 1:
            return _info(active[0]), None
        if active:
            ids = ", ".join(image.id for image in active)
            return None, (field, f"ambiguous: {len(active)} active images are named {name!r} ({ids}); "
                                 f"name the one you mean by id")
        message = f"no active image named {name!r} in Glance"
        if named:
            others = ", ".join(f"{image.id} is {image.status}" for image in named)
            message += f" ({others})"
        return None, (field, f"{message}; check the name with `openstack image list` or give its id")

    def _list_named(self, name: str) -> Iterable[Any]:
        """Glance's images with this name; every page. Glance reads a name starting with "in:" as its
        list operator, so such names are matched here instead (the caller compares names anyway)."""
        if name.startswith("in:"):
            return self._conn.image.images()
        return self._conn.image.images(name=name)


def _info(image: Any) -> ImageInfo:
    """ImageInfo from an openstacksdk Image of an active image."""
    properties = image.properties or {}
    stores = properties.get("stores") or getattr(image, "stores", None) or ""
    if isinstance(stores, str):
        stores = stores.split(",")
    virtual_size = image.virtual_size
    return ImageInfo(id=image.id, name=image.name or "", status=image.status,
                     disk_format=image.disk_format or "", container_format=image.container_format or "",
                     size=int(image.size or 0), virtual_size=int(virtual_size) if virtual_size is not None else None,
                     checksum=image.checksum or None, hash_algo=image.hash_algo or None,
                     hash_value=image.hash_value or None,
                     stores=tuple(store.strip() for store in stores if store and store.strip()))


def _glance_failure(doing: str, error: Exception, image_id: str | None) -> ImageError:
    """ImageError for a request that failed (Glance or Keystone down, refusing, or erring), not a policy
    problem: with the HTTP status when there is one."""
    status = getattr(error, "status_code", None) or getattr(error, "http_status", None)
    status = status if isinstance(status, int) else None
    if isinstance(error, sdk_exceptions.HttpException) and status is not None:
        details = f": {error.details}" if getattr(error, "details", None) else ""
        return ImageError(f"cannot talk to Glance while {doing}: HTTP {status}{details}",
                          image_id=image_id, status=status)
    return ImageError(f"cannot talk to Glance while {doing}: {type(error).__name__}: {error}",
                      image_id=image_id, status=status)


def _body_hint(response: requests.Response) -> str:
    """A short excerpt of an error body, for messages (error bodies are small)."""
    try:
        text = response.raw.read(300, decode_content=True).decode(errors="replace").strip()
    except Exception:
        return ""
    return f": {' '.join(text.split())[:200]}" if text else ""


def _parse_clouds(clouds_yaml: bytes) -> Mapping[Any, Any]:
    """The `clouds` mapping of a clouds.yaml; CloudConfigError otherwise, never quoting the content."""
    problem: str | None = None
    data: Any = None
    try:
        data = yaml.safe_load(clouds_yaml)
    except yaml.YAMLError as error:   # its text quotes the offending line: give the position only
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = f"clouds.yaml in the secret is not valid YAML{where}"
    except Exception as error:   # e.g. undecodable bytes
        problem = f"clouds.yaml in the secret cannot be read ({type(error).__name__})"
    if problem is None and not (isinstance(data, Mapping) and isinstance(data.get("clouds"), Mapping)):
        problem = "clouds.yaml in the secret has no `clouds:` mapping"
    if problem is not None:
        raise CloudConfigError((_CLOUD_SECRET_PATH, problem))
    return data["clouds"]


_SECRET_WORDS = ("password", "secret", "token", "key", "credential", "passcode")


def _secret_values(entry: Mapping[Any, Any]) -> list[str]:
    """Every string under `auth`, and under any key that sounds secret: what messages must not show."""
    found: list[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, secret or any(word in str(key).lower() for word in _SECRET_WORDS))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, secret)
        elif secret and value is not None and str(value):
            found.append(str(value))

    for key, value in entry.items():
        walk(value, str(key).lower() == "auth" or any(word in str(key).lower() for word in _SECRET_WORDS))
    return found


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
