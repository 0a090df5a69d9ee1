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
space=$dir
[ -d "$space" ] || space=$(dirname -- "$dir")
printf 'free %s\n' "$(df -P -B1 -- "$space" 2>/dev/null | awk 'NR==2 {print $4}')"
if [ -d "$dir" ]; then
  find "$dir" -mindepth 1 -maxdepth 1 -type f -printf 'file %s %T@ %U %G %m %f\n'
fi
for tool in qemu-img; do
  if command -v "$tool" >/dev/null 2>&1; then printf 'tool %s\n' "$tool"; fi
done
"""

# One hop of a chain. The operator streams into the first hop, or has a node that holds a verified
# copy send it ("send" mode); each "recv" hop writes its own copy and relays it, as it grows, to the
# next hop over the nodes' own SSH trust, then verifies, checks, converts and renames its copy.
# The script travels with the stream: each hop re-quotes its own text and the remaining hops for the
# next one, so a command line stays the same size however long the chain.
# Positional parameters: script nuser nkey nknown nstrict size algo digest format reserve, then
# 8 per hop: mode name address port dir tmp final convert.
# Each recv hop prints "novacache-result NAME STATUS SIZE MTIME"; a hop whose relay to the next
# failed prints "novacache-link NAME STATUS MESSAGE"; messages go to stderr as "NAME: message".
# The digest of standard input, by the algorithm in $algo; shared by the scripts that hash.
DIGEST = r"""
digest() {
  case $algo in
    sha512) sha512sum ;;
    sha384) sha384sum ;;
    sha256) sha256sum ;;
    md5) md5sum ;;
    *) return 2 ;;
  esac
}
"""

RELAY = DIGEST + r"""
set -eu
script=$1 nuser=$2 nkey=$3 nknown=$4 nstrict=$5 size=$6 algo=$7 digest=$8 format=$9 reserve=${10}
shift 10
mode=$1 self=$2 dir=$5 tmp=$6 final=$7 convert=$8
shift 8
fwdpid= result= link=
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
finish() {
  rc=$?
  if [ -n "$fwdpid" ]; then
    if wait "$fwdpid"; then :; else link=$?; fi
  fi
  if [ "$mode" = recv ]; then printf 'novacache-result %s %s\n' "$self" "${result:-$rc - -}"; fi
  if [ -n "$link" ]; then
    printf 'novacache-link %s %s %s\n' "$self" "$link" "$(head -c 300 -- "$tmp.err" 2>/dev/null | tr '\n' ' ')"
  fi
  rm -f -- "$tmp" "$tmp.raw" "$tmp.err" "$tmp.sum" "$tmp.bad"
}
trap finish EXIT
trap 'exit 129' HUP INT TERM
fail() { printf '%s: %s\n' "$self" "$1" >&2; exit "$2"; }
relay() {
  ssh -F none -T -o BatchMode=yes -o ConnectTimeout=20 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 \
    -o IdentitiesOnly=yes -o StrictHostKeyChecking="$nstrict" -o UserKnownHostsFile="$nknown" \
    -o Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com \
    -i "$nkey" -p "$2" -l "$nuser" -- "$1" "$next"
}
if [ ! -d "$dir" ]; then
  # Nova creates its cache directory with the first image it caches; so do we, owned alike.
  mkdir -- "$dir" 2>/dev/null && chown --reference="$dir/.." -- "$dir" ||
    fail "cannot create the cache directory $dir (does instances_path exist?)" 2
fi
cd -- "$dir"
umask 077
if [ $# -gt 0 ]; then
  next="sh -c $(q "$script") novacache"
  for arg in "$script" "$nuser" "$nkey" "$nknown" "$nstrict" "$size" "$algo" "$digest" "$format" "$reserve" "$@"; do
    next="$next $(q "$arg")"
  done
  if [ "$mode" = send ]; then
    relay "$3" "$4" < "$final" 2> "$tmp.err" || link=$?
    exit 0
  fi
fi
# This node's copy is written, and hashed, at the speed the stream arrives; a relay to the next
# node reads the file as it grows, so a slow or broken next node never holds up the stream or
# this node's own copy.
: > "$tmp"
exec 3<&0
{ tee -- "$tmp" <&3 || : > "$tmp.bad"; } | digest > "$tmp.sum" &
writer=$!
exec 3<&-
if [ $# -gt 0 ]; then
  tail -c +1 -s 0.2 --pid="$writer" -f -- "$tmp" 2>/dev/null | relay "$3" "$4" 2> "$tmp.err" &
  fwdpid=$!
fi
wait "$writer" || true
[ ! -e "$tmp.bad" ] || fail "writing the copy failed" 3
got=$(stat -c %s -- "$tmp")
[ "$got" = "$size" ] || fail "received $got bytes, expected $size" 3
read -r sum rest < "$tmp.sum" || sum=
[ "$sum" = "$digest" ] || fail "$algo of the received bytes is $sum, expected $digest" 4
ready=$tmp
if [ "$format" = raw ]; then
  magic=$(head -c 4 -- "$tmp" | od -An -tx1 | tr -d ' \n')
  case $magic in
    514649fb|4b444d56|3c3c3c20|636f6e65|76686478|51454400)
      fail "refused: the image is declared raw but its bytes are in another disk format (magic $magic)" 6 ;;
  esac
else
  info=$(qemu-img info --output=json -f "$format" "$tmp" 2>&1) || fail "qemu-img cannot read the image as $format: $info" 5
  case $info in
    *'"backing-filename"'*|*'"data-file"'*) fail "refused: the image names a backing file or an external data file" 6 ;;
  esac
fi
if [ "$convert" = yes ]; then
  vsize=$(printf '%s\n' "$info" | sed -n 's/^ *"virtual-size": *\([0-9]*\).*/\1/p' | head -n 1)
  avail=$(df -P -B1 . | awk 'NR==2 {print $4}')
  [ $((avail - vsize)) -ge "$reserve" ] || fail "not enough space to convert: raw size $vsize, $avail bytes free, reserve $reserve" 7
  qemu-img convert -q -f "$format" -O raw "$tmp" "$tmp.raw" || fail "qemu-img convert failed" 5
  rm -f -- "$tmp"
  ready=$tmp.raw
fi
chown --reference=. -- "$ready"
chmod 0644 -- "$ready"
sync -- "$ready"
mv -f -- "$ready" "$final"
sync -- .
result="0 $(stat -c '%s %Y' -- "$final")"
"""

TOUCH = r"""
cd -- "$1" && shift && touch -c -- "$@"
"""

REMOVE = r"""
cd -- "$1" && shift && rm -f -- "$@"
"""

CHECKSUM = DIGEST + r"""
set -eu
cd -- "$1"; algo=$2; shift 2
for name do
  sum=$(digest < "$name")
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
    free_bytes: int
    files: dict[str, CacheFile]
    temps: tuple[CacheFile, ...]
    tools: frozenset[str]
    host_key_checked: bool = True


@dataclass(frozen=True)
class RelaySsh:
    """How a node reaches the next one of its site (paths are on the nodes): Nova's migration SSH."""

    user: str
    identity_file: str
    known_hosts_file: str
    strict_host_key_checking: bool = True


@dataclass(frozen=True)
class Hop:
    """A node that receives an image in a chain, as the node before it reaches it."""

    name: str
    address: str
    port: int
    cache_dir: str
    convert: bool


@dataclass(frozen=True)
class HopResult:
    """What became of one hop: a verified copy in place (size, mtime), or why not."""

    name: str
    ok: bool
    size: int = 0
    mtime: float = 0.0
    message: str = ""


def parse_chain_output(hops: Sequence[str], sender: str | None, stdout: str, stderr: str) -> dict[str, HopResult]:
    """Attribute the chain's result lines and messages to its hops.

    A hop with no result line was never reached: the hop before it (or the sender) could not
    relay to it, and its link line says why.
    """
    results: dict[str, tuple[int, int, float]] = {}
    links: dict[str, str] = {}
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "novacache-result":
            name, status, size, mtime = (rest.split(" ") + ["-", "-", "-"])[:4]
            results[name] = (int(status), int(size) if size.isdigit() else 0,
                             float(mtime) if status == "0" else 0.0)
        elif kind == "novacache-link":
            name, status, message = (rest.split(" ", 2) + ["", ""])[:3]
            links[name] = f"relay from {name} failed ({status}): {message.strip() or 'no message'}"
    messages: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        name, sep, message = line.partition(": ")
        if sep and (name in hops or name == sender):
            messages.setdefault(name, []).append(message)
    outcome = {}
    previous = sender
    for name in hops:
        said = "; ".join(messages.get(name, []))
        if name in results:
            status, size, mtime = results[name]
            outcome[name] = HopResult(name, status == 0, size, mtime,
                                      said or ("" if status == 0 else f"failed with status {status}"))
        else:
            why = links.get(previous) if previous else None
            outcome[name] = HopResult(name, False, message=said or why or
                                      (f"not reached: {previous} did not relay the image" if previous
                                       else "the node did not report"))
        previous = name
    return outcome


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
    free, files, temps, tools = 0, {}, [], set()
    for line in lines[2:]:
        kind, _, rest = line.partition(" ")
        if kind == "free":
            free = int(rest) if rest.isdigit() else 0
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
    return NodeFacts(config=config, free_bytes=free, files=files, temps=tuple(temps), tools=frozenset(tools))


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

    async def chain(self, image_id: str, hops: Sequence[Hop], chunks: AsyncIterator[bytes] | None, *,
                    size: int, digest: tuple[str, str], disk_format: str, reserve: int,
                    relay: RelaySsh | None = None, send_from: str | None = None) -> dict[str, HopResult]:
        """Fill the image into every hop, in order, in one stream.

        With chunks, this node is hops[0] and the stream comes from the operator. With send_from
        (this node's cache directory), this node sends its own cached copy and is not a hop.
        Each hop relays to the next over the nodes' SSH trust (relay) while writing its own copy,
        and verifies its own copy end to end. disk_format is the qemu-img name of what the bytes
        claim to be (`cacherules.qemu_format`): raw bytes that are really another format, and
        images that name a backing or data file, are refused as Nova refuses them. A hop that
        fails does not stop the hops before it; the ones after it get nothing, and say so.
        """
        algo, value = digest
        if algo not in DIGESTS:
            raise NodeError(f"{self.name}: unsupported digest algorithm {algo!r}")
        if (chunks is None) == (send_from is None) or not hops:
            raise ValueError("chain needs hops, and either chunks or send_from")
        if len(hops) > 1 or send_from is not None:
            if relay is None:
                raise ValueError("relaying between nodes needs relay settings")
        if self._conn is None:
            raise NodeError(f"{self.name}: not connected")
        final = cacherules.cache_name(image_id)
        records: list[str | int] = []
        if send_from is not None:
            records += ["send", self.name, self.address, self.port, send_from, cacherules.temp_name(image_id),
                        final, "no"]
        for hop in hops:
            records += ["recv", hop.name, hop.address, hop.port, hop.cache_dir, cacherules.temp_name(image_id),
                        final, "yes" if hop.convert else "no"]
        relay = relay or RelaySsh("root", "-", "-", True)
        cmd = command(RELAY, RELAY, relay.user, relay.identity_file, relay.known_hosts_file,
                      "yes" if relay.strict_host_key_checking else "accept-new",
                      size, algo, value, disk_format, reserve, *records)
        process = await self._conn.create_process(cmd, encoding=None)
        try:
            try:
                if chunks is not None:
                    async for chunk in chunks:
                        process.stdin.write(chunk)
                        await process.stdin.drain()
            finally:
                # Also when the source failed: the hops then see a short file, remove it and exit,
                # and waiting for that means the nodes are clean when this returns.
                process.stdin.write_eof()
                result = await asyncio.wait_for(process.wait(), self.CLEANUP_TIMEOUT)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
            raise NodeError(f"{self.name}: relaying image {image_id}: {error or type(error).__name__}") from None
        finally:
            if process.exit_status is None:
                process.close()
        return parse_chain_output([hop.name for hop in hops], (self.name if send_from else None),
                                  (result.stdout or b"").decode(errors="replace"),
                                  (result.stderr or b"").decode(errors="replace"))

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
