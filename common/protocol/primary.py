"""What the primary receives from the backup (welcome or reject, then progress and
acks), checked and turned into events."""
from __future__ import annotations

from collections import deque

from remus.common.protocol.events import Acked, Progress, Rejected, Welcome
from remus.common.protocol.messages import (FROM_BACKUP, MAX_EPOCH, PROTOCOL_VERSION, SESSION_RE,
                                            check_fields, check_int)
from remus.common.wire import DEFAULT_MAX_PAYLOAD, Frame, FrameDecoder, ProtocolError


class PrimaryProtocol:
    """What the primary receives from the backup: welcome/reject, then acks.

    ``sent(epoch)`` records a checkpoint the daemon queued; acks must then
    arrive for exactly those epochs, in order.
    """

    def __init__(self, session: str, max_payload: int = DEFAULT_MAX_PAYLOAD, *,
                 generation: int = 1, authenticated: bool = False) -> None:
        """`generation`: the one this primary holds the guest at; `authenticated`: the
        backup proved who it is (TLS). Only then may its reject supersede us."""
        if not isinstance(session, str) or not SESSION_RE.fullmatch(session):
            raise ValueError(f"session must be 32 lowercase hex digits, got {session!r}")
        self.session = session
        self.generation = check_int("generation", generation, 0, MAX_EPOCH)
        self.authenticated = bool(authenticated)
        self._decoder = FrameDecoder(max_payload)
        self._outstanding: deque[int] = deque()
        self._last_sent = 0
        self.state = "await-welcome"  # -> ready | rejected; failed | closed
        self._error: str | None = None

    @property
    def outstanding(self) -> tuple[int, ...]:
        """Epochs sent but not yet acknowledged, oldest first."""
        return tuple(self._outstanding)

    def sent(self, epoch: int) -> None:
        check_int("epoch", epoch, 1, MAX_EPOCH)
        if epoch <= self._last_sent:
            raise ValueError(f"sent({epoch}) after sent({self._last_sent}): epochs must increase")
        self._last_sent = epoch
        self._outstanding.append(epoch)

    def receive(self, data: bytes) -> list[Welcome | Rejected | Acked | Progress]:
        if self._error is not None:
            raise ProtocolError(f"protocol is unusable after an earlier error ({self._error})")
        if self.state == "closed":
            raise ProtocolError("receive() after close()")
        try:
            events = []
            for frame in self._decoder.feed(data):
                events.append(self._handle(frame))
            return events
        except ProtocolError as exc:
            self._error = str(exc)
            self.state = "failed"
            raise

    def _handle(self, frame: Frame) -> Welcome | Rejected | Acked | Progress:
        t, f = check_fields(frame, "backup", FROM_BACKUP)
        if t == "progress":
            if self.state != "ready" or f["epoch"] not in self._outstanding or f["bytes"] < 0:
                raise ProtocolError(f"progress of epoch {f['epoch']}, which is not awaiting an ack")
            return Progress(f["epoch"], f["bytes"])
        if self.state == "rejected":
            raise ProtocolError(f"{t!r} message after the backup rejected the session")
        if t == "welcome":
            if self.state != "await-welcome":
                raise ProtocolError("second welcome from the backup")
            if f["version"] != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"peer speaks protocol version {f['version']}, this primary speaks "
                    f"{PROTOCOL_VERSION}"
                )
            if f["session"] != self.session:
                raise ProtocolError(
                    f"welcome is for session {f['session']!r}, this primary's session is "
                    f"{self.session!r}"
                )
            self.state = "ready"
            return Welcome(f["session"], f["generation"])
        if t == "reject":
            if self.state != "await-welcome":
                raise ProtocolError("reject from the backup after it welcomed the session")
            self.state = "rejected"
            newer = f["generation"] > self.generation
            return Rejected(f["reason"], f["generation"], newer and self.authenticated)
        # ack
        epoch = f["epoch"]
        if self.state != "ready":
            raise ProtocolError(f"ack for epoch {epoch} before the backup's welcome")
        if not self._outstanding:
            raise ProtocolError(f"ack for epoch {epoch}, but no checkpoint is awaiting an ack")
        if epoch != self._outstanding[0]:
            expected = self._outstanding[0]
            raise ProtocolError(
                f"ack for epoch {epoch}, but the oldest unacknowledged checkpoint sent is "
                f"epoch {expected}"
            )
        self._outstanding.popleft()
        return Acked(epoch)

    def close(self) -> None:
        """EOF from the backup. Raises ProtocolError if a frame was cut off."""
        if self.state in ("closed", "failed"):
            return
        self.state = "closed"
        self._decoder.close()
