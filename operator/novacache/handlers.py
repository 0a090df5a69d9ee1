"""kopf wiring: the only module that imports kopf. The work is in `controller`, `engine` and below.

Policies are served without finalizers: deleting a policy, or the operator itself, never leaves an
object that cannot be deleted. Refreshing on refreshInterval is done by each policy's own runner
rather than a kopf timer, because kopf's timers and daemons need finalizers.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import kopf

from .controller import Controller
from .kube import GROUP, PLURAL, VERSION, Kube

LIVENESS = "http://0.0.0.0:8080/healthz"


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler bookkeeping in annotations of our own: the status belongs to the policy's schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # Events are posted for notable transitions by the controller; kopf's own only for trouble.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    memo.controller = Controller(Kube.from_environment())


@kopf.on.cleanup()
async def stop_all(memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.shutdown()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def apply(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.apply(dict(body))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def deleted(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    if event["type"] == "DELETED":
        meta = event["object"]["metadata"]
        await memo.controller.forget(meta["namespace"], meta["name"])


@kopf.on.probe(id="policies")
def policies(memo: kopf.Memo, **_: Any) -> int:
    """For the liveness endpoint: how many policies this operator serves."""
    return len(memo.controller.runners)


def run(namespaces: Sequence[str], liveness: str = LIVENESS) -> None:
    """Run the operator until it is stopped: over namespaces, or the whole cluster when empty."""
    kopf.configure(verbose=False)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=list(namespaces),
             liveness_endpoint=liveness)
