#!/usr/bin/env python3
"""Make x509 test credentials for TLS migrations, in QEMU's tls-creds-x509 layout.

    python scripts/make-test-certs.py DIR [--hostname NAME ...]

writes into DIR:

    ca-cert.pem                      a self-signed CA
    server-cert.pem, server-key.pem  the destination's certificate (for NAMEs,
                                     default: localhost, 127.0.0.1, ::1)
    client-cert.pem, client-key.pem  the source's certificate (mutual authentication)

Both daemons point ``--object tls-creds-x509,id=tls0,dir=DIR`` at the same folder
(each uses its own half).  For tests and trials only: real deployments use their
own CA.  Needs the ``cryptography`` package (in the project's test extras).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "multifd-migrate test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make(directory: Path, hostnames: list[str], days: int = 30) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = _key()
    ca = (x509.CertificateBuilder().subject_name(_name("multifd-migrate test CA"))
          .issuer_name(_name("multifd-migrate test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(role: str, usage: x509.ObjectIdentifier, names: list[str]) -> None:
        key = _key()
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = (x509.CertificateBuilder().subject_name(_name(f"{role} {names[0]}"))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start)
                   .not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (directory / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(directory / f"{role}-key.pem", key)

    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, hostnames)
    leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, ["migrate-src"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--hostname", action="append",
                        help="names the server certificate is valid for (repeatable)")
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    make(args.dir, args.hostname or ["localhost", "127.0.0.1", "::1"], args.days)
    print(f"wrote test credentials to {args.dir}")


if __name__ == "__main__":
    main()
