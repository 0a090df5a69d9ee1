"""ImageCachePolicy: valid policies parse with their defaults; every bad value is refused with its path and fix."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from novacache.policy import (
    DEFAULT_NOVA_CONF_PATHS, UUID_RE, CloudSpec, ImageRef, Limits, NodeSpec, Policy, PolicyError, SiteSpec,
    SshSpec, format_duration, load_policy, load_policy_file, load_policy_spec, parse_duration,
)

IMAGE_ID = "07bc2424-753b-4f65-9da5-5a99d8383fe6"
OTHER_ID = "5b1c6d2e-0f3a-4e8b-9c7d-1a2b3c4d5e6f"
GiB = 1024 ** 3

FULL = f"""
apiVersion: imagecache.openstack.org/v1alpha1
kind: ImageCachePolicy
metadata: {{name: edge-images, namespace: openstack}}
spec:
  cloud: {{secretRef: {{name: openstack-clouds, key: my-clouds.yaml}}, cloudName: central}}
  ssh:
    secretRef: {{name: compute-ssh, privateKeyKey: id_ed25519, knownHostsKey: hosts}}
    user: nova-cache
    port: 2222
    trustOnFirstUse: true
  images: [{{id: {IMAGE_ID.upper()}}}, {{name: cirros}}]
  ttl: 2d
  refreshInterval: 1h30m
  verify: checksum
  novaConf: /etc/nova/nova.conf
  limits: {{glanceStreams: 3, diskReserve: 512MiB, staleTempAge: 90m}}
  sites:
    - name: dcn0
      novaConf: [/srv/site/nova.conf, /etc/nova/nova.conf]
      nodes:
        - {{name: dcn0-compute-0, address: 192.0.2.10, port: 22, novaConf: /srv/node/nova.conf}}
        - {{name: dcn0-compute-1.example.com, address: "2001:db8::11"}}
    - name: dcn1
      nodes:
        - {{name: dcn1-compute-0, address: compute-0.dcn1.example.com}}
"""


def minimal() -> dict[str, Any]:
    """The smallest valid document: everything else takes its default."""
    return {
        "apiVersion": "imagecache.openstack.org/v1alpha1",
        "kind": "ImageCachePolicy",
        "metadata": {"name": "edge-images"},
        "spec": {
            "cloud": {"secretRef": {"name": "openstack-clouds"}, "cloudName": "central"},
            "ssh": {"secretRef": {"name": "compute-ssh"}},
            "images": [{"id": IMAGE_ID}],
            "sites": [{"name": "dcn0", "nodes": [{"name": "dcn0-compute-0", "address": "192.0.2.10"}]}],
        },
    }


def edited(path: str, value: Any, document: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the document (minimal by default) with the field at a path like spec.sites[0].name set."""
    document = copy.deepcopy(document or minimal())
    steps = [int(index) if index else key for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]
    parent = document
    for step in steps[:-1]:
        parent = parent[step]
    parent[steps[-1]] = value
    return document


def problems(document: Any) -> dict[str, str]:
    """The problems loading this document reports, by field path (it must report some)."""
    with pytest.raises(PolicyError) as caught:
        load_policy(document)
    return dict(caught.value.problems)


def problem(path: str, value: Any, document: dict[str, Any] | None = None) -> str:
    """The one problem reported for setting path to value; the path in the error must be that field's."""
    found = problems(edited(path, value, document))
    assert list(found) == [path], found
    return found[path]


# ---- valid policies ----------------------------------------------------------------------------------------

def test_a_full_document_parses_with_every_value() -> None:
    policy = load_policy(yaml.safe_load(FULL))
    assert isinstance(policy, Policy)
    assert policy.name == "edge-images" and policy.namespace == "openstack"
    assert policy.cloud == CloudSpec(secret_name="openstack-clouds", key="my-clouds.yaml", cloud_name="central")
    assert policy.ssh == SshSpec(secret_name="compute-ssh", private_key_key="id_ed25519", known_hosts_key="hosts",
                                 user="nova-cache", port=2222, trust_on_first_use=True)
    assert policy.images == (ImageRef(path="spec.images[0]", id=IMAGE_ID),
                             ImageRef(path="spec.images[1]", name="cirros"))
    assert (policy.ttl, policy.refresh_interval, policy.verify) == (2 * 86400, 5400, "checksum")
    assert policy.limits == Limits(glance_streams=3, disk_reserve=512 * 1024 ** 2, stale_temp_age=5400)
    assert [site.name for site in policy.sites] == ["dcn0", "dcn1"]
    assert policy.sites[0].nodes[0] == NodeSpec(name="dcn0-compute-0", address="192.0.2.10", port=22,
                                                 nova_conf=("/srv/node/nova.conf",), site="dcn0")


def test_node_settings_fall_back_to_the_site_then_the_spec() -> None:
    policy = load_policy(yaml.safe_load(FULL))
    by_name = {node.name: node for node in policy.nodes}
    assert by_name["dcn0-compute-1.example.com"].port == 2222  # spec.ssh.port
    assert by_name["dcn0-compute-1.example.com"].nova_conf == ("/srv/site/nova.conf", "/etc/nova/nova.conf")
    assert by_name["dcn1-compute-0"].nova_conf == ("/etc/nova/nova.conf",)  # spec.novaConf, a single string
    assert by_name["dcn1-compute-0"].site == "dcn1"


def test_nodes_lists_every_node_in_site_order() -> None:
    policy = load_policy(yaml.safe_load(FULL))
    assert [node.name for node in policy.nodes] == ["dcn0-compute-0", "dcn0-compute-1.example.com", "dcn1-compute-0"]


def test_defaults_fill_in() -> None:
    policy = load_policy(minimal())
    assert policy.namespace is None
    assert policy.cloud.key == "clouds.yaml"
    assert policy.ssh == SshSpec(secret_name="compute-ssh", private_key_key="ssh-privatekey",
                                 known_hosts_key="known_hosts", user="root", port=22, trust_on_first_use=False)
    assert (policy.ttl, policy.refresh_interval, policy.verify) == (86400, 86400 // 4, "size")
    assert policy.limits == Limits(glance_streams=5, disk_reserve=GiB, stale_temp_age=3600)
    assert policy.nodes[0].port == 22
    assert policy.nodes[0].nova_conf == DEFAULT_NOVA_CONF_PATHS
    assert DEFAULT_NOVA_CONF_PATHS == (
        "/etc/nova/nova.conf", "/var/lib/config-data/puppet-generated/nova_libvirt/etc/nova/nova.conf")


def test_refresh_interval_defaults_to_a_quarter_of_ttl() -> None:
    assert load_policy(edited("spec.ttl", "8h")).refresh_interval == 2 * 3600


def test_null_fields_take_their_defaults() -> None:
    # `verify:` with nothing after it is null in YAML: treated as left out, not as a wrong type
    assert load_policy(edited("spec.verify", None)).verify == "size"


def test_the_model_is_immutable() -> None:
    policy = load_policy(minimal())
    assert isinstance(policy.images, tuple) and isinstance(policy.sites, tuple)
    assert isinstance(policy.sites[0], SiteSpec) and isinstance(policy.sites[0].nodes, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.ttl = 1  # type: ignore[misc]


def test_kubernetes_metadata_and_status_are_tolerated() -> None:
    document = minimal()
    document["metadata"].update(uid="1234", labels={"app": "x"}, resourceVersion="7", generation=2)
    document["status"] = {"nodes": {}}
    assert load_policy(document).name == "edge-images"


def test_the_operator_loads_a_spec_with_metadata_given_separately() -> None:
    policy = load_policy_spec(minimal()["spec"], "edge-images", "openstack")
    assert (policy.name, policy.namespace) == ("edge-images", "openstack")
    assert load_policy_spec(minimal()["spec"], "edge-images").namespace is None


def test_the_operator_gets_spec_paths_and_checks_the_names_too() -> None:
    spec = edited("spec.ttl", [])["spec"]
    with pytest.raises(PolicyError) as caught:
        load_policy_spec(spec, "Edge_Images", "open stack")
    assert [path for path, _ in caught.value.problems] == ["metadata.name", "metadata.namespace", "spec.ttl"]


def test_a_policy_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(FULL)
    assert load_policy_file(path) == load_policy(yaml.safe_load(FULL))
    assert load_policy_file(str(path)).name == "edge-images"


def test_broken_yaml_in_a_file_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("spec:\n  ttl: 24h\n   verify: size\n")
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path)
    [(where, message)] = caught.value.problems
    assert where == str(path)
    assert "not valid YAML" in message and "line 3" in message and "\n" not in message


def test_a_file_with_bad_bytes_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"kind: \xff\xfe\x00bad")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy_file(path)


@pytest.mark.parametrize("document", [None, [], "ImageCachePolicy"])
def test_a_document_that_is_not_a_mapping_is_refused(document: Any) -> None:
    assert "expected an ImageCachePolicy mapping" in problems(document)["document"]


# ---- errors: format, and collecting them all --------------------------------------------------------------

def test_an_error_is_one_line_per_problem_with_path_and_fix() -> None:
    document = edited("spec.images", [{"id": IMAGE_ID}, {"id": "not-a-uuid"}])
    with pytest.raises(PolicyError) as caught:
        load_policy(document)
    assert str(caught.value) == (
        "spec.images[1].id: 'not-a-uuid' is not an image UUID; "
        f"write it like {IMAGE_ID} (openstack image list shows ids)")
    assert isinstance(caught.value, ValueError)


def test_several_problems_are_reported_together() -> None:
    document = minimal()
    document["spec"].update(ttl="soon", verify="md5", images=[{"name": ""}])
    document["spec"]["ssh"]["port"] = 0
    document["spec"]["sites"][0]["nodes"][0]["address"] = "$(reboot)"
    found = problems(document)
    assert list(found) == ["spec.ssh.port", "spec.images[0].name", "spec.ttl", "spec.verify",
                           "spec.sites[0].nodes[0].address"]


def test_a_hostile_value_stays_on_one_line_of_the_error() -> None:
    message = problem("spec.ssh.user", "root\nProxyCommand reboot")
    assert "\n" not in message and "'root\\nProxyCommand reboot'" in message


def test_a_very_long_value_is_cut_short_in_the_message() -> None:
    assert len(problem("spec.images[0].id", "x" * 10_000)) < 300


def test_missing_required_fields_say_what_to_write() -> None:
    document = minimal()
    del document["metadata"]["name"], document["spec"]["cloud"], document["spec"]["images"]
    found = problems(document)
    assert "name the policy" in found["metadata.name"]
    assert "openstack-clouds" in found["spec.cloud.secretRef.name"]
    assert "name the cloud in clouds.yaml to use, like central" in found["spec.cloud.cloudName"]
    assert found["spec.images"].startswith("required; list the images to keep cached, like images: [{id: ")


def test_a_missing_spec_reports_its_required_fields() -> None:
    document = minimal()
    del document["spec"]
    assert set(problems(document)) == {"spec.cloud.secretRef.name", "spec.cloud.cloudName",
                                       "spec.ssh.secretRef.name", "spec.images", "spec.sites"}


def test_a_section_of_the_wrong_type_is_one_problem_not_many() -> None:
    assert problem("spec.ssh", "compute-ssh") == (
        "expected a mapping with secretRef, user, port, trustOnFirstUse, got a string")


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("apiVersion", "v1", "write apiVersion: imagecache.openstack.org/v1alpha1"),
    ("kind", "ImagePolicy", "write kind: ImageCachePolicy"),
])
def test_api_version_and_kind_must_be_ours(path: str, value: str, expected: str) -> None:
    assert expected in problem(path, value)


# ---- unknown fields and wrong types -----------------------------------------------------------------------

@pytest.mark.parametrize(("path", "guess"), [
    ("spec.ttll", "did you mean ttl?"),
    ("spec.refresh_interval", "did you mean refreshInterval?"),
    ("spec.ssh.secretRef.privateKey", "did you mean privateKeyKey?"),
    ("spec.sites[0].nodes[0].adress", "did you mean address?"),
    ("spec.limits.glanceStream", "did you mean glanceStreams?"),
    ("metadata.nmae", "did you mean name?"),
])
def test_an_unknown_field_is_a_typo_named_with_the_known_ones(path: str, guess: str) -> None:
    document = edited("spec.limits", {}) if path.startswith("spec.limits") else minimal()
    message = problem(path, "x", document)
    assert guess in message and "the fields here are" in message


def test_the_unknown_field_message_lists_the_known_fields() -> None:
    assert problem("spec.cloud.zzz", 1).endswith("the fields here are secretRef, cloudName")


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.ttl", [1], "expected a duration like 24h, got a list"),
    ("spec.ttl", True, "expected a duration like 24h, got true/false"),
    ("spec.images", {"id": IMAGE_ID},
     "expected a list of the images to keep cached, got a mapping; write it like images: ["),
    ("spec.images[0]", IMAGE_ID, "expected a mapping with id, name, got a string"),
    ("spec.sites", "dcn0", "expected a list of the edge sites, got a string; write it like sites: [{name: dcn0"),
    ("spec.ssh.port", "22", "expected a port number like 22, got a string"),
    ("spec.ssh.trustOnFirstUse", "yes", "expected true or false, got a string"),
    ("spec.cloud.cloudName", 2024, "expected a cloud name, got a number; put it in quotes"),
    ("spec.limits", [], "expected a mapping with glanceStreams, diskReserve, staleTempAge, chainsPerSite, got a list"),
])
def test_a_wrong_type_says_what_was_expected(path: str, value: Any, expected: str) -> None:
    assert problem(path, value).startswith(expected)


def test_unquoted_yaml_numbers_and_dates_get_a_hint_to_quote_them() -> None:
    document = yaml.safe_load("images: [{name: 1.0}, {name: 2024-01-01}]")
    found = problems(edited("spec.images", document["images"]))
    assert found == {"spec.images[0].name": "expected an image name, got a number; put it in quotes",
                     "spec.images[1].name": "expected an image name, got a date; put it in quotes"}


# ---- images -----------------------------------------------------------------------------------------------

def test_image_ids_are_case_insensitive_in_and_lowercase_out() -> None:
    assert load_policy(edited("spec.images[0].id", IMAGE_ID.upper())).images[0].id == IMAGE_ID
    assert UUID_RE.match(IMAGE_ID.upper())


@pytest.mark.parametrize("bad_id", [
    "07bc2424753b4f659da55a99d8383fe6",          # no dashes
    "{07bc2424-753b-4f65-9da5-5a99d8383fe6}",    # braces
    "07bc2424-753b-4f65-9da5-5a99d8383fe",       # too short
    "07bc2424-753b-4f65-9da5-5a99d8383fg6",      # not hex
    f"{IMAGE_ID}\n",                              # trailing newline
    f"{IMAGE_ID}; rm -rf /",
    "../../etc/passwd",
    "$(reboot)",
])
def test_an_image_id_must_be_a_uuid(bad_id: str) -> None:
    message = problem("spec.images[0].id", bad_id)
    assert "is not an image UUID; write it like 07bc2424-753b-4f65-9da5-5a99d8383fe6" in message


def test_an_image_needs_exactly_one_of_id_or_name() -> None:
    assert "needs an id or a name" in problem("spec.images[0]", {})
    assert "keep just one" in problem("spec.images[0]", {"id": IMAGE_ID, "name": "cirros"})


def test_an_image_name_can_hold_any_printable_text() -> None:
    # names only ever reach Glance's API as a query, never a shell
    name = "CentOS Stream 9 (x86_64); build $(date) & more"
    assert load_policy(edited("spec.images[0]", {"name": name})).images[0].name == name


@pytest.mark.parametrize(("name", "expected"), [
    ("", "is empty; write the name"),
    ("  ", "is empty; write the name"),
    ("x" * 256, "is 256 characters long; use at most 255"),
    ("cirros\nrm -rf /", "contains control characters such as newlines"),
    ("cirros\x00", "contains control characters"),
])
def test_an_image_name_must_be_one_short_line(name: str, expected: str) -> None:
    assert expected in problem("spec.images[0].name", name, edited("spec.images[0]", {"name": "cirros"}))


def test_a_name_of_255_characters_is_fine() -> None:
    assert load_policy(edited("spec.images[0]", {"name": "x" * 255})).images[0].name == "x" * 255


def test_an_image_listed_twice_is_reported_at_the_repeat() -> None:
    images = [{"id": IMAGE_ID}, {"name": "cirros"}, {"id": IMAGE_ID.upper()}, {"name": "cirros"}, {"id": OTHER_ID}]
    assert problems(edited("spec.images", images)) == {
        "spec.images[2].id": f"'{IMAGE_ID}' is already given at spec.images[0].id; list each image once",
        "spec.images[3].name": "'cirros' is already given at spec.images[1].name; list each image once",
    }


def test_images_must_not_be_empty() -> None:
    assert problem("spec.images", []).startswith("is empty; list at least one of the images to keep cached")


# ---- durations --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("24h", 86400), ("90m", 5400), ("1h30m", 5400), ("2d", 172800), ("86400s", 86400), ("45s", 45),
    ("1d2h3m4s", 93784), (3600, 3600), ("3600", 3600), (" 6h ", 21600),
])
def test_parse_duration(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "0", 0, "0s", "0h0m", -5, "-5m", "5 m", "1.5h", "h", "24H", "30m1h", "1y", "24h; reboot", "²", 1.5, None,
])
def test_parse_duration_refuses_anything_else_and_says_what_works(text: Any) -> None:
    with pytest.raises(ValueError, match="like 24h"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [
    (86400, "24h"), (5400, "1h30m"), (45, "45s"), (3661, "1h1m1s"), (172800, "48h"), (60, "1m"), (0, "0s"),
])
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [1, 59, 60, 61, 3599, 3600, 5400, 86399, 86400, 86401, 10 ** 9])
def test_durations_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["24h", "1h30m", "45s", "2h1s"])
def test_formatted_durations_round_trip(text: str) -> None:
    assert format_duration(parse_duration(text)) == text


def test_ttl_must_be_at_least_a_minute() -> None:
    assert "shorter than a minute; set ttl to the nodes' remove_unused_original_minimum_age_seconds" in problem(
        "spec.ttl", "59s")
    assert load_policy(edited("spec.ttl", "1m")).ttl == 60


def test_ttl_must_be_positive() -> None:
    assert "is not a positive duration; write it like 24h" in problem("spec.ttl", "0s")


def test_a_garbage_duration_names_the_accepted_forms() -> None:
    found = problems(edited("spec.limits", {"staleTempAge": "an hour"}))
    assert found == {"spec.limits.staleTempAge": "'an hour' is not a duration; write it like 24h, 90m, 1h30m, 2d "
                                                 "or 45s, or as a whole number of seconds"}


@pytest.mark.parametrize("refresh", ["24h", "25h", 86400])
def test_refresh_interval_must_be_shorter_than_ttl(refresh: str | int) -> None:
    message = problem("spec.refreshInterval", refresh)
    assert "is not shorter than ttl (24h)" in message and "like 6h" in message


# ---- sites and nodes --------------------------------------------------------------------------------------

def test_sites_must_not_be_empty() -> None:
    assert problem("spec.sites", []).startswith("is empty; list at least one of the edge sites, like sites: [")


def test_a_site_needs_a_node() -> None:
    assert problem("spec.sites[0].nodes", []).startswith("is empty; list at least one of the site's compute nodes")
    assert "required" in problems(edited("spec.sites[0]", {"name": "dcn0"}))["spec.sites[0].nodes"]


@pytest.mark.parametrize("name", ["DCN0", "dcn_0", "-dcn0", "dcn0-", "dcn0.east", "", "x" * 64, "dcn0\n", "a;b"])
def test_a_site_name_is_a_dns_label(name: str) -> None:
    assert "is not a valid site name; use lowercase letters, digits and '-'" in problem("spec.sites[0].name", name)


def test_a_site_name_may_have_63_characters() -> None:
    assert load_policy(edited("spec.sites[0].name", "s" * 63)).sites[0].name == "s" * 63


def test_site_names_are_unique() -> None:
    sites = [{"name": "dcn0", "nodes": [{"name": "a", "address": "192.0.2.1"}]},
             {"name": "dcn0", "nodes": [{"name": "b", "address": "192.0.2.2"}]}]
    assert problems(edited("spec.sites", sites)) == {
        "spec.sites[1].name": "'dcn0' is already given at spec.sites[0].name; give each site its own name"}


def test_node_names_are_unique_across_sites() -> None:
    sites = [{"name": "dcn0", "nodes": [{"name": "compute-0", "address": "192.0.2.1"}]},
             {"name": "dcn1", "nodes": [{"name": "compute-0", "address": "192.0.2.2"}]}]
    assert problems(edited("spec.sites", sites)) == {
        "spec.sites[1].nodes[0].name": "'compute-0' is already given at spec.sites[0].nodes[0].name; "
                                       "list each node once, in one site"}


def test_nodes_may_share_an_address_on_different_ports() -> None:
    nodes = [{"name": "a", "address": "127.0.0.1", "port": 2201}, {"name": "b", "address": "127.0.0.1", "port": 2202}]
    assert [node.port for node in load_policy(edited("spec.sites[0].nodes", nodes)).nodes] == [2201, 2202]


@pytest.mark.parametrize("name", ["Compute-0", "compute_0", "compute..0", ".compute", "compute-0.", "a b",
                                  "x" * 64, ".".join(["x" * 63] * 4)])
def test_a_node_name_is_a_label_or_dotted_host_name(name: str) -> None:
    assert "is not a valid node name; use dot-separated lowercase letters" in problem(
        "spec.sites[0].nodes[0].name", name)


def test_a_node_name_may_be_a_long_dotted_host_name() -> None:
    name = ".".join(["x" * 63] * 3 + ["y" * 61])  # 253 characters
    assert load_policy(edited("spec.sites[0].nodes[0].name", name)).nodes[0].name == name


@pytest.mark.parametrize("address", [
    "192.0.2.10", "2001:db8::10", "::1", "fe80::1%eth0", "compute-0", "Compute-0.DCN0.example.com", "localhost"])
def test_an_address_is_an_ip_literal_or_host_name(address: str) -> None:
    assert load_policy(edited("spec.sites[0].nodes[0].address", address)).nodes[0].address == address


@pytest.mark.parametrize("address", [
    "10.0.0.1; rm -rf /", "$(reboot)", "`reboot`", "192.0.2.10\n", "192.0.2.10 -p 2222", "-oProxyCommand=reboot",
    "root@192.0.2.10", "192.0.2.10:22", "[2001:db8::10]", "10.0.0.256", "1.2.3", "123", "host_name", "",
    "fe80::1%$(reboot)", "a" * 64 + ".example.com", "compute-0..example.com", "ssh://192.0.2.10",
])
def test_anything_else_as_an_address_is_refused_before_it_reaches_ssh(address: str) -> None:
    message = problem("spec.sites[0].nodes[0].address", address)
    assert "write an IP address like 192.0.2.10" in message or "use an interface name" in message


@pytest.mark.parametrize(("path", "port"), [
    ("spec.ssh.port", 0), ("spec.ssh.port", 65536), ("spec.sites[0].nodes[0].port", -22),
])
def test_ports_are_1_to_65535(path: str, port: int) -> None:
    assert problem(path, port) == f"{port} is not a port number; use 1 to 65535, like 22"


def test_a_boolean_is_not_a_port() -> None:
    assert problem("spec.sites[0].nodes[0].port", True) == "expected a port number like 22, got true/false"


# ---- ssh, secrets, cloud ----------------------------------------------------------------------------------

@pytest.mark.parametrize("user", ["Root", "1user", "root; reboot", "root\n", "-oProxyCommand=x", "u" * 33, "",
                                  "nova cache", "$(id)", "root@host"])
def test_the_ssh_user_is_a_posix_user_name(user: str) -> None:
    assert "is not a valid user name; use up to 32 lowercase letters" in problem("spec.ssh.user", user)


@pytest.mark.parametrize("user", ["root", "_novacache", "heat-admin", "u" * 32])
def test_plain_ssh_users_are_fine(user: str) -> None:
    assert load_policy(edited("spec.ssh.user", user)).ssh.user == user


@pytest.mark.parametrize("path", ["spec.cloud.secretRef.name", "spec.ssh.secretRef.name"])
@pytest.mark.parametrize("name", ["Compute-SSH", "compute_ssh", "../etc", "a/b", "x" * 254])
def test_secret_names_are_dns_subdomains(path: str, name: str) -> None:
    assert "is not a valid Secret name" in problem(path, name)


@pytest.mark.parametrize("path", ["spec.cloud.secretRef.key", "spec.ssh.secretRef.privateKeyKey",
                                  "spec.ssh.secretRef.knownHostsKey"])
@pytest.mark.parametrize("key", ["..", ".", "a/b", "../../etc/shadow", "key name", "", "k\n"])
def test_secret_keys_are_plain_file_names(path: str, key: str) -> None:
    assert "is not a valid Secret key; use letters, digits, '-', '_' and '.'" in problem(path, key)


@pytest.mark.parametrize("name", ["", "central\nother"])
def test_the_cloud_name_is_one_line(name: str) -> None:
    assert "write the name of an entry under clouds: in clouds.yaml" in problem("spec.cloud.cloudName", name)


# ---- nova.conf paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    ("etc/nova/nova.conf", "is not an absolute path; write it from /"),
    ("~/nova.conf", "is not an absolute path"),
    ("/etc/nova/../shadow", "contains '..'; write the path without it"),
    ("/etc/nova/", "names a directory"),
    ("/etc/nova/nova.conf\n/etc/shadow", "contains characters other than"),
    ("/etc/nova/nova.conf\x00", "contains characters other than"),
    ("/etc/nova/$(reboot).conf", "contains characters other than"),
    ("/etc/nova/nova.conf; reboot", "contains characters other than"),
    ("/etc/nova/nova conf", "contains characters other than"),
])
def test_a_nova_conf_path_is_absolute_and_plain(path: str, expected: str) -> None:
    for field in ("spec.novaConf", "spec.sites[0].novaConf", "spec.sites[0].nodes[0].novaConf"):
        message = problem(field, path)
        assert expected in message and "like /etc/nova/nova.conf" in message


def test_nova_conf_lists_report_the_bad_entry() -> None:
    found = problems(edited("spec.novaConf", ["/etc/nova/nova.conf", "nova.conf"]))
    assert list(found) == ["spec.novaConf[1]"]


def test_nova_conf_list_must_not_be_empty() -> None:
    assert "is empty; list at least one nova.conf path" in problem("spec.sites[0].novaConf", [])


def test_plain_nova_conf_paths_are_fine() -> None:
    path = "/var/lib/kolla/config_files/nova-compute_1.conf"
    assert load_policy(edited("spec.novaConf", [path])).nodes[0].nova_conf == (path,)


# ---- limits and verify ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("limits", "field", "expected"), [
    ({"glanceStreams": 0}, "glanceStreams", "0 is not positive; use a whole number of at least 1"),
    ({"glanceStreams": -3}, "glanceStreams", "-3 is not positive"),
    ({"glanceStreams": "5"}, "glanceStreams", "expected a whole number like 5, got a string"),
    ({"diskReserve": 0}, "diskReserve", "is not a positive size; write it like 512MiB, 1G, 10GiB"),
    ({"diskReserve": "lots"}, "diskReserve", "is not a size"),
    ({"diskReserve": "-1G"}, "diskReserve", "is not a size"),
    ({"staleTempAge": "0s"}, "staleTempAge", "is not a positive duration"),
])
def test_limits_are_positive(limits: dict[str, Any], field: str, expected: str) -> None:
    assert expected in problem(f"spec.limits.{field}", limits[field], edited("spec.limits", {}))


@pytest.mark.parametrize(("reserve", "size"), [("512MiB", 512 * 1024 ** 2), ("1G", GiB), ("10GiB", 10 * GiB),
                                               (4096, 4096), ("1GB", 10 ** 9)])
def test_disk_reserve_takes_sizes(reserve: str | int, size: int) -> None:
    assert load_policy(edited("spec.limits", {"diskReserve": reserve})).limits.disk_reserve == size


def test_verify_is_size_or_checksum() -> None:
    assert load_policy(edited("spec.verify", "checksum")).verify == "checksum"
    assert "is not a verify mode; use size" in problem("spec.verify", "sha256")


def test_distribution_settings_default_and_inherit() -> None:
    doc = yaml.safe_load(FULL)
    doc["spec"]["strategy"] = "proxy"
    doc["spec"]["sites"][0]["strategy"] = "direct"
    doc["spec"]["sites"][0]["seedNode"] = doc["spec"]["sites"][0]["nodes"][0]["name"]
    doc["spec"]["nodeSsh"] = {"user": "nova_migration", "port": 2022, "strictHostKeyChecking": False}
    doc["spec"]["limits"] = {"chainsPerSite": 2}
    policy = load_policy(doc)
    assert policy.sites[0].strategy == "direct"
    assert policy.sites[0].seed_node == doc["spec"]["sites"][0]["nodes"][0]["name"]
    assert all(site.strategy == "proxy" for site in policy.sites[1:])
    assert policy.node_ssh.user == "nova_migration" and policy.node_ssh.port == 2022
    assert policy.node_ssh.identity_file == "/etc/nova/migration/identity"
    assert policy.node_ssh.strict_host_key_checking is False
    assert policy.limits.chains_per_site == 2
    default = load_policy(minimal())
    assert default.sites[0].strategy == "pipeline" and default.sites[0].seed_node is None
    assert default.limits.chains_per_site == 1 and default.node_ssh.strict_host_key_checking is True


def test_a_seed_node_must_belong_to_its_site_and_strategies_are_known() -> None:
    doc = minimal()
    doc["spec"]["sites"][0]["seedNode"] = "elsewhere-compute-9"
    doc["spec"]["strategy"] = "torrent"
    with pytest.raises(PolicyError) as error:
        load_policy(doc)
    paths = [path for path, _ in error.value.problems]
    assert "spec.sites[0].seedNode" in paths and "spec.strategy" in paths
    assert "is not a node of this site" in str(error.value)
