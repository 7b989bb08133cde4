"""TLS on every migration channel, with x509 credentials in QEMU's layout.

Credentials are declared on a daemon's command line the way QEMU declares them::

    --object tls-creds-x509,id=tls0,dir=/etc/migrate/pki[,verify-peer=on|off]

and selected per migration with the ``tls-creds`` parameter (``tls0``), exactly as
with QEMU.  The folder holds ``ca-cert.pem`` plus ``server-cert.pem`` and
``server-key.pem`` (the destination) and/or ``client-cert.pem`` and
``client-key.pem`` (the source); ``scripts/make-test-certs.py`` makes a test set.

Every connection — the main channel and each multifd channel — is its own TLS
session (TLS 1.2 or newer).  The destination requires a client certificate signed
by its CA unless ``verify-peer=off``; the source checks the destination's
certificate against the name in ``tls-hostname``, or the host of the migration
URI.  The handshake runs on the non-blocking socket inside the event loop.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from migrate_common.net import wait_readable, wait_writable
from protocol.errors import ChannelError, ConfigError
from vm.properties import BOOL_WORDS

__all__ = ["TlsCreds", "parse_tls_object", "client_context", "server_context", "handshake"]


@dataclass(frozen=True, slots=True)
class TlsCreds:
    id: str
    dir: Path
    verify_peer: bool = True

    def file(self, name: str) -> Path:
        path = self.dir / name
        if not path.is_file():
            raise ConfigError(f"tls-creds {self.id}: {path} is missing")
        return path


def parse_tls_object(text: str) -> TlsCreds:
    """Parse ``tls-creds-x509,id=ID,dir=PATH[,verify-peer=on|off][,endpoint=...]``."""
    kind, _, rest = text.partition(",")
    if kind != "tls-creds-x509":
        raise ConfigError(f"--object {kind!r}: only tls-creds-x509 objects are supported")
    props: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--object {text!r}: expected key=value, got {item!r}")
        props[key] = value
    unknown = set(props) - {"id", "dir", "verify-peer", "endpoint"}
    if unknown:
        raise ConfigError(f"--object tls-creds-x509: unknown properties {sorted(unknown)}")
    if "id" not in props or "dir" not in props:
        raise ConfigError("--object tls-creds-x509 needs id=... and dir=...")
    verify = props.get("verify-peer", "on")
    if verify not in BOOL_WORDS:
        raise ConfigError(f"--object tls-creds-x509: verify-peer must be on or off, "
                          f"got {verify!r}")
    directory = Path(props["dir"])
    if not directory.is_dir():
        raise ConfigError(f"tls-creds {props['id']}: {directory} is not a directory")
    return TlsCreds(props["id"], directory, BOOL_WORDS[verify])


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_context(creds: TlsCreds) -> ssl.SSLContext:
    """The source's side: verify the destination, present our certificate if we have one."""
    ctx = _base(ssl.Purpose.SERVER_AUTH)
    try:
        ctx.load_verify_locations(cafile=creds.file("ca-cert.pem"))
        if (creds.dir / "client-cert.pem").is_file():
            ctx.load_cert_chain(creds.file("client-cert.pem"), creds.file("client-key.pem"))
    except ssl.SSLError as exc:
        raise ConfigError(f"tls-creds {creds.id}: cannot load credentials: {exc}") from None
    return ctx


def server_context(creds: TlsCreds) -> ssl.SSLContext:
    """The destination's side: our certificate, and (by default) the client's required."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(creds.file("server-cert.pem"), creds.file("server-key.pem"))
        if creds.verify_peer:
            ctx.load_verify_locations(cafile=creds.file("ca-cert.pem"))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"tls-creds {creds.id}: cannot load credentials: {exc}") from None
    return ctx


async def handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None, timeout: float,
                    what: str) -> ssl.SSLSocket:
    """Run the TLS handshake on a connected non-blocking socket."""
    loop = asyncio.get_running_loop()
    tls = ctx.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname,
                          do_handshake_on_connect=False)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    await wait_readable(loop, tls)
                except ssl.SSLWantWriteError:
                    await wait_writable(loop, tls)
    except TimeoutError:
        tls.close()
        raise ChannelError(f"{what}: TLS handshake did not finish within {timeout:g} s",
                           channel=what) from None
    except (ssl.SSLError, OSError) as exc:
        tls.close()
        hint = ""
        if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):
            hint = " (is TLS — tls-creds — set on both sides?)"
        raise ChannelError(f"{what}: TLS handshake failed: "
                           f"{getattr(exc, 'reason', None) or exc}{hint}", channel=what) from None
    except BaseException:
        tls.close()
        raise
