"""remusctl: the operator's tool."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


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

    # Key material, one directory for both channels: CURVE key pairs for the
    # heartbeat, and a CA with node certificates for the checkpoint stream's TLS.
    keys = sub.add_parser("keys", help="key material: heartbeat key pairs, stream certificates")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser("generate", help="create heartbeat key pairs and stream certificates")
    gen.description = (
        "Create, in --dir, the key material of each --node: a CURVE key pair for the "
        "heartbeat (NAME.key public, give it to the peer; NAME.key_secret, mode 0600) and "
        "a TLS certificate for the checkpoint stream (NAME.crt; NAME.tls.key, mode 0600), "
        "issued by a small CA made in the same folder (ca.crt for both hosts; ca.key, "
        "mode 0600, needed only to issue certificates: keep it off the nodes). EC P-256, "
        "valid ten years. An existing CA is reused, so a node can be added later; "
        "existing node files are kept unless --force (which also makes a new CA). "
        "Copy to the primary: ca.crt, primary.crt, primary.tls.key, primary.key_secret, "
        "backup.key; to the backup: ca.crt, backup.crt, backup.tls.key, backup.key_secret, "
        "primary.key. Then set [tls] dir (and [heartbeat] keys_dir) to that folder. "
        "The alternative, [tls] insecure = true, leaves the stream unauthenticated: anyone "
        "who reaches the backup's port can feed its replica, or forge a session and a "
        "handover that makes the backup take the guest over without fencing.")
    gen.add_argument("--dir", type=Path, required=True,
                     help="folder for the key files (created if missing)")
    gen.add_argument("--node", action="append", required=True, metavar="NAME",
                     help="node name; repeat for several nodes")
    gen.add_argument("--force", action="store_true",
                     help="replace existing key files, and make a new CA")
    gen.set_defaults(func=run_keys_generate)

    from remus.common.fencing.cli import add_fence_test_parser
    add_fence_test_parser(sub)

    from remus.common import drill, libvirt_import, reprotect_cli, status_cli
    libvirt_import.add_import_parser(sub)
    status_cli.add_parsers(sub)
    drill.add_parser(sub)
    reprotect_cli.add_parser(sub)
    return parser


def run_keys_generate(args) -> int:
    from remus.common import heartbeat, tls
    try:
        # Refuse before writing anything, so a refusal never leaves half a set.
        tls.preflight(args.dir, args.node, force=args.force)
        made = heartbeat.generate_keys(args.dir, args.node, force=args.force)
        written = tls.generate(args.dir, args.node, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"remusctl keys generate: {exc}", file=sys.stderr)
        return 1
    for public, secret in made:
        print(f"public: {public}")
        print(f"secret: {secret}")
    for path in written:
        print(f"tls: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from remus.common.config import ConfigError
    try:
        return args.func(args) or 0
    except ConfigError as exc:  # every subcommand that reads a config reports it alike
        print(f"remusctl: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
