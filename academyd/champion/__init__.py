"""The champion: which adapter Venom serves, and the only code that changes it.

- `service.Champion`: promotion and rollback for the daemon (commands, the pipeline, the monitor), as
  compare-and-swap moves on the champion the decision was made against (`moves`, the artifacts a move needs built once per version by `artifacts`);
- `monitor.Monitor`: the post-promotion watch, an APScheduler job (poked by ingest, debounced, with a
  cooldown), never on the ingest ack path; `assess` its decision (guardrails, then academyd.anytime).
"""

from academyd.champion.monitor import Monitor
from academyd.champion.service import Champion

__all__ = ["Champion", "Monitor"]
