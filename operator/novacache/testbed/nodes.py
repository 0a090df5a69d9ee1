"""Compute nodes of the testbed: real OpenSSH sshd processes, each with a private filesystem view.

A node looks like a Nova compute host to anything that logs in: its own /etc/nova/nova.conf, its
own /var/lib/nova/instances/_base owned by the nova user, and the migration SSH key that lets it
reach the other nodes of its site (as TripleO's nova migration keys do). Each sshd runs in a
private mount namespace where those two directories are bind-mounted from the node's own tree and
the rest of the testbed's directory (other nodes, keys, Glance) is hidden under an empty tmpfs.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .processes import run, spawn
from .topology import NodePlan

SSHD = "/usr/sbin/sshd"
NOVA_UID = NOVA_GID = 42436  # the nova user inside TripleO's containers
NOVA_CONF_DIR = Path("/etc/nova")
NOVA_STATE_DIR = Path("/var/lib/nova")
MIGRATION_DIR = NOVA_CONF_DIR / "migration"
# Parts of the testbed directory a node must not see.
HIDDEN = ("nodes", "keys", "secrets", "glance", "images")

NOVA_CONF = """\
# nova.conf of testbed node {name} (site {site}); the image cache options as Nova ships them.
[DEFAULT]
instances_path = {instances_path}
force_raw_images = {force_raw}

[image_cache]
subdirectory_name = _base
manager_interval = 2400
remove_unused_original_minimum_age_seconds = {ttl}
remove_unused_resized_minimum_age_seconds = 3600

[libvirt]
images_type = {images_type}
"""


@dataclass(frozen=True)
class NodeFiles:
    """Where one node's files live on the host."""

    root: Path       # DIR/nodes/<name>: becomes the node's /etc/nova and /var/lib/nova
    sshd_dir: Path   # DIR/sshd/<name>: config, host key, authorized_keys (read by sshd at each login)

    @property
    def etc_nova(self) -> Path:
        return self.root / "etc-nova"

    @property
    def var_lib_nova(self) -> Path:
        return self.root / "var-lib-nova"

    @property
    def cache_dir(self) -> Path:
        """The node's image cache as the host sees it (the node sees /var/lib/nova/instances/_base)."""
        return self.var_lib_nova / "instances" / "_base"

    @property
    def host_key(self) -> Path:
        return self.sshd_dir / "ssh_host_ed25519_key"

    @property
    def config(self) -> Path:
        return self.sshd_dir / "sshd_config"

    @property
    def authorized_keys(self) -> Path:
        return self.sshd_dir / "authorized_keys"


def node_files(testbed_dir: Path, name: str) -> NodeFiles:
    return NodeFiles(root=testbed_dir / "nodes" / name, sshd_dir=testbed_dir / "sshd" / name)


def keygen(path: Path, comment: str) -> str:
    """Make an ed25519 key pair at path (path.pub beside it); return the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path.with_name(path.name + ".pub").read_text().strip()


def known_hosts_line(address: str, port: int, public_key: str) -> str:
    """A known_hosts entry for a node, in the [host]:port form when the port is not 22."""
    host = address if port == 22 else f"[{address}]:{port}"
    key_type, key = public_key.split()[:2]
    return f"{host} {key_type} {key}"


def make_host_key(node: NodePlan, files: NodeFiles) -> str:
    """Give the node its own host key; return the public key line."""
    return keygen(files.host_key, f"{node.name} host key")


def prepare(node: NodePlan, files: NodeFiles, *, authorized: list[str], migration_key: Path,
            site_known_hosts: list[str], nova_conf: dict[str, object], isolated: bool) -> None:
    """Write a node's tree and sshd configuration (its host key must exist already)."""
    files.authorized_keys.write_text("".join(line + "\n" for line in authorized))

    migration = files.etc_nova / "migration"
    migration.mkdir(parents=True, exist_ok=True)
    (files.etc_nova / "nova.conf").write_text(NOVA_CONF.format(name=node.name, site=node.site, **nova_conf))
    (migration / "identity").write_bytes(migration_key.read_bytes())
    (migration / "identity").chmod(0o600)
    (migration / "known_hosts").write_text("".join(line + "\n" for line in site_known_hosts))

    files.cache_dir.mkdir(parents=True, exist_ok=True)
    if isolated:
        for path in (files.var_lib_nova, files.var_lib_nova / "instances", files.cache_dir):
            os.chown(path, NOVA_UID, NOVA_GID)

    listen = node.address if node.port == 22 else f"{node.address}:{node.port}"
    files.config.write_text("\n".join([
        f"ListenAddress {listen}",
        f"HostKey {files.host_key}",
        f"AuthorizedKeysFile {files.authorized_keys}",
        "PidFile none",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "MaxStartups 200:30:400",
        "MaxSessions 100",
        "PrintMotd no",
        "AcceptEnv LANG LC_*",
        "Subsystem sftp internal-sftp",
        "LogLevel ERROR",
        "",
    ]))


def start(node: NodePlan, files: NodeFiles, testbed_dir: Path, isolated: bool) -> int:
    """Start the node's sshd, with isolation inside a private mount namespace; return its PID."""
    sshd = [SSHD, "-D", "-e", "-f", str(files.config)]
    log = testbed_dir / "logs" / f"{node.name}.log"
    if not isolated:
        return spawn(sshd, log, netns=node.netns)
    mounts = [
        ["mount", "--bind", str(files.etc_nova), str(NOVA_CONF_DIR)],
        ["mount", "--bind", str(files.var_lib_nova), str(NOVA_STATE_DIR)],
    ] + [["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "novacache-hidden", str(testbed_dir / part)]
         for part in HIDDEN if (testbed_dir / part).exists()]
    script = " && ".join(shlex.join(cmd) for cmd in mounts) + " && exec " + shlex.join(sshd)
    return spawn(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                 log, netns=node.netns)
