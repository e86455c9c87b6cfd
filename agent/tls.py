"""Server credentials for `gpusoc-agent run`, without importing `cryptography`.

Loading cryptography's X.509 stack costs ~9 MB of RSS; the agent's steady state needs only
gRPC's own TLS. The checks here use the stdlib's OpenSSL bindings instead, with errors that
name the files: presence and PEM shape, the key matching the certificate, and a client CA that
really is a CA and not the one that issued the agent's own certificate (the swapped-CA
mistake, which would admit other agents as consoles). gRPC's own errors for these come late,
as a bind failure or a closed socket on the console's side. `agent.pki` holds the
`cryptography`-based checks for tooling and tests.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import grpc

PathArg = str | os.PathLike[str]


class TlsFileError(Exception):
    """A certificate, key or CA file is missing, unreadable, not PEM, or the files do not fit together.

    The message names the file(s).
    """


def _read_pem(path: PathArg, what: str, marker: bytes) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{what} {p}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker not in data:
        raise TlsFileError(f"{what} {p}: not a PEM {marker.decode().strip('-').strip()} file")
    return data


def _decode_certificate(cert_file: PathArg) -> dict[str, object] | None:
    """The first certificate in a PEM file through CPython's own decoder, or None if it cannot tell."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(str(cert_file))
    except (ssl.SSLError, OSError, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def certificate_common_name(cert_file: PathArg) -> str | None:
    """The subject CN of a PEM certificate through the stdlib's decoder (None if it cannot tell).

    Consoles accept an agent only when its Describe host equals this CN, so the agent checks it
    at start instead of running unreachable. `ssl._ssl._test_decode_cert` is CPython's own
    certificate decoder; without it (another runtime) the check is skipped.
    """
    decoded = _decode_certificate(cert_file)
    subject = decoded.get("subject") if decoded else None
    for rdn in subject if isinstance(subject, tuple) else ():
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


def check_key_matches_certificate(cert_file: PathArg, key_file: PathArg) -> None:
    """Raise TlsFileError, naming both files, unless key_file is the private key of cert_file.

    gRPC only finds a mismatch when it binds the port, and then reports "Failed to bind to
    address", which reads like a port problem. An encrypted key is refused here too (gRPC cannot
    use one), instead of OpenSSL prompting for a pass phrase on the terminal.
    """

    def _no_pass_phrase() -> bytes:
        raise TlsFileError(f"agent key {key_file} is encrypted; gRPC needs an unencrypted key")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file), password=_no_pass_phrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(
                f"agent key {key_file} does not match agent certificate {cert_file}; "
                "give the key that was issued with this certificate (pki/agents/HOST.key for pki/agents/HOST.pem)"
            ) from None
        raise TlsFileError(
            f"agent certificate {cert_file} and key {key_file} cannot be loaded together: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise TlsFileError(f"agent certificate {cert_file} or key {key_file}: {exc.strerror or exc}") from None


def _name_text(name: object) -> str:
    """`O=gpusoc, OU=agent-ca, CN=...` from the decoder's tuple of RDNs."""
    short = {"organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN", "countryName": "C"}
    parts = [
        f"{short.get(key, key)}={value}"
        for rdn in (name if isinstance(name, tuple) else ())
        for key, value in rdn
    ]
    return ", ".join(parts) or "?"


def check_client_ca(cert_file: PathArg, client_ca_file: PathArg) -> None:
    """Raise TlsFileError when the client CA file cannot admit only consoles.

    Refused: a file without any CA certificate (a leaf given by mistake), and a CA whose subject
    is the issuer of the agent's own certificate: that is the agent CA, given where the console
    CA belongs (the two files swapped). With it, the real console is refused with nothing but a
    closed socket, and every other agent of the fleet could stream this host's telemetry if its
    certificate carried the clientAuth usage (certificates from `gpusoc-agent pki` before this
    check did). One CA for both roles is not supported: console certificates need their own CA.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(client_ca_file))
    except ssl.SSLError as exc:
        raise TlsFileError(f"console CA {client_ca_file}: not a PEM CA certificate ({exc.reason or exc})") from None
    except OSError as exc:
        raise TlsFileError(f"console CA {client_ca_file}: {exc.strerror or exc}") from None
    cas = ctx.get_ca_certs()  # only certificates that are CAs (OpenSSL's X509_check_ca)
    if not cas:
        raise TlsFileError(
            f"console CA {client_ca_file} holds no CA certificate (basicConstraints CA:TRUE), only "
            "a leaf certificate; give the console CA that issued the consoles' certificates "
            "(pki/console-ca.pem from gpusoc-agent pki init)"
        )
    decoded = _decode_certificate(cert_file)
    issuer = decoded.get("issuer") if decoded else None
    if issuer and any(ca.get("subject") == issuer for ca in cas):
        raise TlsFileError(
            f"client CA {client_ca_file} is the CA that issued this agent's own certificate {cert_file} "
            f"({_name_text(issuer)}): that is the agent CA, which belongs on consoles, not on agents. "
            "Trusting it would let other agents connect as consoles, and real consoles would be refused. "
            "Give the console CA instead: --tls-client-ca pki/console-ca.pem "
            "(tls_client_ca in the config; /etc/gpusoc/tls/console-ca.pem by default). "
            "One CA for both agents and consoles is not supported"
        )


def load_server_credentials(cert_file: PathArg, key_file: PathArg, client_ca_file: PathArg) -> grpc.ServerCredentials:
    """mTLS server credentials that require a client certificate chaining to client_ca_file.

    Runs the start-up checks first, so a mistake is a TlsFileError naming the files instead of a
    bind failure or consoles refused: PEM shape, the key matching the certificate
    (`check_key_matches_certificate`) and the client CA (`check_client_ca`).
    """
    cert = _read_pem(cert_file, "agent certificate", b"CERTIFICATE-----")
    key = _read_pem(key_file, "agent key", b"PRIVATE KEY-----")
    ca = _read_pem(client_ca_file, "console CA", b"CERTIFICATE-----")
    check_key_matches_certificate(cert_file, key_file)
    check_client_ca(cert_file, client_ca_file)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
