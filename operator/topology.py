"""Where one worker's tensor-parallel group runs: on one node (one pod, a Deployment replica) or across whole
nodes (one pod per node, a LeaderWorkerSet group). A pure function of three numbers, so the operator, the CRD's
CEL rule (crd.yaml) and the docs agree on which specs can be placed."""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """A worker that no node layout can hold (the message says why and what would fit)."""


@dataclass(frozen=True)
class Topology:
    nodes: int         # pods per worker: 1 = a Deployment pod; more = a LeaderWorkerSet group of this size
    gpus_per_pod: int  # 0 on CPU

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


def place(tensor_parallel_size: int, gpus: int, gpus_per_node: int) -> Topology:
    """The layout of a worker with `gpus` GPUs (0: CPU) on nodes of `gpus_per_node` GPUs.

    A worker either fits on one node, or fills whole nodes: splitting it unevenly would leave ranks with
    different GPU counts per pod, and a partial node would strand GPUs that another group cannot use.
    """
    tp = tensor_parallel_size
    if gpus == 0:
        if tp != 1:
            raise PlacementError(f"tensorParallelSize {tp} needs GPUs (gpus: 0 runs one CPU rank)")
        return Topology(nodes=1, gpus_per_pod=0)
    if gpus != tp:
        raise PlacementError(f"gpus ({gpus}) must equal tensorParallelSize ({tp}): one GPU per rank")
    if gpus_per_node < 1:
        raise PlacementError(f"gpusPerNode must be at least 1, got {gpus_per_node}")
    if tp <= gpus_per_node:
        return Topology(nodes=1, gpus_per_pod=tp)
    if tp % gpus_per_node:
        raise PlacementError(
            f"tensorParallelSize {tp} cannot be placed on nodes of {gpus_per_node} GPUs (gpusPerNode): it must fit "
            f"on one node (at most {gpus_per_node}) or fill whole nodes (a multiple of {gpus_per_node})")
    return Topology(nodes=tp // gpus_per_node, gpus_per_pod=gpus_per_node)
