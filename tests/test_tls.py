"""TLS on every channel with mutual x509 authentication."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_status

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["vfio-sim,id=gpu0,state-size=4M", "vfio-sim,id=gpu1,state-size=2M"]


def make_certs(directory: Path, *hostnames: str) -> Path:
    pytest.importorskip("cryptography")
    args = [a for h in hostnames for a in ("--hostname", h)]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make-test-certs.py"),
                    str(directory), *args], check=True, capture_output=True)
    return directory


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "pki")


async def test_tls_migration_with_ram_and_devices(pair_factory, pki):
    async with pair_factory(DEVICES, memory="16M,fill=mixed", workload="dirty-rate=20M",
                            src_tls=pki, dst_tls=pki) as pair:
        await pair.configure(multifd=True, channels=3,
                             extra_params={"tls-creds": "tls0", "max-bandwidth": 0})
        info = await pair.migrate()
        assert info["status"] == "completed", info.get("error-desc")
        assert info["x-tls"] is True
        src, dst = await pair.digests()
        assert src == dst


async def test_source_without_client_certificate_is_rejected(pair_factory, pki, tmp_path):
    anonymous = tmp_path / "anon"
    anonymous.mkdir()
    shutil.copy(pki / "ca-cert.pem", anonymous)           # trusts the server, no identity
    async with pair_factory(DEVICES, src_tls=anonymous, dst_tls=pki) as pair:
        await pair.configure(multifd=True, channels=2, extra_params={"tls-creds": "tls0"})
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "TLS" in info["error-desc"] or "closed" in info["error-desc"]
        dst = await wait_status(pair.dst, "failed")
        assert "TLS handshake failed" in dst["error-desc"]
        assert (await pair.src.execute("query-status"))["status"] == "running"


async def test_certificates_from_another_ca_are_rejected(pair_factory, pki, tmp_path):
    other = make_certs(tmp_path / "other")
    async with pair_factory(DEVICES, src_tls=other, dst_tls=pki) as pair:
        await pair.configure(multifd=True, channels=2, extra_params={"tls-creds": "tls0"})
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "certificate verify failed" in info["error-desc"].lower() or \
            "TLS handshake failed" in info["error-desc"]


async def test_hostname_must_match_the_certificate(pair_factory, pki):
    async with pair_factory(DEVICES, src_tls=pki, dst_tls=pki) as pair:
        await pair.configure(multifd=True, channels=2, extra_params={
            "tls-creds": "tls0", "tls-hostname": "not-the-destination.example"})
        info = await pair.migrate()
        assert info["status"] == "failed"
        assert "TLS handshake failed" in info["error-desc"]


async def test_plaintext_source_against_tls_destination(pair_factory, pki):
    async with pair_factory(DEVICES, dst_tls=pki) as pair:
        await pair.configure(multifd=True, channels=2, side="src")
        await pair.configure(multifd=True, channels=2, side="dst",
                             extra_params={"tls-creds": "tls0"})
        info = await pair.migrate()
        assert info["status"] == "failed"
        dst = await wait_status(pair.dst, "failed")
        assert "tls-creds" in dst["error-desc"] and "both sides" in dst["error-desc"]


async def test_unknown_tls_object_is_refused(pair_factory):
    async with pair_factory(DEVICES) as pair:
        await pair.configure(multifd=True, channels=2, side="src",
                             extra_params={"tls-creds": "tls9"})
        with pytest.raises(Exception, match="no such object"):
            await pair.src.execute("migrate", {"uri": await pair.uri()})


def _tls_pair(pki: Path):
    """A connected TLS pair over loopback TCP with small buffers (client, server)."""
    import socket
    import ssl
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server-cert.pem", pki / "server-key.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(pki / "ca-cert.pem")
    client_ctx.check_hostname = False
    listener = socket.create_server(("127.0.0.1", 0))
    raw_client = socket.socket()
    raw_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw_client.connect(listener.getsockname())
    raw_server, _ = listener.accept()
    raw_server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.close()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "server", server_ctx.wrap_socket(raw_server, server_side=True)))
    t.start()
    client = client_ctx.wrap_socket(raw_client)
    t.join(5)
    return client, out["server"]


def test_tls_channel_thread_io_stall_and_stop(pki):
    """The channel threads' blocking TLS I/O: exact bytes, the stall timeout when the
    peer stops reading, and a stop that ends a blocked receive."""
    import threading
    import time

    from migrate_common.threadio import Stopped, Stopper, hand_to_thread, recv_into, send_all
    from protocol.errors import ChannelError

    client, server = _tls_pair(pki)
    try:
        hand_to_thread(client, stall_timeout=0.3)
        hand_to_thread(server)
        assert send_all(client, [b"head", b"payload"], Stopper(client), 0.3, "ch") == 11
        buf = bytearray(11)
        got = 0
        while got < 11:
            got += recv_into(server, memoryview(buf)[got:], Stopper(server))
        assert bytes(buf) == b"headpayload"
        start = time.monotonic()
        with pytest.raises(ChannelError, match="x-channel-stall-timeout"):
            send_all(client, [bytes(8 << 20)], Stopper(client), 0.3, "ch")
        assert time.monotonic() - start < 10
    finally:
        client.close()
        server.close()

    client, server = _tls_pair(pki)
    try:
        hand_to_thread(server)
        stopper = Stopper(server)
        result = []

        def blocked() -> None:
            try:
                recv_into(server, memoryview(bytearray(100)), stopper)
            except Stopped:
                result.append("stopped")

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.2)
        stopper.stop()
        t.join(2)
        assert result == ["stopped"]
    finally:
        client.close()
        server.close()
