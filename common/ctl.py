"""remusctl: the operator's tool."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remusctl",
        description="Operate Remus: build the demo guest, make node keys, inspect replicas.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    guest = sub.add_parser("guest", help="the built-in demo guest")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True)
    from remus.common import guest_image
    guest_image.add_build_parser(guest_sub)

    # Key material. `generate` makes CURVE key pairs for the heartbeat channel;
    # other kinds (TLS for the checkpoint stream) can join this group.
    keys = sub.add_parser("keys", help="key material: node key pairs")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    from remus.common import heartbeat
    heartbeat.add_keys_generate_parser(keys_sub)

    from remus.common import fencing
    fencing.add_fence_test_parser(sub)

    from remus.common import drill, reprotect_cli, status_cli
    status_cli.add_parsers(sub)
    drill.add_parser(sub)
    reprotect_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
