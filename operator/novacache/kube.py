"""The few Kubernetes API calls the operator makes itself: read a Secret, patch a policy's status,
post an Event. kopf watches and dispatches; these calls happen in the middle of long reconciles,
so they go through the official client directly, on worker threads. No kopf here.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
from typing import Any

import kubernetes

from .credentials import SecretError, SecretReader

GROUP = "imagecache.openstack.org"
VERSION = "v1alpha1"
PLURAL = "imagecachepolicies"
KIND = "ImageCachePolicy"
COMPONENT = "nova-image-cache-operator"


class Kube:
    """The operator's own API client, configured like kopf: in-cluster, else from kubeconfig."""

    def __init__(self, api_client: kubernetes.client.ApiClient):
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)

    @classmethod
    def from_environment(cls) -> "Kube":
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        return cls(kubernetes.client.ApiClient())

    def secret_reader(self, namespace: str) -> SecretReader:
        """Read keys of Secrets in the policy's namespace; errors name the field, never a value."""
        def read(name: str, key: str, path: str) -> bytes:
            try:
                secret = self._core.read_namespaced_secret(name, namespace)
            except kubernetes.client.ApiException as error:
                if error.status == 404:
                    raise SecretError(f"{path}: Secret {namespace}/{name} does not exist; create it "
                                      f"(kubectl -n {namespace} create secret generic {name} ...) or correct "
                                      f"the reference") from None
                raise SecretError(f"{path}: cannot read Secret {namespace}/{name}: {error.status} {error.reason}; "
                                  f"the operator's service account needs get on secrets") from None
            data = secret.data or {}
            if key not in data:
                raise SecretError(f"{path}: Secret {namespace}/{name} has no key {key!r}; it has "
                                  f"{', '.join(sorted(data)) or 'no keys'}") from None
            return base64.b64decode(data[key])
        return read

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (lists in it are replaced whole)."""
        await asyncio.to_thread(
            self._custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name,
            {"status": status}, _content_type="application/merge-patch+json")

    async def post_event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A Kubernetes Event about a policy, for `kubectl describe` and event-driven tooling."""
        meta = body.get("metadata", {})
        now = datetime.datetime.now(datetime.timezone.utc)
        event = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(generate_name=f"{meta.get('name')}.",
                                                    namespace=meta.get("namespace")),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}", kind=KIND, name=meta.get("name"),
                namespace=meta.get("namespace"), uid=meta.get("uid")),
            reason=reason, message=message[:1024], type=kind, count=1,
            first_timestamp=now, last_timestamp=now,
            source=kubernetes.client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT)
        await asyncio.to_thread(self._core.create_namespaced_event, meta.get("namespace"), event)
