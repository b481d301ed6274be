"""A hostile client of the backup's stream port (run on another host by test_hostile):
holds N idle TCP connections, reopening each one the backup closes, plus S TLS
handshakes stalled after the first bytes, for a number of seconds. Prints a JSON
summary: how many connections it opened in all."""
import json
import resource
import selectors
import socket
import sys
import time


def main() -> None:
    host, port, idle, stalled, seconds = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                          int(sys.argv[4]), float(sys.argv[5]))
    room = idle + stalled + 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (room, room))
    sel = selectors.DefaultSelector()
    opened = 0

    def open_one(kind: str) -> None:
        nonlocal opened
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        opened += 1
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, kind)

    for i in range(idle + stalled):
        open_one("idle" if i < idle else "stalled")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, events in sel.select(0.05):
            s, kind = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                if kind == "stalled" and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:  # the first bytes of a TLS ClientHello, then nothing
                        s.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                    except OSError:
                        pass
                sel.modify(s, selectors.EVENT_READ, kind)
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # closed by the backup: come back
                sel.unregister(s)
                s.close()
                open_one(kind)
                time.sleep(0.001)  # a persistent client, not a CPU burner
    print(json.dumps({"opened": opened}))


if __name__ == "__main__":
    main()
