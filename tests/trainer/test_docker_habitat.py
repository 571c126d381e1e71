"""The Docker habitat on a real dockerd (started by the session, see fixtures/docker.py) with a real trainer:
a training run in a container, what the container can and cannot do (no network, not root, read-only
inputs), re-attach by labels from a second habitat, cancel, an OOM kill, the `auto` choice, and the pure
mount plan and container config."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
from structlog.testing import capture_logs

from academyd.habitat import habitat_for
from academyd.habitat.base import Habitat, HabitatError, JobStatus, TrainingJob
from academyd.habitat.docker import (
    LABEL_MANAGED,
    LABEL_OUTPUT_DIR,
    LABEL_RUN_ID,
    DockerHabitat,
    DockerOptions,
    Mount,
    container_config,
    container_name,
    default_user,
    has_nvidia,
    mount_plan,
    parse_user,
)
from academyd.habitat.process import ProcessHabitat
from academyd.settings import Settings
from academyd.trainer import spec as S
from fixtures.docker import TEST_USER

LONG = {"max_steps": 5000, "hyperparameters": {"logging_steps": 5, "save_steps": 40}}
NOBODY_UID = int(TEST_USER.split(":")[0])


async def take(stream: Any, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    got = []
    async for event in stream:
        got.append(event)
        if until(event):
            break
    return got


def _habitat(url: str, options: DockerOptions) -> DockerHabitat:
    return DockerHabitat(docker.DockerClient(base_url=url, timeout=120), options, poll_s=0.1)


def _containers(client: docker.DockerClient, out: Path) -> list[Any]:
    return client.containers.list(all=True, filters={"label": [f"{LABEL_OUTPUT_DIR}={out}"]})


# ------------------------------------------------------------------ pure: mount plan, container config

def _spec(**overrides: Any) -> S.TrainSpec:
    data: dict[str, Any] = {"base_model": "/models/base", "dataset_path": "/data/train.jsonl",
                            "heldout_path": "/data/heldout.jsonl", "output_dir": "/runs/r1/",
                            "format": "alpaca"}
    data.update(overrides)
    return S.TrainSpec.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "extra", "expected"),
    [
        ({}, (), [("/runs/r1", False), ("/src/academyd", True), ("/data/train.jsonl", True),
                  ("/data/heldout.jsonl", True), ("/models/base", True)]),
        # A hub name is not a path: no mount (a mounted cache serves it); no held-out set: no mount.
        ({"base_model": "unsloth/llama-3-8b", "heldout_path": None}, (Mount("/hf", "/cache/hf"),),
         [("/runs/r1", False), ("/src/academyd", True), ("/data/train.jsonl", True), ("/cache/hf", True)]),
        # A target named twice is mounted once, the writable output directory first.
        ({"dataset_path": "/runs/r1"}, (Mount("/src/academyd", "/src/academyd"),),
         [("/runs/r1", False), ("/src/academyd", True), ("/data/heldout.jsonl", True),
          ("/models/base", True)]),
    ],
)
def test_mount_plan(
    overrides: dict[str, Any], extra: tuple[Mount, ...], expected: list[tuple[str, bool]]
) -> None:
    plan = mount_plan(_spec(**overrides), source_dir="/src/", extra=extra)
    assert [(m.target, m.read_only) for m in plan] == expected
    # Inputs missing on the host are not mounted (the trainer reports them, not Docker).
    missing = mount_plan(_spec(**overrides), source_dir="/src/", extra=extra, missing={"/data/heldout.jsonl"})
    assert [m.target for m in missing] == [t for t, _ in expected if t != "/data/heldout.jsonl"]
    assert [m for m in plan if not m.read_only] == [Mount("/runs/r1", "/runs/r1", read_only=False)]
    if extra:
        assert extra[0].source in {m.source for m in plan}


def test_container_config_and_options() -> None:
    options = DockerOptions(image="img:1", python="/venv/bin/python", user="1000:1000", source_dir="/src",
                            cpus=1.5, pids_limit=256, shm_mb=128)
    job = TrainingJob(spec=_spec(), run_id="run 7/x", memory_limit_mb=2048, env={"HOME": "/work", "X": "1"})
    cfg = container_config(job, options, gpu=False)
    assert cfg["image"] == "img:1"
    assert cfg["command"] == ["/venv/bin/python", "-m", "academyd.trainer", "/runs/r1/spec.json"]
    assert cfg["network_mode"] == "none" and cfg["user"] == "1000:1000"
    assert cfg["read_only"] is True and cfg["init"] is True
    assert cfg["cap_drop"] == ["ALL"] and cfg["security_opt"] == ["no-new-privileges"]
    assert cfg["mem_limit"] == cfg["memswap_limit"] == "2048m"
    assert cfg["nano_cpus"] == 1_500_000_000 and cfg["pids_limit"] == 256 and cfg["shm_size"] == "128m"
    assert "device_requests" not in cfg
    assert cfg["labels"][LABEL_MANAGED] == "true" and cfg["labels"][LABEL_RUN_ID] == "run 7/x"
    assert cfg["labels"][LABEL_OUTPUT_DIR] == "/runs/r1" and cfg["working_dir"] == "/runs/r1"
    assert cfg["name"] == container_name("run 7/x", "/runs/r1")
    assert cfg["name"].startswith("academyd-run-7-x-")
    env = cfg["environment"]
    assert env["PYTHONPATH"] == "/src" and env["HF_HUB_OFFLINE"] == "1"
    assert env["HOME"] == "/work" and env["X"] == "1"  # the job's environment wins over the defaults
    mounts = {m["Target"]: m for m in cfg["mounts"]}
    assert mounts["/runs/r1"]["ReadOnly"] is False and mounts["/data/train.jsonl"]["ReadOnly"] is True
    assert all(m["Type"] == "bind" for m in cfg["mounts"])

    bare = container_config(TrainingJob(spec=_spec(), run_id="r"),
                            DockerOptions(image="i", cpus=0, pids_limit=0), gpu=True)
    assert not {"mem_limit", "nano_cpus", "pids_limit"} & set(bare)
    (request,) = bare["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]

    assert has_nvidia({"Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}})
    assert not has_nvidia({"Runtimes": {"runc": {}}}) and not has_nvidia({})
    assert parse_user("1000:100") == (1000, 100)
    for bad in ("0:0", "root", "1000"):
        with pytest.raises(HabitatError, match="docker_user"):
            parse_user(bad)
    assert default_user(0, 0) == "65534:65534" and default_user(1000, 50) == "1000:50"
    with pytest.raises(HabitatError, match="docker_mounts"):
        Mount.parse("relative:/x")
    assert Mount.parse("/a/b/") == Mount("/a/b", "/a/b") and Mount.parse("/a:/b").target == "/b"


# ------------------------------------------------------------------ real engine, real container, real trainer

PROBE = r"""
import errno, json, os, socket
out = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid()}
out["net"] = sorted(os.listdir("/sys/class/net"))
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(("192.0.2.1", 9))  # TEST-NET-1: unroutable by construction; no packet can leave anyway
    out["connect"] = "connected"
except OSError as exc:
    out["connect"] = exc.errno
def writable(path):
    try:
        with open(path, "a"):
            return True
    except OSError as exc:
        return exc.errno
out["write_dataset"] = writable(os.environ["PROBE_DATASET"])
out["mount_options"] = {line.split()[4]: line.split()[5] for line in open("/proc/self/mountinfo")}
out["write_output"] = writable(os.path.join(os.getcwd(), "probe.txt"))
print(json.dumps(out))
"""


@pytest.mark.slow
async def test_container_has_no_network_and_is_not_root(
    docker_client: docker.DockerClient, docker_options: DockerOptions, make_spec: Callable[..., S.TrainSpec],
    tmp_path: Path,
) -> None:
    """The habitat's own container config, with a probe for a command instead of the trainer."""
    out = tmp_path / "probe"
    out.mkdir()
    os.chown(out, NOBODY_UID, NOBODY_UID)
    dataset = tmp_path / "writable.jsonl"  # writable by anyone on the host: only the mount can refuse
    dataset.write_text("{}\n")
    dataset.chmod(0o666)
    spec = make_spec(out, dataset_path=str(dataset))
    cfg = container_config(TrainingJob(spec=spec, run_id="probe", env={"PROBE_DATASET": spec.dataset_path}),
                           docker_options, gpu=False)
    cfg["command"] = [docker_options.python, "-c", PROBE]
    container = docker_client.containers.create(**cfg)
    try:
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 0, container.logs().decode()
        seen = json.loads(container.logs(stdout=True, stderr=False).decode())
        attrs = container.attrs
    finally:
        container.remove(force=True)
    assert seen["net"] == ["lo"]  # no interface but loopback
    assert seen["connect"] == errno.ENETUNREACH
    assert seen["uid"] == seen["euid"] == NOBODY_UID and seen["gid"] == NOBODY_UID
    assert seen["write_dataset"] == errno.EROFS
    options = {target: set(opts.split(",")) for target, opts in seen["mount_options"].items()}
    venv = str(Path(docker_options.python).parents[1])
    assert "ro" in options["/"] and "ro" in options[str(dataset)] and "ro" in options[venv]
    assert "rw" in options[str(out)]
    assert seen["write_output"] is True
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    assert attrs["Config"]["User"] == TEST_USER


@pytest.mark.slow
async def test_trains_in_a_container(
    docker_url: str, docker_client: docker.DockerClient, docker_options: DockerOptions,
    make_spec: Callable[..., S.TrainSpec], docker_base_model: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    spec = make_spec(out, base_model=str(docker_base_model), backend="peft", max_steps=30)
    habitat = _habitat(docker_url, docker_options)
    assert isinstance(habitat, Habitat) and habitat.name == "docker"
    handle = await habitat.start(TrainingJob(spec=spec, run_id="d-1", time_limit_s=300, memory_limit_mb=4096))
    assert handle.ref == f"docker:{out}" and handle.run_id == "d-1"
    (container,) = _containers(docker_client, out)
    assert container.labels[LABEL_RUN_ID] == "d-1" and container.attrs["HostConfig"]["NetworkMode"] == "none"
    assert container.attrs["HostConfig"]["Memory"] == 4096 * 2**20

    events = [e async for e in habitat.progress(handle)]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done", events[-1]
    assert kinds.count("progress") >= 3 and events[0]["total_steps"] == 30
    assert [e["step"] for e in events if e["type"] == "progress"] == sorted(
        e["step"] for e in events if e["type"] == "progress")

    result = await habitat.result(handle)
    assert result.status is JobStatus.SUCCEEDED, result
    assert result.exit_code == 0 and result.reason is None
    assert result.summary is not None and result.summary["steps"] == 30
    assert result.summary["adapter_heldout_loss"] < result.summary["base_heldout_loss"]
    assert result.adapter_path == str(out / S.ADAPTER_DIR)
    assert (out / S.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    # The trainer itself ran as nobody: everything it wrote is nobody's.
    for path in (out / S.EVENTS_FILE, out / S.SUMMARY_FILE, out / S.ADAPTER_DIR / "adapter_config.json"):
        assert path.stat().st_uid == NOBODY_UID, path
    # The container is gone once its result is collected; its logs stay in the output directory.
    assert _containers(docker_client, out) == []
    assert json.loads((out / "trainer.stdout").read_text().splitlines()[-1])["type"] == "done"
    assert await habitat.status(handle) is JobStatus.SUCCEEDED
    again = await habitat.result(handle)
    assert again.status is JobStatus.SUCCEEDED and again.summary == result.summary
    await habitat.close()


@pytest.mark.slow
async def test_reattach_by_labels_from_a_second_habitat_and_cancel(
    docker_url: str, docker_client: docker.DockerClient, docker_options: DockerOptions,
    make_spec: Callable[..., S.TrainSpec], docker_base_model: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "long"
    spec = make_spec(out, base_model=str(docker_base_model), backend="peft", **LONG)
    first = _habitat(docker_url, docker_options)
    handle = await first.start(TrainingJob(spec=spec, run_id="d-2", time_limit_s=300))
    seen = await take(first.progress(handle), lambda e: e["type"] == "progress" and e["step"] >= 10)
    assert seen[0]["type"] == "start" and seen[0]["total_steps"] == 5000
    assert await first.status(handle) is JobStatus.RUNNING
    with pytest.raises(HabitatError, match="already runs"):
        await first.start(TrainingJob(spec=spec, run_id="d-2b"))
    await first.close()  # the daemon goes away; the container keeps running

    # A restarted daemon: a new client, a new habitat. It finds the job by the engine's labels alone...
    second = _habitat(docker_url, docker_options)
    found = await second.find_jobs()
    assert (handle.ref, "d-2") in [(h.ref, h.run_id) for h in found]
    # ...or by the ref it stored.
    again = await second.reattach(handle.ref)
    assert again is not None and again.run_id == "d-2" and again.output_dir == str(out)
    assert await second.status(again) is JobStatus.RUNNING
    last = seen[-1]["step"]
    replay = await take(second.progress(again), lambda e: e["type"] == "progress" and e["step"] > last)
    assert replay[: len(seen)] == seen and replay[-1]["step"] > seen[-1]["step"]

    await second.cancel(again, grace_s=20)
    result = await second.result(again)
    assert result.status is JobStatus.CANCELLED, result
    assert result.exit_code == S.EXIT_CANCELLED and result.error_code == "cancelled"
    assert result.summary is None and result.adapter_path is None
    tail = [e async for e in second.progress(again)]
    assert tail[-1]["type"] == "error" and tail[-1]["code"] == "cancelled"  # the trainer's own last word
    assert _containers(docker_client, out) == []
    assert (out / S.CHECKPOINTS_DIR).is_dir()  # kept for a resume
    await second.cancel(again)  # idempotent
    assert await second.status(again) is JobStatus.CANCELLED
    assert await second.reattach("docker:" + str(tmp_path / "never-ran")) is None
    assert await second.reattach("process:" + str(out)) is None
    await second.close()


@pytest.mark.slow
async def test_memory_limit_is_an_oom_kill_reported_as_such(
    docker_url: str, docker_options: DockerOptions, make_spec: Callable[..., S.TrainSpec],
    docker_base_model: Path, tmp_path: Path,
) -> None:
    habitat = _habitat(docker_url, docker_options)
    spec = make_spec(tmp_path / "oom", base_model=str(docker_base_model), backend="peft")
    handle = await habitat.start(TrainingJob(spec=spec, run_id="d-3", memory_limit_mb=64))
    events = [e async for e in habitat.progress(handle)]
    result = await habitat.result(handle)
    assert result.status is JobStatus.FAILED and result.error_code == "memory_limit", result
    assert "64 MB" in (result.reason or "") and result.exit_code == 137
    assert events[-1]["type"] == "error" and events[-1]["code"] == "memory_limit"
    await habitat.close()


@pytest.mark.slow
async def test_start_refuses_what_cannot_work_and_says_why(
    docker_url: str, docker_client: docker.DockerClient, docker_options: DockerOptions,
    make_spec: Callable[..., S.TrainSpec], tiny_base_model: Path, tmp_path: Path,
) -> None:
    options = DockerOptions(**{**docker_options.__dict__, "image": "academyd-no-such-image:0"})
    habitat = _habitat(docker_url, options)
    with pytest.raises(HabitatError, match="never pulls"):
        await habitat.start(TrainingJob(spec=make_spec(tmp_path / "x"), run_id="d-4"))
    await habitat.close()
    # The tiny model's weights are 0600 root: nobody in the container could not read them.
    habitat = _habitat(docker_url, docker_options)
    with pytest.raises(HabitatError, match=r"cannot read .*model\.safetensors.*chmod"):
        spec = make_spec(tmp_path / "y", base_model=str(tiny_base_model))
        await habitat.start(TrainingJob(spec=spec, run_id="d-5"))
    with pytest.raises(HabitatError, match="must not run as root"):
        await _habitat(docker_url, DockerOptions(**{**docker_options.__dict__, "user": "0:0"})).start(
            TrainingJob(spec=make_spec(tmp_path / "z"), run_id="d-6"))
    assert _containers(docker_client, tmp_path / "y") == []
    await habitat.close()


@pytest.mark.slow
async def test_a_job_that_ended_while_no_daemon_watched(
    docker_url: str, docker_client: docker.DockerClient, docker_options: DockerOptions,
    make_spec: Callable[..., S.TrainSpec], docker_base_model: Path, tmp_path: Path,
) -> None:
    """The trainer's own bad_input verdict (a missing dataset: not mounted) reaches a later habitat."""
    out = tmp_path / "bad"
    spec = make_spec(out, base_model=str(docker_base_model), dataset_path=str(tmp_path / "missing.jsonl"))
    first = _habitat(docker_url, docker_options)
    handle = await first.start(TrainingJob(spec=spec, run_id="d-7"))
    await first.close()
    (container,) = _containers(docker_client, out)
    assert container.wait(timeout=120)["StatusCode"] == S.EXIT_BAD_INPUT

    second = _habitat(docker_url, docker_options)
    again = await second.reattach(handle.ref)
    assert again is not None
    assert await second.status(again) is JobStatus.FAILED
    events = [e async for e in second.progress(again)]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_input"
    assert "missing.jsonl" in events[-1]["reason"]
    result = await second.result(again)
    assert result.status is JobStatus.FAILED and result.error_code == "bad_input"
    assert result.exit_code == S.EXIT_BAD_INPUT and "missing.jsonl" in (result.reason or "")
    assert _containers(docker_client, out) == []
    await second.close()


@pytest.mark.slow
async def test_time_limit_stops_the_container(
    docker_url: str, docker_client: docker.DockerClient, docker_options: DockerOptions,
    make_spec: Callable[..., S.TrainSpec], docker_base_model: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "slow"
    habitat = _habitat(docker_url, docker_options)
    spec = make_spec(out, base_model=str(docker_base_model), backend="peft", **LONG)
    handle = await habitat.start(TrainingJob(spec=spec, run_id="d-8", time_limit_s=3))
    events = [e async for e in habitat.progress(handle)]
    result = await habitat.result(handle)
    assert result.status is JobStatus.FAILED and result.error_code == "time_limit", result
    assert "time limit 3 s" in (result.reason or "")
    assert events[-1]["type"] == "error" and events[-1]["code"] == "time_limit"
    assert _containers(docker_client, out) == []
    await habitat.close()


@pytest.mark.slow
def test_auto_picks_docker_when_the_engine_answers(
    docker_url: str, habitat_image: str, tmp_path: Path
) -> None:
    def auto(url: str, image: str) -> Any:
        return habitat_for(Settings(training={"habitat": "auto", "docker_url": url, "docker_image": image}))

    with capture_logs() as logs:
        on = auto(docker_url, habitat_image)
        off = auto(dead := f"unix://{tmp_path / 'no-engine.sock'}", habitat_image)
        no_image = auto(docker_url, "academyd-no-such-image:0")
    assert isinstance(on, DockerHabitat) and on.options.image == habitat_image
    assert on.options.user == default_user(os.getuid(), os.getgid())
    on.client.close()
    assert type(off) is ProcessHabitat and off.name == "process"
    # An engine without the image: the process habitat, with a warning saying what to build.
    assert type(no_image) is ProcessHabitat
    choices = [(e["chosen"], e["log_level"]) for e in logs if e["event"] == "habitat_auto"]
    assert choices == [("docker", "info"), ("process", "info"), ("process", "warning")]
    assert "no-engine.sock" in logs[1]["reason"] and "build or load" in logs[2]["reason"]
    with pytest.raises(HabitatError, match="does not answer"):
        habitat_for(Settings(training={"habitat": "docker", "docker_url": dead}))
