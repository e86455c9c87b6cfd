"""Server credentials for `gpusoc-agent run`, without importing `cryptography`.

Loading cryptography's X.509 stack costs ~9 MB of RSS; the agent's steady state needs only
gRPC's own TLS. Files are checked for presence and PEM shape here with clear errors; deep
checks (key matches certificate, chains) live in `agent.pki` for tooling and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

PathArg = str | os.PathLike[str]


class TlsFileError(Exception):
    """A certificate or key file is missing, unreadable or not PEM; the message names it."""


def _read_pem(path: PathArg, what: str, marker: bytes) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{what} {p}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker not in data:
        raise TlsFileError(f"{what} {p}: not a PEM {marker.decode().strip('-').strip()} file")
    return data


def load_server_credentials(cert_file: PathArg, key_file: PathArg, client_ca_file: PathArg) -> grpc.ServerCredentials:
    """mTLS server credentials that require a client certificate chaining to client_ca_file."""
    cert = _read_pem(cert_file, "agent certificate", b"CERTIFICATE-----")
    key = _read_pem(key_file, "agent key", b"PRIVATE KEY-----")
    ca = _read_pem(client_ca_file, "console CA", b"CERTIFICATE-----")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
