"""A Kubernetes API server for operator tests: KMock's emulator, made to behave like a real one where it matters.

No cluster is needed. `kube` (a pytest fixture) or `kube_harness()` starts KMock's Kubernetes emulator on
127.0.0.1 in a thread of its own, installs the ImageCachePolicy CRD from crds/imagecachepolicies.yaml, creates
the namespaces "default" and "kube-system", writes a kubeconfig (plain http, a bearer token) and points
KUBECONFIG at it. `run_operator()` then runs kopf handlers under kopf.testing.KopfRunner against it, and both
kopf's own login and the official `kubernetes` client (load_kube_config()) reach the emulator the standard way.

Use it from a test module:

    from k8s import kube, run_operator, sample_spec   # noqa: F401  (kube is a fixture)

    def test_something(kube):
        kube.create_secret("openstack-clouds", {"clouds.yaml": b"..."})
        with run_operator("novacache.handlers"):
            kube.create_policy("p1", sample_spec())
            kube.wait_for(lambda: kube.condition("p1", "Ready"), 5, "p1 to become Ready")

What KMock 0.8 does on its own, and what this module changes (see the report in KMOCK_DIFFERENCES below):
every write goes through `RealisticKubernetes`, a subclass of kmock.KubernetesEmulator that keeps KMock's
HTTP server, request log, discovery and `objects` store, but replaces its create/patch/delete/list/watch.

Notes:
- KMock ships a pytest plugin (entry point `kmock = kmock._internal.pytest`) with an async `kmock` fixture that
  serves from the test's own event loop. It is not used here: tests are synchronous, KopfRunner blocks the
  test thread while the operator stops, and the server must keep answering meanwhile; so the server runs in
  its own thread and loop. The plugin stays loaded (harmless) because the package is installed.
- The kubernetes client reads $KUBECONFIG once, at import time; the harness also points
  kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION at its kubeconfig (and restores it, and the
  client's default Configuration, afterwards). KUBERNETES_SERVICE_HOST/PORT are hidden for the duration, or
  the in-cluster login (tried first by kopf's login_via_client) would win.
- While the operator runs, click's CliRunner has replaced sys.stdout/sys.stderr process-wide: print() from
  the test goes into `runner.output`.
- The emulator's state lives in its thread: look at it with `kube.inspect(lambda k: ...)`, or through the API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import random
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import pytest
import requests
import yaml

try:
    import jsonschema
except ImportError:  # pragma: no cover  # a test extra; without it, no schema validation (pruning and defaults stay)
    jsonschema = None

from kmock._internal import rendering as _kmock_rendering  # only for StreamingError, see _call_namespaces()

GROUP = "imagecache.openstack.org"
VERSION = "v1alpha1"
PLURAL = "imagecachepolicies"
KIND = "ImageCachePolicy"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_PATH = Path(__file__).resolve().parent.parent / "crds" / "imagecachepolicies.yaml"
TOKEN = "kmock-harness-token"

T = TypeVar("T")

KMOCK_DIFFERENCES = """
KMock 0.8's KubernetesEmulator vs a real API server, and what RealisticKubernetes does about each:
 1. No uid, creationTimestamp, resourceVersion or generation on objects; lists carry resourceVersion "...".
    -> set on every write from one global resourceVersion counter; lists carry the current one.
 2. A PATCH applies whatever it gets to the whole object: a PATCH of the main resource changes status, and a
    PATCH of /status changes spec and metadata.
    -> status subresource semantics: the main resource keeps its status, /status changes status only (as
       for CRs, metadata sent to /status is dropped too); status is dropped on create.
 3. metadata.generation is never set or bumped.
    -> 1 on create for custom resources; +1 when anything outside metadata and status changes, and +1 when
       deletionTimestamp is set (as real); metadata-only and status-only writes keep it.
 4. The patch type (Content-Type) is ignored: dict bodies are merged by KMock's own merge (it raises on a
    dict<->scalar replacement), list bodies are JSON patches whose failed "test" op is a 500.
    -> merge-patch per RFC 7386; a JSON patch whose test fails or whose path is missing is a 422 (kopf
       relies on that for its finalizers); strategic-merge-patch is a 415 for custom resources (as real) and
       a plain merge for built-ins; apply-patch (server-side apply) is a 415 (not emulated).
 5. metadata.resourceVersion in a PATCH body is not checked. -> 409 Conflict when it differs (PUT too).
 6. Watches ignore resourceVersion: every watch replays every object as ADDED, then live events.
    -> a watch from resourceVersion=N sends only the events after N (the whole history is kept); without
       one it sends the current objects as ADDED first; sendInitialEvents ends with the BOOKMARK
       "k8s.io/initial-events-end"; timeoutSeconds ends the stream; labelSelector/fieldSelector are honoured
       on list and watch (field selectors: metadata.name/namespace, and the usual ones of events/secrets).
 7. /api/v1/namespaces fails to parse (a 500) and /api/v1/namespaces/NAME is read as a namespace scope, so
    namespaces are not objects and nothing checks that one exists.
    -> namespaces are objects; creating in a missing namespace is a 404, in a terminating one a 403;
       deleting a namespace deletes its contents (finalizers honoured), then the namespace.
 8. Any resource can be created, even an undeclared one (it then becomes "known"); cluster-scoped objects
    can be addressed inside a namespace; nothing is validated.
    -> unknown resources are 404; custom resources are pruned (unknown fields dropped, as for structural
       schemas; the paths are logged in `kube.kmock.pruned`; fieldValidation=Strict makes it a 400),
       defaulted and validated against the CRD's openAPIV3Schema (jsonschema; the CEL rules in
       x-kubernetes-validations are NOT evaluated); names must be DNS-1123.
 9. No generateName (kopf's events use it: every event would collide on the name None). -> supported.
10. Secrets: stringData is stored as is. -> folded into base64 data; data values must be base64.
11. core/v1 and events.k8s.io/v1 events are separate stores.
    -> one store, two views converted field by field (involvedObject<->regarding, message<->note,
       reportingComponent<->reportingController, source/firstTimestamp/lastTimestamp/count <->
       deprecated*); the API server's event validation: a core/v1 event with eventTime needs
       reportingComponent, reportingInstance, action and reason; events.k8s.io/v1 also needs eventTime and
       type Normal|Warning.
12. No PUT (replace), no deletecollection, no dryRun, no authentication.
    -> PUT and deletecollection work; dryRun does not persist; every request except /version, /healthz,
       /livez and /readyz needs "Authorization: Bearer <token>" (else 401), so both kopf and the kubernetes
       client are proven to use the kubeconfig's credentials.
13. Every PATCH stores a new version and broadcasts MODIFIED, even when it changes nothing.
    -> a no-op write keeps the resourceVersion and sends no event; removing the last finalizer of a
       deleting object sends one DELETED (not MODIFIED + DELETED). DELETE answers the object for custom
       resources and a Status for built-ins, as real.
14. Discovery: /api/v1 says groupVersion "/v1"; subresources claim the main resource's verbs.
    -> "v1"; status gets get/patch/update. (Left as is: /apis picks an arbitrary preferredVersion for
       groups with several versions; our group has one.)
Not emulated (tests must not rely on them): server-side apply, managedFields, strategic-merge list semantics
($patch directives, merge keys), CEL rules, admission webhooks, RBAC (everything is allowed), owner-reference
garbage collection, watch 410 Gone and periodic bookmarks, field selectors beyond the common ones,
Warning headers for pruned fields, protobuf.
"""


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers: times, names, errors, patches, selectors, schemas.

def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # as the API server's generateName suffixes


def _generate_name(prefix: str) -> str:
    return prefix + "".join(random.choice(_NAME_SUFFIX_ALPHABET) for _ in range(5))


def _status_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """An error that KMock renders as a metav1.Status with this code and reason (as the API server does)."""
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {"causes": []})


def _not_found(rdef: ResourceDef, name: str) -> kmock.KubernetesError:
    return _status_error(404, "NotFound", f'{rdef.qualified_plural} "{name}" not found',
                         name=name, group=rdef.group, kind=rdef.plural)


def _invalid(rdef: ResourceDef, name: str, problems: Sequence[str]) -> kmock.KubernetesError:
    return _status_error(422, "Invalid", f'{rdef.kind}.{rdef.group or "core"} "{name}" is invalid: '
                         + "; ".join(problems), name=name, group=rdef.group, kind=rdef.kind,
                         causes=[{"message": p} for p in problems])


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _split_selector(selector: str) -> list[str]:
    return [term.strip() for term in re.split(r",(?![^()]*\))", selector) if term.strip()]


def match_labels(selector: str, labels: Mapping[str, str]) -> bool:
    """Label selector semantics: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b); terms are ANDed."""
    for term in _split_selector(selector):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (key in labels and labels[key] in values):
                return False
        elif m := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)", term):
            key, op, value = m.groups()
            if (op == "!=") == (labels.get(key) == value):
                return False
        elif m := re.fullmatch(r"!\s*(\S+)", term):
            if m.group(1) in labels:
                return False
        elif re.fullmatch(r"[^=!\s()]+", term):
            if term not in labels:
                return False
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return True


_FIELDS_ANYWHERE = {"metadata.name", "metadata.namespace"}
_FIELDS_BY_KIND = {
    "Event": {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
              "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
              "regarding.kind", "regarding.namespace", "regarding.name", "regarding.uid",
              "reason", "reportingComponent", "reportingController", "source", "type"},
    "Secret": {"type"},
    "Namespace": {"status.phase"},
}


def match_fields(selector: str, obj: Mapping[str, Any]) -> bool:
    """Field selectors: path=value, path==value, path!=value, for the fields the real server supports."""
    for term in _split_selector(selector):
        m = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise ValueError(f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        if path not in _FIELDS_ANYWHERE | _FIELDS_BY_KIND.get(obj.get("kind", ""), set()):
            raise ValueError(f'field label not supported: "{path}"')
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, Mapping) else None
        if path == "source" and isinstance(current, Mapping):
            current = current.get("component")
        if (op == "!=") == ((current or "") == value):
            return False
    return True


def prune(value: Any, schema: Mapping[str, Any] | None, path: str = "", dropped: list[str] | None = None,
          root: bool = False) -> Any:
    """Drop the fields a structural schema does not know (as the API server does), collecting their paths."""
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        result = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if root and key in ("apiVersion", "kind", "metadata"):
                result[key] = item
            elif props is not None and key in props:
                result[key] = prune(item, props[key], where, dropped)
            elif isinstance(extra, Mapping):
                result[key] = prune(item, extra, where, dropped)
            elif extra is True or preserve:
                result[key] = item
            elif dropped is not None:
                dropped.append(where)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(item, schema["items"], f"{path}[{i}]", dropped) for i, item in enumerate(value)]
    return value


def apply_defaults(value: Any, schema: Mapping[str, Any] | None) -> Any:
    """Fill in `default`s top-down, recursing into defaulted values too (as the API server does)."""
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and isinstance(sub, Mapping) and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, sub in props.items():
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        if isinstance(schema.get("additionalProperties"), Mapping):
            for key in value:
                if key not in props:
                    value[key] = apply_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            value[i] = apply_defaults(item, schema["items"])
    return value


def _jsonschema_of(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as a JSON schema (draft 4): no x-kubernetes-*, nullable as a type."""
    if isinstance(schema, list):
        return [_jsonschema_of(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    result = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("default", "nullable", "description", "example"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            result[key] = {k: _jsonschema_of(v) for k, v in value.items()}
        else:
            result[key] = _jsonschema_of(value)
    if schema.get("x-kubernetes-int-or-string") and "type" not in result and "anyOf" not in result:
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(result.get("type"), str):
        result["type"] = [result["type"], "null"]
    return result


def _schema_problems(obj: Mapping[str, Any], schema: Mapping[str, Any] | None) -> list[str]:
    if jsonschema is None or not schema:
        return []
    validator = jsonschema.Draft4Validator(_jsonschema_of(schema))
    problems = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        problems.append(f"{where or '<root>'}: {error.message}")
    return problems


# Events: one store (core/v1 form), two views. Field pairs: (core/v1, events.k8s.io/v1).
_EVENT_FIELDS = [("involvedObject", "regarding"), ("message", "note"), ("reportingComponent", "reportingController"),
                 ("source", "deprecatedSource"), ("firstTimestamp", "deprecatedFirstTimestamp"),
                 ("lastTimestamp", "deprecatedLastTimestamp"), ("count", "deprecatedCount")]


def _event_as(obj: Mapping[str, Any], api_version: str) -> dict[str, Any]:
    """An Event in the field names of api_version ("v1" or "events.k8s.io/v1"), from either form."""
    result = copy.deepcopy(dict(obj))
    to_v1 = api_version != "v1"
    for core, v1 in _EVENT_FIELDS:
        old, new = (core, v1) if to_v1 else (v1, core)
        if old in result:
            result[new] = result.pop(old)
    result.update(apiVersion=api_version, kind="Event")
    return result


def _event_problems(event: Mapping[str, Any], via_events_api: bool) -> list[str]:
    """The API server's event validation (legacy rules for core/v1, strict ones for events.k8s.io/v1)."""
    problems = []
    meta = event.get("metadata", {})
    involved = event.get("involvedObject") or {}
    controller = "reportingController" if via_events_api else "reportingComponent"
    if not event.get("eventTime"):
        if involved.get("namespace") and involved.get("namespace") != meta.get("namespace"):
            problems.append("involvedObject.namespace: does not match event.namespace")
    else:
        if not involved.get("namespace") and meta.get("namespace") not in ("default", "kube-system"):
            problems.append("involvedObject.namespace: does not match event.namespace")
        if not event.get("reportingComponent"):
            problems.append(f"{controller}: Required value")
        elif not re.fullmatch(rf"({_DNS_SUBDOMAIN.pattern}/)?{_QUALIFIED.pattern}", event["reportingComponent"]):
            problems.append(f"{controller}: must be a qualified name")
        if not event.get("reportingInstance"):
            problems.append("reportingInstance: Required value")
        elif len(event["reportingInstance"]) > 128:
            problems.append("reportingInstance: can have at most 128 characters")
        if not event.get("action"):
            problems.append("action: Required value")
        elif len(event["action"]) > 128:
            problems.append("action: can have at most 128 characters")
        if not event.get("reason"):
            problems.append("reason: Required value")
        elif len(event["reason"]) > 128:
            problems.append("reason: can have at most 128 characters")
        if len(event.get("message") or "") > 1024:
            problems.append("note: can have at most 1024 characters")
    if via_events_api:
        if not event.get("eventTime"):
            problems.append("eventTime: Required value")
        if event.get("type") not in ("Normal", "Warning"):
            problems.append(f"type: has invalid value: {event.get('type')}")
        for core, v1 in _EVENT_FIELDS[3:]:
            if event.get(core):
                problems.append(f"{v1}: needs to be unset")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The emulator.

@dataclasses.dataclass(frozen=True)
class ResourceDef:
    """What the server knows of one resource (one group/version/plural)."""
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str] = frozenset()
    schema: Mapping[str, Any] | None = None  # openAPIV3Schema, for custom resources
    custom: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_plural(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def is_events_api(self) -> bool:
        return self.group == "events.k8s.io" and self.plural == "events"

    @property
    def storage(self) -> kmock.resource:
        """Where the objects live: events.k8s.io/v1 events are the core/v1 ones, viewed differently."""
        if self.is_events_api:
            return kmock.resource("", "v1", "events")
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def has_generation(self) -> bool:
        return self.custom or self.plural == "customresourcedefinitions"


@dataclasses.dataclass(frozen=True)
class _Change:
    rv: int
    storage: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]


_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?")
_ANONYMOUS_PATHS = {"/version", "/healthz", "/livez", "/readyz"}
_CUSTOM_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


@attrs.define(kw_only=True)
class RealisticKubernetes(kmock.KubernetesEmulator):
    """KMock's emulator with real API-server semantics for what an operator relies on (see KMOCK_DIFFERENCES).

    The objects live in KMock's own `objects` store (with their history of versions), so tests can also look
    at `kube.kmock.objects[resource, namespace, name].history`; KMock's DSL still works for fault injection
    (e.g. `kube.kmock['patch', kmock.resource(GROUP, VERSION, PLURAL)] << 500` answers before the fallbacks).
    """

    token: str | None = TOKEN
    _rv: int = attrs.field(default=0, init=False)
    _changes: list[_Change] = attrs.field(factory=list, init=False)
    _tick: asyncio.Event | None = attrs.field(default=None, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _custom: dict[tuple[str, str, str], ResourceDef] = attrs.field(factory=dict, init=False)
    watches: list[tuple[str, str, str, str | None]] = attrs.field(factory=list, init=False)  # started watches
    pruned: list[str] = attrs.field(factory=list, init=False)  # "kind/ns/name: field" the server dropped

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():  # kmock 0.8 uses importlib.resources.read_binary (deprecated)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()  # the built-ins of a recent K3s: namespaces, secrets, events, ...
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.DELETE] << self._serve_delete_collection

    # ---- plumbing

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if self.token is not None and raw_request.path not in _ANONYMOUS_PATHS:
            if raw_request.headers.get("Authorization") != f"Bearer {self.token}":
                await raw_request.read()
                return await self._render_error(_status_error(401, "Unauthorized", "Unauthorized"))
        if _NAMESPACE_PATH.fullmatch(raw_request.path):
            return await self._call_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _call_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """KMock cannot parse /api/v1/namespaces[/NAME]: build its Request here, then go the usual way."""
        match = _NAMESPACE_PATH.fullmatch(raw_request.path)
        assert match is not None
        body = await raw_request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        name, method = match.group("name"), raw_request.method.upper()
        params = dict(raw_request.query)
        action = (kmock.action.WATCH if method == "GET" and params.get("watch") in ("true", "1") else
                  kmock.action.LIST if method == "GET" and not name else
                  kmock.action.FETCH if method == "GET" else
                  kmock.action.CREATE if method == "POST" and not name else
                  kmock.action.UPDATE if method == "PATCH" and name else
                  kmock.action.DELETE if method == "DELETE" and name else None)
        request = kmock.Request(
            id=len(self._requests), method=method, url=raw_request.url, params=params,
            headers=dict(raw_request.headers), cookies=dict(raw_request.cookies), body=body,
            text=body.decode("utf-8", "replace"), data=data, action=action,
            resource=kmock.resource("", "v1", "namespaces"), namespace=None, name=name,
            subresource=match.group("sub"), raw_request=raw_request)
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as error:
            if self._errors:
                self._errors[-1].append(error)
            streaming_error = getattr(_kmock_rendering, "StreamingError", ())
            if isinstance(error, streaming_error) and error.args and error.args[0].prepared:
                await self._stream_error(error.__cause__ or error, error.args[0])
                await error.args[0].write_eof()
                return error.args[0]
            return await self._render_error(error.__cause__ if isinstance(error, streaming_error) else error)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle (it mutates objects its own way before any reaction runs); the
        # mutations happen in the fallback reactions below, so a fault injected by a test changes nothing.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    def _def(self, request: kmock.Request) -> ResourceDef:
        resource = request.resource
        if resource is None or not resource.plural:
            raise NotImplementedError  # not an object request (discovery): let the next reaction answer
        rdef = self.resource_def(resource.group or "", resource.version or "", resource.plural)
        if request.namespace is not None and not rdef.namespaced:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return rdef

    def resource_def(self, group: str, version: str, plural: str) -> ResourceDef:
        if (group, version, plural) in self._custom:
            return self._custom[group, version, plural]
        key = kmock.resource(group, version, plural)
        if key not in self.resources:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        info = self.resources[key]
        return ResourceDef(group, version, plural, info.kind or plural.capitalize(), bool(info.namespaced),
                           frozenset(info.subresources))

    def _key(self, rdef: ResourceDef, namespace: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        return rdef.storage, namespace if rdef.namespaced else None, name

    def _load(self, rdef: ResourceDef, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = self._key(rdef, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _store(self, rdef: ResourceDef, obj: dict[str, Any]) -> None:
        key = self._key(rdef, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in self.objects:
            self.objects[key].history.append(copy.deepcopy(obj))
        else:
            self.objects[key] = copy.deepcopy(obj)

    def _live(self, storage: kmock.resource) -> list[dict[str, Any]]:
        found = [(ns or "", name, obj) for (res, ns, name), obj in self.objects.items()
                 if res == storage and not obj.deleted]
        return [copy.deepcopy(obj.raw) for _, _, obj in sorted(found, key=lambda item: item[:2])]

    def _emit(self, rdef: ResourceDef, type_: str, obj: dict[str, Any]) -> None:
        self._changes.append(_Change(self._rv, rdef.storage, type_, copy.deepcopy(obj)))
        if self._tick is not None:
            self._tick.set()
        self._tick = asyncio.Event()

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _view(self, rdef: ResourceDef, obj: dict[str, Any]) -> dict[str, Any]:
        return _event_as(obj, "events.k8s.io/v1") if rdef.is_events_api else obj

    def _selected(self, obj: Mapping[str, Any], params: Mapping[str, str]) -> bool:
        try:
            return (match_labels(params.get("labelSelector", ""), obj.get("metadata", {}).get("labels") or {})
                    and match_fields(params.get("fieldSelector", ""), obj))
        except ValueError as error:
            raise _status_error(400, "BadRequest", str(error)) from None

    def close_streams(self) -> None:
        """End every watch stream (before the server stops, so that shutdown does not wait for them)."""
        self._closing = True
        if self._tick is not None:
            self._tick.set()

    # ---- discovery

    async def _serve_version(self, request: kmock.Request) -> Any:
        """KMock's APIResourceList, with the two things it gets wrong fixed (groupVersion of the core
        group is "v1", not "/v1"; subresources have their own verbs)."""
        result = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        for entry in result.get("resources", []):
            if entry["name"].endswith("/status"):
                entry["verbs"] = ["get", "patch", "update"]
        return result

    # ---- CRDs and namespaces

    def install_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = frozenset((version.get("subresources") or {}).keys())
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            rdef = ResourceDef(spec["group"], version["name"], names["plural"], names["kind"],
                               spec.get("scope", "Namespaced") == "Namespaced", subresources, schema, custom=True)
            self._custom[rdef.group, rdef.version, rdef.plural] = rdef
            self.resources[f"{rdef.group}/{rdef.version}/{rdef.plural}"] = kmock.ResourceInfo(
                namespaced=rdef.namespaced, kind=rdef.kind, singular=names.get("singular") or rdef.kind.lower(),
                verbs=_CUSTOM_VERBS, shortnames=names.get("shortNames", []),
                categories=names.get("categories", []), subresources=subresources)

    def _namespace_gone(self, name: str) -> bool:
        ns = self._load(self.resource_def("", "v1", "namespaces"), None, name)
        return ns is None or bool(ns["metadata"].get("deletionTimestamp"))

    def _finish_namespace(self, name: str | None) -> None:
        """The namespace controller: a terminating namespace goes once nothing is left in it."""
        nsdef = self.resource_def("", "v1", "namespaces")
        ns = self._load(nsdef, None, name) if name else None
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        if any(key[1] == name and not obj.deleted for key, obj in self.objects.items()):
            return
        self.objects[self._key(nsdef, None, name)].delete()
        self._bump(ns)
        self._emit(nsdef, "DELETED", ns)

    # ---- reading

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        rdef = self._def(request)
        if request.subresource not in (None, *rdef.subresources):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        obj = self._load(rdef, request.namespace, request.name)
        if obj is None:
            raise _not_found(rdef, request.name)
        return self._view(rdef, obj)

    async def _serve_list(self, request: kmock.Request) -> Any:
        rdef = self._def(request)
        if request.subresource:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        items = [self._view(rdef, obj) for obj in self._live(rdef.storage)
                 if request.namespace is None or obj["metadata"].get("namespace") == request.namespace]
        items = [obj for obj in items if self._selected(obj, request.params)]
        metadata: dict[str, Any] = {"resourceVersion": str(self._rv)}
        limit = int(request.params.get("limit") or 0)
        if limit > 0:
            start = int(request.params.get("continue") or 0)
            items, rest = items[start:start + limit], items[start + limit:]
            if rest:
                metadata.update({"continue": str(start + limit), "remainingItemCount": len(rest)})
        return {"apiVersion": rdef.api_version, "kind": f"{rdef.kind}List", "metadata": metadata, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        rdef = self._def(request)
        params = request.params
        since = params.get("resourceVersion") or ""
        if since and not since.isdigit():
            raise _status_error(400, "BadRequest", f"invalid resource version: {since!r}")
        initial = params.get("sendInitialEvents") == "true"
        if initial and params.get("resourceVersionMatch") != "NotOlderThan":
            raise _status_error(422, "Invalid", "sendInitialEvents requires resourceVersionMatch=NotOlderThan")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        raw_request = getattr(request, "_raw_request", None)  # aiohttp's, to notice a client that went away
        self.watches.append((rdef.group, rdef.version, rdef.plural, request.namespace))

        def wanted(obj: Mapping[str, Any]) -> bool:
            if request.namespace is not None and obj["metadata"].get("namespace") != request.namespace:
                return False
            if request.name is not None and obj["metadata"].get("name") != request.name:
                return False
            return self._selected(obj, params)

        self._selected({"kind": rdef.kind, "metadata": {}}, params)  # a bad selector is a 400, not a broken stream
        yield b""  # send the headers now: the client is watching even if nothing happens
        if not since or since == "0" or initial:
            position = len(self._changes)
            for obj in self._live(rdef.storage):
                if wanted(view := self._view(rdef, obj)):
                    yield {"type": "ADDED", "object": view}
            if initial:
                yield {"type": "BOOKMARK", "object": {
                    "apiVersion": rdef.api_version, "kind": rdef.kind,
                    "metadata": {"resourceVersion": str(self._rv),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}}
        else:
            position = next((i for i, change in enumerate(self._changes) if change.rv > int(since)),
                            len(self._changes))
        while not self._closing:
            while position < len(self._changes):
                change = self._changes[position]
                position += 1
                if change.storage == rdef.storage and wanted(view := self._view(rdef, change.obj)):
                    yield {"type": change.type, "object": view}
            if deadline is not None and loop.time() >= deadline:
                return
            if raw_request is not None and (raw_request.transport is None or raw_request.transport.is_closing()):
                return
            if self._tick is None:
                self._tick = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), timeout=0.25)

    # ---- writing

    def _admit(self, rdef: ResourceDef, old: dict[str, Any] | None, obj: dict[str, Any],
               params: Mapping[str, str]) -> dict[str, Any]:
        """What the API server does to every object it is asked to store: per kind, prune, default, validate."""
        name = obj["metadata"].get("name", "")
        if rdef.plural == "secrets" and not rdef.group:
            data = obj.setdefault("data", {}) or {}
            for key, value in (obj.pop("stringData", None) or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
            for key, value in data.items():
                try:
                    base64.b64decode(value, validate=True)
                except (ValueError, TypeError):
                    raise _invalid(rdef, name, [f"data[{key}]: Invalid value: not base64"]) from None
            obj.setdefault("type", "Opaque")
            if old is not None and old.get("type") != obj.get("type"):
                raise _invalid(rdef, name, ["type: Invalid value: field is immutable"])
        if rdef.plural == "events" and not rdef.group and old is None:
            if problems := _event_problems(obj, via_events_api=params.get("__events_api") == "1"):
                raise _invalid(rdef, name, problems)
        if rdef.plural == "namespaces" and not rdef.group:
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {}).setdefault("phase", "Active")
        if rdef.custom and rdef.schema:
            dropped: list[str] = []
            obj = prune(obj, rdef.schema, dropped=dropped, root=True)
            if dropped and params.get("fieldValidation") == "Strict":
                raise _status_error(400, "BadRequest", "strict decoding error: "
                                    + ", ".join(f'unknown field "{p}"' for p in dropped))
            self.pruned.extend(f"{rdef.kind}/{obj['metadata'].get('namespace')}/{name}: {p}" for p in dropped)
            obj = apply_defaults(obj, rdef.schema)
            if problems := _schema_problems({k: v for k, v in obj.items() if k != "metadata"}, rdef.schema):
                raise _invalid(rdef, name, problems)
        return obj

    async def _serve_create(self, request: kmock.Request) -> Any:
        rdef = self._def(request)
        if request.subresource or request.name:
            raise _status_error(405, "MethodNotAllowed", "the server does not allow this method on the resource")
        body = request.data
        if not isinstance(body, dict):
            raise _status_error(400, "BadRequest", "the body of the request was not a JSON object")
        obj = _event_as(body, "v1") if rdef.is_events_api else copy.deepcopy(body)
        if obj.get("apiVersion") not in (None, "v1" if rdef.is_events_api else rdef.api_version) or \
                obj.get("kind") not in (None, rdef.kind):
            raise _status_error(400, "BadRequest", f"the object is not a {rdef.api_version} {rdef.kind}")
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _status_error(400, "BadRequest", "metadata must be an object")
        if rdef.namespaced:
            namespace = request.namespace
            if namespace is None:
                raise _status_error(404, "NotFound", "the server could not find the requested resource")
            if meta.get("namespace", namespace) != namespace:
                raise _status_error(400, "BadRequest", "the namespace of the provided object does not match "
                                    "the namespace sent on the request")
            if self._load(self.resource_def("", "v1", "namespaces"), None, namespace) is None:
                raise _status_error(404, "NotFound", f'namespaces "{namespace}" not found',
                                    name=namespace, kind="namespaces")
            if self._namespace_gone(namespace):
                raise _status_error(403, "Forbidden", f'unable to create new content in namespace {namespace} '
                                    "because it is being terminated")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _invalid(rdef, "", ["metadata.name: Required value: name or generateName is required"])
            meta["name"] = _generate_name(meta["generateName"])
        name = meta["name"]
        label = rdef.plural == "namespaces" and not rdef.group
        if len(name) > (63 if label else 253) or not _DNS_SUBDOMAIN.fullmatch(name) or (label and "." in name):
            raise _invalid(rdef, name, [f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 "
                                        + ("label" if label else "subdomain")])
        if self._load(rdef, meta.get("namespace"), name) is not None:
            raise _status_error(409, "AlreadyExists", f'{rdef.qualified_plural} "{name}" already exists',
                                name=name, group=rdef.group, kind=rdef.plural)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "generation",
                      "managedFields"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        if rdef.has_generation:
            meta["generation"] = 1
        if "status" in rdef.subresources and rdef.custom:
            obj.pop("status", None)
        obj["apiVersion"], obj["kind"] = ("v1" if rdef.is_events_api else rdef.api_version), rdef.kind
        params = dict(request.params, __events_api="1" if rdef.is_events_api else "0")
        obj = self._admit(rdef, None, obj, params)
        if rdef.plural == "customresourcedefinitions" and rdef.group == "apiextensions.k8s.io":
            obj["status"] = {"acceptedNames": obj["spec"]["names"],
                             "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
                             "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now()}
                                            for t in ("NamesAccepted", "Established")]}
        if request.params.get("dryRun"):
            return kmock.Response(status=201, payload=self._view(rdef, obj))
        self._bump(obj)
        self._store(rdef, obj)
        self._emit(rdef, "ADDED", obj)
        if rdef.plural == "customresourcedefinitions" and rdef.group == "apiextensions.k8s.io":
            self.install_crd(obj)
        return kmock.Response(status=201, payload=self._view(rdef, obj))

    def _write(self, rdef: ResourceDef, old: dict[str, Any], new: Any, subresource: str | None,
               params: Mapping[str, str]) -> dict[str, Any]:
        """Store `new` as the next state of `old` (a PATCH's result or a PUT's body) with real-server rules."""
        name = old["metadata"]["name"]
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise _status_error(400, "BadRequest", "the object is not a JSON object with metadata")
        if rdef.is_events_api:
            new = _event_as(new, "v1")
        new_meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        if new_meta.get("resourceVersion") not in (None, "", old_meta["resourceVersion"]):
            raise _status_error(409, "Conflict", f'Operation cannot be fulfilled on {rdef.qualified_plural} '
                                f'"{name}": the object has been modified; please apply your changes to the '
                                "latest version and try again", name=name, group=rdef.group, kind=rdef.plural)
        for field in ("name", "namespace", "uid"):
            if new_meta.get(field) not in (None, old_meta.get(field)):
                raise _invalid(rdef, name, [f"metadata.{field}: Invalid value: field is immutable"])
        if subresource == "status":  # the status strategy: only the status changes
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = new
            if "status" in rdef.subresources:  # the main resource keeps its status
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
            for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                          "deletionGracePeriodSeconds", "name", "namespace"):
                if field in old_meta:
                    result["metadata"][field] = old_meta[field]
                else:
                    result["metadata"].pop(field, None)
            if old_meta.get("deletionTimestamp"):
                added = set(result["metadata"].get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise _invalid(rdef, name, ["metadata.finalizers: Forbidden: no new finalizers can be added "
                                                "if the object is being deleted, found new finalizers "
                                                + json.dumps(sorted(added))])
        result["apiVersion"], result["kind"] = ("v1" if rdef.is_events_api else rdef.api_version), rdef.kind
        result["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        result = self._admit(rdef, old, result, params)
        if rdef.has_generation and subresource != "status":
            def content(obj: dict[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in obj.items() if k not in ("metadata", "status")}
            if content(result) != content(old):
                result["metadata"]["generation"] = old_meta.get("generation", 0) + 1
        if result == old or params.get("dryRun"):
            return self._view(rdef, result)  # a no-op write: nothing is stored, no event, same resourceVersion
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            self._store(rdef, result)  # the last finalizer is gone: the update deletes it (one DELETED event)
            self._remove(rdef, result)
        else:
            self._bump(result)
            self._store(rdef, result)
            self._emit(rdef, "MODIFIED", result)
        return self._view(rdef, result)

    def _remove(self, rdef: ResourceDef, obj: dict[str, Any]) -> None:
        self.objects[self._key(rdef, obj["metadata"].get("namespace"), obj["metadata"]["name"])].delete()
        self._bump(obj)
        self._emit(rdef, "DELETED", obj)
        self._finish_namespace(obj["metadata"].get("namespace"))

    async def _serve_update(self, request: kmock.Request) -> Any:
        rdef = self._def(request)
        if request.subresource not in (None, "status") or (request.subresource and "status" not in rdef.subresources):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        old = self._load(rdef, request.namespace, request.name)
        if old is None:
            raise _not_found(rdef, request.name)
        headers = {key.lower(): value for key, value in request.headers.items()}
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        current = self._view(rdef, copy.deepcopy(old))
        patch = request.data
        if content_type == "application/merge-patch+json" or (
                content_type == "application/strategic-merge-patch+json" and not rdef.custom):
            if not isinstance(patch, dict):
                raise _status_error(400, "BadRequest", "a merge patch must be a JSON object")
            new = merge_patch(current, patch)
        elif content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _status_error(400, "BadRequest", "a JSON patch must be a JSON array")
            try:
                new = jsonpatch.apply_patch(current, patch, in_place=False)
            except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict,
                    jsonpointer.JsonPointerException) as error:
                raise _invalid(rdef, request.name, [f"the JSON patch cannot be applied: {error}"]) from None
            except (jsonpatch.InvalidJsonPatch, TypeError, ValueError) as error:
                raise _status_error(400, "BadRequest", f"invalid JSON patch: {error}") from None
        else:
            raise _status_error(415, "UnsupportedMediaType",
                                'the body of the request was in an unknown format - accepted media types '
                                'include: application/json-patch+json, application/merge-patch+json'
                                + ("" if rdef.custom else ", application/strategic-merge-patch+json")
                                + (" (server-side apply is not emulated)" if "apply-patch" in content_type else ""))
        return self._write(rdef, old, new, request.subresource, request.params)

    async def _serve_replace(self, request: kmock.Request) -> Any:
        if request.resource is None or request.name is None:
            raise NotImplementedError
        rdef = self._def(request)
        if request.subresource not in (None, "status") or (request.subresource and "status" not in rdef.subresources):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        old = self._load(rdef, request.namespace, request.name)
        if old is None:
            raise _not_found(rdef, request.name)
        if not isinstance(request.data, dict):
            raise _status_error(400, "BadRequest", "the body of the request was not a JSON object")
        if request.data.get("metadata", {}).get("name") != request.name:
            raise _status_error(400, "BadRequest", "the name of the object does not match the name on the URL")
        return self._write(rdef, old, copy.deepcopy(request.data), request.subresource, request.params)

    def _delete(self, rdef: ResourceDef, obj: dict[str, Any], options: Mapping[str, Any],
                params: Mapping[str, str]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        pre = (options or {}).get("preconditions") or {}
        if pre.get("uid") not in (None, obj["metadata"]["uid"]) or \
                pre.get("resourceVersion") not in (None, obj["metadata"]["resourceVersion"]):
            raise _status_error(409, "Conflict", f'Operation cannot be fulfilled on {rdef.qualified_plural} '
                                f'"{name}": the preconditions do not match')
        if params.get("dryRun") or obj["metadata"].get("deletionTimestamp"):
            return obj
        is_namespace = rdef.plural == "namespaces" and not rdef.group
        if obj["metadata"].get("finalizers") or is_namespace:
            obj["metadata"]["deletionTimestamp"] = _now()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            if obj["metadata"].get("generation"):
                obj["metadata"]["generation"] += 1
            if is_namespace:
                obj.setdefault("status", {})["phase"] = "Terminating"
            self._bump(obj)
            self._store(rdef, obj)
            self._emit(rdef, "MODIFIED", obj)
            if is_namespace:
                for (res, ns, child), stored in list(self.objects.items()):
                    if ns == name and not stored.deleted:
                        child_def = next((d for d in self._all_defs() if d.storage == res), None)
                        if child_def is not None:
                            self._delete(child_def, copy.deepcopy(stored.raw), {}, {})
                self._finish_namespace(name)
            return obj
        self._remove(rdef, obj)
        return obj

    def _all_defs(self) -> list[ResourceDef]:
        defs = list(self._custom.values())
        for res in self.resources:
            if (res.group, res.version, res.plural) not in self._custom:
                defs.append(self.resource_def(res.group or "", res.version or "", res.plural or ""))
        return defs

    def _deleted_reply(self, rdef: ResourceDef, obj: dict[str, Any], gone: bool) -> Any:
        if gone and not rdef.custom:  # built-ins answer a Status once the object is gone; CRs answer the object
            return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success",
                    "details": {"name": obj["metadata"]["name"], "group": rdef.group, "kind": rdef.plural,
                                "uid": obj["metadata"]["uid"]}}
        return self._view(rdef, obj)

    async def _serve_delete(self, request: kmock.Request) -> Any:
        rdef = self._def(request)
        if request.subresource:
            raise _status_error(405, "MethodNotAllowed", "the server does not allow this method on the resource")
        obj = self._load(rdef, request.namespace, request.name)
        if obj is None:
            raise _not_found(rdef, request.name)
        options = request.data if isinstance(request.data, dict) else {}
        obj = self._delete(rdef, obj, options, request.params)
        gone = self._load(rdef, request.namespace, request.name) is None and not request.params.get("dryRun")
        return self._deleted_reply(rdef, obj, gone)

    async def _serve_delete_collection(self, request: kmock.Request) -> Any:
        if request.resource is None or request.name is not None or not request.resource.plural:
            raise NotImplementedError
        rdef = self._def(request)
        deleted = []
        for obj in self._live(rdef.storage):
            if request.namespace is not None and obj["metadata"].get("namespace") != request.namespace:
                continue
            if self._selected(self._view(rdef, obj), request.params):
                deleted.append(self._view(rdef, self._delete(rdef, obj, {}, request.params)))
        return {"apiVersion": rdef.api_version, "kind": f"{rdef.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": deleted}


# --------------------------------------------------------------------------------------------------------------
# The harness: the emulator in a thread, a kubeconfig, and a synchronous client for the tests.

def minimal_crd() -> dict[str, Any]:
    """An ImageCachePolicy CRD with the same names and status subresource, any spec (if the file is missing)."""
    anything = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {"group": GROUP, "scope": "Namespaced",
                 "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                           "singular": KIND.lower(), "shortNames": ["icp"]},
                 "versions": [{"name": VERSION, "served": True, "storage": True, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                   "spec": anything, "status": anything}}}}]},
    }


def load_crd(path: Path = CRD_PATH) -> dict[str, Any]:
    """The CRD from crds/imagecachepolicies.yaml, or minimal_crd() when the file is not there."""
    if not path.exists():
        return minimal_crd()
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    crds = [doc for doc in docs if doc.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise ValueError(f"{path}: expected one CustomResourceDefinition, found {len(crds)}")
    return crds[0]


def sample_spec(**overrides: Any) -> dict[str, Any]:
    """A small valid ImageCachePolicy spec (the required fields only); keyword arguments replace top-level keys."""
    spec = {
        "cloud": {"secretRef": {"name": "openstack-clouds"}, "cloudName": "central"},
        "ssh": {"secretRef": {"name": "compute-ssh"}},
        "images": [{"name": "cirros"}],
        "sites": [{"name": "dcn0", "nodes": [{"name": "dcn0-compute-0", "address": "192.0.2.10"}]}],
    }
    spec.update(overrides)
    return spec


class KubeAPIError(Exception):
    """A request answered with an error status; `status` is the code, `body` the metav1.Status (or text)."""

    def __init__(self, method: str, path: str, status: int, body: Any):
        self.status, self.body = status, body
        reason = body.get("reason") if isinstance(body, dict) else ""
        message = body.get("message") if isinstance(body, dict) else str(body)[:500]
        super().__init__(f"{method} {path} -> {status} {reason}: {message}")


class KubeHarness:
    """A running emulator plus a small synchronous client (the way kubectl would talk to it)."""

    def __init__(self, directory: Path, crd: dict[str, Any] | None, namespaces: Sequence[str]):
        self.directory = directory
        self.token = TOKEN
        self.kmock: RealisticKubernetes = RealisticKubernetes(token=TOKEN)
        self._crd = crd
        self._namespaces = namespaces
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="kmock-kubernetes", daemon=True)
        self.url = ""
        self.kubeconfig = directory / "kubeconfig"
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies for 127.0.0.1, whatever the environment says
        self.session.headers.update({"Authorization": f"Bearer {TOKEN}", "User-Agent": "kube-harness"})

    # ---- lifecycle

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as error:  # noqa: BLE001  # reported to the starting thread
            self._failure = error
            self._started.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.kmock, kmock.Server(self.kmock, host="127.0.0.1") as server:
            self.url = str(server.url).rstrip("/")
            self._started.set()
            await self._stop.wait()
            self.kmock.close_streams()
            await asyncio.sleep(0.05)  # let the watch streams see it and end before the server goes

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(10) or self._failure is not None:
            raise RuntimeError("the KMock server did not start") from self._failure
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": self.token}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
            "current-context": "kmock",
        }))
        for namespace in self._namespaces:
            self.create_namespace(namespace)
        if self._crd is not None:
            self.api("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", self._crd)

    def stop(self) -> None:
        self.session.close()
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("the KMock server did not stop")

    def crashes(self) -> list[BaseException]:
        """Exceptions inside the emulator other than API errors it meant to answer (bugs, not 4xx answers)."""
        errors = self.kmock._errors[-1] if self.kmock._errors else []
        return [e for e in errors if not isinstance(e, kmock.KubernetesError)]

    def inspect(self, fn: Callable[[RealisticKubernetes], T], timeout: float = 5) -> T:
        """Run fn(emulator) in the server's thread (between requests) and return its result: the safe way to
        look at `kube.kmock.objects` and the like while an operator is writing."""
        async def call() -> T:
            return fn(self.kmock)
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    # ---- a small client

    def api(self, method: str, path: str, body: Any = None, *, content_type: str | None = None,
            params: Mapping[str, str] | None = None, expect: Sequence[int] = (200, 201)) -> Any:
        """One request; the decoded JSON answer, or KubeAPIError for an unexpected status."""
        headers = {"Content-Type": content_type or "application/json"} if body is not None else {}
        data = json.dumps(body) if body is not None else None
        response = self.session.request(method, self.url + path, data=data, headers=headers, params=params,
                                        timeout=10)
        try:
            answer = response.json()
        except ValueError:
            answer = response.text
        if response.status_code not in expect:
            raise KubeAPIError(method, path, response.status_code, answer)
        return answer

    @staticmethod
    def policy_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": name}})

    def create_policy(self, name: str, spec: Mapping[str, Any], namespace: str = "default", *,
                      labels: Mapping[str, str] | None = None,
                      annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if labels:
            metadata["labels"] = dict(labels)
        if annotations:
            metadata["annotations"] = dict(annotations)
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": dict(spec)}
        return self.api("POST", self.policy_path(namespace), body)

    def patch_spec(self, name: str, spec_changes: Mapping[str, Any], namespace: str = "default") -> dict[str, Any]:
        """Merge-patch the spec (null deletes a field); the generation goes up by one if the spec changed."""
        before = self.get_policy(name, namespace)
        if before is None:
            raise KubeAPIError("PATCH", self.policy_path(namespace, name), 404, "not found")
        after = self.api("PATCH", self.policy_path(namespace, name), {"spec": dict(spec_changes)},
                         content_type="application/merge-patch+json")
        if after["spec"] != before["spec"]:
            assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1, after["metadata"]
        return after

    def patch_status(self, name: str, status: Mapping[str, Any], namespace: str = "default") -> dict[str, Any]:
        """Merge-patch the status through the status subresource (as a controller would)."""
        return self.api("PATCH", self.policy_path(namespace, name, "status"), {"status": dict(status)},
                        content_type="application/merge-patch+json")

    def delete_policy(self, name: str, namespace: str = "default", *, wait: float | None = None) -> None:
        """Ask for deletion (finalizers may hold it); with `wait`, also wait that long for the object to go."""
        self.api("DELETE", self.policy_path(namespace, name))
        if wait is not None:
            self.wait_for(lambda: self.get_policy(name, namespace) is None, wait, f"policy {namespace}/{name} to go")

    def get_policy(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        try:
            return self.api("GET", self.policy_path(namespace, name))
        except KubeAPIError as error:
            if error.status == 404:
                return None
            raise

    def list_policies(self, namespace: str | None = None) -> list[dict[str, Any]]:
        path = self.policy_path(namespace) if namespace else f"/apis/{GROUP}/{VERSION}/{PLURAL}"
        return self.api("GET", path)["items"]

    def condition(self, name: str, type_: str, namespace: str = "default") -> dict[str, Any] | None:
        """The status condition of this type, if the policy has it."""
        policy = self.get_policy(name, namespace) or {}
        return next((c for c in (policy.get("status") or {}).get("conditions") or [] if c.get("type") == type_),
                    None)

    def create_secret(self, name: str, data: Mapping[str, bytes], namespace: str = "default",
                      type: str = "Opaque") -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "type": type, "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        return self.api("POST", f"/api/v1/namespaces/{namespace}/secrets", body)

    def events(self, namespace: str = "default", *, name: str | None = None) -> list[dict[str, Any]]:
        """Events in the namespace (core/v1 form; those posted via events.k8s.io/v1 too), oldest first;
        with `name`, only those about an object of that name."""
        params = {"fieldSelector": f"involvedObject.name={name}"} if name else None
        items = self.api("GET", f"/api/v1/namespaces/{namespace}/events", params=params)["items"]
        return sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
        """Poll until the predicate is truthy and return its value; fail naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)


_ACTIVE: list[KubeHarness] = []


@contextlib.contextmanager
def kube_harness(directory: Path, *, crd: dict[str, Any] | None | bool = True,
                 namespaces: Sequence[str] = ("default", "kube-system")) -> Iterator[KubeHarness]:
    """Run the emulator for the duration; KUBECONFIG points at it, in-cluster config is hidden.

    crd: True loads crds/imagecachepolicies.yaml (or minimal_crd() if the file is missing), a dict installs
    that CRD, False/None installs none.
    """
    harness = KubeHarness(Path(directory), load_crd() if crd is True else (crd or None), namespaces)
    saved_env = {key: os.environ.get(key) for key in (
        "KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KOPF_RUN_NAMESPACE",
        "NO_PROXY", "no_proxy")}
    try:
        import kubernetes.client
        import kubernetes.config.kube_config
        saved_client_config = kubernetes.client.Configuration._default
        saved_location = kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    except ImportError:  # pragma: no cover
        kubernetes = None
    try:
        harness.start()
        os.environ["KUBECONFIG"] = str(harness.kubeconfig)
        if kubernetes is not None:
            # The client reads $KUBECONFIG once, when imported (pytest imported it long before this test), so
            # load_kube_config() without arguments would miss it; a real process has it set before it starts.
            kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(harness.kubeconfig)
            kubernetes.client.Configuration.set_default(None)
        for key in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KOPF_RUN_NAMESPACE"):
            os.environ.pop(key, None)  # or kopf's and the client's in-cluster login would win over KUBECONFIG
        for key in ("NO_PROXY", "no_proxy"):
            os.environ[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1", "localhost"]))
        _ACTIVE.append(harness)
        yield harness
    finally:
        if harness in _ACTIVE:
            _ACTIVE.remove(harness)
        harness.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if kubernetes is not None:
            kubernetes.client.Configuration._default = saved_client_config
            kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_location
    crashes = harness.crashes()
    assert not crashes, f"the emulator failed on requests (a harness bug?): {crashes!r}"


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeHarness]:
    """A running Kubernetes emulator with the ImageCachePolicy CRD and KUBECONFIG pointing at it."""
    with kube_harness(tmp_path) as harness:
        yield harness


# --------------------------------------------------------------------------------------------------------------
# The operator under KopfRunner.

def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"\[(ERROR|CRITICAL)\s*\]", line)]


@contextlib.contextmanager
def run_operator(module: str = "novacache.handlers", extra_args: Sequence[str] = (),
                 env: Mapping[str, str | None] | None = None, *, namespaces: Sequence[str] = (),
                 harness: KubeHarness | None = None, ready: tuple[str, str, str] | None = (GROUP, VERSION, PLURAL),
                 ready_timeout: float = 10.0, allow_errors: bool = False, verbose: bool = True,
                 settings: Any = None) -> Iterator[Any]:
    """Run kopf handlers (a module name, or a path to a .py file) under kopf.testing.KopfRunner.

    Runs `kopf run --standalone (-A | --namespace NS...) [--verbose] (-m MODULE | FILE) *extra_args` with a
    fresh handler registry (the module is imported anew, so handlers never leak between tests). Waits until
    the operator watches `ready` (group, version, plural; None: do not wait). On exit, stops the operator and
    asserts it exited cleanly (no exception, exit code 0) and, unless allow_errors, that it logged no ERROR
    or CRITICAL line (a handler failure, a failed API request). Yields the KopfRunner; `runner.output` holds
    the operator's log after the block.
    """
    from kopf.testing import KopfRunner
    import kopf

    harness = harness or (_ACTIVE[-1] if _ACTIVE else None)
    args = ["run", "--standalone"]
    args += [arg for ns in namespaces for arg in ("--namespace", ns)] if namespaces else ["--all-namespaces"]
    if verbose:
        args.append("--verbose")
    if module.endswith(".py") or os.sep in module:
        args.append(str(module))
    else:
        args += ["-m", module]
        for name in [name for name in sys.modules if name == module or name.startswith(module + ".")]:
            del sys.modules[name]  # so that its handlers register in this run's registry
    args += list(extra_args)
    try:  # the registry class `kopf run` uses by default: it adds kopf's standard login handlers
        from kopf._core.intents.registries import SmartOperatorRegistry as Registry
    except ImportError:  # pragma: no cover  # then the handlers must bring their own @kopf.on.login
        Registry = kopf.OperatorRegistry
    registry = Registry()
    previous = kopf.get_default_registry()
    watched = len(harness.kmock.watches) if harness else 0
    runner = KopfRunner(args, registry=registry, settings=settings, timeout=15,
                        env={"KOPF_RUN_NAMESPACE": None, **(env or {})})
    try:
        with runner:
            if harness is not None and ready is not None:
                def watching() -> bool:
                    started = [w for w in harness.kmock.watches[watched:] if w[:3] == tuple(ready)]
                    return bool(started) or runner.future.done()
                harness.wait_for(watching, ready_timeout, f"the operator to watch {'/'.join(ready)}")
            yield runner
    finally:
        kopf.set_default_registry(previous)
    output = runner.output
    assert runner.exception is None, output
    assert runner.exit_code == 0, output
    if not allow_errors:
        errors = _error_lines(output)
        assert not errors, "the operator logged errors:\n" + "\n".join(errors) + "\n\nfull log:\n" + output
