"""The `novacache` command: the operator, one-shot reconciles, and the embedded testbed."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .units import format_size, parse_size


def _rate(text: str) -> int | None:
    from .testbed.network import parse_rate
    try:
        return parse_rate(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_shape_arguments(parser: argparse.ArgumentParser, nodes: int = 3, image_size: str = "64MiB") -> None:
    parser.add_argument("--sites", type=int, default=2, help="edge sites (default 2)")
    parser.add_argument("--nodes", type=int, default=nodes, help=f"compute nodes per site (default {nodes})")
    parser.add_argument("--wan-rate", type=_rate, default="80mbit",
                        help="WAN link rate central<->site, e.g. 80mbit; 'none' for unshaped (default 80mbit)")
    parser.add_argument("--lan-rate", type=_rate, default="800mbit",
                        help="LAN link rate inside a site; 'none' for unshaped (default 800mbit)")
    parser.add_argument("--image-size", type=_size, default=image_size,
                        help=f"sample image size (default {image_size})")
    parser.add_argument("--mode", choices=["auto", "netns", "loopback"], default="auto",
                        help="netns: shaped multi-site network (root); loopback: sshd on 127.0.0.1 ports, "
                             "unshaped (default: netns when possible)")
    parser.add_argument("--rbd-site", action="append", default=[], metavar="SITE",
                        help="make this site's nodes use [libvirt] images_type = rbd (repeatable)")


def _options(args: argparse.Namespace):
    from .testbed import Options
    return Options(sites=args.sites, nodes=args.nodes, wan_rate=args.wan_rate, lan_rate=args.lan_rate,
                   image_size=args.image_size, mode=args.mode, rbd_sites=args.rbd_site)


def _testbed_up(args: argparse.Namespace) -> int:
    from .testbed import Testbed
    testbed = Testbed.up(Path(args.dir), _options(args))
    print(describe(testbed))
    print(f"\nState in {testbed.dir / 'testbed.json'}; secrets in {testbed.secrets_dir}; "
          f"sample policy in {testbed.dir / 'policy.yaml'}.")
    print(f"Run commands where the operator runs: novacache testbed exec --dir {testbed.dir} -- CMD")
    return 0


def _testbed_down(args: argparse.Namespace) -> int:
    from .testbed import Testbed
    Testbed.load(Path(args.dir)).down(keep_files=args.keep_files)
    print(f"testbed in {args.dir} is down")
    return 0


def _testbed_show(args: argparse.Namespace) -> int:
    from .testbed import Testbed
    print(describe(Testbed.load(Path(args.dir))))
    return 0


def _testbed_exec(args: argparse.Namespace) -> int:
    from .testbed import Testbed
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("novacache testbed exec: give a command after --")
    argv = Testbed.load(Path(args.dir)).exec_argv(command)
    os.execvp(argv[0], argv)


def _demo(args: argparse.Namespace) -> int:
    import subprocess

    from .testbed import Testbed
    directory = Path(tempfile.mkdtemp(prefix="novacache-demo-"))
    print(f"== Bringing up a testbed in {directory}", flush=True)
    testbed = Testbed.up(directory, _options(args))
    novacache = str(Path(sys.argv[0]).resolve()) if Path(sys.argv[0]).name == "novacache" else "novacache"
    reconcile = testbed.exec_argv([novacache, "reconcile", "-f", str(directory / "policy.yaml")])
    failed = False
    try:
        print(describe(testbed))
        for title in ("Cold caches: every node is filled from Glance",
                      "Second pass: images are cached, only their ages are reset"):
            print(f"\n== {title}\n$ {' '.join(reconcile)}", flush=True)
            failed |= subprocess.run(reconcile).returncode != 0
    finally:
        print("\n== Tearing the testbed down", flush=True)
        testbed.down()
    print("done: nothing left behind" + ("; but a reconcile failed, see above" if failed else ""))
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    from . import handlers
    if not args.all_namespaces and not args.namespace:
        raise SystemExit("novacache run: give --namespace NS (repeatable) or --all-namespaces")
    handlers.run([] if args.all_namespaces else args.namespace, liveness=args.liveness)
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import json

    from . import credentials
    from .engine import reconcile
    from .glance import GlanceImages
    from .policy import load_policy_file

    policy = load_policy_file(args.file)
    if args.verify:
        policy = dataclasses.replace(policy, verify=args.verify)
    secrets_dir = Path(args.secrets_dir) if args.secrets_dir else Path(args.file).resolve().parent / "secrets"
    creds = credentials.load(policy, credentials.directory_reader(secrets_dir))
    source = GlanceImages.from_clouds_yaml(creds.clouds_yaml, policy.cloud.cloud_name)
    report = asyncio.run(reconcile(policy, source, creds.ssh, dry_run=args.dry_run))
    print(report.table())
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def _bench_distribution(args: argparse.Namespace) -> int:
    from . import bench
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(strategies) - {"direct", "proxy", "pipeline"}
    if unknown:
        raise SystemExit(f"novacache bench distribution: unknown strategies {sorted(unknown)}; "
                         f"use direct, proxy and pipeline")
    rows = bench.distribution(Path(args.dir), _options(args), strategies)
    bench.print_table(rows)
    if args.json:
        bench.write_json(rows, Path(args.json))
    return 0 if all(row["allVerified"] for row in rows) else 1


def describe(testbed) -> str:
    """The testbed's topology and what its Glance holds right now, as a person wants to read it."""
    from .testbed.images import list_images
    state = testbed.state
    options = state["options"]

    def rate(bits: int | None) -> str:
        return "unshaped" if bits is None or state["mode"] != "netns" else f"{bits / 1e6:g} Mbit/s"

    lines = [f"Testbed ({state['mode']} mode{', isolated node filesystems' if state['isolated'] else ''})",
             f"  central: {state['central']['namespace'] or 'root namespace'}  Glance {testbed.glance_endpoint}",
             f"  WAN links {rate(options['wan_rate'])}, LAN links {rate(options['lan_rate'])}"]
    for site in testbed.sites:
        lines.append(f"  site {site['name']} (images_type {site['imagesType']})"
                     + (f"  LAN {site['lanNetwork']}" if site["lanNetwork"] else ""))
        for node in site["nodes"]:
            lines.append(f"    {node['name']:<18} {node['address']}:{node['port']:<6} sshd pid {node['pid']}")
    lines.append("  Glance images:")
    for image in list_images(testbed.glance_endpoint):
        lines.append(f"    {image['id']}  {image['name']:<14} {image['disk_format']:<6} "
                     f"{format_size(image['size']):>10}  stores={image['stores']}  "
                     f"sha512={image['sha512'][:16]}...")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="novacache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    testbed = commands.add_parser("testbed", help="a real multi-site test environment on this machine")
    testbed_commands = testbed.add_subparsers(dest="testbed_command", required=True)
    up = testbed_commands.add_parser("up", help="build a testbed and leave it running")
    up.add_argument("--dir", required=True, help="directory for the testbed's state, secrets and policy")
    _add_shape_arguments(up)
    up.set_defaults(func=_testbed_up)
    down = testbed_commands.add_parser("down", help="remove a testbed completely")
    down.add_argument("--dir", required=True)
    down.add_argument("--keep-files", action="store_true", help="keep DIR's files (logs) for a post-mortem")
    down.set_defaults(func=_testbed_down)
    show = testbed_commands.add_parser("show", help="print a testbed's topology and Glance images")
    show.add_argument("--dir", required=True)
    show.set_defaults(func=_testbed_show)
    exec_ = testbed_commands.add_parser("exec", help="run a command where the operator runs (central)")
    exec_.add_argument("--dir", required=True)
    exec_.add_argument("command", nargs=argparse.REMAINDER)
    exec_.set_defaults(func=_testbed_exec)

    run = commands.add_parser("run", help="run the operator (kopf) against the current Kubernetes cluster")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="serve policies in this namespace")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve policies cluster-wide")
    run.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                     help="health endpoint for probes (default http://0.0.0.0:8080/healthz)")
    run.set_defaults(func=_run)

    reconcile = commands.add_parser(
        "reconcile", help="one full reconcile of a policy file, without Kubernetes; exit 0 when every "
                          "target node holds every image, verified and fresh")
    reconcile.add_argument("-f", "--file", required=True, help="ImageCachePolicy YAML file")
    reconcile.add_argument("--secrets-dir", help="where secretRefs resolve, as DIR/<name>/<key> "
                                                 "(default: 'secrets' beside the policy file)")
    reconcile.add_argument("--report-json", metavar="FILE", help="write the full report as JSON")
    reconcile.add_argument("--dry-run", action="store_true", help="observe and plan only; change nothing")
    reconcile.add_argument("--verify", choices=["size", "checksum"], help="override spec.verify")
    reconcile.set_defaults(func=_reconcile)

    bench = commands.add_parser("bench", help="benchmarks on the shaped testbed (figures, not tests)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    distribution = bench_commands.add_parser(
        "distribution", help="fill a cold testbed with each strategy and compare wall time and WAN bytes")
    distribution.add_argument("--dir", required=True, help="directory for the benchmark's testbed")
    _add_shape_arguments(distribution, nodes=4, image_size="256MiB")
    distribution.add_argument("--strategies", default="direct,proxy,pipeline",
                              help="comma-separated strategies to compare (default direct,proxy,pipeline)")
    distribution.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    distribution.set_defaults(func=_bench_distribution)

    demo = commands.add_parser("demo", help="bring a testbed up, show it, tear it down")
    _add_shape_arguments(demo)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    from .credentials import SecretError
    from .glance import ImageError
    from .policy import PolicyError
    from .testbed import TestbedError
    try:
        return args.func(args)
    except (PolicyError, SecretError, ImageError, TestbedError) as error:
        print(f"novacache: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
