"""kopf handlers: thin glue between kopf's events and the pure builders / reconcile functions.

Run with `glmserve operator` (glmserve.operator.entry.run_operator) or `kopf run -m glmserve.operator.handlers`.
Errors never crash the operator: they become the Degraded condition and a Warning event, and kopf retries.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from glmserve.operator import naming
from glmserve.operator.conditions import Failure
from glmserve.operator.kube import KubeApi, KubeError, load_config
from glmserve.operator.reconcile import (MissingApiError, OwnershipError, delete_children, observe,
                                         reconcile_children, refresh_status)
from glmserve.operator.schema import GROUP, KIND, PLURAL, VERSION
from glmserve.operator.spec import SpecError, check_owner_name, parse_spec

GLMD = (GROUP, VERSION, PLURAL)
FINALIZER = "glmserve.io/cleanup"
RETRY_DELAY_S = 30
STATUS_RESYNC_S = 60
CHILD_LABELS = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: the CRD's status schema has no room for (and prunes) kopf's fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="glmserve.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="glmserve.io", key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    # Serve the resources and namespaces found at startup: no cluster-wide list/watch of CRDs and namespaces is
    # needed (least privilege; Helm installs the CRD before the operator starts).
    settings.scanning.disabled = True
    settings.posting.reporting_component = naming.MANAGED_BY
    # Without a watch timeout a silently dropped connection would stall the operator until the next restart.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    if getattr(memo, "api", None) is None:
        memo.api = KubeApi(memo.get("kube_config") or load_config())


@kopf.on.cleanup()
def close_client(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "api", None) is not None:
        memo.api.close()


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's own connection uses the same credentials as our client."""
    cfg = memo.api.config
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None,
        scheme=scheme or None, token=token or None,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
    )


@kopf.on.resume(*GLMD)
@kopf.on.create(*GLMD)
@kopf.on.update(*GLMD)
def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    owner = naming.Owner.from_body(body)
    old_status = dict(body.get("status") or {})
    try:
        spec = parse_spec(dict(body.get("spec") or {}))
        check_owner_name(spec, owner.name)
    except SpecError as e:
        _fail(patch, body, memo.api, None, owner, old_status, Failure("InvalidSpec", str(e)))
        raise kopf.PermanentError(str(e)) from e  # retrying cannot help; the next spec edit runs again
    try:
        outcome = reconcile_children(memo.api, spec, owner)
    except (KubeError, OwnershipError, MissingApiError) as e:
        _fail(patch, body, memo.api, spec, owner, old_status, Failure("ReconcileFailed", str(e)))
        raise kopf.TemporaryError(str(e), delay=RETRY_DELAY_S) from e
    if outcome.changed:
        kopf.info(body, reason="Reconciled", message=outcome.summary())
    logger.info("reconciled %s/%s: %s", owner.namespace, owner.name, outcome.summary())
    _set_status(patch, old_status, observe(memo.api, spec, owner, old_status, failure=None,
                                           observed_generation=owner.generation))


def _set_status(patch: kopf.Patch, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Write the status only when it changed: a restarted operator must not touch anything."""
    if {k: old.get(k) for k in new} != new:
        patch.status.update(new)


def _fail(patch: kopf.Patch, body: kopf.Body, api: KubeApi, spec: Any, owner: naming.Owner,
          old_status: dict[str, Any], failure: Failure) -> None:
    kopf.warn(body, reason=failure.reason, message=failure.message)
    try:
        status = observe(api, spec, owner, old_status, failure=failure, observed_generation=owner.generation)
    except KubeError:  # the API itself is failing: still record why, without the children's state
        status = {"conditions": [{"type": "Degraded", "status": "True", "reason": failure.reason,
                                  "message": failure.message, "observedGeneration": owner.generation}]}
    _set_status(patch, old_status, status)


@kopf.on.delete(*GLMD)
def cleanup(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    owner = naming.Owner.from_body(body)
    try:
        gone = delete_children(memo.api, owner)
    except KubeError as e:
        raise kopf.TemporaryError(str(e), delay=RETRY_DELAY_S) from e
    logger.info("deleted the children of %s/%s: %s", owner.namespace, owner.name, ", ".join(gone) or "none left")


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
def child_deployment_changed(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Keep the owner's status current as pods become ready, roll or scale."""
    _refresh_owner(body, memo, logger)


# Roles spanning nodes. Without the LWS CRD in the cluster kopf only logs that it cannot serve this resource.
@kopf.on.event("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels=CHILD_LABELS)
def child_lws_changed(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Keep the owner's status current as groups become ready, roll or scale."""
    _refresh_owner(body, memo, logger)


def _refresh_owner(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger) -> None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            try:
                refresh_status(memo.api, body["metadata"]["namespace"], ref["name"])
            except KubeError as e:  # the periodic resync below catches up
                logger.warning("status refresh of %s failed: %s", ref["name"], e)


@kopf.timer(*GLMD, interval=STATUS_RESYNC_S, initial_delay=STATUS_RESYNC_S)
def resync_status(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A safety net for missed Deployment events."""
    try:
        refresh_status(memo.api, body["metadata"]["namespace"], body["metadata"]["name"])
    except KubeError:
        pass
