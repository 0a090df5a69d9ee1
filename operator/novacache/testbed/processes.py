"""Long-running testbed processes (sshd, Glance): started detached, stopped by PID.

`novacache testbed up` returns while its processes keep running, so they are started in their own
session and recorded by PID; `down` (perhaps another process) stops them by that PID. When the
caller is still their parent (the pytest fixture), stopping also reaps them, leaving no zombie.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix argv so that it runs inside a network namespace; `ip netns exec` execs, keeping the PID."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def spawn(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
          netns: str | None = None) -> int:
    """Start argv in a session of its own, output appended to log; return its PID.

    A bare PID rather than a Popen: the process outlives this call (and maybe this program), and
    is stopped with `stop(pid)`.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = in_netns(netns, argv)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        return os.posix_spawnp(argv[0], argv, dict(os.environ if env is None else env), setsid=True,
                               file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                             (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """True while pid names a process that has not exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


def stop(pid: int, timeout: float = 10.0) -> None:
    """Terminate pid (then kill it after timeout; at once with timeout 0) and reap it if it is our child."""
    signals = ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)) if timeout else ((signal.SIGKILL, 5.0),)
    for sig, wait in signals:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.02)
        if not alive(pid):
            break
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def run(argv: Sequence[str], netns: str | None = None, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a short command and capture its output; on failure raise with its stderr in the message."""
    proc = subprocess.run(in_netns(netns, argv), input=input, capture_output=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(in_netns(netns, argv))} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return proc
