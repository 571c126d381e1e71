"""The Docker habitat: the trainer in a container, on a Docker engine reached through the `docker` SDK.

The container
- runs `<python> -m academyd.trainer <job_dir>/spec.json` from a configurable image (the Unsloth image in
  production), with Docker's init as PID 1 so that `docker stop`'s SIGTERM reaches the trainer (which saves
  nothing more and exits 5), then SIGKILL after the grace period;
- has no network (`network_mode="none"`): the trainer is offline by design and a dataset cannot leak;
- runs as a non-root uid:gid with a read-only root filesystem, every capability dropped, no-new-privileges,
  and a tmpfs `/tmp` as HOME;
- sees what it needs at the host's own paths (`mount_plan`): its output directory writable (the only
  writable mount); its spec (a single file), the dataset, the held-out set, a base model given as a path,
  the `academyd` package and configured extra mounts read-only;
- gets a memory limit (no swap beyond it; by default 3/4 of the engine's memory), a CPU limit (by default
  all of the engine's CPUs but one), a pids limit, bounded logs, and every GPU when the engine has the
  NVIDIA runtime;
- is known by the engine's labels (`academyd.managed`, `academyd.run_id`, `academyd.job_dir`,
  `academyd.spec_hash`), by which a restarted daemon finds it (`reattach`, `find_jobs`): never by a file.

The job's directory is `academyd.habitat.jobdir`'s: the daemon's control directory (spec.json, job.json,
exit_code, cancelled, limit.json, trainer.stdout/.stderr) with the container's `output/` inside it. The
container cannot write its own bookkeeping: the exit code and the logs come from the engine when the
container ends (an OOM kill becomes limit.json). The daemon reads the output as untrusted: events,
summary, adapter and loss log without following symlinks, size-limited and validated; on success it copies
the adapter, summary and loss log into `result/`, which is what the registry reads. A planted link fails
the job with a reason that names it. The progress stream, the conclusion, cancel and the watchdog are
the job-directory watcher's (academyd.habitat.jobdir.JobWatcher), as for the process habitat.

Bind mounts name host paths, so the engine must share the daemon's filesystem (a local engine).

The modules, one concern each: `container` (what a container is: labels, user, name, mounts, limits; pure),
`host` (the host's side of the mounts: absolute paths, the control directory, the output handed to the
container's uid, inputs readable by it), `engine` (the client, the probes, the containers found by label,
a container's end copied into the control directory), `readback` (the output read back as untrusted) and
`habitat` (ContainerRunner: start, re-attachment after a restart, the engine's state, stop; DockerHabitat:
the watcher over it).
"""

from academyd.habitat.docker.container import (
    LABEL_JOB_DIR,
    LABEL_MANAGED,
    LABEL_OUTPUT_DIR,
    LABEL_RUN_ID,
    LABEL_SPEC_HASH,
    NOBODY,
    DockerOptions,
    Mount,
    container_config,
    container_name,
    default_cpus,
    default_memory_mb,
    default_user,
    has_nvidia,
    mount_plan,
    parse_user,
    replace_options,
)
from academyd.habitat.docker.engine import connect, engine_answers, image_present
from academyd.habitat.docker.habitat import REF_PREFIX, ContainerRunner, DockerHabitat
from academyd.habitat.docker.host import unreadable
from academyd.habitat.docker.readback import collect_result

__all__ = [
    "LABEL_JOB_DIR", "LABEL_MANAGED", "LABEL_OUTPUT_DIR", "LABEL_RUN_ID", "LABEL_SPEC_HASH", "NOBODY", "REF_PREFIX",
    "ContainerRunner", "DockerHabitat", "DockerOptions", "Mount", "collect_result", "connect", "container_config", "container_name",
    "default_cpus", "default_memory_mb", "default_user", "engine_answers", "has_nvidia", "image_present",
    "mount_plan", "parse_user", "replace_options", "unreadable",
]
