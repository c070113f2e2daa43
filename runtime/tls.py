"""Mutual TLS credentials from a certs directory (see runtime.pki for the layout).

Servers require a client certificate signed by the platform CA; the certificate's common name is the
caller's identity. Clients present their own service's certificate and trust only the platform CA.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from runtime.config import SecuritySettings


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SystemExit(
            f"missing {path}: run `make certs` for a dev PKI, or mount the service's certificate"
        ) from None


def private_key(security: SecuritySettings, identity: str) -> bytes:
    """The identity's private key (PEM): also the secret the service's page tokens are signed
    with (runtime.pagination)."""
    return _read(security.certs_dir / f"{identity}-key.pem")


def _usable_pair(directory: Path, identity: str) -> tuple[bytes, bytes]:
    """The identity's key and certificate, checked: gRPC takes any bytes and then only fails to
    listen, which reads like a port in use. A file that is not PEM, or a key that is not the
    certificate's, stops the service naming the file."""
    key_path, cert_path = directory / f"{identity}-key.pem", directory / f"{identity}.pem"
    key, cert = _read(key_path), _read(cert_path)
    fix = "run `make certs` for a dev PKI, or mount the service's own certificate and key"
    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
    except ValueError as error:
        raise SystemExit(f"{cert_path} is not a PEM certificate ({error}): {fix}") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as error:
        raise SystemExit(
            f"{key_path} is not an unencrypted PEM private key ({error}): {fix}"
        ) from None
    raw = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != public.public_bytes(*raw):
        raise SystemExit(f"{key_path} is not the key of {cert_path}: {fix}")
    return key, cert


def server_credentials(security: SecuritySettings, identity: str) -> grpc.ServerCredentials:
    d = security.certs_dir
    return grpc.ssl_server_credentials(
        [_usable_pair(d, identity)],
        root_certificates=_read(d / "ca.pem"),
        require_client_auth=True,
    )


def channel_credentials(security: SecuritySettings, identity: str) -> grpc.ChannelCredentials:
    d = security.certs_dir
    return grpc.ssl_channel_credentials(
        root_certificates=_read(d / "ca.pem"),
        private_key=_read(d / f"{identity}-key.pem"),
        certificate_chain=_read(d / f"{identity}.pem"),
    )
