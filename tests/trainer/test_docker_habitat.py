"""The Docker habitat on a real dockerd (started by the session, see fixtures/docker.py) with a real trainer:
a training run in a container, what the container can and cannot do (no network, not root, read-only
inputs), re-attach by labels from a second habitat, cancel, an OOM kill, the `auto` choice, and the pure
mount plan and container config."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
from fixtures.docker import TEST_USER
from structlog.testing import capture_logs

from academyd.habitat import habitat_for
from academyd.habitat.base import Habitat, HabitatError, JobStatus, TrainingJob
from academyd.habitat.docker import (
    LABEL_JOB_DIR,
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
    replace_options,
)
from academyd.habitat.process import ProcessHabitat
from academyd.settings import Settings
from academyd.trainer import spec as S

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
    return client.containers.list(all=True, filters={"label": [f"{LABEL_JOB_DIR}={out}"]})


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
    cfg = container_config(job, options, gpu=False, job_dir="/runs/")
    assert cfg["image"] == "img:1"
    assert cfg["command"] == ["/venv/bin/python", "-m", "academyd.trainer", "/runs/spec.json"]
    assert cfg["network_mode"] == "none" and cfg["user"] == "1000:1000"
    assert cfg["read_only"] is True and cfg["init"] is True
    assert cfg["cap_drop"] == ["ALL"] and cfg["security_opt"] == ["no-new-privileges"]
    assert cfg["mem_limit"] == cfg["memswap_limit"] == "2048m"
    assert cfg["nano_cpus"] == 1_500_000_000 and cfg["pids_limit"] == 256 and cfg["shm_size"] == "128m"
    assert "device_requests" not in cfg
    assert cfg["labels"][LABEL_MANAGED] == "true" and cfg["labels"][LABEL_RUN_ID] == "run 7/x"
    assert cfg["labels"][LABEL_OUTPUT_DIR] == "/runs/r1" and cfg["working_dir"] == "/runs/r1"
    assert cfg["labels"][LABEL_JOB_DIR] == "/runs"
    assert cfg["name"] == container_name("run 7/x", "/runs")
    assert cfg["name"].startswith("academyd-run-7-x-")
    env = cfg["environment"]
    assert env["PYTHONPATH"] == "/src" and env["HF_HUB_OFFLINE"] == "1"
    assert env["HOME"] == "/work" and env["X"] == "1"  # the job's environment wins over the defaults
    mounts = {m["Target"]: m for m in cfg["mounts"]}
    assert mounts["/runs/r1"]["ReadOnly"] is False and mounts["/data/train.jsonl"]["ReadOnly"] is True
    assert mounts["/runs/spec.json"]["ReadOnly"] is True  # the spec: one read-only file of the control dir
    assert [t for t, m in mounts.items() if not m["ReadOnly"]] == ["/runs/r1"]  # the only writable mount
    assert cfg["log_config"]["Config"] == {"max-size": "20m", "max-file": "2"}
    assert all(m["Type"] == "bind" for m in cfg["mounts"])

    bare = container_config(TrainingJob(spec=_spec(), run_id="r"),
                            DockerOptions(image="i", cpus=0, pids_limit=0), gpu=True, job_dir="/runs")
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
    (tmp_path / "spec.json").write_text("{}")
    (tmp_path / "spec.json").chmod(0o644)
    cfg = container_config(TrainingJob(spec=spec, run_id="probe", env={"PROBE_DATASET": spec.dataset_path}),
                           docker_options, gpu=False, job_dir=str(tmp_path))
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
    # The adapter the daemon hands on is its own validated copy, outside the container's mount.
    assert result.adapter_path == str(out / "result" / S.ADAPTER_DIR)
    assert (out / "result" / S.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (out / "result" / S.SUMMARY_FILE).is_file() and (out / "result" / S.LOSS_FILE).is_file()
    # The trainer itself ran as nobody, and wrote only into output/: everything there is nobody's.
    for path in (out / "output" / S.EVENTS_FILE, out / "output" / S.SUMMARY_FILE,
                 out / "output" / S.ADAPTER_DIR / "adapter_config.json"):
        assert path.stat().st_uid == NOBODY_UID, path
    # The bookkeeping is the daemon's, written from what the engine said.
    for name in ("job.json", "spec.json", "exit_code", "trainer.stdout"):
        assert (out / name).stat().st_uid == os.getuid(), name
    assert (out / "exit_code").read_text().strip() == "0"
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
    # ...or by a start of the same run (a daemon that died before recording the ref): no second container.
    adopted = await second.start(TrainingJob(spec=spec, run_id="d-2", time_limit_s=300))
    assert adopted.ref == handle.ref and len(_containers(docker_client, out)) == 1
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
    assert (out / "output" / S.CHECKPOINTS_DIR).is_dir()  # kept for a resume
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
        no_image = auto(docker_url, "sha256:" + "0" * 64)
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
        habitat_for(Settings(training={"habitat": "docker", "docker_url": dead, "docker_image": habitat_image}))
    with pytest.raises(HabitatError, match="needs an image"):
        habitat_for(Settings(training={"habitat": "docker", "docker_url": docker_url}))
    # A tag is refused at load: it can move under a deployment.
    with pytest.raises(ValueError, match="not pinned by digest"):
        Settings(training={"docker_image": "unsloth/unsloth:latest"})


# ------------------------------------------------------------------ a hostile trainer

# Stands in for the trainer (`-m academyd.trainer SPEC`) in a package of its own, mounted as the source
# directory: what a compromised image or a malicious training dependency could run in the container.
HOSTILE = r'''
import json, os, sys, time
spec_path = sys.argv[1]
spec = json.load(open(spec_path))
out, ctl = spec["output_dir"], os.path.dirname(spec_path)
t = json.loads(os.environ["HOSTILE_TARGETS"])
mode = os.environ["HOSTILE_MODE"]
tried = {}
def attempt(name, fn):
    try:
        fn()
        tried[name] = "written"
    except OSError as exc:
        tried[name] = exc.errno
def write(path, data):
    with open(path, "w") as fh:
        fh.write(data)
# Rewrite the job's bookkeeping, the daemon's database, another job's files.
attempt("job.json", lambda: write(os.path.join(ctl, "job.json"), '{"container_id": "evil", "run_id": "x"}'))
attempt("exit_code", lambda: write(os.path.join(ctl, "exit_code"), "0\n"))
attempt("spec.json", lambda: write(spec_path, "{}"))
attempt("db", lambda: write(t["db"], "owned"))
attempt("other_job", lambda: write(os.path.join(t["other_job"], "job.json"), "{}"))
attempt("other_output", lambda: write(os.path.join(t["other_job"], "output", "events.jsonl"), "{}"))
# Its own output may carry look-alikes; the daemon does not read bookkeeping from there.
write(os.path.join(out, "exit_code"), "0\n")
write(os.path.join(out, "job.json"), '{"container_id": "evil"}')
def event(kind, **kw):
    return json.dumps({"type": kind, "time": time.time(), **kw}) + "\n"
lines = event("start", total_steps=2) + event("progress", step=2, total_steps=2, loss=0.1)
lines += event("done", exit_code=0, steps=2)
if mode == "events-link":
    os.symlink(t["db"], os.path.join(out, "events.jsonl"))
    time.sleep(60)  # the daemon must stop it: it refuses to read the log
else:
    write(os.path.join(out, "events.jsonl"), lines)
if mode == "result-links":
    os.symlink(t["db"], os.path.join(out, "summary.json"))
    os.symlink(os.path.join(t["other_job"], "output", "adapter"), os.path.join(out, "adapter"))
    os.symlink(t["db"], os.path.join(out, "loss.jsonl"))
if mode == "hardlink":
    os.mkdir(os.path.join(out, "adapter"))
    write(os.path.join(out, "decoy.json"), json.dumps({"steps": 2}))
    os.link(os.path.join(out, "decoy.json"), os.path.join(out, "summary.json"))
print(json.dumps({"tried": tried}), flush=True)
sys.exit(0)
'''

# A well-behaved job running beside it (another run's container): started first, checked after.
SLEEPER = r'''
import json, os, signal, sys, time
spec = json.load(open(sys.argv[1]))
os.makedirs(os.path.join(spec["output_dir"], "adapter"), exist_ok=True)
with open(os.path.join(spec["output_dir"], "adapter", "adapter_model.safetensors"), "w") as fh:
    fh.write("weights of another run")
with open(os.path.join(spec["output_dir"], "events.jsonl"), "a") as fh:
    fh.write(json.dumps({"type": "start", "time": time.time(), "total_steps": 1}) + "\n")
signal.signal(signal.SIGTERM, lambda *a: sys.exit(5))
time.sleep(120)
'''


def fake_trainer(root: Path, program: str) -> Path:
    pkg = root / "academyd" / "trainer"
    pkg.mkdir(parents=True)
    (root / "academyd" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(program)
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def fingerprint(root: Path) -> dict[str, tuple[int, str]]:
    import hashlib

    return {str(p.relative_to(root)): (p.lstat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() and not p.is_symlink() else "")
            for p in sorted(root.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["events-link", "result-links", "hardlink"])
async def test_a_hostile_trainer_touches_nothing_of_the_daemon_and_its_run_fails_saying_why(
    mode: str, docker_url: str, docker_client: docker.DockerClient, docker_options: DockerOptions,
    make_spec: Callable[..., S.TrainSpec], docker_base_model: Path, tmp_path: Path,
) -> None:
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    db = data / "academy.db"  # stands for the daemon's database
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs(run_id TEXT)")
        conn.execute("INSERT INTO runs VALUES ('r-ok')")
    db.chmod(0o666)  # even a file anyone may write: the container cannot reach it
    other = data / "runs" / "r-ok"
    sleeper = _habitat(docker_url, DockerOptions(**{**docker_options.__dict__,
                                                     "source_dir": str(fake_trainer(tmp_path / "ok", SLEEPER))}))
    ok = await sleeper.start(TrainingJob(spec=make_spec(other, base_model=str(docker_base_model)), run_id="r-ok"))
    await take(sleeper.progress(ok), lambda e: e["type"] == "start")
    (other_container,) = _containers(docker_client, other)
    other_labels = dict(other_container.labels)
    before_db, before_other = db.read_bytes(), fingerprint(other)

    evil = data / "runs" / "r-evil"
    hostile = _habitat(docker_url, DockerOptions(**{**docker_options.__dict__,
                                                     "source_dir": str(fake_trainer(tmp_path / "evil", HOSTILE))}))
    targets = {"db": str(db), "other_job": str(other)}
    spec = make_spec(evil, base_model=str(docker_base_model))
    handle = await hostile.start(TrainingJob(spec=spec, run_id="r-evil", time_limit_s=120, env={
        "HOSTILE_TARGETS": json.dumps(targets), "HOSTILE_MODE": mode}))
    written_record = json.loads((evil / "job.json").read_text())
    events = [e async for e in hostile.progress(handle)]
    result = await hostile.result(handle)

    # The run fails, and says what was refused.
    assert result.status is JobStatus.FAILED, result
    assert result.error_code == "unsafe_output", result
    assert result.summary is None and result.adapter_path is None
    expected = {"events-link": r"events\.jsonl: a symlink", "result-links": r"summary\.json: a symlink",
                "hardlink": r"summary\.json: it has 2 hard links"}[mode]
    import re

    assert re.search(expected, result.reason or ""), result.reason
    if mode == "events-link":  # refused while it ran: the container is stopped, the stream says why
        assert events[-1]["type"] == "error" and events[-1]["code"] == "unsafe_output", events
    else:  # its own "done" is only a claim: the result, read as the daemon reads it, decides
        assert events[-1]["type"] == "done"
    assert not (evil / "result" / S.ADAPTER_DIR).exists()
    # The daemon's files: untouched (the bookkeeping is the daemon's, the exit code the engine's).
    assert db.read_bytes() == before_db
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT run_id FROM runs").fetchall() == [("r-ok",)]
    assert json.loads((evil / "job.json").read_text()) == written_record
    assert "container_id" not in json.loads((evil / "job.json").read_text())  # never the container's word
    assert (evil / "exit_code").read_text().strip() == ("137" if mode == "events-link" else "0")
    assert json.loads((evil / "spec.json").read_text())["output_dir"] == str(evil / "output")
    if mode != "events-link":
        tried = json.loads((evil / "trainer.stdout").read_text().splitlines()[-1])["tried"]
        assert set(tried) == {"job.json", "exit_code", "spec.json", "db", "other_job", "other_output"}
        assert all(isinstance(v, int) for v in tried.values()), tried  # every write failed (an errno)
    # The other run: its container still running, its labels and files as they were.
    other_container.reload()
    assert other_container.status == "running" and other_container.labels == other_labels
    assert fingerprint(other) == before_other
    assert await sleeper.status(ok) is JobStatus.RUNNING
    assert _containers(docker_client, evil) == []
    await sleeper.cancel(ok, grace_s=5)
    assert (await sleeper.result(ok)).status is JobStatus.CANCELLED
    await hostile.close()
    await sleeper.close()


class PeakMemory:
    """The peak memory of a job's container that its memory limit cannot reclaim: anonymous memory plus
    shmem (a tmpfs's files: the in-container copy of the base). The page cache of files it reads is left
    out: the kernel reclaims it before it kills anything, and it is charged to whichever cgroup read a page
    first, so it varies with what ran before (measured: 0.75-1.26 GB for the same mounted run).

    Polled from the engine's stats while the container lives (its cgroup goes with it), cgroup v1 or v2."""

    def __init__(self, client: docker.DockerClient, out: Path) -> None:
        self.client, self.out, self.bytes, self.samples, self.usage = client, out, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def unreclaimable(stats: dict[str, Any]) -> int:
        if "anon" in stats:  # cgroup v2: memory.stat has both
            return int(stats["anon"]) + int(stats.get("shmem", 0))
        # cgroup v1: the engine passes no shmem, but tmpfs pages sit on the anonymous LRU lists with the rss.
        return int(stats.get("total_active_anon", 0)) + int(stats.get("total_inactive_anon", 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            for c in _containers(self.client, self.out):
                # A container that just ended answers with an error or an empty body.
                with contextlib.suppress(docker.errors.DockerException, OSError, ValueError):
                    mem = c.stats(stream=False, one_shot=True).get("memory_stats") or {}
                    if mem.get("stats"):
                        self.bytes = max(self.bytes, self.unreclaimable(mem["stats"]))
                        self.usage = max(self.usage, int(mem.get("max_usage") or mem.get("usage") or 0))
                        self.samples += 1
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.bytes


@pytest.mark.slow
async def test_a_gguf_base_is_dequantized_once_on_the_host_and_mounted_read_only(
    docker_url: str, docker_client: docker.DockerClient, docker_options: DockerOptions,
    make_spec: Callable[..., S.TrainSpec], smol: Any, base_cache: Path, trainer_python: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real SmolLM2 GGUF in a container: the daemon dequantizes it on the host (the host's trainer) and
    the container reads that directory through a read-only mount instead of making its own copy in its
    tmpfs /tmp (about 540 MB of its memory limit). The same job without a host trainer, dequantizing in
    the container as before, is measured beside it: the mount must keep that copy out of its memory."""
    from academyd.basemodel import BASE_IDENTITY_FILE, dequantized_dir

    hp = {"batch_size": 2, "epochs": 1, "replay_general": 0}
    options = replace_options(docker_options, host_trainer_python=str(trainer_python))
    out = tmp_path / "gguf"
    spec = make_spec(out, base_model=smol.path, backend="peft", max_steps=2, hyperparameters=hp)
    habitat = _habitat(docker_url, options)
    handle = await habitat.start(TrainingJob(spec=spec, run_id="d-gguf", time_limit_s=900, memory_limit_mb=3072))
    peak_mounted = PeakMemory(docker_client, out)
    target = dequantized_dir(smol.sha256, base_cache.resolve())
    assert (target / BASE_IDENTITY_FILE).is_file()
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    (container,) = _containers(docker_client, out)
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts[str(target)]["RW"] is False and mounts[str(target)]["Source"] == str(target)
    assert f"ACADEMY_BASE_CACHE={base_cache.resolve()}" in container.attrs["Config"]["Env"]
    events = [e async for e in habitat.progress(handle)]
    result = await habitat.result(handle)
    mounted = peak_mounted.stop()
    assert result.status is JobStatus.SUCCEEDED, (result, events[-1:])
    assert result.summary is not None and result.summary["base"]["sha256"] == smol.sha256
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before  # read, never written
    await habitat.close()

    # Without a host trainer (and no cache made before): no mount, the container dequantizes into its tmpfs.
    monkeypatch.setenv("ACADEMY_BASE_CACHE", str(tmp_path / "empty-cache"))
    plain_out = tmp_path / "gguf-in-container"
    plain = _habitat(docker_url, replace_options(docker_options, host_trainer_python=None))
    with capture_logs() as logs:
        handle = await plain.start(TrainingJob(spec=make_spec(plain_out, base_model=smol.path, backend="peft",
                                                              max_steps=2, hyperparameters=hp),
                                               run_id="d-gguf-plain", time_limit_s=900, memory_limit_mb=3072))
    peak_plain = PeakMemory(docker_client, plain_out)
    assert any(e["event"] == "base_cache_not_mounted" and "no host trainer" in e["reason"] for e in logs), logs
    (container,) = _containers(docker_client, plain_out)
    assert str(target) not in {m["Destination"] for m in container.attrs["Mounts"]}
    events = [e async for e in plain.progress(handle)]
    result = await plain.result(handle)
    in_container = peak_plain.stop()
    assert result.status is JobStatus.SUCCEEDED, (result, events[-1:])
    await plain.close()
    figures = {"peak_mb_mounted": round(mounted / 2**20), "peak_mb_in_container": round(in_container / 2**20),
               "with_page_cache_mb": [round(peak_mounted.usage / 2**20), round(peak_plain.usage / 2**20)],
               "samples": [peak_mounted.samples, peak_plain.samples]}
    print("container peak memory:", json.dumps(figures))
    assert peak_mounted.samples > 5 and peak_plain.samples > 5, figures
    # The fp32 SmolLM2-135M is 538 MB on disk: the mounted run must be spared most of that copy.
    assert in_container - mounted > 300 * 2**20, figures


async def test_a_host_dequantize_that_hangs_is_killed_and_the_container_dequantizes_itself(
    docker_url: str, docker_options: DockerOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host's trainer hangs while dequantizing (a stand-in interpreter that sleeps): after the timeout
    it is killed, not left running, and the job goes on without the mount, with the reason in the log."""
    import academyd.habitat.docker.habitat as docker_habitat

    pidfile = tmp_path / "pid"
    hang = tmp_path / "python"
    hang.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 120\n")
    hang.chmod(0o755)
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setenv("ACADEMY_BASE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(docker_habitat, "DEQUANTIZE_TIMEOUT_S", 1)
    habitat = _habitat(docker_url, replace_options(docker_options, host_trainer_python=str(hang)))
    with capture_logs() as logs:
        mounts, env = await habitat.runner._base_cache(str(base), NOBODY_UID, NOBODY_UID)
    assert (mounts, env) == ((), {})
    events = {e["event"]: e for e in logs}
    assert "not done in 1 s" in events["base_dequantize_failed"]["error"], logs
    assert "not dequantized on the host" in events["base_cache_not_mounted"]["reason"], logs
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    await habitat.close()
