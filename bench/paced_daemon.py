"""Run ``migrate-src`` or ``migrate-dst`` with every TCP socket paced by the kernel.

    python bench/paced_daemon.py --pacing-rate BYTES_PER_S src|dst -- DAEMON ARGS...

Used by the shaped-network scenario to hold each TCP stream below the link rate, the
way a real NIC queue or a per-flow policer does.  It sets ``SO_MAX_PACING_RATE``
(socket option 47; TCP paces such a socket by itself, no ``fq`` qdisc needed) on every
IPv4/IPv6 stream socket the daemon opens through :class:`socket.socket`, then runs the
daemon's own ``main()`` unchanged.  The daemons stay untouched: the pacing lives here.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)


def set_pacing(sock: socket.socket, rate: int) -> None:
    """Cap one socket at ``rate`` bytes/s (the 64-bit form, so > 2 GB/s works too)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("=Q", rate))


def install(rate: int) -> None:
    """Make every stream socket created from now on paced at ``rate`` bytes/s."""
    base = socket.socket

    class PacedSocket(base):  # type: ignore[misc, valid-type]
        def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                     fileno: int | None = None) -> None:
            super().__init__(family, type, proto, fileno)
            if fileno is None and self.family in (socket.AF_INET, socket.AF_INET6) \
                    and self.type == socket.SOCK_STREAM:
                set_pacing(self, rate)

    socket.socket = PacedSocket  # type: ignore[misc]


def main(argv: list[str]) -> int:
    rate = 0
    if len(argv) >= 2 and argv[0] == "--pacing-rate":
        rate = int(argv[1])
        argv = argv[2:]
    if not argv or argv[0] not in ("src", "dst"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    side, rest = argv[0], argv[1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    if rate > 0:
        install(rate)
    if side == "src":
        from migrate_src.cli import main as daemon_main
    else:
        from migrate_dst.cli import main as daemon_main
    return int(daemon_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
