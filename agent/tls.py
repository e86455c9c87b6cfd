"""Server credentials for `gpusoc-agent run`, without importing `cryptography`.

Loading cryptography's X.509 stack costs ~9 MB of RSS; the agent's steady state needs only
gRPC's own TLS. Files are checked for presence and PEM shape here with clear errors; deep
checks (key matches certificate, chains) live in `agent.pki` for tooling and tests.
"""

from __future__ import annotations

import os
import ssl
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


def certificate_common_name(cert_file: PathArg) -> str | None:
    """The subject CN of a PEM certificate through the stdlib's decoder (None if it cannot tell).

    Consoles accept an agent only when its Describe host equals this CN, so the agent checks it
    at start instead of running unreachable. `ssl._ssl._test_decode_cert` is CPython's own
    certificate decoder; without it (another runtime) the check is skipped.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(str(cert_file))
    except (ssl.SSLError, OSError, ValueError):
        return None
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def check_host_matches_certificate(host: str, cert_file: PathArg) -> None:
    """Raise TlsFileError when the certificate names another host than the agent's --host."""
    cn = certificate_common_name(cert_file)
    if cn is not None and cn != host:
        raise TlsFileError(
            f"agent certificate {cert_file} is issued to {cn!r} but this agent's host name is {host!r}; "
            f"consoles reject an agent whose name differs from its certificate. Start it with --host {cn} "
            f'(or host = "{cn}" in the config), or issue a certificate for {host!r} '
            f"(gpusoc-agent pki init --out DIR --agent {host})"
        )


def load_server_credentials(cert_file: PathArg, key_file: PathArg, client_ca_file: PathArg) -> grpc.ServerCredentials:
    """mTLS server credentials that require a client certificate chaining to client_ca_file."""
    cert = _read_pem(cert_file, "agent certificate", b"CERTIFICATE-----")
    key = _read_pem(key_file, "agent key", b"PRIVATE KEY-----")
    ca = _read_pem(client_ca_file, "console CA", b"CERTIFICATE-----")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
