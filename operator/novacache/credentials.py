"""The policy's secrets, from wherever they live: Kubernetes Secrets, or files laid out like them.

A policy names secrets by reference (`spec.cloud.secretRef`, `spec.ssh.secretRef`). The operator
reads them through the Kubernetes API; standalone runs read `DIR/<secret name>/<key>`, which is
how Kubernetes mounts a secret, so a mounted secret and a testbed's output work alike. Secret
values never reach a log line, an error message or a report: errors name the reference only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .node import SshCredentials
from .policy import Policy


class SecretError(LookupError):
    """A referenced secret or key is missing or unusable; says which field refers to it and the fix."""


# (secret name, key, field path for errors) -> the value
SecretReader = Callable[[str, str, str], bytes]


@dataclass(frozen=True)
class Credentials:
    clouds_yaml: bytes = field(repr=False)
    ssh: SshCredentials


def directory_reader(secrets_dir: Path) -> SecretReader:
    """Read secrets from files DIR/<name>/<key>."""
    def read(name: str, key: str, path: str) -> bytes:
        location = secrets_dir / name / key
        try:
            return location.read_bytes()
        except FileNotFoundError:
            raise SecretError(f"{path}: secret {name!r} has no key {key!r} (no file {location}); create "
                              f"it or correct the reference") from None
        except OSError as error:
            raise SecretError(f"{path}: cannot read {location}: {error.strerror}") from None
    return read


def load(policy: Policy, read: SecretReader) -> Credentials:
    """Everything the engine needs from the policy's secrets."""
    cloud, ssh = policy.cloud, policy.ssh
    clouds_yaml = read(cloud.secret_name, cloud.key, "spec.cloud.secretRef")
    private_key = read(ssh.secret_name, ssh.private_key_key, "spec.ssh.secretRef")
    try:
        known_hosts = read(ssh.secret_name, ssh.known_hosts_key, "spec.ssh.secretRef")
    except SecretError:
        if not ssh.trust_on_first_use:
            raise
        known_hosts = b""
    return Credentials(clouds_yaml=clouds_yaml, ssh=SshCredentials(
        user=ssh.user, private_key=private_key, known_hosts=known_hosts,
        trust_on_first_use=ssh.trust_on_first_use))
