"""Habitats: where training jobs run. The interface is `academyd.habitat.base.Habitat`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from academyd.habitat.base import Habitat, HabitatError, JobHandle, JobResult, JobStatus, TrainingJob

if TYPE_CHECKING:
    from academyd.settings import Settings

log = structlog.get_logger("academyd.habitat")

__all__ = ["Habitat", "HabitatError", "JobHandle", "JobResult", "JobStatus", "TrainingJob", "habitat_for"]


def habitat_for(settings: Settings, nc: Any = None) -> Habitat:
    """The habitat `settings.training.habitat` names. `auto`: workers when any is connected (decided per job,
    given the daemon's NATS connection `nc`), else Docker when its engine answers, else a local process."""
    kind = settings.training.habitat
    if kind == "nats" or (kind == "auto" and nc is not None):
        if nc is None:
            raise HabitatError("the nats habitat needs the daemon's NATS connection")
        from academyd.habitat.nats import AutoHabitat, NatsHabitat

        remote = NatsHabitat(settings, nc)
        if kind == "nats":
            return remote
        return AutoHabitat(remote, _local(settings, _auto_kind(settings)))
    if kind == "auto":
        kind = _auto_kind(settings)
    return _local(settings, kind)


def _local(settings: Settings, kind: str) -> Habitat:
    if kind == "docker":
        from academyd.habitat.docker import DockerHabitat

        return DockerHabitat.from_settings(settings)
    from academyd.habitat.process import ProcessHabitat

    return ProcessHabitat(trainer_python=settings.training.trainer_python)


def _auto_kind(settings: Settings) -> str:
    """Docker when an engine answers (a quick ping) and holds the configured image; else the process."""
    from academyd.habitat.docker import engine_answers, image_present

    t = settings.training
    if not t.docker_image:
        log.info("habitat_auto", chosen="process", reason="no training.docker_image (an image pinned by digest)")
        return "process"
    where = t.docker_url or "DOCKER_HOST/the default socket"
    if not engine_answers(t.docker_url):
        log.info("habitat_auto", chosen="process", reason=f"no Docker engine answers at {where}")
        return "process"
    if not image_present(t.docker_url, t.docker_image):
        log.warning("habitat_auto", chosen="process", reason=(
            f"the Docker engine at {where} answers but has no image {t.docker_image}; build or load it "
            "there to train in containers"))
        return "process"
    log.info("habitat_auto", chosen="docker", reason=f"the Docker engine at {where} answers",
             image=t.docker_image)
    return "docker"
