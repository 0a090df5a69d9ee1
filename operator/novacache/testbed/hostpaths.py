"""Directories a testbed needs on the host, created only if missing and removed once unused.

Isolated nodes bind-mount their own trees over /etc/nova and /var/lib/nova, and sshd needs its
privilege-separation directory /run/sshd; mount points must exist on the host. A registry under
/run records which testbeds are up and which directories the testbeds created, so the last testbed
to go down removes exactly those (and only when empty), and a machine is left as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REGISTRY = Path("/run/novacache-testbed")
CREATED = REGISTRY / "created-paths"


def _member(testbed_dir: Path) -> Path:
    return REGISTRY / f"testbed-{hashlib.sha1(str(testbed_dir).encode()).hexdigest()[:16]}"


def claim(testbed_dir: Path, paths: list[Path]) -> list[str]:
    """Register the testbed and make sure paths exist; return the ones created now."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    _member(testbed_dir).write_text(f"{testbed_dir}\n")
    created: list[Path] = []
    for path in paths:
        missing = [p for p in [path, *path.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
    if created:
        with CREATED.open("a") as out:
            out.writelines(f"{p}\n" for p in created)
    return [str(p) for p in created]


def release(testbed_dir: Path) -> None:
    """Unregister the testbed; if it was the last, remove the directories testbeds created."""
    _member(testbed_dir).unlink(missing_ok=True)
    if not REGISTRY.exists() or any(REGISTRY.glob("testbed-*")):
        return
    created = CREATED.read_text().split() if CREATED.exists() else []
    for path in sorted(map(Path, created), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:
            pass  # gone already, or someone put files there: leave it
    CREATED.unlink(missing_ok=True)
    REGISTRY.rmdir()
