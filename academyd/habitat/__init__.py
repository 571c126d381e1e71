"""Habitats: where training jobs run. The interface is `academyd.habitat.base.Habitat`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from academyd.habitat.base import Habitat, HabitatError, JobHandle, JobResult, JobStatus, TrainingJob

if TYPE_CHECKING:
    from academyd.settings import Settings

__all__ = ["Habitat", "HabitatError", "JobHandle", "JobResult", "JobStatus", "TrainingJob", "habitat_for"]


def habitat_for(settings: Settings) -> Habitat:
    """The habitat `settings.training.habitat` names; `auto` decides between process and Docker."""
    kind = settings.training.habitat
    if kind == "auto":
        # The auto rule belongs here. Until the Docker habitat says when it is usable, auto means process.
        kind = "process"
    if kind == "docker":
        from academyd.habitat.docker import DockerHabitat  # the Docker engineer's module, same interface

        return DockerHabitat.from_settings(settings)  # type: ignore[no-any-return]
    from academyd.habitat.process import ProcessHabitat

    return ProcessHabitat(trainer_python=settings.training.trainer_python)
