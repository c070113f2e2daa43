"""The development PKI: a dev CA, one certificate per identity, and a JWT signing key.

`make certs` (or the first `make up`, or the test suite) writes them under `certs/`, which git ignores:
no private key is ever committed. Production mounts real files at the same paths (see the README's
"Security model"); nothing here runs there.

Layout of a certs directory:
    ca.pem, ca-key.pem              the dev certificate authority
    <identity>.pem, <identity>-key.pem
                                    a leaf certificate whose common name is the identity (a service name,
                                    or a platform caller such as `gateway`), valid as server and client
    jwt/<kid>.pem, jwt/<kid>-key.pem
                                    an ES256 key pair that signs user tokens; the services load every
                                    public key in jwt/ and pick one by the token's `kid`
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_IDENTITIES = ("wallet", "gifting", "payout", "promotion")
CALLER_IDENTITIES = (
    "gateway",
    "admin-console",
    "ad-delivery",
    "payment-webhooks",
    "payout-webhooks",
)
"""Platform callers: the API gateway (coinsctl plays it locally) and the admin console carry users'
requests; ad delivery reports promotions' delivery; the payment webhook receiver relays the payment
provider's events (refunds, chargebacks), the payout webhook receiver the payout processor's."""
DEV_KEY_ID = "dev-1"
_VALIDITY = dt.timedelta(days=825)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coins dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(directory: Path, common_name: str = "coins dev CA") -> None:
    """A self-signed certificate authority: ca.pem and ca-key.pem in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca-key.pem", key)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(
    directory: Path, identity: str, hosts: Iterable[str] = ("localhost", "127.0.0.1")
) -> None:
    """A leaf certificate for `identity`, signed by the CA in `directory`, usable as server and client."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(identity)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(directory / f"{identity}-key.pem", key)
    (directory / f"{identity}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_signing_key(directory: Path, key_id: str = DEV_KEY_ID) -> None:
    """An ES256 key pair for user tokens: jwt/<kid>-key.pem (signs) and jwt/<kid>.pem (verifies)."""
    folder = directory / "jwt"
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(folder / f"{key_id}-key.pem", key)
    (folder / f"{key_id}.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def ensure_dev_pki(directory: Path) -> bool:
    """Create whatever of the dev PKI is missing in `directory`; True if anything was written.

    A new CA gets every identity a new certificate. Otherwise only an identity without its
    certificate or key gets one (say, one added to the lists above since the folder was made), and
    every other identity keeps its own: running processes may hold them."""
    new_ca = not (directory / "ca.pem").exists()
    if new_ca:
        make_ca(directory)
    wrote = new_ca
    for identity in (*SERVICE_IDENTITIES, *CALLER_IDENTITIES):
        files = (directory / f"{identity}.pem", directory / f"{identity}-key.pem")
        if new_ca or not all(path.exists() for path in files):
            issue(directory, identity)
            wrote = True
    if not (directory / "jwt" / f"{DEV_KEY_ID}-key.pem").exists():
        make_signing_key(directory)
        wrote = True
    return wrote


if __name__ == "__main__":  # `make certs`
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m runtime.pki",
        description="Write a development CA, a certificate per service and a token signing key "
        "(nothing is overwritten).",
    )
    parser.add_argument(
        "directory",
        nargs="?",
        default=os.environ.get("COINS_CERTS_DIR", "certs"),
        help="where (default: $COINS_CERTS_DIR, else certs)",
    )
    target = Path(parser.parse_args().directory)
    created = ensure_dev_pki(target)
    print(f"dev PKI {'written to' if created else 'already in'} {target}/")
