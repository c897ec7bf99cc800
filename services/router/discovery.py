"""How the router learns its workers. Static lists now; Kubernetes EndpointSlices implement the same
interface (services/router/discovery_k8s.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerSet:
    """Addresses ("host:port" of each worker's gRPC server) by role, as last seen."""

    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()

    def of(self, role: str) -> tuple[str, ...]:
        return self.prefill if role == "prefill" else self.decode


class WorkerDiscovery(ABC):
    """Source of the current worker set. `current()` must be cheap: the router calls it per health tick."""

    async def start(self) -> None:
        """Begin watching (no-op for static lists)."""

    async def stop(self) -> None:
        """Stop watching."""

    @abstractmethod
    def current(self) -> WorkerSet: ...


class StaticDiscovery(WorkerDiscovery):
    def __init__(self, prefill: list[str], decode: list[str]):
        self._set = WorkerSet(tuple(prefill), tuple(decode))

    def current(self) -> WorkerSet:
        return self._set
