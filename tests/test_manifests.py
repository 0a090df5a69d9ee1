"""The CRD, the install manifests and the Containerfile, checked without a cluster.

How each thing is checked, so that a green run is not read as proving more than it does:

- ImageCachePolicy documents go through `admit`, an emulation of what the API server does with them: null
  fields dropped, defaults applied (Kubernetes' structural defaulting, reimplemented below), then the OpenAPI
  schema checked by jsonschema with four keywords replaced or added: `pattern` is matched by RE2, Go's regexp
  engine (Python's `re` differs: `$` also matches before a trailing newline, `\\d` matches non-ASCII digits);
  unknown fields are refused (kubectl's default strict field validation; the API server alone would drop
  them); `x-kubernetes-list-type: map` keys must be unique; and the `x-kubernetes-validations` CEL rules are
  evaluated by cel-python, with the one Kubernetes extension function they use (split) added and `duration()`
  replaced by Go's time.ParseDuration rules (cel-python's own accepts "2d", Go's does not).
- Not reproduced: the API server's CEL type checker and cost estimator. The cost arithmetic is in the CRD's
  header comment; test_the_schema_is_structural checks the maxItems/maxLength bounds it rests on.
- policy.py stays the authority: every document is also loaded with novacache.policy.load_policy, and the
  places where the two are meant to differ are listed (SCHEMA_STRICTER, OPERATOR_ONLY) and tested as such.
- The other manifests are validated against Kubernetes' own API schemas (kubernetes-validate, strict, the
  newest version it ships); kustomize is emulated just enough to list what `kubectl apply -k` creates.
- The Argo CD health check runs in Lua 5.1 (lupa), the Lua version Argo CD's interpreter implements.
"""

from __future__ import annotations

import copy
import decimal
import functools
import re
import tomllib
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import kubernetes_validate
import lupa.lua51
import pytest
import re2
import yaml
from celpy import celtypes

import test_policy  # its FULL and minimal() are the policy tests' valid documents
from novacache.policy import PolicyError, load_policy, parse_duration

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "imagecachepolicies.yaml"
MANIFESTS = ROOT / "manifests"
K8S_VERSION = kubernetes_validate.utils.latest_version()

CRD = yaml.safe_load(CRD_FILE.read_text())
[VERSION] = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
API_VERSION = f"{CRD['spec']['group']}/{VERSION['name']}"
IMAGE_ID = test_policy.IMAGE_ID


def load_yaml_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


# ---- the API server, as far as Python can play it ------------------------------------------------------------

_GO_UNITS = {"ns": 1, "us": 10 ** 3, "µs": 10 ** 3, "μs": 10 ** 3, "ms": 10 ** 6, "s": 10 ** 9, "m": 60 * 10 ** 9,
             "h": 3600 * 10 ** 9}
_GO_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def go_duration(text: Any) -> celtypes.DurationType:
    """CEL's duration(string) as cel-go implements it: Go's time.ParseDuration (no 'd' unit, at most ~292y)."""
    text = str(text)
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    if body == "0":
        return celtypes.DurationType(0)
    if not body:
        raise ValueError(f"time: invalid duration {text!r}")
    nanos, position = decimal.Decimal(0), 0
    while position < len(body):
        part = _GO_PART.match(body, position)
        if not part or part.group(1) in ("", "."):
            raise ValueError(f"time: invalid duration {text!r}")
        nanos += decimal.Decimal(part.group(1).rstrip(".") or "0") * _GO_UNITS[part.group(2)]
        position = part.end()
    if nanos > 2 ** 63 - 1:
        raise ValueError(f"time: invalid duration {text!r}")
    seconds, rest = divmod(int(nanos), 10 ** 9)
    return celtypes.DurationType(sign * seconds, sign * rest)


def _cel_split(text: Any, separator: Any) -> celtypes.ListType:
    """Kubernetes' <string>.split(<string>) (cel-go's strings extension)."""
    return celtypes.ListType([celtypes.StringType(part) for part in str(text).split(str(separator))])


_CEL_FUNCTIONS = {"duration": go_duration, "split": _cel_split}
_CEL = celpy.Environment()


@functools.cache
def cel_program(rule: str) -> celpy.Runner:
    return _CEL.program(_CEL.compile(rule), functions=_CEL_FUNCTIONS)


def cel_rule_holds(rule: str, value: Any) -> bool:
    """A rule the API server would evaluate with self = value; an evaluation error fails the rule, as there."""
    try:
        result = cel_program(rule).evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError:
        return False
    return not isinstance(result, celpy.CELEvalError) and bool(result)


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _properties(validator: Any, properties: dict, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, schema)
    if validator.is_type(instance, "object") and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key in instance:
            if key not in properties:
                yield jsonschema.ValidationError(f"unknown field {key!r}")


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    if list_type == "map" and validator.is_type(instance, "array"):
        keys, seen = schema["x-kubernetes-list-map-keys"], set()
        for item in instance:
            if isinstance(item, dict):
                key = tuple(item.get(name) for name in keys)
                if key in seen:
                    yield jsonschema.ValidationError(f"Duplicate value: {dict(zip(keys, key))}")
                seen.add(key)


def _validations(validator: Any, rules: list, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        if not cel_rule_holds(rule["rule"], instance):
            yield jsonschema.ValidationError(rule.get("message") or f"failed rule: {rule['rule']}")


KubernetesValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {
    "pattern": _pattern, "properties": _properties,
    "x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _validations})


def drop_nulls(value: Any) -> Any:
    """Null fields that the schema does not declare nullable (none are) are dropped before defaulting."""
    if isinstance(value, dict):
        return {key: drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [drop_nulls(item) for item in value]
    return value


def apply_defaults(value: Any, schema: dict) -> Any:
    """Kubernetes' structural defaulting: fill missing fields that have defaults, then descend (into those too)."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name, field in properties.items():
            if "default" in field and name not in value:
                value[name] = copy.deepcopy(field["default"])
        for name, item in value.items():
            if name in properties:
                apply_defaults(item, properties[name])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(item, schema["items"])
    return value


def schema_errors(value: Any, schema: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
                  for error in KubernetesValidator(schema).iter_errors(value))


def admit(document: Any) -> list[str]:
    """What the API server (and kubectl's strict field validation) would say to creating this; [] is stored."""
    if not isinstance(document, dict):
        return ["(root): not an object"]
    errors = []
    if (document.get("apiVersion"), document.get("kind")) != (API_VERSION, CRD["spec"]["names"]["kind"]):
        errors.append("(root): not an ImageCachePolicy of this CRD's version")
    if not (document.get("metadata") or {}).get("name"):
        errors.append("metadata.name: required")
    return errors + schema_errors(apply_defaults(drop_nulls(copy.deepcopy(document)), SCHEMA), SCHEMA)


def policy_problems(document: Any) -> dict[str, str]:
    try:
        load_policy(copy.deepcopy(document))
    except PolicyError as error:
        return dict(error.problems)
    return {}


# ---- documents ---------------------------------------------------------------------------------------------

def complete() -> dict[str, Any]:
    """A valid document setting every field the schema has (test_every_schema_field_is_exercised checks that)."""
    document = yaml.safe_load(test_policy.FULL)
    spec = document["spec"]
    spec["nodeSsh"] = {"user": "nova", "port": 2022, "identityFile": "/var/lib/nova/.ssh/id_ed25519",
                       "knownHostsFile": "/var/lib/nova/.ssh/known_hosts", "strictHostKeyChecking": False}
    spec["strategy"] = "proxy"
    spec["limits"]["chainsPerSite"] = 2
    spec["sites"][0].update(strategy="pipeline", seedNode="dcn0-compute-1.example.com")
    return document


def inheriting() -> dict[str, Any]:
    """Spec-level values that sites and nodes inherit, set away from their defaults."""
    document = test_policy.minimal()
    document["spec"].update(strategy="direct", ttl="8h", novaConf="/srv/nova/nova.conf")
    document["spec"]["ssh"]["port"] = 2222
    return document


def sample_policy() -> dict[str, Any]:
    [document] = load_yaml_documents(MANIFESTS / "policy-sample.yaml")
    return document


def edited(path: str, value: Any, document: dict | None = None) -> dict[str, Any]:
    return test_policy.edited(path, value, document or test_policy.minimal())


def deleted(path: tuple, document: dict) -> dict:
    document = copy.deepcopy(document)
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return document


def dotted(path: tuple) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path).lstrip(".")


def object_schemas(schema: dict, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every object schema with properties, with a document path to one instance of it ([0] for list items)."""
    if schema.get("type") == "object" and "properties" in schema:
        yield path, schema
        for name, field in schema["properties"].items():
            yield from object_schemas(field, path + (name,))
    elif schema.get("type") == "array":
        yield from object_schemas(schema["items"], path + (0,))


def spec_object_schemas() -> list[tuple[tuple, dict]]:
    return [(path, schema) for path, schema in object_schemas(SCHEMA) if path[:1] in ((), ("spec",))]


def document_fields(document: Any, schema: dict, path: tuple = (), where: tuple = ()) -> Iterator[tuple[tuple, tuple]]:
    """(path in the document, path in the schema) of every field the document sets that the schema declares."""
    if isinstance(document, dict) and "properties" in schema:
        for name, value in document.items():
            if name in schema["properties"]:
                yield path + (name,), where + (name,)
                yield from document_fields(value, schema["properties"][name], path + (name,), where + (name,))
    elif isinstance(document, list) and "items" in schema:
        for index, item in enumerate(document):
            yield from document_fields(item, schema["items"], path + (index,), where + ("[]",))


def spec_field_paths() -> list[tuple]:
    """Every field that complete() sets under spec (spec included), like ("spec", "sites", 0, "name")."""
    return [path for path, _ in document_fields(complete(), SCHEMA) if path[0] == "spec"]


def schema_field_paths(schema: dict, where: tuple = ()) -> Iterator[tuple]:
    for name, field in schema.get("properties", {}).items():
        yield where + (name,)
        yield from schema_field_paths(field, where + (name,))
    if "items" in schema:
        yield from schema_field_paths(schema["items"], where + ("[]",))


# ---- the CRD itself ------------------------------------------------------------------------------------------

def test_the_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(CRD, K8S_VERSION, strict=True)


def test_the_crd_names_group_version_and_scope() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["group"] == "imagecache.openstack.org" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "ImageCachePolicy", "listKind": "ImageCachePolicyList",
                             "plural": "imagecachepolicies", "singular": "imagecachepolicy",
                             "shortNames": ["icp"], "categories": ["openstack"]}
    assert (VERSION["name"], VERSION["served"], VERSION["storage"]) == ("v1alpha1", True, True)
    assert VERSION["subresources"] == {"status": {}}
    assert API_VERSION == "imagecache.openstack.org/v1alpha1"


def schema_nodes(schema: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    yield path or "(root)", schema
    for name, field in schema.get("properties", {}).items():
        yield from schema_nodes(field, f"{path}.{name}")
    if "items" in schema:
        yield from schema_nodes(schema["items"], f"{path}[]")


INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def test_the_schema_is_structural() -> None:
    """The rules the API server enforces for apiextensions.k8s.io/v1 schemas, and the bounds CEL costing needs."""
    assert SCHEMA["properties"]["metadata"] == {"type": "object"}  # nothing more is allowed there
    for path, node in schema_nodes(SCHEMA):
        assert not {"allOf", "oneOf", "not", "additionalProperties", "nullable", "$ref"} & set(node), path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node and node["anyOf"] == INT_OR_STRING, path
            assert "maxLength" in node, f"{path}: CEL costing and etcd want every string bounded"
        elif node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" not in node and not {"properties", "items", "anyOf"} & set(node), path
        else:
            assert node.get("type") in ("object", "array", "string", "integer", "boolean"), path
            assert "anyOf" not in node, path
        for name in node.get("required", []):
            assert name in node["properties"], f"{path}: required {name} is not a property"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: CEL costing needs maxItems on every list"
        if node.get("type") == "string" and "enum" not in node and node.get("format") != "date-time" \
                and path not in (".apiVersion", ".kind"):  # the API server sets these two
            assert "maxLength" in node, f"{path}: CEL costing needs maxLength on every string"
        if node.get("x-kubernetes-list-type") == "map":
            items = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in items["required"] and items["properties"][key]["type"] == "string", path
        if "enum" in node:
            assert all(isinstance(value, str) for value in node["enum"]) and node["type"] == "string", path


def test_every_default_is_valid_where_it_is_defaulted() -> None:
    """The API server refuses a CRD whose defaults fail their own schema (CEL rules included)."""
    defaults = [(path, node) for path, node in schema_nodes(SCHEMA) if "default" in node]
    assert len(defaults) >= 15
    for path, node in defaults:
        value = apply_defaults(copy.deepcopy(node["default"]), node)
        assert schema_errors(value, node) == [], path


def all_rules() -> list[tuple[str, dict]]:
    return [(path, rule) for path, node in schema_nodes(SCHEMA) for rule in node.get("x-kubernetes-validations", [])]


@pytest.mark.parametrize(("path", "rule"), all_rules(), ids=[path for path, _ in all_rules()])
def test_cel_rules_compile_and_have_one_line_messages(path: str, rule: dict) -> None:
    cel_program(rule["rule"])  # parses; the API server's type check is not reproduced here
    assert rule["message"] and "\n" not in rule["message"]
    assert rule.get("reason", "FieldValueInvalid") in (
        "FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate")
    node = dict(schema_nodes(SCHEMA))[path]
    if "fieldPath" in rule:
        assert rule["fieldPath"].lstrip(".") in node["properties"]


def test_the_rules_use_only_functions_this_test_emulates() -> None:
    """A Kubernetes-only CEL function that cel-python lacks must be added to _CEL_FUNCTIONS, not go untested."""
    used = {name for _, rule in all_rules() for name in re.findall(r"\.?([A-Za-z_]\w*)\(", rule["rule"])}
    known = {"has", "type", "int", "duration", "getSeconds", "endsWith", "contains", "split", "exists"}
    assert used <= known, used - known


def test_printer_columns() -> None:
    columns = {column["name"]: column for column in VERSION["additionalPrinterColumns"]}
    assert list(columns) == ["Ready", "Cached", "Images", "Last Refresh", "Age"]
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Cached"]["jsonPath"] == ".status.summary.cached"
    assert columns["Images"]["jsonPath"] == ".status.summary.images"
    assert (columns["Last Refresh"]["jsonPath"], columns["Last Refresh"]["type"]) == (".status.lastRefreshTime",
                                                                                       "date")
    assert (columns["Age"]["jsonPath"], columns["Age"]["type"]) == (".metadata.creationTimestamp", "date")
    for column in list(columns.values())[:-1]:  # each reads a field the status schema declares, of its type
        node = SCHEMA
        for step in column["jsonPath"].replace('[?(@.type=="Ready")]', "").split(".")[1:]:
            node = node.get("items", node)["properties"][step]
        if column["type"] == "date":
            assert node.get("format") == "date-time", column
        else:
            assert node["type"] == column["type"], column


# ---- the status the operator writes --------------------------------------------------------------------------

def a_status() -> dict[str, Any]:
    """A status as status.py is to write it (every field)."""
    return {
        "observedGeneration": 3,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "AllCached", "message": "6 of 6 node-image pairs cached",
             "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 3},
            {"type": "Reconciling", "status": "False", "reason": "Idle", "message": "",
             "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 3},
            {"type": "Stalled", "status": "False", "reason": "Valid", "message": "",
             "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 3},
        ],
        "summary": {"nodes": 3, "nodesReady": 3, "images": 2, "cached": "6/6", "bytesMoved": 3 * 2 ** 33},
        "sites": [{"name": "dcn0", "nodes": 2, "nodesReady": 2, "imagesCached": 2, "bytesMoved": 2 ** 34},
                  {"name": "dcn1", "nodes": 1, "nodesReady": 1, "imagesCached": 2, "bytesMoved": 2 ** 33}],
        "failures": [{"site": "dcn1", "node": "dcn1-compute-0", "image": "cirros", "reason": "disk reserve"}],
        "lastRefreshTime": "2025-01-01T00:00:00Z",
        "nextRefreshTime": "2025-01-01T06:00:00Z",
    }


STATUS_SCHEMA = SCHEMA["properties"]["status"]


def test_a_full_status_fits_the_status_schema() -> None:
    assert schema_errors(a_status(), STATUS_SCHEMA) == []
    assert set(STATUS_SCHEMA["properties"]) == set(a_status())


@pytest.mark.parametrize(("field", "value"), [
    ("conditions", [{"type": "Ready", "status": "Yes"}]),
    ("conditions", [{"type": "Ready", "status": "True"}, {"type": "Ready", "status": "False"}]),
    ("conditions", [{"status": "True"}]),
    ("summary", {"cached": "five of six"}),
    ("failures", [{"reason": "x"}] * 21),
    ("observedGeneration", -1),
    ("bogus", 1),
])
def test_a_malformed_status_is_refused(field: str, value: Any) -> None:
    assert schema_errors({**a_status(), field: value}, STATUS_SCHEMA)


# ---- valid documents: accepted by both the schema and policy.py ---------------------------------------------

GOOD_EDITS = [
    ("spec.images[0].id", IMAGE_ID.upper()),
    ("spec.images", [{"id": IMAGE_ID}, {"name": "cirros 0.6.2 (x86_64)"}, {"name": "c" * 255}]),
    ("spec.ttl", "1m"), ("spec.ttl", 60), ("spec.ttl", "60"), ("spec.ttl", "2d"), ("spec.ttl", "1d12h30m15s"),
    ("spec.refreshInterval", "5h59m59s"), ("spec.refreshInterval", 3600), ("spec.refreshInterval", "3600"),
    ("spec.verify", "checksum"), ("spec.strategy", "direct"), ("spec.strategy", "proxy"),
    ("spec.novaConf", "/etc/nova/nova.conf"), ("spec.novaConf", ["/etc/nova/nova.conf", "/srv/nova.conf"]),
    ("spec.ssh.user", "_novacache"), ("spec.ssh.user", "u" * 32), ("spec.ssh.port", 65535),
    ("spec.ssh.secretRef", {"name": "compute-ssh", "privateKeyKey": "...", "knownHostsKey": ".hosts"}),
    ("spec.cloud.secretRef", {"name": "a.b-c", "key": "my_clouds.yaml"}),
    ("spec.limits", {"glanceStreams": 64, "chainsPerSite": 64, "diskReserve": 4096, "staleTempAge": 90}),
    ("spec.limits", {"diskReserve": "512MiB"}), ("spec.limits", {"diskReserve": "1GB"}),
    ("spec.limits", {"diskReserve": "1.5G"}), ("spec.limits", {"diskReserve": "10 GiB"}),
    ("spec.nodeSsh", {}), ("spec.nodeSsh", {"identityFile": "/etc/nova/./migration//id.key", "port": 22}),
    ("spec.sites[0].name", "s" * 63),
    ("spec.sites[0].nodes[0].name", ".".join(["x" * 63] * 3 + ["y" * 61])),
    ("spec.sites[0].nodes[0].address", "2001:db8::10"), ("spec.sites[0].nodes[0].address", "fe80::1%eth0"),
    ("spec.sites[0].nodes[0].address", "::1"), ("spec.sites[0].nodes[0].address", "Compute-0.DCN0.example.com"),
    ("spec.sites[0].seedNode", "dcn0-compute-0"), ("spec.sites[0].strategy", "direct"),
    ("spec.sites", [{"name": f"dcn{i}", "nodes": [{"name": f"dcn{i}-compute-0", "address": f"192.0.2.{i}"}]}
                    for i in range(50)]),
    ("spec.verify", None),  # null: left out, so defaulted
]


def good_documents() -> list[tuple[str, dict]]:
    return ([("minimal", test_policy.minimal()), ("FULL", yaml.safe_load(test_policy.FULL)),
             ("complete", complete()), ("inheriting", inheriting()), ("policy-sample.yaml", sample_policy())]
            + [(f"{path}={value!r}"[:80], edited(path, value)) for path, value in GOOD_EDITS])


@pytest.mark.parametrize(("name", "document"), good_documents(), ids=[name for name, _ in good_documents()])
def test_valid_policies_are_accepted_by_the_schema_and_by_policy_py(name: str, document: dict) -> None:
    assert policy_problems(document) == {}
    assert admit(document) == []


# ---- invalid documents: refused by both ----------------------------------------------------------------------

TWO_SITES_SAME_NAME = [{"name": "dcn0", "nodes": [{"name": "a", "address": "192.0.2.1"}]},
                       {"name": "dcn0", "nodes": [{"name": "b", "address": "192.0.2.2"}]}]
TWO_NODES_SAME_NAME = [{"name": "a", "address": "192.0.2.1"}, {"name": "a", "address": "192.0.2.2"}]

BAD_EDITS = [
    # image ids, names, and exactly one of the two
    ("spec.images[0].id", "not-a-uuid"), ("spec.images[0].id", IMAGE_ID.replace("-", "")),
    ("spec.images[0].id", IMAGE_ID + "\n"), ("spec.images[0].id", "g" + IMAGE_ID[1:]), ("spec.images[0].id", 42),
    ("spec.images[0]", {}), ("spec.images[0]", {"id": IMAGE_ID, "name": "cirros"}), ("spec.images[0]", "cirros"),
    ("spec.images", []), ("spec.images", None), ("spec.images", [{"name": ""}]), ("spec.images", [{"name": "   "}]),
    ("spec.images", [{"name": "a\nb"}]), ("spec.images", [{"name": "c" * 256}]),
    # strategy, verify
    ("spec.strategy", "fastest"), ("spec.sites[0].strategy", "p2p"), ("spec.verify", "sha256"),
    # durations, and refreshInterval shorter than ttl (24h when left out)
    ("spec.ttl", "soon"), ("spec.ttl", "59s"), ("spec.ttl", 59), ("spec.ttl", "0s"), ("spec.ttl", "24 h"),
    ("spec.ttl", "1.5h"), ("spec.ttl", True), ("spec.ttl", "-1h"), ("spec.ttl", ""),
    ("spec.refreshInterval", "24h"), ("spec.refreshInterval", "25h"), ("spec.refreshInterval", 86400),
    ("spec.refreshInterval", "86400"), ("spec.refreshInterval", "1d"), ("spec.refreshInterval", "0s"),
    ("spec.refreshInterval", "0"), ("spec.refreshInterval", 0), ("spec.refreshInterval", "1h30"),
    # ssh
    ("spec.ssh.port", 0), ("spec.ssh.port", 65536), ("spec.ssh.port", "22"), ("spec.ssh.port", 22.5),
    ("spec.sites[0].nodes[0].port", -22), ("spec.ssh.user", "root; reboot"), ("spec.ssh.user", "Root"),
    ("spec.ssh.user", "u" * 33), ("spec.ssh.user", "root\n"), ("spec.ssh.trustOnFirstUse", "yes"),
    ("spec.ssh", "compute-ssh"), ("spec.ssh", None), ("spec.ssh.secretRef", {}),
    # secrets and the cloud
    ("spec.cloud.secretRef.name", "Compute_SSH"), ("spec.ssh.secretRef.name", "../etc"),
    ("spec.ssh.secretRef.privateKeyKey", ".."), ("spec.ssh.secretRef.privateKeyKey", "."),
    ("spec.ssh.secretRef.knownHostsKey", "a/b"), ("spec.cloud.secretRef.key", "key name"),
    ("spec.cloud.cloudName", ""), ("spec.cloud.cloudName", "central\nother"), ("spec.cloud.cloudName", " "),
    ("spec.cloud", None), ("spec.cloud", {"cloudName": "central"}),
    # sites and nodes
    ("spec.sites", []), ("spec.sites", None), ("spec.sites", TWO_SITES_SAME_NAME),
    ("spec.sites[0].name", "DCN0"), ("spec.sites[0].name", "dcn_0"), ("spec.sites[0].name", "x" * 64),
    ("spec.sites[0].name", "dcn0\n"), ("spec.sites[0].nodes", []), ("spec.sites[0].nodes", TWO_NODES_SAME_NAME),
    ("spec.sites[0].nodes[0].name", "Compute-0"), ("spec.sites[0].nodes[0].name", "compute_0"),
    ("spec.sites[0].nodes[0].address", "$(reboot)"), ("spec.sites[0].nodes[0].address", "-oProxyCommand=reboot"),
    ("spec.sites[0].nodes[0].address", "10.0.0.1; rm -rf /"), ("spec.sites[0].nodes[0].address", "root@192.0.2.10"),
    ("spec.sites[0].nodes[0].address", "[2001:db8::10]"), ("spec.sites[0].nodes[0].address", "192.0.2.10 -p 2222"),
    ("spec.sites[0].nodes[0].address", ""), ("spec.sites[0].nodes[0].address", "192.0.2.10\n"),
    ("spec.sites[0].seedNode", "dcn9-compute-0"), ("spec.sites[0].seedNode", "Not A Node"),
    # node-to-node ssh
    ("spec.nodeSsh", {"identityFile": "etc/nova/id"}), ("spec.nodeSsh", {"identityFile": "/etc/nova/../shadow"}),
    ("spec.nodeSsh", {"knownHostsFile": "/etc/nova/"}), ("spec.nodeSsh", {"knownHostsFile": "/"}),
    ("spec.nodeSsh", {"identityFile": "/etc/nova/$(reboot)"}), ("spec.nodeSsh", {"port": 0}),
    ("spec.nodeSsh", {"user": "Root"}), ("spec.nodeSsh", {"strictHostKeyChecking": "no"}),
    ("spec.nodeSsh", {"identityFile": "/etc/nova/id\n"}),
    # limits
    ("spec.limits", {"glanceStreams": 0}), ("spec.limits", {"chainsPerSite": 0}),
    ("spec.limits", {"glanceStreams": "5"}), ("spec.limits", {"diskReserve": "lots"}),
    ("spec.limits", {"diskReserve": -1}), ("spec.limits", {"diskReserve": 0}), ("spec.limits", {"staleTempAge": "0s"}),
    ("spec.limits", {"staleTempAge": "an hour"}), ("spec.limits", {"staleTempAge": 0}),
    # typos and missing pieces
    ("spec.imagez", [{"id": IMAGE_ID}]), ("spec.sites[0].nodes[0].adress", "192.0.2.10"),
    ("spec.limits", {"glanceStream": 5}), ("spec", None), ("kind", "ImagePolicy"),
    ("apiVersion", "imagecache.openstack.org/v1"),
]


def _ids(edits: list) -> list[str]:
    return [f"{path}={value!r}"[:90] for path, value in edits]


@pytest.mark.parametrize(("path", "value"), BAD_EDITS, ids=_ids(BAD_EDITS))
def test_invalid_policies_are_refused_by_the_schema_and_by_policy_py(path: str, value: Any) -> None:
    document = edited(path, value)
    assert policy_problems(document), "policy.py accepts it, so the schema must not be the only one refusing"
    assert admit(document), "the API server would store it"


@pytest.mark.parametrize(("ttl", "refresh"), [
    ("24h", "6h"), ("24h", "24h"), ("24h", "23h59m59s"), ("2d", "1d"), ("2d", "47h"), ("2d", "2d"), ("2d", "48h"),
    ("1d", "1d1s"), ("1d12h", "36h"), ("1d12h", "35h59m"), (86400, "6h"), (86400, 86399), (86400, 86400),
    ("86400", "1d"), ("3600", 3599), ("90m", "1h30m"), ("90m", "1h29m"), ("1m", "59s"), ("1m", 60), (3600, "0d1h"),
])
def test_refresh_interval_below_ttl_is_checked_for_every_duration_form(ttl: Any, refresh: Any) -> None:
    """The CEL rule converts every form policy.parse_duration takes (days included), so the two always agree."""
    document = edited("spec.ttl", ttl, edited("spec.refreshInterval", refresh))
    shorter = parse_duration(refresh) < parse_duration(ttl)
    assert (admit(document) == []) is shorter
    assert (policy_problems(document) == {}) is shorter


# ---- where the schema and policy.py differ on purpose --------------------------------------------------------

SCHEMA_STRICTER = [
    # Sane bounds that policy.py does not have (they keep CEL costs, status size and Glance load bounded).
    ("spec.limits", {"glanceStreams": 65}), ("spec.limits", {"chainsPerSite": 65}),
    ("spec.images", [{"name": f"image-{i}"} for i in range(501)]),
    ("spec.sites[0].nodes", [{"name": f"n{i}", "address": f"10.0.{i // 250}.{i % 250 + 1}"} for i in range(501)]),
    ("spec.nodeSsh", {"identityFile": "/" + "a" * 4096}),
    # Durations and sizes exactly as written: policy.py also strips surrounding blanks.
    ("spec.ttl", " 24h"), ("spec.limits", {"diskReserve": "1GiB "}),
    # Durations past Go's ~292 years fail the CEL conversion.
    ("spec.ttl", "3000000h"),
]

OPERATOR_ONLY = [
    # Left to the operator (Stalled=True): too costly in CEL, or not expressible in a structural schema.
    ("spec.images", [{"id": IMAGE_ID}, {"id": IMAGE_ID.upper()}]),
    ("spec.images", [{"name": "cirros"}, {"name": "cirros"}]),
    ("spec.sites", [{"name": "dcn0", "nodes": [{"name": "compute-0", "address": "192.0.2.1"}]},
                    {"name": "dcn1", "nodes": [{"name": "compute-0", "address": "192.0.2.2"}]}]),
    ("spec.novaConf", "nova.conf"), ("spec.novaConf", []), ("spec.sites[0].novaConf", 42),
    ("spec.sites[0].nodes[0].novaConf", ["/etc/nova/../nova.conf"]),
    ("spec.limits", {"diskReserve": "0GiB"}),
    ("spec.cloud.cloudName", "\u3000"),  # blank in Unicode, not in ASCII
    ("spec.sites[0].nodes[0].address", "10.0.0.256"), ("spec.sites[0].nodes[0].address", "host_name"),
    ("spec.sites[0].nodes[0].address", "compute-0..example.com"),
]


@pytest.mark.parametrize(("path", "value"), SCHEMA_STRICTER, ids=_ids(SCHEMA_STRICTER))
def test_where_the_schema_is_stricter_than_policy_py(path: str, value: Any) -> None:
    document = edited(path, value)
    assert policy_problems(document) == {}
    assert admit(document)


@pytest.mark.parametrize(("path", "value"), OPERATOR_ONLY, ids=_ids(OPERATOR_ONLY))
def test_what_only_the_operator_refuses(path: str, value: Any) -> None:
    document = edited(path, value)
    assert admit(document) == []
    assert policy_problems(document)


# ---- the schema describes exactly policy.py's spec -----------------------------------------------------------

# Fields the lead was adding to policy.py while this file was written; if a checkout lacks them, the field
# comparisons skip (with this reason) instead of failing.
PENDING_IN_POLICY = {"strategy", "seedNode", "nodeSsh", "chainsPerSite"}


def policy_fields_at(path: tuple) -> set[str] | None:
    """The fields policy.py knows at path, read from its message for an unknown field put there."""
    document = complete()
    target = document
    for step in path:
        target = target[step]
    target["zzUnknownField"] = 1
    message = policy_problems(document).get(dotted(path + ("zzUnknownField",)), "")
    found = re.search(r"the fields here are (.*)$", message)
    return set(found.group(1).split(", ")) if found else None


@pytest.mark.parametrize(("path", "schema"), spec_object_schemas(),
                         ids=[dotted(path) or "(root)" for path, _ in spec_object_schemas()])
def test_each_object_has_the_same_fields_in_the_schema_and_in_policy_py(path: tuple, schema: dict) -> None:
    known = policy_fields_at(path)
    if known is None and set(path) & PENDING_IN_POLICY:
        pytest.skip(f"policy.py does not take {dotted(path)} yet (pending: {sorted(PENDING_IN_POLICY)})")
    assert known is not None, f"policy.py does not read {dotted(path)} as a mapping of fields"
    missing = set(schema["properties"]) - known
    if missing and missing <= PENDING_IN_POLICY:
        pytest.skip(f"policy.py does not take {sorted(missing)} at {dotted(path) or '(root)'} yet")
    assert set(schema["properties"]) == known


def test_every_schema_field_is_exercised() -> None:
    """complete() sets every spec field, so the comparisons around this test reach the whole schema."""
    covered = {where for _, where in document_fields(complete(), SCHEMA)}
    assert set(schema_field_paths(SCHEMA["properties"]["spec"], ("spec",))) <= covered


# Leaving these out is refused by a CEL rule (exactly one of id or name), not by `required`.
ONE_OF = {("spec", "images", "[]", "id"), ("spec", "images", "[]", "name")}

def test_required_fields_are_the_ones_policy_py_requires() -> None:
    for path, where in document_fields(complete(), SCHEMA):
        if path[0] != "spec":
            continue
        parent = SCHEMA
        for step in where[:-1]:
            parent = parent["items"] if step == "[]" else parent["properties"][step]
        required = where[-1] in parent.get("required", [])
        refused = bool(policy_problems(deleted(path, complete())))
        assert refused == (required or where in ONE_OF), dotted(path)


@pytest.mark.parametrize("path", spec_field_paths(), ids=[dotted(path) for path in spec_field_paths()])
@pytest.mark.parametrize("how", ["left out", "null"])
def test_leaving_out_any_field_is_judged_alike(path: tuple, how: str) -> None:
    """Both drop or refuse each field alike: required ones are refused, optional ones take their default."""
    document = deleted(path, complete()) if how == "left out" else test_policy.edited(dotted(path), None,
                                                                                       complete())
    assert (admit(document) == []) == (policy_problems(document) == {})


@pytest.mark.parametrize("document", [test_policy.minimal(), inheriting(), complete()],
                         ids=["minimal", "inheriting", "complete"])
def test_the_schema_defaults_mean_what_policy_py_defaults_mean(document: dict) -> None:
    """Defaulted by the API server or not, the policy is the same; fields that inherit have no default."""
    assert load_policy(apply_defaults(copy.deepcopy(document), SCHEMA)) == load_policy(document)


def test_fields_that_inherit_or_derive_have_no_default() -> None:
    spec = SCHEMA["properties"]["spec"]["properties"]
    site = spec["sites"]["items"]["properties"]
    node = site["nodes"]["items"]["properties"]
    for field in (spec["refreshInterval"], spec["novaConf"], spec["nodeSsh"]["properties"]["port"], site["strategy"],
                  site["novaConf"], site["seedNode"], node["port"], node["novaConf"]):
        assert "default" not in field


# ---- manifests -------------------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def kustomize_build(directory: Path) -> list[dict]:
    """What `kubectl apply -k directory` applies, for the features our kustomizations use (and checks those)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images"}
    objects: list[dict] = []
    for entry in kustomization["resources"]:
        target = (directory / entry).resolve()
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{entry}: a directory without kustomization.yaml"
            objects += kustomize_build(target)
        else:
            assert target.is_file(), f"{entry} does not exist"
            # kustomize's default load restrictor: single files only from this directory or below
            assert directory.resolve() in target.parents, f"{entry}: kustomize refuses files outside {directory}"
            objects += load_yaml_documents(target)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    return objects


INSTALLED = kustomize_build(MANIFESTS)


def installed(kind: str) -> list[dict]:
    return [obj for obj in INSTALLED if obj["kind"] == kind]


def manifest_files() -> list[Path]:
    return sorted(path for path in MANIFESTS.glob("*.yaml") if path.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_every_manifest_is_valid_for_kubernetes(path: Path) -> None:
    for document in load_yaml_documents(path):
        if document.get("apiVersion") == API_VERSION:
            assert admit(document) == [] and policy_problems(document) == {}
        else:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_kubectl_apply_k_installs_the_crd_namespace_rbac_and_operator_only() -> None:
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for obj in INSTALLED)
    assert kinds == sorted([
        ("CustomResourceDefinition", "imagecachepolicies.imagecache.openstack.org"),
        ("Namespace", "nova-image-cache"),
        ("ServiceAccount", "nova-image-cache-operator"),
        ("ClusterRole", "nova-image-cache-operator"), ("ClusterRole", "nova-image-cache-operator-secrets"),
        ("ClusterRoleBinding", "nova-image-cache-operator"),
        ("ClusterRoleBinding", "nova-image-cache-operator-secrets"),
        ("ClusterRole", "nova-image-cache-policies-view"), ("ClusterRole", "nova-image-cache-policies-edit"),
        ("Deployment", "nova-image-cache-operator"),
    ])
    assert installed("CustomResourceDefinition")[0] == CRD
    assert {obj["metadata"]["namespace"] for obj in INSTALLED if obj["kind"] not in CLUSTER_SCOPED} == {
        "nova-image-cache"}
    for obj in INSTALLED:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_examples_are_not_installed() -> None:
    resources = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    assert not {"secret-examples.yaml", "policy-sample.yaml", "argocd-health-patch.yaml"} & set(resources)
    assert not installed("Secret") and not installed("ImageCachePolicy") and not installed("ConfigMap")


def test_the_image_is_set_through_kustomize() -> None:
    [image] = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["images"]
    assert image["name"] == "nova-image-cache-operator" and image["newName"] and image["newTag"]
    [deployment] = load_yaml_documents(MANIFESTS / "deployment.yaml")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image["name"]
    [built] = installed("Deployment")
    assert built["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"


# The operator's rights, exactly: (API group, resource) -> verbs.
OPERATOR_RIGHTS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},  # kopf's CRD observer
    ("imagecache.openstack.org", "imagecachepolicies"): {"get", "list", "watch", "patch"},
    ("imagecache.openstack.org", "imagecachepolicies/status"): {"get", "patch"},
    ("", "events"): {"create"},  # kopf posts core v1 Events and never patches them
    ("", "secrets"): {"get"},  # the two Secrets a policy names
}


def test_the_operator_has_exactly_the_least_rights() -> None:
    [account] = installed("ServiceAccount")
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"],
               "namespace": account["metadata"]["namespace"]}
    roles = {role["metadata"]["name"]: role for role in installed("ClusterRole")}
    assert not installed("Role") and not installed("RoleBinding")
    rights: dict[tuple[str, str], set[str]] = {}
    for binding in installed("ClusterRoleBinding"):
        assert binding["subjects"] == [subject] and binding["roleRef"]["kind"] == "ClusterRole"
        for rule in roles[binding["roleRef"]["name"]]["rules"]:
            assert not {"resourceNames", "nonResourceURLs"} & set(rule)
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert "*" not in (group, resource, *rule["verbs"])
                    rights.setdefault((group, resource), set()).update(rule["verbs"])
    assert rights == OPERATOR_RIGHTS
    [deployment] = installed("Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_people_get_policy_rights_through_aggregation_only() -> None:
    bound = {binding["roleRef"]["name"] for binding in installed("ClusterRoleBinding")}
    for name in ("nova-image-cache-policies-view", "nova-image-cache-policies-edit"):
        [role] = [role for role in installed("ClusterRole") if role["metadata"]["name"] == name]
        assert name not in bound
        assert role["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["imagecache.openstack.org"]
            writes = set(rule["verbs"]) - {"get", "list", "watch"}
            assert not (writes and "imagecachepolicies/status" in rule["resources"]), "status is the operator's"


def test_the_deployment_runs_one_locked_down_replica() -> None:
    [deployment] = installed("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    assert container["args"] == ["run", "--all-namespaces"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"} and security["runAsUser"] == 10001
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    [port] = container["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert port["containerPort"] == 8080
    [mount] = container["volumeMounts"]
    [volume] = pod["volumes"]
    assert mount == {"name": volume["name"], "mountPath": "/tmp"} and "emptyDir" in volume


def test_the_example_secrets_hold_placeholders_that_match_the_sample_policy() -> None:
    secrets = {secret["metadata"]["name"]: secret for secret in load_yaml_documents(MANIFESTS / "secret-examples.yaml")}
    policy = load_policy(sample_policy())
    clouds, ssh = secrets[policy.cloud.secret_name], secrets[policy.ssh.secret_name]
    for secret in secrets.values():
        assert secret["metadata"]["namespace"] == policy.namespace
        assert "data" not in secret  # stringData only: nothing base64 that could hide a real value
        for value in secret["stringData"].values():
            assert "PLACEHOLDER" in value and "PRIVATE KEY" not in value
    assert ssh["type"] == "kubernetes.io/ssh-auth"
    assert set(ssh["stringData"]) == {policy.ssh.private_key_key, policy.ssh.known_hosts_key} == {
        "ssh-privatekey", "known_hosts"}
    clouds_yaml = yaml.safe_load(clouds["stringData"][policy.cloud.key])
    auth = clouds_yaml["clouds"][policy.cloud.cloud_name]["auth"]
    assert {"auth_url", "username", "password", "project_name", "user_domain_name", "project_domain_name"} <= set(
        auth)
    assert all(value.startswith("PLACEHOLDER") for key, value in auth.items() if key in ("username", "password"))


# ---- Argo CD health check --------------------------------------------------------------------------------

HEALTH_LUA = (MANIFESTS / "argocd-health.lua").read_text()


def argocd_health(obj: dict) -> tuple[str, str]:
    """The health Argo CD would show for obj, from the Lua script run in Lua 5.1 as Argo CD runs it."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA)
    return result["status"], result["message"]


def policy_object(generation: int = 2, status: dict | None = None) -> dict:
    document = sample_policy()
    document["metadata"]["generation"] = generation
    if status is not None:
        document["status"] = status
    return document


def conditions(observed: int = 2, **statuses: str) -> dict:
    return {"observedGeneration": observed, "conditions": [
        {"type": kind, "status": status, "reason": f"{kind}Reason", "message": f"{kind} says {status}"}
        for kind, status in statuses.items()]}


@pytest.mark.parametrize(("status", "health", "message"), [
    (None, "Progressing", "Waiting for the operator to report on this policy"),
    (conditions(observed=1, Ready="True"), "Progressing", "Waiting for the operator to observe generation 2"),
    ({"conditions": conditions(Ready="True")["conditions"]}, "Progressing", "observe generation 2"),
    (conditions(Ready="True", Reconciling="False", Stalled="False"), "Healthy", "Ready says True"),
    (conditions(Ready="False", Reconciling="True", Stalled="False"), "Progressing", "Reconciling says True"),
    (conditions(Ready="False", Reconciling="False", Stalled="True"), "Degraded", "Stalled says True"),
    (conditions(Ready="True", Reconciling="True", Stalled="True"), "Degraded", "Stalled says True"),
    (conditions(Ready="False", Reconciling="False", Stalled="False"), "Degraded", "Ready says False"),
    (conditions(Ready="Unknown"), "Progressing", "Ready says Unknown"),
    ({"observedGeneration": 2}, "Progressing", "Waiting for the operator to report on this policy"),
    ({"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True"}]}, "Healthy", "Ready"),
])
def test_argocd_health(status: dict | None, health: str, message: str) -> None:
    found_health, found_message = argocd_health(policy_object(status=status))
    assert found_health == health and message in found_message


def test_the_argocd_cm_patch_carries_the_health_script_verbatim() -> None:
    [patch] = load_yaml_documents(MANIFESTS / "argocd-health-patch.yaml")
    assert (patch["kind"], patch["metadata"]) == ("ConfigMap", {"name": "argocd-cm", "namespace": "argocd"})
    key = f"resource.customizations.health.{CRD['spec']['group']}_{CRD['spec']['names']['kind']}"
    assert patch["data"] == {key: HEALTH_LUA}


# ---- Containerfile ---------------------------------------------------------------------------------------

def containerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_containerfile_builds_a_wheel_and_runs_it_unprivileged() -> None:
    instructions = containerfile_instructions()
    arguments = dict(argument.split("=", 1) for kind, argument in instructions if kind == "ARG")
    stages = [argument for kind, argument in instructions if kind == "FROM"]
    assert arguments["PYTHON_IMAGE"] == "python:3.11-slim"
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    final = instructions[[i for i, (kind, _) in enumerate(instructions) if kind == "FROM"][-1]:]
    runs = " ".join(argument for kind, argument in final if kind == "RUN")
    assert "pip wheel" in " ".join(argument for kind, argument in instructions if kind == "RUN")
    assert "apt-get install -y --no-install-recommends openssh-client &&" in re.sub(r"\s+", " ", runs)
    assert "rm -rf /var/lib/apt/lists/*" in runs and "--uid 10001" in runs and "--no-index" in runs
    last = {kind: argument for kind, argument in final}
    [deployment] = installed("Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert last["USER"].split(":")[0] == str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])
    assert last["EXPOSE"] == str(container["ports"][0]["containerPort"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert yaml.safe_load(last["ENTRYPOINT"]) == ["novacache"] and "novacache" in scripts
    assert yaml.safe_load(last["CMD"]) == container["args"] == ["run", "--all-namespaces"]
