"""``migrate-dst``: a VM waiting for its state, serving QMP until told to quit."""

from __future__ import annotations

import sys
from pathlib import Path

from migrate_common.cli import (
    build_settings,
    build_tls_objects,
    build_vm,
    common_parser,
    qmp_address,
    run_main,
)
from migrate_common.daemon import run_daemon
from migrate_dst.daemon import DestinationDaemon

DEFAULT_QMP = "unix:/tmp/migrate-dst.qmp"


def main(argv: list[str] | None = None) -> int:
    parser = common_parser("migrate-dst", "Destination side of a multifd live migration: "
                           "waits for the VM's state and runs it.", DEFAULT_QMP)
    parser.add_argument("--incoming", default="defer", metavar="defer|tcp:HOST:PORT|unix:PATH",
                        help="where to listen for the migration; 'defer' waits for QMP "
                             "migrate-incoming (default)")
    parser.add_argument("--record-channels", metavar="DIR", type=Path,
                        help="record every channel's bytes of each incoming migration into "
                             "DIR/attempt-N (for migrate-analyze; slows receiving)")
    args = parser.parse_args(argv)

    def make():  # type: ignore[no-untyped-def]
        vm = build_vm(args, "destination")
        settings = build_settings(args)
        address = qmp_address(args)
        incoming = None if args.incoming == "defer" else args.incoming
        tls_objects = build_tls_objects(args)

        async def serve() -> None:
            await run_daemon(DestinationDaemon(vm, settings, incoming=incoming,
                                               record_dir=args.record_channels,
                                               tls_objects=tls_objects), address)

        return serve()

    return run_main(args, make)


if __name__ == "__main__":
    sys.exit(main())
