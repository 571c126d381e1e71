"""`academyd worker`: trains the daemon's jobs on any host with the trainer environment, over NATS only.

See `academyd.worker.protocol` for the wire (subjects, buckets, the lease) and `academyd.worker.run`
for the worker itself; the daemon's side is `academyd.habitat.nats`.
"""

from academyd.worker.run import Worker, probe_capabilities

__all__ = ["Worker", "probe_capabilities"]
