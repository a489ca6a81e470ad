"""A certificate authority made for a test, and a server certificate it signed for 127.0.0.1: a
server on TLS that the engine trusts only when told to."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Authority:
    """A CA made for the test, and a server certificate it signed for 127.0.0.1."""

    ca_file: Path
    server: ssl.SSLContext
    files: tuple[Path, Path, Path]  # the server's certificate and key, the CA's certificate


def make_authority(folder: Path) -> Authority:
    """A CA and a certificate it signed for 127.0.0.1, their files in ``folder``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, public: ec.EllipticCurvePublicKey, issuer: str, ca: bool
             ) -> x509.Certificate:  # fmt: skip
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)  # fmt: skip
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(cert("flashsale test CA", ca_key.public_key(), "flashsale test CA",
                             True).public_bytes(pem))  # fmt: skip
    cert_file.write_bytes(cert("127.0.0.1", key.public_key(), "flashsale test CA",
                               False).public_bytes(pem))  # fmt: skip
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return Authority(ca_file, server, (cert_file, key_file, ca_file))
