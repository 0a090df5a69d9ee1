"""A real multi-site environment on one machine: Glance at central, sshd compute nodes at the edge.

`Testbed.up()` builds it and records everything in DIR/testbed.json; `Testbed.load(DIR).down()`
removes it, from this process or another, leaving no process, namespace, link or mount behind.
Besides the state file, `up` writes what a user of the operator would hold: mounted-secret-style
files under DIR/secrets and a sample ImageCachePolicy in DIR/policy.yaml.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import hostpaths, network, nodes, processes
from .glance import GlanceServer, default_glance_venv
from .images import SampleImage, make_sample_images, upload_images
from .topology import MAX_SLOTS, NodePlan, Plan, loopback_plan, netns_plan

STATE_FILE = "testbed.json"
CLOUD_SECRET = "openstack-clouds"
SSH_SECRET = "compute-ssh"
CLOUD_NAME = "central"
MiB = 1024 * 1024


class TestbedError(RuntimeError):
    """The testbed cannot be built or used here; the message says why and what to do."""


@dataclass
class Options:
    """What to build. Rates are bits per second; None means an unshaped link."""

    sites: int = 2
    nodes: int = 3
    wan_rate: int | None = 80_000_000
    lan_rate: int | None = 800_000_000
    image_size: int = 64 * MiB
    mode: str = "auto"          # "netns", "loopback", or "auto": netns when this machine allows it
    ttl: int = 86400            # remove_unused_original_minimum_age_seconds in the nodes' nova.conf
    rbd_sites: list[str] = field(default_factory=list)   # sites whose nodes say images_type = rbd
    glance_venv: Path | None = None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_port(address: str, port: int, pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not processes.alive(pid):
            raise TestbedError(f"sshd for {address}:{port} exited at start; see the testbed's logs/")
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TestbedError(f"sshd at {address}:{port} did not accept connections within {timeout:.0f}s")


def _check_prerequisites(glance_venv: Path) -> None:
    missing = [tool for tool in ("ssh", "ssh-keygen", "qemu-img", "ip", "tc", "unshare")
               if shutil.which(tool) is None]
    if not Path(nodes.SSHD).exists():
        missing.append(nodes.SSHD)
    if missing:
        raise TestbedError(f"missing {', '.join(missing)}: run `make deps` (Debian packages "
                           f"openssh-server openssh-client qemu-utils iproute2 util-linux)")
    if not (glance_venv / "bin" / "gunicorn").exists():
        raise TestbedError(f"no Glance virtualenv at {glance_venv}: run `make glance` or set "
                           f"NOVACACHE_GLANCE_VENV")


class Testbed:
    """A running testbed, described by its state file."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, directory: Path, state: dict[str, Any]):
        self.dir = directory
        self.state = state

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def up(cls, directory: Path, options: Options | None = None) -> "Testbed":
        options = options or Options()
        directory = directory.resolve()
        if (directory / STATE_FILE).exists():
            raise TestbedError(f"a testbed is already up in {directory}: bring it down first "
                               f"(novacache testbed down --dir {directory})")
        glance_venv = options.glance_venv or default_glance_venv()
        _check_prerequisites(glance_venv)
        root = os.geteuid() == 0
        mode = options.mode
        if mode == "auto":
            mode = "netns" if root and network.netns_available() else "loopback"
        if mode == "netns" and not (root and network.netns_available()):
            raise TestbedError("mode netns needs root and network namespaces; use --mode loopback")
        unknown = set(options.rbd_sites) - {f"dcn{i}" for i in range(options.sites)}
        if unknown:
            raise TestbedError(f"rbd_sites names sites that the testbed will not have: {sorted(unknown)}")

        directory.mkdir(parents=True, exist_ok=True)
        if mode == "netns":
            plan = netns_plan(network.free_slot(MAX_SLOTS), options.sites, options.nodes)
        else:
            plan = loopback_plan(options.sites, options.nodes, _free_ports(options.sites * options.nodes))
        testbed = cls(directory, {
            "version": 1, "dir": str(directory), "mode": mode, "isolated": root,
            "options": {**asdict(options), "glance_venv": str(glance_venv)},
            "namespaces": plan.namespaces, "hostInterface": plan.host_interface,
            "pids": [], "hostPaths": [],
        })
        testbed._save()
        try:
            testbed._build(plan, options, glance_venv)
        except BaseException:
            testbed.down(keep_files=True)
            raise
        return testbed

    def _build(self, plan: Plan, options: Options, glance_venv: Path) -> None:
        isolated = self.state["isolated"]
        if isolated:
            self.state["hostPaths"] = hostpaths.claim(
                self.dir, [nodes.NOVA_CONF_DIR, nodes.NOVA_STATE_DIR, Path("/run/sshd")])
        self._save()
        if plan.slot is not None:
            network.build(plan, options.wan_rate, options.lan_rate)
        self._start_nodes(plan, options, isolated)
        glance = GlanceServer(workdir=self.dir / "glance", stores=["central"] + [s.name for s in plan.sites],
                              host=plan.central_address,
                              port=9292 if plan.slot is not None else _free_ports(1)[0],
                              netns=plan.central_netns, venv=glance_venv)
        self.state["pids"].append(glance.start())
        self.state["glance"] = {"endpoint": glance.endpoint, "stores": glance.stores, "pid": glance.pid}
        self._save()
        images = upload_images(glance.endpoint, make_sample_images(self.dir / "images", options.image_size))
        self.state["images"] = [image.to_dict() for image in images]
        self.state["central"] = {"namespace": plan.central_netns, "address": plan.central_address,
                                 "hostAddress": plan.host_address, "route": plan.route}
        self._write_secrets()
        self._write_policy()
        self._save()

    def _start_nodes(self, plan: Plan, options: Options, isolated: bool) -> None:
        keys = self.dir / "keys"
        operator_key = nodes.keygen(keys / "operator", "nova-image-cache-operator")
        files = {node.name: nodes.node_files(self.dir, node.name) for site in plan.sites for node in site.nodes}
        host_keys = {node.name: nodes.make_host_key(node, files[node.name])
                     for site in plan.sites for node in site.nodes}
        sites = []
        for site in plan.sites:
            migration_key = keys / f"migration-{site.name}"
            migration_public = nodes.keygen(migration_key, f"nova migration {site.name}")
            site_known_hosts = [nodes.known_hosts_line(n.address, n.port, host_keys[n.name]) for n in site.nodes]
            site_nodes = []
            for node in site.nodes:
                f = files[node.name]
                nodes.prepare(node, f, authorized=[operator_key, migration_public], migration_key=migration_key,
                              site_known_hosts=site_known_hosts, isolated=isolated, nova_conf={
                                  "instances_path": nodes.NOVA_STATE_DIR / "instances" if isolated
                                  else f.var_lib_nova / "instances",
                                  "force_raw": True, "ttl": options.ttl,
                                  "images_type": "rbd" if site.name in options.rbd_sites else "qcow2"})
                pid = nodes.start(node, f, self.dir, isolated)
                self.state["pids"].append(pid)
                self._save()
                site_nodes.append({
                    "name": node.name, "namespace": node.netns, "address": node.address, "port": node.port,
                    "pid": pid, "hostKey": host_keys[node.name], "root": str(f.root),
                    "cacheDir": str(f.cache_dir),
                    "novaConf": str(nodes.NOVA_CONF_DIR / "nova.conf") if isolated
                    else str(f.etc_nova / "nova.conf"),
                })
            sites.append({"name": site.name, "routerNamespace": site.router_netns,
                          "lanNetwork": site.lan_network, "wanInterface": f"wan{site.index + 1}",
                          "imagesType": "rbd" if site.name in options.rbd_sites else "qcow2",
                          "nodes": site_nodes})
        self.state["sites"] = sites
        self._save()
        for node in self.nodes:
            _wait_for_port(node["address"], node["port"], node["pid"])

    def _write_secrets(self) -> None:
        endpoint = self.glance_endpoint
        cloud = self.dir / "secrets" / CLOUD_SECRET
        cloud.mkdir(parents=True, exist_ok=True)
        (cloud / "clouds.yaml").write_text(yaml.safe_dump({"clouds": {CLOUD_NAME: {
            "auth_type": "none", "auth": {"endpoint": endpoint}, "image_endpoint_override": endpoint}}}))
        ssh = self.dir / "secrets" / SSH_SECRET
        ssh.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.dir / "keys" / "operator", ssh / "ssh-privatekey")
        (ssh / "ssh-privatekey").chmod(0o600)
        (ssh / "known_hosts").write_text("".join(
            nodes.known_hosts_line(node["address"], node["port"], node["hostKey"]) + "\n"
            for node in self.nodes))

    def _write_policy(self) -> None:
        images = self.state["images"]
        policy = {
            "apiVersion": "imagecache.openstack.org/v1alpha1",
            "kind": "ImageCachePolicy",
            "metadata": {"name": "testbed-images"},
            "spec": {
                "cloud": {"secretRef": {"name": CLOUD_SECRET}, "cloudName": CLOUD_NAME},
                "ssh": {"secretRef": {"name": SSH_SECRET}, "user": self.ssh_user},
                "images": [{"id": images[0]["id"]}] + [{"name": image["name"]} for image in images[1:]],
                "ttl": "24h",
                "refreshInterval": "6h",
                "sites": [{"name": site["name"], "nodes": [
                    {"name": n["name"], "address": n["address"], "port": n["port"],
                     **({} if self.state["isolated"] else {"novaConf": n["novaConf"]})}
                    for n in site["nodes"]]} for site in self.sites],
            },
        }
        (self.dir / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))

    def _save(self) -> None:
        tmp = self.dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=2, default=str) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    # -- using ------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> "Testbed":
        path = directory.resolve() / STATE_FILE
        try:
            return cls(directory.resolve(), json.loads(path.read_text()))
        except FileNotFoundError:
            raise TestbedError(f"no testbed in {directory} (no {STATE_FILE}); bring one up with "
                               f"novacache testbed up --dir {directory}") from None

    @property
    def sites(self) -> list[dict[str, Any]]:
        return self.state.get("sites", [])

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return [node for site in self.sites for node in site["nodes"]]

    @property
    def images(self) -> list[SampleImage]:
        return [SampleImage.from_dict(image) for image in self.state.get("images", [])]

    @property
    def glance_endpoint(self) -> str:
        return self.state["glance"]["endpoint"]

    @property
    def central_netns(self) -> str | None:
        return self.state["namespaces"][0] if self.state["namespaces"] else None

    @property
    def ssh_user(self) -> str:
        return "root" if self.state["isolated"] else pwd.getpwuid(os.geteuid()).pw_name

    @property
    def secrets_dir(self) -> Path:
        return self.dir / "secrets"

    @property
    def operator_key(self) -> Path:
        return self.secrets_dir / SSH_SECRET / "ssh-privatekey"

    @property
    def known_hosts(self) -> Path:
        return self.secrets_dir / SSH_SECRET / "known_hosts"

    def ssh_argv(self, node: dict[str, Any], command: str) -> list[str]:
        """An OpenSSH command line that logs in to node as the operator does: key only, host key checked."""
        return ["ssh", "-F", "none", "-i", str(self.operator_key), "-p", str(node["port"]),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                f"{self.ssh_user}@{node['address']}", command]

    def exec_argv(self, argv: list[str]) -> list[str]:
        """argv made to run where the operator runs: inside the central namespace."""
        return processes.in_netns(self.central_netns, argv)

    def wan_rate(self) -> int | None:
        return self.state["options"]["wan_rate"] if self.state["mode"] == "netns" else None

    def wan_tx_bytes(self, site: str) -> int:
        """Bytes central has sent down a site's WAN link, as the kernel counts them (headers included)."""
        interface = next(s["wanInterface"] for s in self.sites if s["name"] == site)
        out = processes.run(["cat", f"/sys/class/net/{interface}/statistics/tx_bytes"], netns=self.central_netns)
        return int(out.stdout)

    def node(self, name: str) -> dict[str, Any]:
        return next(node for node in self.nodes if node["name"] == name)

    def stop_node(self, name: str) -> None:
        """Take a node down hard, as a crash would: every process of its sshd, sessions included."""
        node = self.node(name)
        for pid in network.namespace_pids(node["namespace"]) if node["namespace"] else [node["pid"]]:
            processes.stop(pid, timeout=0)

    def start_node(self, name: str) -> None:
        """Bring a stopped node back with its files as they were."""
        node = self.node(name)
        plan = NodePlan(name=name, site="", index=0, netns=node["namespace"], address=node["address"],
                        port=node["port"])
        node["pid"] = nodes.start(plan, nodes.node_files(self.dir, name), self.dir, self.state["isolated"])
        self.state["pids"].append(node["pid"])
        self._save()
        _wait_for_port(node["address"], node["port"], node["pid"])

    # -- removing ---------------------------------------------------------------------------
    def down(self, keep_files: bool = False) -> None:
        """Stop every process, remove every namespace and link, release host paths, then the files."""
        for namespace in self.state["namespaces"]:
            for pid in network.namespace_pids(namespace):
                processes.stop(pid)
        for pid in self.state["pids"]:
            processes.stop(pid)
        network.destroy(self.state["namespaces"], self.state["hostInterface"])
        hostpaths.release(self.dir)
        if keep_files:
            (self.dir / STATE_FILE).unlink(missing_ok=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

