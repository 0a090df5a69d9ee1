"""A real Glance API server for tests and the testbed, without Keystone.

The operator's Glance client code (openstacksdk, multistore `stores`, copy-image imports, streamed
downloads) is only trustworthy when tested against Glance itself, not a mock of our own making.
Glance pins its own oslo libraries, so it lives in its own virtualenv and is only ever launched
from here as a subprocess: gunicorn serving `glance.wsgi.api:application` (Glance no longer serves
HTTP by itself), one worker because the database is sqlite, configured with file-backed stores
only, and with our `glance_noauth` paste filter standing in for Keystone.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from novacache.testbed import processes

_NOAUTH = Path(__file__).resolve().with_name("glance_noauth.py")
_LOG_TAIL = 4000


def default_glance_venv() -> Path:
    """Glance's own virtualenv: $NOVACACHE_GLANCE_VENV, else `.glance-venv` at the repository root."""
    configured = os.environ.get("NOVACACHE_GLANCE_VENV")
    return Path(configured) if configured else Path(__file__).resolve().parents[3] / ".glance-venv"


@dataclass
class GlanceServer:
    """One Glance API process, its config, sqlite database, stores and log all under `workdir`.

    `stores` become file-backed multistore backends (the first is the default), standing in for the
    per-site Ceph stores of a DCN deployment, so that `stores` and copy-image behave as in one.
    `pid` is recorded so that another process (`testbed down`) can stop the server it did not start.
    """

    workdir: Path
    stores: list[str]
    host: str
    port: int = 9292
    netns: str | None = None
    venv: Path = field(default_factory=default_glance_venv)
    pid: int | None = None

    @property
    def endpoint(self) -> str:
        """The URL clients use: Glance's versions document sits at its root."""
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        """Where gunicorn and Glance write, appended across restarts."""
        return self.workdir / "glance.log"

    def start(self, timeout: float = 60.0) -> int:
        """Configure, create the schema, start gunicorn and wait until the API answers; return its PID.

        On failure nothing started is left running, and the error carries the tail of the log.
        Keep-alive is off: when Glance refuses an upload before reading its body (unknown store, wrong
        format), gunicorn drops the connection and the client's next request on it fails.
        """
        if not self.stores:
            raise ValueError("GlanceServer needs at least one store")
        if self.pid is not None and processes.alive(self.pid):
            raise RuntimeError(f"Glance already runs as PID {self.pid}")
        config_dir = self._write_config()
        processes.run([str(self.venv / "bin" / "glance-manage"),
                       "--config-file", str(config_dir / "glance-api.conf"), "db_sync"])
        log_start = self.log.stat().st_size if self.log.exists() else 0
        argv = [str(self.venv / "bin" / "gunicorn"),
                "--bind", f"{self.host}:{self.port}",
                "--workers", "1", "--threads", "8",   # several nodes download at once
                "--graceful-timeout", "5",             # stays within processes.stop's TERM grace
                "--keep-alive", "0",                   # see the docstring
                "--no-control-socket",                 # else gunicorn 27 servers share ~/.gunicorn/gunicorn.ctl
                "--access-logfile", "-",
                "--pythonpath", str(config_dir),       # for glance_noauth; see _write_config
                "glance.wsgi.api:application"]
        env = {**os.environ, "OS_GLANCE_CONFIG_DIR": str(config_dir)}
        self.pid = processes.spawn(argv, self.log, env=env, netns=self.netns)
        try:
            self._wait_ready(self.pid, log_start, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self.pid

    def stop(self) -> None:
        """Stop the server (TERM, then KILL) and forget its PID; a no-op when it is not running."""
        if self.pid is not None:
            processes.stop(self.pid)
            self.pid = None

    def _wait_ready(self, pid: int, log_start: int, timeout: float) -> None:
        """Wait for our gunicorn to have bound the port and the API to answer through our paste pipeline.

        The log check keeps us from taking another server already on the port for ours.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not processes.alive(pid):
                raise RuntimeError(f"Glance exited during start-up; {self._log_tail(log_start)}")
            if b"Listening at:" in self._read_log(log_start) and _answers(f"{self.endpoint}/versions", self.netns):
                return
            time.sleep(0.1)
        raise RuntimeError(f"Glance did not answer on {self.endpoint} within {timeout:.0f} s; "
                           f"{self._log_tail(log_start)}")

    def _read_log(self, start: int) -> bytes:
        with open(self.log, "rb") as log:
            log.seek(start)
            return log.read()

    def _log_tail(self, start: int) -> str:
        tail = self._read_log(start)[-_LOG_TAIL:].decode(errors="replace")
        return f"end of {self.log}:\n{tail}"

    def _write_config(self) -> Path:
        """Write glance-api.conf, its paste pipeline and filter under workdir; create the store directories.

        The filter is copied next to the config because its own directory also holds this module:
        put on Glance's sys.path, our `glance.py` would shadow the `glance` package.
        """
        config_dir = self.workdir / "etc"
        dirs = {name: self.workdir / "stores" / name for name in self.stores}
        dirs["os_glance_staging_store"] = self.workdir / "staging"
        dirs["os_glance_tasks_store"] = self.workdir / "tasks"
        for path in [config_dir, *dirs.values()]:
            path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_NOAUTH, config_dir / _NOAUTH.name)
        store_sections = "".join(f"\n[{name}]\nfilesystem_store_datadir = {path}\n" for name, path in dirs.items())
        (config_dir / "glance-api.conf").write_text(
            "[DEFAULT]\n"
            f"enabled_backends = {', '.join(f'{name}:file' for name in self.stores)}\n"
            "enabled_import_methods = [glance-direct,web-download,copy-image]\n"
            "\n[database]\n"
            f"connection = sqlite:///{self.workdir / 'glance.sqlite'}\n"
            "\n[glance_store]\n"
            f"default_backend = {self.stores[0]}\n"
            "\n[paste_deploy]\n"
            f"config_file = {config_dir / 'glance-api-paste.ini'}\n"
            + store_sections)
        (config_dir / "glance-api-paste.ini").write_text(
            "[pipeline:glance-api]\n"
            "pipeline = versionnegotiation noauth rootapp\n"
            "\n[filter:versionnegotiation]\n"
            "paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory\n"
            "\n[filter:noauth]\n"
            "paste.filter_factory = glance_noauth:filter_factory\n"
            "\n[composite:rootapp]\n"
            "paste.composite_factory = glance.api:root_app_factory\n"
            "/: apiversions\n"
            "/v2: apiv2app\n"
            "\n[app:apiversions]\n"
            "paste.app_factory = glance.api.versions:create_resource\n"
            "\n[app:apiv2app]\n"
            "paste.app_factory = glance.api.v2.router:API.factory\n")
        return config_dir


def _answers(url: str, netns: str | None) -> bool:
    """True when url answers with success; asked from inside netns, whose loopback and routes are its own."""
    if netns is not None:
        probe = ("import sys, urllib.request\n"
                 "urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=2)")
        return processes.run([sys.executable, "-c", probe, url], netns=netns, check=False).returncode == 0
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as response:
            return response.status < 400
    except OSError:
        return False
