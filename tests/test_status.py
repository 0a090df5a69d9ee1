"""The CR status: conditions GitOps tools read, counts, failures; bounded for a large fleet."""

from __future__ import annotations

import datetime
import json

from novacache import status
from novacache.report import ImageResult, NodeResult, Report, State

NOW = datetime.datetime(2026, 11, 21, 6, 0, tzinfo=datetime.timezone.utc)
LATER = NOW + datetime.timedelta(hours=6)


def fleet(sites: int, nodes_per_site: int, images: int, failing_every: int = 0) -> Report:
    report = Report(policy="edge-images", started_at=0.0, finished_at=60.0)
    report.images = [{"id": f"{i:08x}-0000-4000-8000-000000000000", "name": f"image-{i}", "diskFormat": "raw",
                      "size": 1 << 30} for i in range(images)]
    count = 0
    for s in range(sites):
        for n in range(nodes_per_site):
            node = NodeResult(site=f"dcn{s}", node=f"dcn{s}-compute-{n}", address=f"192.0.2.{n % 250}")
            for i, image in enumerate(report.images):
                count += 1
                failed = failing_every and count % failing_every == 0
                node.images.append(ImageResult(
                    image["id"], image["name"], State.FAILED if failed else State.FILLED,
                    bytes_moved=0 if failed else 1 << 30, wan_bytes=(1 << 30) if n == 0 else 0,
                    source="glance" if n == 0 else f"relay from dcn{s}-compute-{n - 1}",
                    reason=("x" * 5000) if failed else "not cached"))
            report.nodes.append(node)
    return report


def conditions(result: dict) -> dict[str, dict]:
    return {c["type"]: c for c in result["conditions"]}


def test_a_clean_reconcile_is_ready_with_counts() -> None:
    result = status.finished(fleet(2, 3, 2), None, 4, NOW, LATER, retrying=False)
    c = conditions(result)
    assert c["Ready"]["status"] == "True" and c["Reconciling"]["status"] == "False"
    assert c["Stalled"]["status"] == "False"
    assert result["observedGeneration"] == 4 and c["Ready"]["observedGeneration"] == 4
    assert result["summary"] == {"nodes": 6, "nodesReady": 6, "images": 2, "cached": "6/6",
                                 "bytesMoved": 12 << 30, "wanBytes": 4 << 30, "sites": 2}
    assert result["sites"][0] == {"name": "dcn0", "nodes": 3, "nodesReady": 3, "imagesCached": 6,
                                  "bytesMoved": 6 << 30, "wanBytes": 2 << 30}
    assert result["failures"] == []
    assert result["lastRefreshTime"] == "2026-11-21T06:00:00Z" and result["nextRefreshTime"] == "2026-11-21T12:00:00Z"


def test_failures_make_it_not_ready_and_retrying() -> None:
    result = status.finished(fleet(2, 3, 2, failing_every=5), None, 1, NOW, LATER, retrying=True)
    c = conditions(result)
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "NodesNotReady"
    assert c["Reconciling"]["status"] == "True" and c["Reconciling"]["reason"] == "RetryScheduled"
    assert c["Stalled"]["status"] == "False"
    assert 0 < len(result["failures"]) <= status.MAX_FAILURES
    assert all(len(f["reason"]) <= status.MAX_REASON for f in result["failures"])


def test_transition_times_move_only_when_a_condition_flips() -> None:
    first = status.finished(fleet(1, 1, 1), None, 1, NOW, LATER, retrying=False)
    later = NOW + datetime.timedelta(hours=1)
    again = status.finished(fleet(1, 1, 1), first, 1, later, LATER, retrying=False)
    assert conditions(again)["Ready"]["lastTransitionTime"] == "2026-11-21T06:00:00Z"
    broken = status.finished(fleet(1, 1, 1, failing_every=1), again, 1, later, LATER, retrying=True)
    assert conditions(broken)["Ready"]["lastTransitionTime"] == "2026-11-21T07:00:00Z"


def test_a_refresh_keeps_a_ready_policy_ready_but_a_new_generation_is_not_ready_yet() -> None:
    done = status.finished(fleet(1, 1, 1), None, 3, NOW, LATER, retrying=False)
    refresh = status.reconciling(done, 3, NOW, "refreshing")
    assert conditions(refresh)["Ready"]["status"] == "True"
    assert conditions(refresh)["Reconciling"]["status"] == "True"
    changed = status.reconciling(done, 4, NOW, "new spec")
    assert conditions(changed)["Ready"]["status"] == "False"
    assert changed["observedGeneration"] == 4


def test_stalled_names_the_problem() -> None:
    result = status.stalled(None, 2, NOW, "SecretNotFound", "spec.ssh.secretRef: Secret default/x does not exist")
    c = conditions(result)
    assert c["Stalled"]["status"] == "True" and c["Ready"]["status"] == "False"
    assert "spec.ssh.secretRef" in c["Stalled"]["message"]


def test_status_for_two_thousand_nodes_and_fifty_images_stays_under_64_kib() -> None:
    for shape in ((2000, 1), (200, 10), (1, 2000)):
        report = fleet(*shape, images=50, failing_every=7)
        result = status.finished(report, None, 1, NOW, LATER, retrying=True)
        size = len(json.dumps(result))
        print(f"{shape[0]} sites x {shape[1]} nodes x 50 images: status {size} bytes")
        assert size < 64 * 1024
        assert result["summary"]["nodes"] == 2000
        assert len(result["sites"]) <= status.MAX_SITES


def test_every_status_fits_the_crds_status_schema() -> None:
    from test_manifests import SCHEMA, schema_errors
    schema = SCHEMA["properties"]["status"]
    done = status.finished(fleet(3, 2, 2, failing_every=3), None, 2, NOW, LATER, retrying=True)
    for result in (done, status.reconciling(done, 3, NOW, "refreshing"),
                   status.stalled(done, 3, NOW, "InvalidSpec", "spec.ttl: bad"),
                   status.finished(fleet(2000, 1, 50, failing_every=7), None, 1, NOW, LATER, retrying=True)):
        assert schema_errors(result, schema) == []
