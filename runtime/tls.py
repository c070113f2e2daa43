"""Mutual TLS credentials from a certs directory (see runtime.pki for the layout).

Servers require a client certificate signed by the platform CA; the certificate's common name is the
caller's identity. Clients present their own service's certificate and trust only the platform CA.
"""

from __future__ import annotations

from pathlib import Path

import grpc

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


def server_credentials(security: SecuritySettings, identity: str) -> grpc.ServerCredentials:
    d = security.certs_dir
    return grpc.ssl_server_credentials(
        [(_read(d / f"{identity}-key.pem"), _read(d / f"{identity}.pem"))],
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
