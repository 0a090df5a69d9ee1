"""The Kubernetes harness (tests/k8s.py) behaves like a real API server, for kopf and the kubernetes client."""

from __future__ import annotations

import base64
import datetime
import json
import socket
import textwrap
from pathlib import Path

import kubernetes
import pytest
import requests

from k8s import (API_VERSION, GROUP, KIND, PLURAL, VERSION, KubeAPIError, KubeHarness,  # noqa: F401
                 kube_harness, run_operator, sample_spec)

# A throwaway operator: what novacache.handlers will do, in miniature. Written to a file per test.
HANDLERS = textwrap.dedent(f"""
    import datetime
    import kopf
    import kubernetes

    G, V, P = {GROUP!r}, {VERSION!r}, {PLURAL!r}

    def condition(status, reason, message):
        return [{{"type": "Ready", "status": status, "reason": reason, "message": message}}]

    @kopf.on.create(G, V, P)
    def created(body, meta, spec, namespace, patch, **_):
        # The official client, logged in the standard way, reads the policy's Secret.
        kubernetes.config.load_kube_config()
        secret = kubernetes.client.CoreV1Api().read_namespaced_secret(spec["cloud"]["secretRef"]["name"], namespace)
        patch.status["observedGeneration"] = meta["generation"]
        patch.status["conditions"] = condition("True", "Created", "keys: " + ",".join(sorted(secret.data)))
        kopf.info(body, reason="Seen", message="policy seen")
        return {{"stored": "by kopf in status.created, which the schema does not have"}}

    @kopf.on.update(G, V, P)
    def updated(meta, patch, **_):
        patch.status["observedGeneration"] = meta["generation"]
        patch.status["conditions"] = condition("True", "Updated", "generation " + str(meta["generation"]))

    @kopf.on.delete(G, V, P)
    def deleted(body, **_):
        kopf.info(body, reason="Deleting", message="policy deleted")

    @kopf.timer(G, V, P, interval=0.2)
    def ticked(status, patch, **_):
        patch.status["summary"] = {{"images": (status.get("summary") or {{}}).get("images", 0) + 1}}
""")

FAILING = textwrap.dedent(f"""
    import kopf

    @kopf.on.create({GROUP!r}, {VERSION!r}, {PLURAL!r}, retries=1)
    def created(**_):
        raise RuntimeError("boom")
""")


def write_module(directory: Path, name: str, text: str) -> str:
    path = directory / f"{name}.py"
    path.write_text(text)
    return str(path)


def test_operator_create_update_timer_delete(kube: KubeHarness, tmp_path: Path) -> None:
    kube.create_secret("openstack-clouds", {"clouds.yaml": b"clouds: {}\n"})
    with run_operator(write_module(tmp_path, "handlers_ok", HANDLERS)) as runner:
        created = kube.create_policy("p1", sample_spec())
        assert created["metadata"]["generation"] == 1 and "status" not in created

        # (1) on.create patched the status through the status subresource, and read the Secret on the way.
        ready = kube.wait_for(lambda: kube.condition("p1", "Ready"), 5, "the create handler's status")
        assert ready["reason"] == "Created" and ready["message"] == "keys: clouds.yaml"
        policy = kube.get_policy("p1")
        assert policy["status"]["observedGeneration"] == 1
        assert "created" not in policy["status"]  # kopf's handler result was pruned, as a real server does
        assert "ImageCachePolicy/default/p1: status.created" in kube.kmock.pruned
        status_patches = [r for r in kube.kmock if r.method == "PATCH" and r.subresource == "status"]
        assert status_patches and all(r.url.path.endswith("/p1/status") for r in status_patches)

        # The timer ticks (status only: no generation change, no update handler).
        kube.wait_for(lambda: (kube.get_policy("p1")["status"].get("summary") or {}).get("images", 0) >= 2, 5,
                      "two timer ticks")
        assert kube.get_policy("p1")["metadata"]["generation"] == 1

        # (2) A spec change bumps the generation and fires on.update.
        changed = kube.patch_spec("p1", {"verify": "checksum"})
        assert changed["metadata"]["generation"] == 2
        kube.wait_for(lambda: kube.condition("p1", "Ready")["reason"] == "Updated", 5, "the update handler")
        assert kube.get_policy("p1")["status"]["observedGeneration"] == 2

        # (5) kopf.info posted an Event about the policy.
        seen = kube.wait_for(lambda: [e for e in kube.events(name="p1") if e["reason"] == "Seen"], 5, "a Seen event")
        involved = seen[0]["involvedObject"]
        assert involved["kind"] == KIND and involved["uid"] == created["metadata"]["uid"]

        # (3) kopf's finalizer holds the deletion until on.delete ran, then the object goes.
        assert kube.get_policy("p1")["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        kube.delete_policy("p1", wait=5)
        assert [e for e in kube.events(name="p1") if e["reason"] == "Deleting"]
        versions = kube.inspect(lambda k: list(k.objects[(GROUP, VERSION, PLURAL), "default", "p1"].history))
        assert versions[-1] is None and versions[-2]["metadata"]["deletionTimestamp"]
    assert "Handler 'created' succeeded" in runner.output


ONE_NAMESPACE = textwrap.dedent(f"""
    import kopf

    @kopf.on.create({GROUP!r}, {VERSION!r}, {PLURAL!r})
    def created(patch, **_):
        patch.status["observedGeneration"] = 1
""")


def test_operator_in_one_namespace_with_liveness(kube: KubeHarness, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kube.create_namespace("other")
    with run_operator(write_module(tmp_path, "handlers_ns", ONE_NAMESPACE), namespaces=["default"],
                      extra_args=["--liveness", f"http://127.0.0.1:{port}/healthz"]):
        kube.wait_for(lambda: _healthy(port), 5, "the liveness endpoint")
        kube.create_policy("mine", sample_spec())
        kube.create_policy("theirs", sample_spec(), namespace="other")
        kube.wait_for(lambda: kube.get_policy("mine").get("status"), 5, "the policy in default to be handled")
    assert "status" not in kube.get_policy("theirs", "other")
    assert ("imagecache.openstack.org", "v1alpha1", "imagecachepolicies", "default") in kube.kmock.watches


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_operator_errors_fail_the_test(kube: KubeHarness, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="the operator logged errors"):
        with run_operator(write_module(tmp_path, "handlers_failing", FAILING)):
            kube.create_policy("p1", sample_spec())
            kube.wait_for(lambda: "kopf.zalando.org/last-handled-configuration"
                          in kube.get_policy("p1")["metadata"].get("annotations", {}), 5, "kopf to give up on p1")


def test_kubernetes_client_secrets_status_events(kube: KubeHarness) -> None:
    kubernetes.config.load_kube_config()  # KUBECONFIG from the harness, as the operator will do it
    core = kubernetes.client.CoreV1Api()
    custom = kubernetes.client.CustomObjectsApi()

    # (4) Secrets: written base64, read back as such; stringData is folded into data.
    kube.create_secret("compute-ssh", {"ssh-privatekey": b"KEY", "known_hosts": b"node ssh-ed25519 AAAA\n"})
    secret = core.read_namespaced_secret("compute-ssh", "default")
    assert base64.b64decode(secret.data["ssh-privatekey"]) == b"KEY" and secret.type == "Opaque"
    core.create_namespaced_secret("default", {"metadata": {"name": "s2"}, "stringData": {"k": "v"}})
    assert core.read_namespaced_secret("s2", "default").data == {"k": base64.b64encode(b"v").decode()}
    with pytest.raises(kubernetes.client.ApiException) as missing:
        core.read_namespaced_secret("absent", "default")
    assert missing.value.status == 404

    # (6) The status subresource: status changes, the spec does not; the generation stays.
    kube.create_policy("p1", sample_spec())
    answer = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "p1",
        {"spec": {"verify": "checksum"}, "status": {"observedGeneration": 1, "summary": {"images": 3}}})
    assert answer["status"] == {"observedGeneration": 1, "summary": {"images": 3}}
    assert answer["spec"]["verify"] == "size" and answer["metadata"]["generation"] == 1
    # ... and the main resource ignores status (the spec change bumps the generation).
    answer = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "p1", {"spec": {"verify": "checksum"}, "status": {"summary": None}})
    assert answer["status"]["summary"] == {"images": 3} and answer["metadata"]["generation"] == 2

    # (5) Events through both APIs land in one store, seen in core/v1 form.
    now = datetime.datetime.now(datetime.UTC)
    ref = {"apiVersion": API_VERSION, "kind": KIND, "name": "p1", "namespace": "default",
           "uid": answer["metadata"]["uid"]}
    core.create_namespaced_event("default", kubernetes.client.CoreV1Event(
        metadata=kubernetes.client.V1ObjectMeta(generate_name="p1-"), involved_object=ref,
        reason="Refreshed", message="via core/v1", type="Normal", event_time=now, action="Refresh",
        reporting_component="imagecache.openstack.org/operator", reporting_instance="operator-0"))
    kubernetes.client.EventsV1Api().create_namespaced_event("default", kubernetes.client.EventsV1Event(
        metadata=kubernetes.client.V1ObjectMeta(generate_name="p1-"), regarding=ref, reason="Refreshed",
        note="via events.k8s.io/v1", type="Warning", event_time=now, action="Refresh",
        reporting_controller="imagecache.openstack.org/operator", reporting_instance="operator-0"))
    events = kube.events(name="p1")
    assert [e["message"] for e in events] == ["via core/v1", "via events.k8s.io/v1"]
    assert all(e["metadata"]["name"].startswith("p1-") for e in events)
    listed = kubernetes.client.EventsV1Api().list_namespaced_event("default").items
    assert sorted(e.note for e in listed) == ["via core/v1", "via events.k8s.io/v1"]
    # A new-style event without the fields the API server requires is refused, as on a real cluster.
    with pytest.raises(kubernetes.client.ApiException) as invalid:
        core.create_namespaced_event("default", kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(generate_name="p1-"), involved_object=ref,
            reason="Refreshed", message="no reportingComponent", event_time=now))
    assert invalid.value.status == 422 and "reportingComponent" in invalid.value.body


def test_api_semantics_without_operator(kube: KubeHarness) -> None:
    # Authentication: no token, no answer.
    assert requests.get(kube.url + f"/apis/{GROUP}/{VERSION}/{PLURAL}").status_code == 401
    # Discovery: the CRD is installed with its status subresource.
    resources = kube.api("GET", f"/apis/{GROUP}/{VERSION}")["resources"]
    assert {r["name"] for r in resources} == {PLURAL, f"{PLURAL}/status"}
    assert all(r["namespaced"] and r["kind"] == KIND for r in resources)

    created = kube.create_policy("p1", sample_spec(), annotations={"a": "1"})
    assert created["spec"]["ttl"] == "24h"  # defaulted from the schema
    rv = created["metadata"]["resourceVersion"]
    path = kube.policy_path("default", "p1")

    # Metadata-only and status-only changes keep the generation; a no-op keeps the resourceVersion.
    merge = "application/merge-patch+json"
    same = kube.api("PATCH", path, {"metadata": {"annotations": {"a": "1"}}}, content_type=merge)
    assert same["metadata"]["resourceVersion"] == rv
    labelled = kube.api("PATCH", path, {"metadata": {"labels": {"x": "y"}}}, content_type=merge)
    assert labelled["metadata"]["generation"] == 1 and labelled["metadata"]["resourceVersion"] != rv

    # Optimistic concurrency: a stale resourceVersion is a 409; a failed JSON-patch test is a 422 (kopf relies on it).
    with pytest.raises(KubeAPIError) as conflict:
        kube.api("PATCH", path, {"metadata": {"resourceVersion": rv, "labels": {"x": "z"}}},
                 content_type=merge)
    assert conflict.value.status == 409
    with pytest.raises(KubeAPIError) as failed:
        kube.api("PATCH", path, [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                                 {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}],
                 content_type="application/json-patch+json")
    assert failed.value.status == 422
    # Strategic merge patches do not exist for custom resources.
    with pytest.raises(KubeAPIError) as unsupported:
        kube.api("PATCH", path, {"spec": {}}, content_type="application/strategic-merge-patch+json")
    assert unsupported.value.status == 415
    # The schema is enforced (CEL rules aside) and fieldValidation=Strict refuses unknown fields.
    with pytest.raises(KubeAPIError) as invalid:
        kube.patch_spec("p1", {"strategy": "teleport"})
    assert invalid.value.status == 422 and "strategy" in str(invalid.value)
    with pytest.raises(KubeAPIError) as strict:
        kube.api("PATCH", path, {"spec": {"nonsense": 1}}, content_type=merge,
                 params={"fieldValidation": "Strict"})
    assert strict.value.status == 400

    # A finalizer holds the deletion: deletionTimestamp set, generation bumped, new finalizers refused.
    kube.api("PATCH", path, {"metadata": {"finalizers": ["example.com/hold"]}},
             content_type=merge)
    kube.delete_policy("p1")
    held = kube.get_policy("p1")
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["generation"] == 2
    with pytest.raises(KubeAPIError) as forbidden:
        kube.api("PATCH", path, {"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}},
                 content_type=merge)
    assert forbidden.value.status == 422
    kube.api("PATCH", path, {"metadata": {"finalizers": None}}, content_type=merge)
    assert kube.get_policy("p1") is None

    # Namespaces: a missing one is a 404; a deleted one takes its content with it.
    with pytest.raises(KubeAPIError) as no_namespace:
        kube.create_policy("p2", sample_spec(), namespace="elsewhere")
    assert no_namespace.value.status == 404
    kube.create_namespace("elsewhere")
    kube.create_policy("p2", sample_spec(), namespace="elsewhere")
    kube.api("DELETE", "/api/v1/namespaces/elsewhere")
    assert kube.get_policy("p2", "elsewhere") is None
    namespaces = kube.api("GET", "/api/v1/namespaces")["items"]
    assert [ns["metadata"]["name"] for ns in namespaces] == ["default", "kube-system"]


def test_watch_continues_from_a_resource_version(kube: KubeHarness) -> None:
    kube.create_policy("p1", sample_spec())
    listing = kube.api("GET", f"/apis/{GROUP}/{VERSION}/{PLURAL}")
    assert listing["kind"] == f"{KIND}List" and [p["metadata"]["name"] for p in listing["items"]] == ["p1"]
    kube.create_policy("p2", sample_spec(), labels={"tier": "edge"})
    kube.patch_spec("p1", {"verify": "checksum"})

    def watch(count: int | None, **params: str) -> list[tuple[str, str]]:
        """The first `count` events (None: all until the server ends the stream after timeoutSeconds=1)."""
        with kube.session.get(f"{kube.url}/apis/{GROUP}/{VERSION}/{PLURAL}", stream=True, timeout=5,
                              params={"watch": "true", "timeoutSeconds": "1", **params}) as response:
            events = []
            for line in response.iter_lines():
                if line:
                    event = json.loads(line)
                    events.append((event["type"], event["object"]["metadata"]["name"]))
                if count is not None and len(events) == count:
                    break
            return events

    since = listing["metadata"]["resourceVersion"]
    assert watch(2, resourceVersion=since) == [("ADDED", "p2"), ("MODIFIED", "p1")]
    assert watch(2) == [("ADDED", "p1"), ("ADDED", "p2")]
    assert watch(None, labelSelector="tier=edge") == [("ADDED", "p2")]


def test_minimal_crd_when_none_is_given(tmp_path: Path) -> None:
    from k8s import minimal_crd
    with kube_harness(tmp_path, crd=minimal_crd()) as harness:
        created = harness.create_policy("anything", {"whatever": [1, 2]})
        assert created["spec"] == {"whatever": [1, 2]}


def test_injected_faults_change_nothing(kube: KubeHarness) -> None:
    import kmock
    kube.create_policy("p1", sample_spec())
    # KMock's DSL answers before the emulation; add reactions in the server's thread.
    kube.inspect(lambda k: k["patch", kmock.resource(GROUP, VERSION, PLURAL)] << 500)
    with pytest.raises(KubeAPIError) as failed:
        kube.patch_spec("p1", {"verify": "checksum"})
    assert failed.value.status == 500
    assert kube.get_policy("p1")["spec"]["verify"] == "size" and kube.get_policy("p1")["metadata"]["generation"] == 1
