"""The follower joins the embedded server as its own least-privilege identity, not as the daemon (#19).

What that identity may do on a real server is tested in tests/daemon/test_auth.py
(test_only_the_follower_touches_its_consumer); here: that `academyd follow` on a data directory uses it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from academyd.bus import BusError
from academyd.follower.follower import follower_nats
from academyd.nats_auth import DAEMON, FOLLOWER, FOLLOWER_INBOX_PREFIX, ensure_credentials, password_file
from academyd.settings import load_settings


def test_the_follower_uses_its_own_identity_on_the_embedded_server(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data")
    with pytest.raises(BusError, match="start the daemon in this data directory first"):
        follower_nats(settings)
    passwords = ensure_credentials(settings.nats_dir)  # what the daemon does at its first start
    cfg = follower_nats(settings)
    assert cfg.user == FOLLOWER and cfg.password == passwords[FOLLOWER]
    assert cfg.inbox_prefix == FOLLOWER_INBOX_PREFIX
    # a data directory made before the follower had an identity: the daemon's, as before
    password_file(settings.nats_dir, FOLLOWER).unlink()
    assert follower_nats(settings).user == DAEMON
