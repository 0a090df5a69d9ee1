"""Distribution within a site, on the shaped testbed: each image crosses a site's WAN link once."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

from conftest import cache_file, needs_glance, needs_netns, policy_for, run, sha512
from novacache import credentials
from novacache.glance import GlanceImages
from novacache.node import parse_chain_output
from novacache.report import State
from novacache.testbed import Testbed

pytestmark = [needs_glance, needs_netns]


def sites_with(bed: Testbed, **site_fields: object) -> list[dict]:
    import yaml
    sites = yaml.safe_load((bed.dir / "policy.yaml").read_text())["spec"]["sites"]
    return [{**site, **site_fields} for site in sites]


@pytest.mark.parametrize("strategy", ["direct", "proxy", "pipeline"])
def test_each_strategy_leaves_every_node_a_verified_copy(bed: Testbed, raw_equivalents: dict,
                                                         strategy: str) -> None:
    before = {site["name"]: bed.wan_tx_bytes(site["name"]) for site in bed.sites}
    report = run(bed, policy_for(bed, strategy=strategy))
    assert report.ok, report.table()
    for node in bed.nodes:
        for image in bed.images:
            assert sha512(cache_file(node, image.id)) == raw_equivalents[image.id]
    image_bytes = sum(image.size for image in bed.images)
    for site in bed.sites:
        copies = len(site["nodes"]) if strategy == "direct" else 1
        assert report.wan_bytes(site["name"]) == copies * image_bytes
        # The kernel agrees: what went down the link is the payload plus TCP/IP and SSH overhead.
        sent = bed.wan_tx_bytes(site["name"]) - before[site["name"]]
        assert copies * image_bytes <= sent <= copies * image_bytes * 1.08
    sources = {r.source for n in report.nodes for r in n.images}
    if strategy == "direct":
        assert sources == {"glance"}
    else:
        assert "glance" in sources and any(s.startswith("relay from") for s in sources)


def test_proxy_uses_the_configured_seed_node(bed: Testbed) -> None:
    seed = bed.sites[0]["nodes"][1]["name"]
    sites = sites_with(bed, strategy="proxy")
    sites[0]["seedNode"] = seed
    report = run(bed, policy_for(bed, sites=sites))
    assert report.ok, report.table()
    for node in report.nodes:
        if node.site == bed.sites[0]["name"]:
            expected = "glance" if node.node == seed else f"relay from {seed}"
            assert {r.source for r in node.images} == {expected}


def test_a_site_where_one_node_holds_the_image_moves_no_wan_bytes(bed: Testbed) -> None:
    site = bed.sites[0]
    holder = site["nodes"][-1]
    only_holder = sites_with(bed)
    only_holder[0]["nodes"] = [n for n in only_holder[0]["nodes"] if n["name"] == holder["name"]]
    assert run(bed, policy_for(bed, sites=only_holder[:1])).ok
    report = run(bed, policy_for(bed))
    assert report.ok, report.table()
    assert report.wan_bytes(site["name"]) == 0
    for node in report.nodes:
        if node.site == site["name"] and node.node != holder["name"]:
            assert all(r.state is State.FILLED and r.source.startswith("relay from") for r in node.images)


class SlowSource:
    """Glance, slowed down, calling `at_bytes` once when that much of a stream has gone by."""

    def __init__(self, inner: GlanceImages, at_bytes: int, action: callable):
        self.inner, self.at_bytes, self.action = inner, at_bytes, action
        self.fired = threading.Event()

    def resolve(self, refs):  # noqa: ANN001, ANN201 - the ImageSource protocol
        return self.inner.resolve(refs)

    def stream(self, image_id: str) -> Iterator[bytes]:
        sent = 0
        for chunk in self.inner.stream(image_id, chunk_size=256 * 1024):
            sent += len(chunk)
            if sent >= self.at_bytes and not self.fired.is_set():
                self.fired.set()
                self.action()
            time.sleep(0.01)
            yield chunk


def test_a_node_killed_mid_chain_does_not_starve_the_nodes_after_it(bed: Testbed) -> None:
    site = bed.sites[0]
    first, victim, last = (n["name"] for n in site["nodes"][:3]) if len(site["nodes"]) > 2 else (None,) * 3
    if victim is None:
        pytest.skip("needs three nodes in a site")
    policy = policy_for(bed, images=[{"id": bed.images[0].id}],
                        sites=[{**sites_with(bed)[0], "seedNode": first}])
    creds = credentials.load(policy, credentials.directory_reader(bed.secrets_dir))
    glance = GlanceImages.from_clouds_yaml(creds.clouds_yaml, policy.cloud.cloud_name)
    source = SlowSource(glance, 4 * 1024 * 1024, lambda: bed.stop_node(victim))
    try:
        report = run(bed, policy, source=source)
    finally:
        bed.start_node(victim)
    assert source.fired.is_set()
    results = {n.node: n for n in report.nodes}
    assert results[first].images[0].state is State.FILLED
    assert results[last].images[0].state is State.FILLED, report.table()
    assert results[last].images[0].source == f"relay from {first}"      # re-planned from the holder
    assert results[victim].images[0].state is State.FAILED
    assert results[victim].images[0].reason
    assert report.wan_bytes(site["name"]) == bed.images[0].size           # still once over the WAN
    assert sha512(cache_file(bed.node(last), bed.images[0].id)) == bed.images[0].sha512
    # The victim is left without a file under the final name.
    assert not cache_file(bed.node(victim), bed.images[0].id).exists()
    # and the next reconcile completes it, from a node of its site.
    again = run(bed, policy)
    assert again.ok and again.wan_bytes(site["name"]) == 0


def test_chain_output_is_attributed_to_the_right_hops() -> None:
    stdout = ("novacache-result a 0 100 1700000000.0\n"
              "novacache-link a 255 ssh: connect to host 198.18.1.11 port 22: Connection refused\n")
    stderr = "a: nothing wrong here\nb: never said\n"
    outcome = parse_chain_output(["a", "b", "c"], None, stdout, stderr)
    assert outcome["a"].ok and outcome["a"].size == 100
    assert not outcome["b"].ok and outcome["b"].message == "never said"
    assert not outcome["c"].ok and "did not relay" in outcome["c"].message
    sent = parse_chain_output(["b"], "a", "novacache-link a 1 broken pipe\n", "")
    assert not sent["b"].ok and "relay from a failed (1): broken pipe" in sent["b"].message
