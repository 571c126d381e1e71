"""Reading back what the container wrote, as untrusted (`academyd.habitat.jobdir`: no symlink followed,
sizes bounded, JSON validated): where this attempt's events begin, and on success the summary, adapter and
loss log copied out of the output into the daemon's own `result/`, which is what the registry reads."""

from __future__ import annotations

from typing import Any

from academyd.habitat import jobdir
from academyd.habitat.jobdir import JobDir, UnsafeOutput
from academyd.trainer import spec as S


def events_size(jd: JobDir) -> int:
    """Where this attempt's events begin: the size of the output's events.jsonl now (0 if none)."""
    try:
        return jobdir.read_from(jd.output, S.EVENTS_FILE, 0, max_bytes=0)[1]
    except UnsafeOutput:
        return 0


def collect_result(jd: JobDir) -> tuple[dict[str, Any], str]:
    """The summary, the adapter and the loss log of a succeeded job, copied out of its output (read as
    untrusted) into the daemon's `result/`; returns (summary, adapter directory the daemon reads)."""
    summary = jobdir.read_json_object(jd.output, S.SUMMARY_FILE)
    if summary is None:
        raise UnsafeOutput(f"the trainer reported success but {jd.output / S.SUMMARY_FILE} does not exist")
    for key in ("steps", "final_loss", "base_heldout_loss", "adapter_heldout_loss"):
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UnsafeOutput(f"refused {jd.output / S.SUMMARY_FILE}: {key} is not a number")
    jd.result.mkdir(exist_ok=True)
    jobdir.copy_tree(jd.output, S.ADAPTER_DIR, jd.result / S.ADAPTER_DIR)
    loss = jobdir.read_bytes(jd.output, S.LOSS_FILE, max_bytes=256 << 20)
    if loss is not None:
        (jd.result / S.LOSS_FILE).write_bytes(loss)
    jobdir.write_control(jd.result / S.SUMMARY_FILE, summary)
    return summary, str(jd.result / S.ADAPTER_DIR)


