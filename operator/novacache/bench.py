"""Benchmarks on the shaped testbed: figures to read, not pass/fail tests.

`novacache bench distribution` fills a cold testbed once per strategy, side by side in one run, and
prints per strategy: wall time, WAN bytes per site (counted by the operator and by the kernel on
the WAN link), the ratio of wall time to the physical limit (image size over the WAN link's TCP
payload ceiling, tbf's link-layer overhead included), and whether every copy verified (each node's
file hashed from the host, not trusted from the report).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import cacherules, credentials
from .engine import reconcile
from .glance import GlanceImages
from .policy import load_policy
from .testbed import Options, Testbed
from .testbed.network import payload_ceiling
from .units import format_size


def distribution(directory: Path, options: Options, strategies: Sequence[str]) -> list[dict[str, Any]]:
    """Run each strategy from a cold cache on one testbed; return one row of figures per strategy."""
    testbed = Testbed.up(directory, dataclasses.replace(options, mode="netns"))
    try:
        image = next(i for i in testbed.images if i.disk_format == "raw")
        document = yaml.safe_load((testbed.dir / "policy.yaml").read_text())
        document["spec"]["images"] = [{"id": image.id}]
        rows = []
        for strategy in strategies:
            _empty_caches(testbed)
            document["spec"]["strategy"] = strategy
            rows.append(_run(testbed, load_policy(document), image, strategy, options))
            print(_format_row(rows[-1]), flush=True)
        return rows
    finally:
        testbed.down()


def _empty_caches(testbed: Testbed) -> None:
    for node in testbed.nodes:
        for entry in Path(node["cacheDir"]).iterdir():
            entry.unlink()


def _run(testbed: Testbed, policy, image, strategy: str, options: Options) -> dict[str, Any]:
    creds = credentials.load(policy, credentials.directory_reader(testbed.secrets_dir))
    source = GlanceImages.from_clouds_yaml(creds.clouds_yaml, policy.cloud.cloud_name)
    sent_before = {site["name"]: testbed.wan_tx_bytes(site["name"]) for site in testbed.sites}
    started = time.monotonic()
    report = asyncio.run(reconcile(policy, source, creds.ssh))
    wall = time.monotonic() - started
    limit = image.size / payload_ceiling(options.wan_rate)
    verified = report.ok and all(_sha512(Path(node["cacheDir"]) / cacherules.cache_name(image.id)) == image.sha512
                                 for node in testbed.nodes)
    return {
        "strategy": strategy, "sites": options.sites, "nodesPerSite": options.nodes, "imageBytes": image.size,
        "wanRate": options.wan_rate, "lanRate": options.lan_rate, "wallSeconds": round(wall, 2),
        "limitSeconds": round(limit, 2), "ratioToLimit": round(wall / limit, 3),
        "wanBytesPerSite": {s["name"]: report.wan_bytes(s["name"]) for s in testbed.sites},
        "wanImagesPerSite": {s["name"]: round(report.wan_bytes(s["name"]) / image.size, 3) for s in testbed.sites},
        "kernelWanBytesPerSite": {s["name"]: testbed.wan_tx_bytes(s["name"]) - sent_before[s["name"]]
                                  for s in testbed.sites},
        "allVerified": verified,
        "summary": report.summary(),
    }


def _sha512(path: Path) -> str | None:
    try:
        with open(path, "rb") as data:
            return hashlib.file_digest(data, "sha512").hexdigest()
    except FileNotFoundError:
        return None


def _format_row(row: dict[str, Any]) -> str:
    wan = ", ".join(f"{site} {copies:.2f}x" for site, copies in row["wanImagesPerSite"].items())
    return (f"{row['strategy']:<9} {row['sites']}x{row['nodesPerSite']} nodes  {format_size(row['imageBytes'])}  "
            f"wall {row['wallSeconds']:7.1f}s  limit {row['limitSeconds']:.1f}s  ratio {row['ratioToLimit']:5.2f}x  "
            f"WAN images per site: {wan}  verified: {'yes' if row['allVerified'] else 'NO'}")


def print_table(rows: list[dict[str, Any]]) -> None:
    """The side-by-side comparison, with the speed-up of each strategy over direct."""
    print("\nstrategy  shape       image       wall      limit   ratio   WAN images per site    verified")
    direct = next((r["wallSeconds"] for r in rows if r["strategy"] == "direct"), None)
    for row in rows:
        line = _format_row(row)
        if direct and row["strategy"] != "direct":
            line += f"  ({direct / row['wallSeconds']:.1f}x faster than direct)"
        print(line)


def write_json(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
