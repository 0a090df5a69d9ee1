"""Nova's image cache rules, in one place.

Everything the operator must agree with Nova about lives here: where a cached image goes, which
nova.conf options decide that, which file names Nova's cache manager would touch or delete (so ours
never look like them), which disk formats Nova converts to raw, and what size the cached file has.
Nothing here does I/O.
"""

from __future__ import annotations

import configparser
import hashlib
import re
import secrets
from dataclasses import dataclass

DEFAULT_STATE_PATH = "/var/lib/nova"
DEFAULT_INSTANCES_PATH = "$state_path/instances"
DEFAULT_SUBDIRECTORY = "_base"
DEFAULT_TTL = 86400  # [image_cache] remove_unused_original_minimum_age_seconds
DEFAULT_CACHE_DIR = f"{DEFAULT_STATE_PATH}/instances/{DEFAULT_SUBDIRECTORY}"

# Our temporary files start with a dot and never match Nova's cache manager's patterns:
# originals are 40 hex digits, resized copies 40 hex digits, '_' and a size.
TEMP_PREFIX = ".novacache-"
_ORIGINAL = re.compile(r"^[0-9a-f]{40}$")

# Glance disk_format -> qemu-img format name, for the formats Nova converts to raw.
CONVERTIBLE = {"qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhd": "vpc", "vhdx": "vhdx", "qed": "qed"}
# Formats Nova stores as they come.
AS_IS = {"raw", "iso"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SUBSTITUTION = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def cache_name(image_id: str) -> str:
    """The file name Nova gives a cached image: the sha1 hex digest of the image id string."""
    return hashlib.sha1(image_id.encode()).hexdigest()


def temp_name(image_id: str) -> str:
    """A unique temporary name for a fill of image_id, beside the final one."""
    return f"{TEMP_PREFIX}{cache_name(image_id)}.{secrets.token_hex(4)}"


def is_temp(name: str) -> bool:
    """True for our temporary files (and their .raw conversions), never for Nova's own files."""
    return name.startswith(TEMP_PREFIX)


def is_original(name: str) -> bool:
    """True for names Nova's cache manager treats as cached original images."""
    return bool(_ORIGINAL.match(name))


class NovaConfError(ValueError):
    """nova.conf cannot be read the way Nova would read it."""


@dataclass(frozen=True)
class NovaCacheConfig:
    """The nova.conf facts that decide where and how a node caches images."""

    instances_path: str = f"{DEFAULT_STATE_PATH}/instances"
    subdirectory_name: str = DEFAULT_SUBDIRECTORY
    force_raw_images: bool = True
    images_type: str = "default"
    remove_unused_original_minimum_age_seconds: int = DEFAULT_TTL
    source: str | None = None   # the nova.conf path these came from; None means Nova's defaults

    @property
    def cache_dir(self) -> str:
        return f"{self.instances_path.rstrip('/')}/{self.subdirectory_name}"

    @property
    def uses_image_cache(self) -> bool:
        """With RBD-backed ephemeral disks Nova clones from Ceph and never uses the image cache."""
        return self.images_type != "rbd"


def parse_nova_conf(text: str, source: str | None = None) -> NovaCacheConfig:
    """Read the image cache options from nova.conf text, with Nova's defaults for what is absent.

    Like oslo.config: [DEFAULT] is an ordinary section, a repeated option's last value wins, and
    `$state_path` (or `${state_path}`) in instances_path is substituted from [DEFAULT].
    """
    parser = configparser.ConfigParser(strict=False, interpolation=None, default_section="\0none")
    try:
        parser.read_string(text, source=source or "<nova.conf>")
    except configparser.Error as error:
        raise NovaConfError(f"{source or 'nova.conf'}: {error}") from None

    def get(section: str, option: str, default: str) -> str:
        return parser.get(section, option, fallback=default).strip()

    state_path = get("DEFAULT", "state_path", DEFAULT_STATE_PATH)
    instances_path = _substitute(get("DEFAULT", "instances_path", DEFAULT_INSTANCES_PATH),
                                 {"state_path": state_path}, source)
    ttl_text = get("image_cache", "remove_unused_original_minimum_age_seconds", str(DEFAULT_TTL))
    try:
        ttl = int(ttl_text)
    except ValueError:
        raise NovaConfError(f"{source}: [image_cache] remove_unused_original_minimum_age_seconds "
                            f"is not an integer: {ttl_text!r}") from None
    return NovaCacheConfig(
        instances_path=instances_path,
        subdirectory_name=get("image_cache", "subdirectory_name", DEFAULT_SUBDIRECTORY),
        force_raw_images=_boolean(get("DEFAULT", "force_raw_images", "true"), "force_raw_images", source),
        images_type=get("libvirt", "images_type", "default").lower(),
        remove_unused_original_minimum_age_seconds=ttl,
        source=source,
    )


def _substitute(value: str, names: dict[str, str], source: str | None) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in names:
            raise NovaConfError(f"{source}: instances_path refers to ${name}, which only ${{state_path}} may")
        return names[name]
    return _SUBSTITUTION.sub(replace, value)


def _boolean(text: str, option: str, source: str | None) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise NovaConfError(f"{source}: {option} is not a boolean: {text!r}")


def qemu_format(disk_format: str) -> str:
    """The qemu-img name of a Glance disk_format this cache can hold; raw for raw and iso."""
    if disk_format in AS_IS:
        return "raw"
    if disk_format in CONVERTIBLE:
        return CONVERTIBLE[disk_format]
    raise ValueError(f"disk_format {disk_format!r} is not one Nova's libvirt driver caches")


def converts(disk_format: str, config: NovaCacheConfig) -> bool:
    """Whether Nova stores this image converted to raw: fetch_to_raw converts every non-raw image
    when force_raw_images is set."""
    return config.force_raw_images and qemu_format(disk_format) != "raw"


def cached_size(size: int, virtual_size: int | None, disk_format: str, config: NovaCacheConfig) -> int | None:
    """The size of the file Nova would keep: the image's bytes, or its virtual size once converted.

    None when it cannot be known in advance (a converted image whose virtual size Glance lacks).
    """
    return virtual_size if converts(disk_format, config) else size
