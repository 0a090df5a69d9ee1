"""ImageCachePolicy: which Glance images to keep cached on which compute nodes, checked before anything runs.

One model serves both the Kubernetes custom resource (the operator hands over its spec and metadata) and a
standalone YAML file (one-shot runs without a cluster). Values that later reach an SSH command line or a path
on a compute node (addresses, user names, nova.conf paths, image ids) are checked here against strict
whitelists, so a mistyped or hostile policy is refused before any connection is made. Every problem is
reported at once, each with its field path and how to fix it, because policies are written by hand and
should be fixable in one pass.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from .units import parse_size

API_VERSION = "imagecache.openstack.org/v1alpha1"
KIND = "ImageCachePolicy"

# Anchored with \A...\Z rather than ^...$ because "$" also matches before a trailing newline.
UUID_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z", re.IGNORECASE)
EXAMPLE_UUID = "07bc2424-753b-4f65-9da5-5a99d8383fe6"

# Plain nova.conf first; TripleO/director deployments keep the containerised nova_libvirt one here.
DEFAULT_NOVA_CONF_PATHS: tuple[str, ...] = (
    "/etc/nova/nova.conf",
    "/var/lib/config-data/puppet-generated/nova_libvirt/etc/nova/nova.conf",
)
DEFAULT_TTL = 24 * 3600  # Nova's remove_unused_original_minimum_age_seconds default
MIN_TTL = 60
VERIFY_MODES = ("size", "checksum")
STRATEGIES = ("direct", "proxy", "pipeline")
# Where Nova's migration SSH keeps its key and known hosts (TripleO's nova_migration_target layout).
MIGRATION_IDENTITY = "/etc/nova/migration/identity"
MIGRATION_KNOWN_HOSTS = "/etc/nova/migration/known_hosts"

_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_LABEL = re.compile(rf"\A{_LABEL}\Z")
_DNS_SUBDOMAIN = re.compile(rf"\A{_LABEL}(?:\.{_LABEL})*\Z")
_HOST_LABEL = re.compile(rf"\A{_LABEL}\Z", re.IGNORECASE)
_ZONE_ID = re.compile(r"\A[A-Za-z0-9_.-]{1,15}\Z")
_USER = re.compile(r"\A[a-z_][a-z0-9_-]{0,31}\Z")
_SECRET_KEY = re.compile(r"\A[-._a-zA-Z0-9]{1,253}\Z")
_PATH = re.compile(r"\A/[A-Za-z0-9._+@:,=/-]*\Z")
_DIGITS = re.compile(r"\A[0-9]+\Z")
_DURATION = re.compile(r"\A(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?\Z")
_DURATION_FORMS = "write it like 24h, 90m, 1h30m, 2d or 45s, or as a whole number of seconds"

_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
# Kubernetes' own metadata, present in `kubectl get -o yaml` output; we read only name and namespace.
_METADATA_FIELDS = ("name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
                    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers",
                    "ownerReferences", "managedFields", "generateName", "selfLink")
_SPEC_FIELDS = ("cloud", "ssh", "nodeSsh", "images", "ttl", "refreshInterval", "verify", "novaConf", "strategy",
                "limits", "sites")

_T = TypeVar("_T")


class PolicyError(ValueError):
    """An unusable policy with every problem found, not just the first, so one edit can fix them all."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{path}: {message}" for path, message in self.problems))


@dataclass(frozen=True)
class CloudSpec:
    """Where the Glance credentials are: a clouds.yaml inside a Secret, and which cloud in it to use."""
    secret_name: str
    key: str
    cloud_name: str


@dataclass(frozen=True)
class SshSpec:
    """How to reach compute nodes; host keys are checked against known_hosts unless trust_on_first_use."""
    secret_name: str
    private_key_key: str
    known_hosts_key: str
    user: str
    port: int
    trust_on_first_use: bool


@dataclass(frozen=True)
class NodeSshSpec:
    """How nodes of a site reach each other to relay images: the SSH trust Nova's migrations use.

    Paths are on the nodes; the private key never leaves them.
    """
    user: str
    port: int | None   # None: the port the operator uses for that node
    identity_file: str
    known_hosts_file: str
    strict_host_key_checking: bool


@dataclass(frozen=True)
class ImageRef:
    """One wanted image, by id or by name (exactly one is set); path says where the policy lists it."""
    path: str
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class NodeSpec:
    """A compute node with its port and nova.conf candidates already resolved (node, else site, else spec)."""
    name: str
    address: str
    port: int
    nova_conf: tuple[str, ...]
    site: str


@dataclass(frozen=True)
class SiteSpec:
    """An edge site: the nodes that share one WAN link to Glance, and how an image spreads among them.

    strategy: direct (every node from Glance), proxy (one seed from Glance, the others copy from it),
    pipeline (the seed from Glance, each node writing its copy while relaying to the next).
    seed_node: the node that receives from Glance (else the first healthy one).
    """
    name: str
    nodes: tuple[NodeSpec, ...]
    strategy: str = "pipeline"
    seed_node: str | None = None


@dataclass(frozen=True)
class Limits:
    """Guards that keep caching from hurting Glance or the nodes (sizes in bytes, ages in seconds)."""
    glance_streams: int
    disk_reserve: int
    stale_temp_age: int
    chains_per_site: int = 1


@dataclass(frozen=True)
class Policy:
    """A checked ImageCachePolicy; durations are seconds, and ttl must match the nodes' Nova setting."""
    name: str
    namespace: str | None
    cloud: CloudSpec
    ssh: SshSpec
    images: tuple[ImageRef, ...]
    ttl: int
    refresh_interval: int
    verify: str
    sites: tuple[SiteSpec, ...]
    limits: Limits
    node_ssh: NodeSshSpec = NodeSshSpec("root", None, MIGRATION_IDENTITY, MIGRATION_KNOWN_HOSTS, True)

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        """Every node of every site, in site order: the unit most work is done per."""
        return tuple(node for site in self.sites for node in site.nodes)


# ---- durations -------------------------------------------------------------------------------------------

def parse_duration(text: str | int) -> int:
    """'24h', '90m', '1h30m', '2d', '45s', or whole seconds (an int or digit string) -> positive seconds."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"expected a duration like 24h, got {_kind(text)}")
    if isinstance(text, int):
        seconds = text
    elif _DIGITS.match(text.strip()):
        seconds = int(text)
    else:
        match = _DURATION.match(text.strip())
        if not match or not any(match.groups()):
            raise ValueError(f"{_show(text)} is not a duration; {_DURATION_FORMS}")
        days, hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds <= 0:
        raise ValueError(f"{_show(text)} is not a positive duration; {_DURATION_FORMS}")
    return seconds


def format_duration(seconds: int) -> str:
    """86400 -> '24h', 5400 -> '1h30m', 45 -> '45s': hours at most, the way Nova's ages are usually thought of."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds}")
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


# ---- loading ---------------------------------------------------------------------------------------------

def load_policy(document: dict) -> Policy:
    """A whole ImageCachePolicy document (apiVersion, kind, metadata, spec), as in a file or a manifest."""
    if not isinstance(document, dict):
        raise PolicyError([("document", f"expected an {KIND} mapping with apiVersion, kind, metadata and spec, "
                                        f"got {_kind(document)}")])
    top = _At("", []).fields(document, _TOP_FIELDS)
    top.require("apiVersion", _constant("apiVersion", API_VERSION), f"write apiVersion: {API_VERSION}")
    top.require("kind", _constant("kind", KIND), f"write kind: {KIND}")
    metadata = top.section("metadata", _METADATA_FIELDS)
    name = metadata.require("name", _object_name, "name the policy, like name: edge-images")
    namespace = metadata.get("namespace", _namespace, None)
    return _policy(top.section("spec", _SPEC_FIELDS), name, namespace)


def load_policy_spec(spec: dict, name: str, namespace: str | None = None) -> Policy:
    """The spec of a custom resource, for the operator, which gets spec and metadata separately."""
    problems: list[tuple[str, str]] = []
    metadata = _At("metadata", problems)
    metadata.key("name").parse(_object_name, name)
    if namespace is not None:
        metadata.key("namespace").parse(_namespace, namespace)
    return _policy(_At("spec", problems).fields(spec, _SPEC_FIELDS), name, namespace)


def load_policy_file(path: str | Path) -> Policy:
    """A policy from a YAML file; broken YAML is a PolicyError naming the file, line and column."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_bytes())  # bytes: yaml reports bad encodings as YAMLError too
    except yaml.YAMLError as error:
        raise PolicyError([(str(path), f"is not valid YAML ({_yaml_problem(error)}); "
                                       "fix the indentation or quoting there")]) from None
    return load_policy(document)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """yaml's multi-line message folded into one line, led by the position people look for."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    return " ".join(str(error).split())


# ---- the spec, section by section ------------------------------------------------------------------------

def _policy(spec: _Fields, name: str | None, namespace: str | None) -> Policy:
    """Builds the Policy, or raises PolicyError if anything (here or in metadata) was wrong."""
    cloud = _cloud(spec.section("cloud", ("secretRef", "cloudName")))
    ssh = _ssh(spec.section("ssh", ("secretRef", "user", "port", "trustOnFirstUse")))
    node_ssh = _node_ssh(spec.section("nodeSsh", ("user", "port", "identityFile", "knownHostsFile",
                                                   "strictHostKeyChecking")))
    strategy = spec.get("strategy", _strategy, "pipeline")
    images = _images(spec)
    ttl, refresh_interval = _timing(spec)
    verify = spec.get("verify", _verify, "size")
    nova_conf = _nova_conf(spec, DEFAULT_NOVA_CONF_PATHS)
    limits = _limits(spec.section("limits", ("glanceStreams", "diskReserve", "staleTempAge", "chainsPerSite")))
    sites = _sites(spec, ssh.port, nova_conf, strategy)
    if spec.at.problems:
        raise PolicyError(spec.at.problems)
    return Policy(name=name, namespace=namespace, cloud=cloud, ssh=ssh, images=images, ttl=ttl,
                  refresh_interval=refresh_interval, verify=verify, sites=sites, limits=limits, node_ssh=node_ssh)


def _cloud(cloud: _Fields) -> CloudSpec:
    ref = cloud.section("secretRef", ("name", "key"))
    return CloudSpec(
        secret_name=ref.require("name", _secret_name, "name the Secret holding clouds.yaml, like openstack-clouds"),
        key=ref.get("key", _secret_key, "clouds.yaml"),
        cloud_name=cloud.require("cloudName", _cloud_name, "name the cloud in clouds.yaml to use, like central"))


def _ssh(ssh: _Fields) -> SshSpec:
    ref = ssh.section("secretRef", ("name", "privateKeyKey", "knownHostsKey"))
    return SshSpec(
        secret_name=ref.require("name", _secret_name,
                                "name the Secret holding the SSH private key and known_hosts, like compute-ssh"),
        private_key_key=ref.get("privateKeyKey", _secret_key, "ssh-privatekey"),
        known_hosts_key=ref.get("knownHostsKey", _secret_key, "known_hosts"),
        user=ssh.get("user", _ssh_user, "root"),
        port=ssh.get("port", _port, 22),
        trust_on_first_use=ssh.get("trustOnFirstUse", _flag, False))


def _node_ssh(node_ssh: _Fields) -> NodeSshSpec:
    return NodeSshSpec(
        user=node_ssh.get("user", _ssh_user, "root"),
        port=node_ssh.get("port", _port, None),
        identity_file=node_ssh.get("identityFile", _conf_path, MIGRATION_IDENTITY),
        known_hosts_file=node_ssh.get("knownHostsFile", _conf_path, MIGRATION_KNOWN_HOSTS),
        strict_host_key_checking=node_ssh.get("strictHostKeyChecking", _flag, True))


def _images(spec: _Fields) -> tuple[ImageRef, ...]:
    """Each entry names exactly one of id or name; the same image listed twice is a mistake worth reporting."""
    images, seen = [], {"id": {}, "name": {}}
    example = f"[{{id: {EXAMPLE_UUID}}}, {{name: cirros}}]"
    for at, value in spec.entries("images", "the images to keep cached", example):
        image = at.fields(value, ("id", "name"))
        given = [key for key in ("id", "name") if image.values.get(key) is not None]
        if len(given) == 2:
            at.problem("gives both id and name; keep just one of them")
        elif not given and not image.quiet:
            at.problem(f"needs an id or a name, like {{id: {EXAMPLE_UUID}}} or {{name: cirros}}")
        ref = ImageRef(path=at.path, id=image.get("id", _image_id, None), name=image.get("name", _image_name, None))
        for key in given:
            _claim(seen[key], getattr(ref, key), at.key(key), "list each image once")
        images.append(ref)
    return tuple(images)


def _timing(spec: _Fields) -> tuple[int, int]:
    """ttl and refreshInterval: refreshing must happen well inside the age at which Nova deletes a file."""
    ttl = spec.get("ttl", _ttl, DEFAULT_TTL)
    refresh = spec.get("refreshInterval", parse_duration, None)
    if ttl is None:
        return ttl, refresh
    if refresh is None:
        return ttl, ttl // 4
    if refresh >= ttl:
        spec.at.key("refreshInterval").problem(
            f"{format_duration(refresh)} is not shorter than ttl ({format_duration(ttl)}), so cached images "
            f"could age out between refreshes; use about a quarter of ttl, like {format_duration(ttl // 4)}")
    return ttl, refresh


def _sites(spec: _Fields, ssh_port: int | None, nova_conf: tuple[str, ...],
           strategy: str | None) -> tuple[SiteSpec, ...]:
    sites, site_names, node_names = [], {}, {}
    example = "[{name: dcn0, nodes: [{name: dcn0-compute-0, address: 192.0.2.10}]}]"
    for at, value in spec.entries("sites", "the edge sites", example):
        site = at.fields(value, ("name", "novaConf", "strategy", "seedNode", "nodes"))
        name = site.require("name", _site_name, "name the site, like name: dcn0")
        _claim(site_names, name, site.at.key("name"), "give each site its own name")
        site_conf = _nova_conf(site, nova_conf)
        nodes = tuple(
            _node(node_at.fields(node, ("name", "address", "port", "novaConf")), name, ssh_port, site_conf, node_names)
            for node_at, node in site.entries("nodes", "the site's compute nodes",
                                              "[{name: dcn0-compute-0, address: 192.0.2.10}]"))
        seed = site.get("seedNode", _node_name, None)
        names = [node.name for node in nodes if node.name is not None]
        if seed is not None and names and seed not in names:
            site.at.key("seedNode").problem(
                f"{_show(seed)} is not a node of this site; name one of {', '.join(names)}, "
                f"or leave seedNode out to use the first healthy node")
        sites.append(SiteSpec(name=name, nodes=nodes, strategy=site.get("strategy", _strategy, strategy),
                              seed_node=seed))
    return tuple(sites)


def _node(node: _Fields, site: str | None, ssh_port: int | None, nova_conf: tuple[str, ...],
          node_names: dict[str, str]) -> NodeSpec:
    """A node with its port and nova.conf resolved; node names are unique across all sites."""
    name = node.require("name", _node_name, "name the compute node, like name: dcn0-compute-0")
    _claim(node_names, name, node.at.key("name"), "list each node once, in one site")
    return NodeSpec(
        name=name,
        address=node.require("address", _address, "give the node's IP address or host name, like 192.0.2.10"),
        port=node.get("port", _port, ssh_port),
        nova_conf=_nova_conf(node, nova_conf),
        site=site)


def _nova_conf(fields: _Fields, inherited: tuple[str, ...]) -> tuple[str, ...]:
    """novaConf at spec, site or node level: one path or a list of candidates; absent means inherit."""
    at, value = fields.at.key("novaConf"), fields.values.get("novaConf")
    if value is None:
        return inherited
    if not isinstance(value, list):
        return (at.parse(_conf_path, value),)
    if not value:
        at.problem("is empty; list at least one nova.conf path, or leave novaConf out to inherit it")
    return tuple(at.index(i).parse(_conf_path, path) for i, path in enumerate(value))


def _limits(limits: _Fields) -> Limits:
    return Limits(glance_streams=limits.get("glanceStreams", _count, 5),
                  disk_reserve=limits.get("diskReserve", _size, parse_size("1GiB")),
                  stale_temp_age=limits.get("staleTempAge", parse_duration, 3600),
                  chains_per_site=limits.get("chainsPerSite", _count, 1))


def _claim(seen: dict[str, str], value: str | None, at: _At, fix: str) -> None:
    """Remembers where value first appeared; a repeat is reported where it repeats, pointing at the first."""
    if value is None:
        return
    if value in seen:
        at.problem(f"{_show(value)} is already given at {seen[value]}; {fix}")
    else:
        seen[value] = at.path


# ---- walking the document --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _At:
    """A place in the document (its field path) and the list that collects every problem found anywhere."""
    path: str
    problems: list[tuple[str, str]]

    def key(self, name: str) -> _At:
        return _At(f"{self.path}.{name}" if self.path else name, self.problems)

    def index(self, i: int) -> _At:
        return _At(f"{self.path}[{i}]", self.problems)

    def problem(self, message: str) -> None:
        self.problems.append((self.path, message))

    def parse(self, parse: Callable[[Any], _T], value: Any) -> _T | None:
        """parse(value), or None after recording its ValueError here."""
        try:
            return parse(value)
        except ValueError as error:
            self.problem(str(error))
            return None

    def fields(self, value: Any, known: tuple[str, ...]) -> _Fields:
        """value read as a mapping of known fields, reporting a wrong type and every unknown (mistyped) key."""
        if value is None:
            return _Fields(self, {}, quiet=False)
        if not isinstance(value, dict):
            self.problem(f"expected a mapping with {', '.join(known)}, got {_kind(value)}")
            return _Fields(self, {}, quiet=True)
        for key in value:
            if key not in known:
                shown = key if isinstance(key, str) and key.isidentifier() else _show(key)
                self.key(shown).problem(_unknown(key, known))
        return _Fields(self, value, quiet=False)


@dataclass(frozen=True)
class _Fields:
    """One mapping's fields; quiet when the mapping itself was the wrong type, so its missing fields are no news."""
    at: _At
    values: dict
    quiet: bool

    def get(self, key: str, parse: Callable[[Any], _T], default: _T) -> _T | None:
        """An optional field, parsed; default when absent or null, None (with a problem) when invalid."""
        value = self.values.get(key)
        return default if value is None else self.at.key(key).parse(parse, value)

    def require(self, key: str, parse: Callable[[Any], _T], how: str) -> _T | None:
        """A required field, parsed; when absent, the problem says how to write it."""
        value = self.values.get(key)
        if value is None:
            if not self.quiet:
                self.at.key(key).problem(f"required; {how}")
            return None
        return self.at.key(key).parse(parse, value)

    def section(self, key: str, known: tuple[str, ...]) -> _Fields:
        """A nested mapping; when absent its own fields' defaults apply and its required fields are reported."""
        section = self.at.key(key).fields(self.values.get(key), known)
        return replace(section, quiet=section.quiet or self.quiet)

    def entries(self, key: str, what: str, example: str) -> list[tuple[_At, Any]]:
        """A required, non-empty list: its items, each with its own path (key[0], key[1], ...)."""
        at, value = self.at.key(key), self.values.get(key)
        if value is None:
            if not self.quiet:
                at.problem(f"required; list {what}, like {key}: {example}")
        elif not isinstance(value, list):
            at.problem(f"expected a list of {what}, got {_kind(value)}; write it like {key}: {example}")
        elif not value:
            at.problem(f"is empty; list at least one of {what}, like {key}: {example}")
        else:
            return [(at.index(i), item) for i, item in enumerate(value)]
        return []


def _unknown(key: Any, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    guess = f"did you mean {close[0]}? " if close else ""
    return f"unknown field; {guess}the fields here are {', '.join(known)}"


def _kind(value: Any) -> str:
    """What a wrong value is, in YAML terms, for 'expected X, got Y' messages."""
    if isinstance(value, bool):
        return "true/false"
    for kind, name in ((int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"),
                       (dict, "a mapping"), (datetime.date, "a date")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    """A user's value quoted for a message: repr keeps hostile newlines on one line, and long values are cut."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- single values: each returns the clean value or raises ValueError saying what is wrong and the fix ------

def _text(value: Any, what: str) -> str:
    """value if it is a string; YAML turns unquoted 2024 or 1.0 into numbers, hence the hint to quote."""
    if isinstance(value, str):
        return value
    unquoted = isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool)
    raise ValueError(f"expected {what}, got {_kind(value)}{'; put it in quotes' if unquoted else ''}")


def _has_control(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def _dns_name(pattern: re.Pattern, longest: int, what: str, rule: str, example: str) -> Callable[[Any], str]:
    """A parser for Kubernetes-style names, which also keeps them safe as file names and in logs."""
    def parse(value: Any) -> str:
        text = _text(value, f"a {what}")
        if len(text) > longest or not pattern.match(text):
            raise ValueError(f"{_show(text)} is not a valid {what}; use {rule}, "
                             f"at most {longest} characters, like {example}")
        return text
    return parse


_LABEL_RULE = "lowercase letters, digits and '-', starting and ending with a letter or digit"
_DOTTED_RULE = "dot-separated lowercase letters, digits and '-', each part starting and ending with a letter or digit"
_site_name = _dns_name(_DNS_LABEL, 63, "site name", _LABEL_RULE, "dcn0")
_namespace = _dns_name(_DNS_LABEL, 63, "namespace", _LABEL_RULE, "openstack")
_node_name = _dns_name(_DNS_SUBDOMAIN, 253, "node name", _DOTTED_RULE, "dcn0-compute-0")
_secret_name = _dns_name(_DNS_SUBDOMAIN, 253, "Secret name", _DOTTED_RULE, "compute-ssh")
_object_name = _dns_name(_DNS_SUBDOMAIN, 253, "policy name", _DOTTED_RULE, "edge-images")


def _one_line(what: str, how: str) -> Callable[[Any], str]:
    """A parser for free-text names that only reach APIs: non-empty, one line, at most 255 characters."""
    def parse(value: Any) -> str:
        text = _text(value, what)
        if not text.strip():
            raise ValueError(f"is empty; {how}")
        if len(text) > 255:
            raise ValueError(f"is {len(text)} characters long; use at most 255")
        if _has_control(text):
            raise ValueError(f"{_show(text)} contains control characters such as newlines; {how}")
        return text
    return parse


_image_name = _one_line("an image name", "write the name on one line as `openstack image list` shows it, like cirros")
_cloud_name = _one_line("a cloud name", "write the name of an entry under clouds: in clouds.yaml, like central")


def _constant(key: str, expected: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value != expected:
            raise ValueError(f"{_show(value)} is not supported; write {key}: {expected}")
        return expected
    return parse


def _image_id(value: Any) -> str:
    text = _text(value, "an image UUID")
    if not UUID_RE.match(text):
        raise ValueError(f"{_show(text)} is not an image UUID; write it like {EXAMPLE_UUID} "
                         "(openstack image list shows ids)")
    return text.lower()


def _address(value: Any) -> str:
    """An IP literal or an RFC 1123 host name and nothing else: it ends up as an ssh argument."""
    text = _text(value, "an IP address or host name")
    fix = ("write an IP address like 192.0.2.10 or 2001:db8::10 (no brackets), "
           "or a host name like dcn0-compute-0.example.com")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        labels = text.split(".")
        # an all-digit last label ("10.0.0.256", "123") would be read as a (bad) IPv4 address, not a name
        if len(text) <= 253 and all(_HOST_LABEL.match(label) for label in labels) and not labels[-1].isdigit():
            return text
        raise ValueError(f"{_show(text)} is not an IP address or host name; {fix}") from None
    scope = getattr(address, "scope_id", None)
    if scope is not None and not _ZONE_ID.match(scope):
        raise ValueError(f"{_show(text)} has an invalid zone after %; use an interface name like fe80::1%eth0")
    return text


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a port number like 22, got {_kind(value)}")
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} is not a port number; use 1 to 65535, like 22")
    return value


def _ssh_user(value: Any) -> str:
    text = _text(value, "a user name")
    if not _USER.match(text):
        raise ValueError(f"{_show(text)} is not a valid user name; use up to 32 lowercase letters, digits, '_' "
                         "and '-', starting with a letter or '_', like root")
    return text


def _secret_key(value: Any) -> str:
    text = _text(value, "a Secret key")
    if text in (".", "..") or not _SECRET_KEY.match(text):
        raise ValueError(f"{_show(text)} is not a valid Secret key; use letters, digits, '-', '_' and '.', "
                         "like ssh-privatekey")
    return text


def _conf_path(value: Any) -> str:
    """An absolute path, plain enough to be safe on a remote command line even if someone forgets to quote it."""
    text = _text(value, "an absolute path to nova.conf")
    example = "like /etc/nova/nova.conf"
    if not text.startswith("/"):
        raise ValueError(f"{_show(text)} is not an absolute path; write it from /, {example}")
    if ".." in text.split("/"):
        raise ValueError(f"{_show(text)} contains '..'; write the path without it, {example}")
    if text.endswith("/"):
        raise ValueError(f"{_show(text)} names a directory; name the nova.conf file in it, {example}")
    if not _PATH.match(text):
        raise ValueError(f"{_show(text)} contains characters other than letters, digits and . _ - + @ : , = / "
                         f"(no spaces, quotes, shell metacharacters or control characters); write it {example}")
    return text


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number like 5, got {_kind(value)}")
    if value < 1:
        raise ValueError(f"{value} is not positive; use a whole number of at least 1, like 5")
    return value


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size like 1GiB, got {_kind(value)}")
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"{_show(value)} is not a positive size; write it like 512MiB, 1G, 10GiB or a number of bytes")
    return size


def _ttl(value: Any) -> int:
    seconds = parse_duration(value)
    if seconds < MIN_TTL:
        raise ValueError(f"{format_duration(seconds)} is shorter than a minute; set ttl to the nodes' "
                         "remove_unused_original_minimum_age_seconds, like 24h (Nova's default)")
    return seconds


def _strategy(value: Any) -> str:
    text = _text(value, "direct, proxy or pipeline")
    if text not in STRATEGIES:
        raise ValueError(f"{_show(text)} is not a strategy; use pipeline (each image crosses the WAN once and "
                         "is relayed node to node), proxy (one node fetches, the others copy from it) or direct "
                         "(every node fetches from Glance)")
    return text


def _verify(value: Any) -> str:
    text = _text(value, "size or checksum")
    if text not in VERIFY_MODES:
        raise ValueError(f"{_show(text)} is not a verify mode; use size (compare file sizes, cheap) or checksum "
                         "(hash each cached file every reconcile, thorough but reads every byte)")
    return text
