"""The Docker engine: a client (`connect`), quick probes for the daemon's status (`engine_answers`,
`image_present`), the academyd containers it holds (found by label, never by a file), and what it knows of
a container's end, copied into the job's control directory (`record_end`)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import docker
from docker.errors import DockerException

from academyd.files import atomic_write_text
from academyd.habitat.base import HabitatError
from academyd.habitat.docker.container import LABEL_JOB_DIR, LABEL_MANAGED
from academyd.habitat.jobdir import (
    EXIT_FILE,
    JOB_FILE,
    LIMIT_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    JobDir,
    read_control,
    write_control,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

LIVE_STATES = ("created", "running", "restarting", "paused")


def connect(url: str | None, *, timeout_s: float = 60.0) -> docker.DockerClient:
    """A client of the engine at `url` (None: DOCKER_HOST or the default socket); HabitatError if down."""
    try:
        if url:
            return docker.DockerClient(base_url=url, timeout=int(math.ceil(timeout_s)))
        return docker.from_env(timeout=int(math.ceil(timeout_s)))
    except DockerException as exc:
        where = url or os.environ.get("DOCKER_HOST", "the default socket")
        raise HabitatError(f"the Docker engine at {where} does not answer ({exc}); start dockerd, fix "
                           "training.docker_url, or set training.habitat=process") from None


def engine_answers(url: str | None, *, timeout_s: float = 2.0) -> bool:
    """A quick ping: whether a Docker engine answers at `url`."""
    try:
        client = connect(url, timeout_s=timeout_s)
    except HabitatError:
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):
        return False
    finally:
        client.close()


def image_present(url: str | None, image: str, *, timeout_s: float = 2.0) -> bool:
    try:
        client = connect(url, timeout_s=timeout_s)
    except HabitatError:
        return False
    try:
        client.images.get(image)
        return True
    except (DockerException, OSError):
        return False
    finally:
        client.close()


def managed_containers(client: docker.DockerClient, job_dir: str | None) -> list[Container]:
    """Every academyd container on the engine (running or not yet collected), or those of `job_dir`."""
    labels = [f"{LABEL_MANAGED}=true"]
    if job_dir is not None:
        labels.append(f"{LABEL_JOB_DIR}={job_dir}")
    return list(client.containers.list(all=True, filters={"label": labels}))


def record_end(container: Container, jd: JobDir) -> None:
    """Copy what the engine knows of the container's end into the control directory (exit_code last)."""
    state: dict[str, Any] = container.attrs.get("State", {})
    for name, streams in ((STDOUT_FILE, {"stdout": True, "stderr": False}),
                          (STDERR_FILE, {"stdout": False, "stderr": True})):
        with open(jd / name, "ab") as fh:
            fh.write(container.logs(**streams))
    if state.get("OOMKilled") and not (jd / LIMIT_FILE).exists():
        record = read_control(jd / JOB_FILE) or {}
        write_control(jd / LIMIT_FILE, {"code": "memory_limit", "reason": (
            f"memory limit {record.get('docker_memory_limit_mb')} MB exceeded (the container was "
            "OOM-killed); raise training.memory_limit_mb or lower batch_size/max_length")})
    atomic_write_text(jd / EXIT_FILE, f"{int(state.get('ExitCode', -1))}\n")
