"""Programmatic entry of the operator; the `glmserve operator` CLI command calls run_operator."""

from __future__ import annotations

import asyncio
import logging
import threading

import kopf
import kubernetes.client


def run_operator(namespace: str | None, all_namespaces: bool, *, liveness_port: int | None = 8080,
                 kube_config: kubernetes.client.Configuration | None = None, verbose: bool = False,
                 stop_flag: asyncio.Event | threading.Event | None = None) -> None:
    """Run the operator until stopped (SIGTERM/SIGINT, or `stop_flag`).

    namespace / all_namespaces: watch one namespace, or all of them (exactly one must be given).
    liveness_port: serve kopf's liveness probe at http://0.0.0.0:PORT/healthz (None: off).
    kube_config: API credentials; None loads the in-cluster service account, else the kubeconfig.
    """
    if all_namespaces == (namespace is not None):
        raise ValueError("pass either a namespace or all_namespaces=True")
    from glmserve.operator import handlers  # noqa: F401  (registers the handlers with kopf)

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.run(
        standalone=True,  # one replica (the chart runs one): no peering objects needed
        clusterwide=all_namespaces,
        namespaces=[namespace] if namespace else (),
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
        memo=kopf.Memo(kube_config=kube_config),
        stop_flag=stop_flag,
    )
