"""A small certificate authority for the security tests: a CA, a server certificate for
127.0.0.1/localhost (usable as a client certificate too, as `memstore serve` uses it), a
client certificate, and certificates from a rogue CA. Written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN "app"
    client_key: Path
    rogue_cert: Path  # a server and client certificate from another CA
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(cn: str, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
           key: ec.EllipticCurvePrivateKey, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(x509.ExtendedKeyUsage([
                ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("memstore test CA", _name("memstore test CA"), ca_key, ca_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    for name, cn, issuer, issuer_key in (("server", "shard", ca.subject, ca_key),
                                         ("client", "app", ca.subject, ca_key),
                                         ("rogue", "shard", _name("rogue"), rogue_key)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(cn, issuer, issuer_key, key)
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, directory / f"{name}.key")
        paths[name] = (directory / f"{name}.pem", directory / f"{name}.key")
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(directory / "ca.pem", *paths["server"], *paths["client"], *paths["rogue"])
