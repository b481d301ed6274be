"""The checkpoint-stream protocol between the primary and the backup, sans I/O.

Like h11 does for HTTP, this package never touches a socket: the daemons feed
received bytes in (``receive``) and get events out, and every method that
produces something to send returns the bytes. Framing is in ``wire``.

Errors: anything wrong with what the peer sent raises ``ProtocolError`` (the
protocol object is then dead; during the backup's handshake the exception's
``reply`` holds a reject frame to send). Misuse by the calling daemon
(bad arguments, acking an epoch that is not awaiting an ack) raises
``ValueError``/``TypeError``.

Modules, each importing only modules listed above it:

    messages  the messages, their schema and header checks, the limits
    events    what the protocol objects return to the daemons
    checksum  the end frame's checksum and the pool that hashes it
    encoder   CheckpointEncoder: the frames the primary sends
    primary   PrimaryProtocol: what the primary receives
    backup    BackupProtocol: what the backup receives, and its replies
"""
from remus.common.protocol.backup import BackupProtocol
from remus.common.protocol.checksum import checkpoint_checksum
from remus.common.protocol.encoder import CheckpointEncoder
from remus.common.protocol.events import (Acked, CheckpointStaged, DiskWritten, DiskZeroed,
                                          InputReceived, PagesReceived, PeerBye, PeerHandover,
                                          Progress, Rejected, Send, SessionOpened,
                                          StagedCheckpoint, Welcome)
from remus.common.protocol.messages import (CODECS, DISK_EXTENT, DISK_SECTOR, MAX_DISK_SIZE,
                                            MAX_DISKS, MAX_FRAME_RAW, MAX_INPUT_COUNT,
                                            MAX_INPUT_FRAME, MAX_NICS, MIN_INPUT_FRAME,
                                            PROTOCOL_VERSION, ZERO_EXTENT, DiskRun)
from remus.common.protocol.primary import PrimaryProtocol
from remus.common.wire import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "ProtocolError",
    "CheckpointEncoder",
    "PrimaryProtocol",
    "BackupProtocol",
    "StagedCheckpoint",
    "Welcome",
    "Rejected",
    "Acked",
    "SessionOpened",
    "Send",
    "CheckpointStaged",
    "PeerBye",
    "PeerHandover",
    "InputReceived",
    "DiskRun",
    "PagesReceived",
    "DiskWritten",
    "DiskZeroed",
    "Progress",
    "checkpoint_checksum",
    "CODECS",
    "MAX_FRAME_RAW",
    "MIN_INPUT_FRAME",
    "MAX_INPUT_FRAME",
    "MAX_INPUT_COUNT",
    "DISK_EXTENT",
    "ZERO_EXTENT",
    "DISK_SECTOR",
    "MAX_DISK_SIZE",
    "MAX_DISKS",
    "MAX_NICS",
]
