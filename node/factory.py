"""The roles one side hands over to on the other side (see common/roles.py)."""
from __future__ import annotations

from pathlib import Path

from remus.backup.standing_by import Standby
from remus.common.config import Config
from remus.common.roles import Role, RunningGuest
from remus.primary.protecting import Protecting


class HostRoles:
    """Both sides' roles, for a host that changes sides."""

    def standby(self, cfg: Config) -> Role:
        return Standby(cfg)

    def protecting(self, cfg: Config, running: RunningGuest,
                   stats: Path | None = None) -> Role:
        return Protecting(cfg, running, stats)
