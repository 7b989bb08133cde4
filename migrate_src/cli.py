"""``migrate-src``: run the source VM and serve QMP until told to quit."""

from __future__ import annotations

import sys

from migrate_common.cli import (
    build_settings,
    build_tls_objects,
    build_vm,
    common_parser,
    qmp_address,
    run_main,
)
from migrate_common.daemon import run_daemon
from migrate_src.daemon import SourceDaemon

DEFAULT_QMP = "unix:/tmp/migrate-src.qmp"


def main(argv: list[str] | None = None) -> int:
    parser = common_parser("migrate-src", "Source side of a multifd live migration: runs the "
                           "VM and migrates it on QMP 'migrate'.", DEFAULT_QMP)
    args = parser.parse_args(argv)

    def make():  # type: ignore[no-untyped-def]
        vm = build_vm(args, "source")
        daemon_args = (vm, build_settings(args), build_tls_objects(args))
        address = qmp_address(args)

        async def serve() -> None:
            await run_daemon(SourceDaemon(*daemon_args), address)

        return serve()

    return run_main(args, make)


if __name__ == "__main__":
    sys.exit(main())
