"""The pods a LeaderWorkerSet controller makes from a LeaderWorkerSet, as far as the tests need them: names,
labels, DNS names and the environment LWS injects, and the args after Kubernetes substitutes $(VAR) references.

Facts from kubernetes-sigs/lws v0.10.0 (api/leaderworkerset/v1/leaderworkerset_types.go, pkg/utils/pod/
pod_utils.go AddLWSVariables): group g's leader is pod `<lws>-<g>` of the leader StatefulSet `<lws>`; its workers
are pods `<lws>-<g>-<w>` (w = 1..size-1) of the StatefulSet `<lws>-<g>`; every pod carries the labels
leaderworkerset.sigs.k8s.io/name, /group-index and /worker-index (the leader's is 0), has the LWS name as its
subdomain (the LWS's own headless Service, "Shared" subdomain policy), and every container gets
LWS_LEADER_ADDRESS=<lws>-<g>.<subdomain>.<namespace>, LWS_GROUP_SIZE=<size>, LWS_WORKER_INDEX=<w>.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


@dataclass
class Pod:
    name: str
    namespace: str
    group: int
    index: int
    statefulset: str
    labels: dict[str, str]
    env: dict[str, str]
    spec: dict[str, Any]
    ip: str

    @property
    def dns_name(self) -> str:
        """What the LWS headless Service's DNS records resolve to this pod (hostname.subdomain.namespace)."""
        return f"{self.name}.{self.spec['subdomain']}.{self.namespace}"

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    def args(self) -> list[str]:
        """The container's args as the kubelet runs them: $(VAR) replaced from the container's environment."""
        values = {**self.env, "POD_IP": self.ip}
        return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values.get(m[1], m[0]), a)
                for a in self.container["args"]]


def pods_of(lws: dict[str, Any], *, replicas: int | None = None) -> list[Pod]:
    name, namespace = lws["metadata"]["name"], lws["metadata"]["namespace"]
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    size = tmpl.get("size", 1)
    groups = replicas if replicas is not None else lws["spec"].get("replicas", 1)
    pods = []
    for g in range(groups):
        for w in range(size):
            template = tmpl.get("leaderTemplate") if w == 0 and tmpl.get("leaderTemplate") else tmpl["workerTemplate"]
            spec = copy.deepcopy(template["spec"])
            spec["subdomain"] = name
            env = {"LWS_LEADER_ADDRESS": f"{name}-{g}.{name}.{namespace}", "LWS_GROUP_SIZE": str(size),
                   "LWS_WORKER_INDEX": str(w)}
            labels = {**template.get("metadata", {}).get("labels", {}), NAME_LABEL: name,
                      GROUP_INDEX_LABEL: str(g), WORKER_INDEX_LABEL: str(w)}
            pods.append(Pod(name=f"{name}-{g}" if w == 0 else f"{name}-{g}-{w}", namespace=namespace, group=g, index=w,
                            statefulset=name if w == 0 else f"{name}-{g}", labels=labels, env=env, spec=spec,
                            ip=f"10.{g // 250}.{g % 250}.{w + 10}"))
    return pods
