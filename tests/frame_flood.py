"""Send N Ethernet frames to a MAC as fast as this process can (run on another host
by test_hostile): input for a guest that may not be taking it."""
import socket
import sys


def main() -> None:
    ifname, mac, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((ifname, 0))
    dst = bytes.fromhex(mac.replace(":", ""))
    frame = dst + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"x" * 46  # 60 bytes, local ethertype
    sent = 0
    for _ in range(count):
        try:
            s.send(frame)
            sent += 1
        except (BlockingIOError, OSError):
            pass  # the kernel queue is full: that frame is lost, as on a wire
    print(sent)


if __name__ == "__main__":
    main()
