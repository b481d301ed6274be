"""Who may subscribe to our beats: the ZAP handler of the PUB sockets admits only
the configured peer public key, and reports any other key it refuses."""
from __future__ import annotations

from typing import Callable

from zmq.auth.thread import ThreadAuthenticator


class Zap(ThreadAuthenticator):
    """zmq.auth's ZAP handler thread, keeping the address of the request at hand so
    that a refusal can name it."""

    address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 4:
            self.address = msg[3].decode("ascii", "replace")
        await super().handle_zap_message(msg)


class KeyCheck:
    """The CURVE credentials provider of link `index`: the peer's key only; any other
    is refused and passed to `rejected`."""

    def __init__(self, index: int, peer_public: bytes, zap: Zap, rejected: Callable[..., None]):
        self.index = index
        self.peer_public = peer_public
        self.zap = zap
        self.rejected = rejected

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.peer_public:
            return True
        self.rejected(self.index, "unknown peer key", key=key.decode("ascii", "replace"),
                      address=self.zap.address)
        return False
