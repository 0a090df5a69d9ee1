"""The operator end to end: kopf handlers against an emulated Kubernetes API, real nodes and Glance."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from conftest import free_port, needs_glance
from k8s import KubeHarness, run_operator
from novacache.testbed import Testbed

pytestmark = needs_glance


def policy_spec(bed: Testbed, **changes: object) -> dict:
    spec = yaml.safe_load((bed.dir / "policy.yaml").read_text())["spec"]
    spec.update(changes)
    return spec


def add_secrets(kube: KubeHarness, bed: Testbed) -> None:
    for secret in ("openstack-clouds", "compute-ssh"):
        kube.create_secret(secret, {f.name: f.read_bytes() for f in (bed.secrets_dir / secret).iterdir()})


def conditions(kube: KubeHarness, name: str) -> dict[str, dict]:
    body = kube.get_policy(name) or {}
    return {c["type"]: c for c in body.get("status", {}).get("conditions", [])}


def ready_at(kube: KubeHarness, name: str, generation: int) -> bool:
    body = kube.get_policy(name) or {}
    ready = conditions(kube, name).get("Ready", {})
    return body.get("status", {}).get("observedGeneration") == generation and ready.get("status") == "True"


def test_a_policy_goes_ready_then_follows_spec_changes_and_refreshes(kube: KubeHarness, bed: Testbed) -> None:
    add_secrets(kube, bed)
    nodes, images = len(bed.nodes), len(bed.images)
    with run_operator(namespaces=["default"]):
        kube.create_policy("edge", policy_spec(bed))
        kube.wait_for(lambda: ready_at(kube, "edge", 1), 180, "Ready at generation 1")
        status = kube.get_policy("edge")["status"]
        assert status["summary"]["nodes"] == nodes and status["summary"]["nodesReady"] == nodes
        assert status["summary"]["cached"] == f"{nodes}/{nodes}" and status["summary"]["images"] == images
        assert status["summary"]["wanBytes"] == len(bed.sites) * sum(i.size for i in bed.images)
        assert conditions(kube, "edge")["Stalled"]["status"] == "False"
        assert all(Path(n["cacheDir"]).exists() and len(list(Path(n["cacheDir"]).iterdir())) == images
                   for n in bed.nodes)
        assert not kube.get_policy("edge")["metadata"].get("finalizers")   # deletion is never blocked
        reasons = {e["reason"] for e in kube.events(name="edge")}
        assert {"SiteFilled", "PolicyReady"} <= reasons

        # A new spec: one image only, refreshed every few seconds.
        kube.patch_spec("edge", {"images": [{"id": bed.images[0].id}], "ttl": "2m", "refreshInterval": "3s"})
        kube.wait_for(lambda: ready_at(kube, "edge", 2), 120, "Ready at generation 2")
        assert kube.get_policy("edge")["status"]["summary"]["images"] == 1
        first = kube.get_policy("edge")["status"]["lastRefreshTime"]
        kube.wait_for(lambda: kube.get_policy("edge")["status"]["lastRefreshTime"] != first, 30,
                      "a timed refresh")
        assert kube.get_policy("edge")["status"]["summary"]["bytesMoved"] == 0   # a refresh moves nothing

        kube.delete_policy("edge", wait=30)
        assert kube.get_policy("edge") is None
    # Deleting a policy removes nothing from the nodes: Nova's cache manager ages files out.
    assert all(len(list(Path(n["cacheDir"]).iterdir())) == images for n in bed.nodes)


def test_a_spec_change_interrupts_a_long_fill(kube: KubeHarness, bed: Testbed) -> None:
    add_secrets(kube, bed)
    with run_operator(namespaces=["default"]) as runner:
        kube.create_policy("edge", policy_spec(bed, strategy="direct"))
        kube.wait_for(lambda: conditions(kube, "edge").get("Reconciling", {}).get("status") == "True", 30,
                      "the first reconcile to start")
        kube.patch_spec("edge", {"images": [{"id": bed.images[0].id}], "strategy": "pipeline"})
        kube.wait_for(lambda: ready_at(kube, "edge", 2), 120, "Ready at generation 2")
    assert "spec changed during a reconcile; starting over" in runner.output
    for node in bed.nodes:
        names = [p.name for p in Path(node["cacheDir"]).iterdir()]
        assert not any(name.startswith(".novacache-") for name in names)   # nothing half-written left


def test_a_missing_secret_stalls_with_a_clear_message(kube: KubeHarness, bed: Testbed) -> None:
    with run_operator(namespaces=["default"]):
        kube.create_policy("edge", policy_spec(bed))
        kube.wait_for(lambda: conditions(kube, "edge").get("Stalled", {}).get("status") == "True", 30, "Stalled")
        stalled = conditions(kube, "edge")["Stalled"]
        assert stalled["reason"] == "SecretNotFound"
        assert "spec.cloud.secretRef" in stalled["message"] and "openstack-clouds" in stalled["message"]
        assert conditions(kube, "edge")["Ready"]["status"] == "False"
        assert any(e["reason"] == "SecretNotFound" and e["type"] == "Warning" for e in kube.events(name="edge"))
        kube.delete_policy("edge", wait=30)


def test_an_image_name_that_matches_nothing_stalls_naming_the_field(kube: KubeHarness, bed: Testbed) -> None:
    add_secrets(kube, bed)
    with run_operator(namespaces=["default"]):
        kube.create_policy("edge", policy_spec(bed, images=[{"name": "no-such-image"}]))
        kube.wait_for(lambda: conditions(kube, "edge").get("Stalled", {}).get("status") == "True", 60, "Stalled")
        stalled = conditions(kube, "edge")["Stalled"]
        assert stalled["reason"] == "ImageNotFound"
        assert "spec.images[0].name" in stalled["message"] and "no-such-image" in stalled["message"]


def test_secrets_never_reach_status_events_or_logs(kube: KubeHarness, bed: Testbed) -> None:
    add_secrets(kube, bed)
    key = (bed.secrets_dir / "compute-ssh" / "ssh-privatekey").read_text().splitlines()[1]
    with run_operator(namespaces=["default"]) as runner:
        kube.create_policy("edge", policy_spec(bed))
        kube.wait_for(lambda: ready_at(kube, "edge", 1), 180, "Ready")
    everything = runner.output + repr(kube.get_policy("edge")) + repr(kube.events())
    assert key not in everything


def test_novacache_run_serves_policies_and_a_health_endpoint(kube: KubeHarness, bed: Testbed) -> None:
    """The real entry point, as the Deployment starts it, in a process of its own."""
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    argv = [str(Path(sys.executable).with_name("novacache")), "run", "--namespace", "default",
            "--liveness", f"http://127.0.0.1:{port}/healthz"]
    operator = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                    return answer.status == 200
            except OSError:
                return False
        kube.wait_for(healthy, 30, "the liveness endpoint")
        kube.create_policy("edge", policy_spec(bed))      # no Secrets in this namespace
        kube.wait_for(lambda: conditions(kube, "edge").get("Stalled", {}).get("status") == "True", 30, "Stalled")
        assert conditions(kube, "edge")["Stalled"]["reason"] == "SecretNotFound"
    finally:
        operator.terminate()
        output = operator.communicate(timeout=30)[0].decode(errors="replace")
    assert operator.returncode in (0, -15), output
