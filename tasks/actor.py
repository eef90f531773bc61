"""What every stage builder's ``build`` does first on its actor: limit torch to the actor's CPUs, pick the
device, and load models from the zoo there (``ActorModels``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from models import zoo
from models.device import DeviceChoice, pick_device, set_cpu_threads
from models.zoo import ModelSpec


class Placed(Protocol):
    """A builder's fields that say where it runs."""

    device: DeviceChoice
    cpus: float
    storage_options: dict[str, Any]


@dataclass(frozen=True)
class ActorModels:
    """Loads models on the device an actor picked, with the run's storage options."""

    device: str
    storage_options: dict[str, Any]

    @classmethod
    def start(cls, builder: Placed) -> ActorModels:
        """Set torch's threads to the builder's CPUs and pick its device."""
        set_cpu_threads(builder.cpus)
        return cls(pick_device(builder.device), builder.storage_options)

    def load(self, spec: ModelSpec) -> Any:
        """The model of ``spec`` on this actor's device."""
        return zoo.build(spec, device=self.device, storage_options=self.storage_options)
