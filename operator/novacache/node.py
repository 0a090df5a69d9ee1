"""One compute node, over SSH: inspect its image cache, receive an image into it, refresh it.

This module speaks to nodes and knows Nova's cache rules (through `cacherules`); it knows nothing
of Glance or Kubernetes. Every remote command is one of the fixed shell scripts below, run as
`sh -c SCRIPT novacache ARG...`: values only ever travel as quoted positional parameters, never
as script text. A fill writes to a temporary name in the cache directory, verifies the bytes
against the expected digest on the node itself, converts to raw when Nova would, sets owner and
mode, fsyncs and renames: nothing is ever under the final name unless it is complete and verified.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import asyncssh

from . import cacherules
from .cacherules import NovaCacheConfig, NovaConfError

# aes128-gcm costs a third less CPU than chacha20 on both ends; the others stay as fallbacks.
CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes128-ctr", "aes256-ctr"]
DIGESTS = {"sha512", "sha384", "sha256", "md5"}

INSPECT = r"""
dir=$1; shift
conf=
for candidate do
  if [ -r "$candidate" ] && [ -f "$candidate" ]; then conf=$candidate; break; fi
done
if [ -n "$conf" ]; then printf 'conf %s\n' "$conf"; base64 -w0 < "$conf"; echo; else printf 'conf -\n\n'; fi
if [ -d "$dir" ]; then
  printf 'dir %s\n' "$(stat -c '%u %g' -- "$dir")"
  printf 'free %s\n' "$(df -P -B1 -- "$dir" | awk 'NR==2 {print $4}')"
  find "$dir" -mindepth 1 -maxdepth 1 -type f -printf 'file %s %T@ %U %G %m %f\n'
else
  echo 'dir -'
fi
for tool in qemu-img sha512sum; do
  if command -v "$tool" >/dev/null 2>&1; then printf 'tool %s\n' "$tool"; fi
done
"""

RECEIVE = r"""
set -eu
dir=$1 tmp=$2 final=$3 size=$4 algo=$5 digest=$6 format=$7 convert=$8 reserve=$9
cleanup() { rm -f -- "$tmp" "$tmp.raw"; }
trap cleanup EXIT
trap 'exit 129' HUP INT TERM PIPE
cd -- "$dir"
umask 077
cat > "$tmp"
got=$(stat -c %s -- "$tmp")
if [ "$got" != "$size" ]; then echo "received $got bytes, expected $size" >&2; exit 3; fi
case $algo in
  sha512) sum=$(sha512sum < "$tmp") ;;
  sha384) sum=$(sha384sum < "$tmp") ;;
  sha256) sum=$(sha256sum < "$tmp") ;;
  md5) sum=$(md5sum < "$tmp") ;;
  *) echo "unknown digest algorithm $algo" >&2; exit 2 ;;
esac
sum=${sum%% *}
if [ "$sum" != "$digest" ]; then echo "$algo of the received bytes is $sum, expected $digest" >&2; exit 4; fi
ready=$tmp
if [ "$format" = raw ]; then
  magic=$(head -c 4 -- "$tmp" | od -An -tx1 | tr -d ' \n')
  case $magic in
    514649fb|4b444d56|3c3c3c20|636f6e65|76686478|51454400)
      echo "refused: the image is declared raw but its bytes are in another disk format (magic $magic)" >&2; exit 6 ;;
  esac
else
  if ! info=$(qemu-img info --output=json -f "$format" "$tmp" 2>&1); then
    echo "qemu-img cannot read the image as $format: $info" >&2; exit 5
  fi
  case $info in
    *'"backing-filename"'*|*'"data-file"'*)
      echo "refused: the image names a backing file or an external data file" >&2; exit 6 ;;
  esac
fi
if [ "$convert" = yes ]; then
  vsize=$(printf '%s\n' "$info" | sed -n 's/^ *"virtual-size": *\([0-9]*\).*/\1/p' | head -n 1)
  avail=$(df -P -B1 . | awk 'NR==2 {print $4}')
  if [ $((avail - vsize)) -lt "$reserve" ]; then
    echo "not enough space to convert: raw size $vsize, $avail bytes free, reserve $reserve" >&2; exit 7
  fi
  qemu-img convert -q -f "$format" -O raw "$tmp" "$tmp.raw"
  rm -f -- "$tmp"
  ready=$tmp.raw
fi
chown --reference=. -- "$ready"
chmod 0644 -- "$ready"
sync -- "$ready"
mv -f -- "$ready" "$final"
sync -- .
stat -c '%s %Y' -- "$final"
"""

TOUCH = r"""
cd -- "$1" && shift && touch -c -- "$@"
"""

REMOVE = r"""
cd -- "$1" && shift && rm -f -- "$@"
"""

CHECKSUM = r"""
set -eu
cd -- "$1"; algo=$2; shift 2
for name do
  case $algo in
    sha512) sum=$(sha512sum < "$name") ;;
    sha384) sum=$(sha384sum < "$name") ;;
    sha256) sum=$(sha256sum < "$name") ;;
    md5) sum=$(md5sum < "$name") ;;
    *) exit 2 ;;
  esac
  printf '%s %s\n' "${sum%% *}" "$name"
done
"""


def command(script: str, *args: str | int) -> str:
    """A remote command line: a fixed script, and every value a quoted positional parameter."""
    return " ".join(["sh", "-c", shlex.quote(script), "novacache", *(shlex.quote(str(a)) for a in args)])


class NodeError(Exception):
    """A node could not be reached or an operation on it failed; the message says which and why."""


@dataclass(frozen=True)
class SshCredentials:
    """How the operator logs in to nodes. Never logged: repr hides the key material."""

    user: str
    private_key: bytes = field(repr=False)
    known_hosts: bytes = field(repr=False)
    trust_on_first_use: bool = False


@dataclass(frozen=True)
class CacheFile:
    """A file in a node's image cache directory."""

    name: str
    size: int
    mtime: float
    uid: int
    gid: int
    mode: int


@dataclass(frozen=True)
class NodeFacts:
    """What one inspection found: Nova's cache settings and the cache directory's contents."""

    config: NovaCacheConfig
    cache_dir_exists: bool
    owner: tuple[int, int] | None
    free_bytes: int
    files: dict[str, CacheFile]
    temps: tuple[CacheFile, ...]
    tools: frozenset[str]
    host_key_checked: bool = True


def parse_inspection(output: str) -> NodeFacts:
    """Turn the INSPECT script's output into facts; nova.conf is parsed here, not on the node."""
    lines = output.split("\n")
    if not lines or not lines[0].startswith("conf "):
        raise NodeError(f"unexpected inspection output: {output[:200]!r}")
    conf_path = lines[0][5:]
    if conf_path == "-":
        config = NovaCacheConfig()
    else:
        text = base64.b64decode(lines[1]).decode("utf-8", errors="replace")
        config = cacherules.parse_nova_conf(text, source=conf_path)
    owner, free, files, temps, tools, exists = None, 0, {}, [], set(), False
    for line in lines[2:]:
        kind, _, rest = line.partition(" ")
        if kind == "dir" and rest != "-":
            uid, gid = rest.split()
            owner, exists = (int(uid), int(gid)), True
        elif kind == "free":
            free = int(rest)
        elif kind == "file":
            parts = rest.split(" ", 5)
            if len(parts) != 6:
                continue
            size, mtime, uid, gid, mode, name = parts
            entry = CacheFile(name, int(size), float(mtime), int(uid), int(gid), int(mode, 8))
            if cacherules.is_temp(name):
                temps.append(entry)
            elif cacherules.is_original(name):
                files[name] = entry
        elif kind == "tool":
            tools.add(rest)
    return NodeFacts(config=config, cache_dir_exists=exists, owner=owner, free_bytes=free, files=files,
                     temps=tuple(temps), tools=frozenset(tools))


class Node:
    """An SSH session to one compute node; use as `async with Node(...) as node:`."""

    # How long a node may take to verify, convert and rename after the last byte (or to clean up).
    CLEANUP_TIMEOUT = 600.0

    def __init__(self, name: str, address: str, port: int, credentials: SshCredentials,
                 connect_timeout: float = 20.0):
        self.name = name
        self.address = address
        self.port = port
        self._credentials = credentials
        self._connect_timeout = connect_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self.host_key_checked = True

    async def __aenter__(self) -> "Node":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Log in with the operator's key; the host key must match known_hosts unless TOFU allows."""
        creds = self._credentials
        try:
            key = asyncssh.import_private_key(creds.private_key)
            known = asyncssh.import_known_hosts(creds.known_hosts.decode())
        except (asyncssh.KeyImportError, ValueError) as error:
            raise NodeError(f"{self.name}: the SSH secret is unusable: {type(error).__name__}") from None
        known_hosts: asyncssh.SSHKnownHosts | None = known
        if not known.match(self.address, self.address, self.port)[0]:
            if not creds.trust_on_first_use:
                raise NodeError(f"{self.name}: no host key for {self.address}:{self.port} in known_hosts; "
                                f"add it (ssh-keyscan -p {self.port} {self.address}) or set "
                                f"spec.ssh.trustOnFirstUse")
            known_hosts, self.host_key_checked = None, False
        try:
            self._conn = await asyncio.wait_for(asyncssh.connect(
                self.address, self.port, username=creds.user, client_keys=[key], known_hosts=known_hosts,
                agent_path=None, config=None, encryption_algs=CIPHERS, keepalive_interval=30,
                login_timeout=self._connect_timeout), self._connect_timeout)
        except asyncssh.HostKeyNotVerifiable:
            raise NodeError(f"{self.name}: host key of {self.address}:{self.port} does not match "
                            f"known_hosts; refusing to connect") from None
        except asyncssh.PermissionDenied:
            raise NodeError(f"{self.name}: {creds.user}@{self.address}:{self.port} refused the "
                            f"operator's key") from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
            raise NodeError(f"{self.name}: cannot connect to {self.address}:{self.port}: "
                            f"{error or type(error).__name__}") from None

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None

    async def _run(self, script: str, *args: str | int, what: str) -> str:
        if self._conn is None:
            raise NodeError(f"{self.name}: not connected")
        try:
            result = await self._conn.run(command(script, *args), check=False)
        except (OSError, asyncssh.Error) as error:
            raise NodeError(f"{self.name}: {what}: {error}") from None
        if result.exit_status != 0:
            raise NodeError(f"{self.name}: {what} failed ({result.exit_status}): {str(result.stderr).strip()}")
        return str(result.stdout)

    async def inspect(self, conf_paths: Sequence[str],
                      cache_dir: str = cacherules.DEFAULT_CACHE_DIR) -> NodeFacts:
        """Read nova.conf and list the cache directory: one round trip when the directory was guessed
        right (the default, or what the last inspection found), two when nova.conf moves it."""
        for _ in range(2):
            output = await self._run(INSPECT, cache_dir, *conf_paths, what="inspecting the image cache")
            try:
                facts = parse_inspection(output)
            except NovaConfError as error:
                raise NodeError(f"{self.name}: {error}") from None
            if facts.config.cache_dir == cache_dir:
                return dataclasses.replace(facts, host_key_checked=self.host_key_checked)
            cache_dir = facts.config.cache_dir
        raise NodeError(f"{self.name}: the cache directory changed while inspecting it")

    async def receive(self, cache_dir: str, image_id: str, chunks: AsyncIterator[bytes], *, size: int,
                      digest: tuple[str, str], disk_format: str, convert: bool,
                      reserve: int) -> tuple[int, float]:
        """Stream an image into the cache under a temp name; verify, check, convert, rename on the node.

        disk_format is the qemu-img name of what the bytes claim to be (`cacherules.qemu_format`):
        raw bytes that are really another format, and images that name a backing or data file,
        are refused as Nova refuses them.

        Returns the cached file's size and mtime. On any failure the node keeps nothing of this fill but what it had.
        """
        algo, value = digest
        if algo not in DIGESTS:
            raise NodeError(f"{self.name}: unsupported digest algorithm {algo!r}")
        if self._conn is None:
            raise NodeError(f"{self.name}: not connected")
        final = cacherules.cache_name(image_id)
        cmd = command(RECEIVE, cache_dir, cacherules.temp_name(image_id), final, size, algo, value,
                      disk_format, "yes" if convert else "no", reserve)
        process = await self._conn.create_process(cmd, encoding=None)
        try:
            try:
                async for chunk in chunks:
                    process.stdin.write(chunk)
                    await process.stdin.drain()
            finally:
                # Also when the source failed: the node then sees a short file, removes it and exits,
                # and waiting for that means the node is clean when this returns.
                process.stdin.write_eof()
                result = await asyncio.wait_for(process.wait(), self.CLEANUP_TIMEOUT)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
            raise NodeError(f"{self.name}: receiving image {image_id}: {error or type(error).__name__}") from None
        finally:
            if process.exit_status is None:
                process.close()
        if result.exit_status != 0:
            reason = result.stderr.decode(errors="replace").strip() if result.stderr else "no message"
            raise NodeError(f"{self.name}: image {image_id} not cached: {reason}")
        final_size, mtime = result.stdout.decode().split()
        return int(final_size), float(mtime)

    async def touch(self, cache_dir: str, names: Sequence[str]) -> float:
        """Reset the age of cached images, all in one command; returns the time it was done."""
        if names:
            await self._run(TOUCH, cache_dir, *names, what="refreshing cached images")
        return time.time()

    async def remove(self, cache_dir: str, names: Sequence[str]) -> None:
        """Remove files of ours (stale temporary files) from the cache directory."""
        if any(not cacherules.is_temp(name) for name in names):
            raise ValueError("only the operator's temporary files may be removed")
        if names:
            await self._run(REMOVE, cache_dir, *names, what="removing stale temporary files")

    async def checksums(self, cache_dir: str, names: Sequence[str], algo: str) -> dict[str, str]:
        """Digest of each named cache file, computed on the node."""
        if algo not in DIGESTS:
            raise NodeError(f"{self.name}: unsupported digest algorithm {algo!r}")
        if not names:
            return {}
        output = await self._run(CHECKSUM, cache_dir, algo, *names, what="checksumming cached images")
        return {name: digest for digest, name in (line.split(" ", 1) for line in output.splitlines() if line)}
