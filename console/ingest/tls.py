"""The console's side of mTLS: credentials for agent channels and the agent's certified identity.

gRPC Python does not expose the server certificate to clients, so before subscribing the
console completes one TLS handshake of its own (same CA, same client certificate, ALPN h2)
and reads the agent's certificate common name. Frames must then carry that host name.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from console.ingest.inventory import parse_address


class TlsConfigError(ValueError):
    """A certificate or key file is missing or unreadable; the message names it."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: {exc.strerror}") from exc


def certificate_identity(der_or_pem: bytes) -> str:
    """The certificate's common name: the identity a host's frames must carry."""
    if der_or_pem.lstrip().startswith(b"-----BEGIN"):
        cert = x509.load_pem_x509_certificate(der_or_pem)
    else:
        cert = x509.load_der_x509_certificate(der_or_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError("certificate has no common name")
    return str(names[0].value)


@dataclass(frozen=True)
class ConsoleTls:
    """Files a console needs: the agent CA and its own client certificate and key."""

    agent_ca: str
    cert: str
    key: str

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.agent_ca, "agent CA"),
            private_key=_read(self.key, "console key"),
            certificate_chain=_read(self.cert, "console certificate"),
        )

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.agent_ca)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"console certificate/key {self.cert}, {self.key}: {exc}") from exc
        ctx.set_alpn_protocols(["h2"])
        return ctx

    def _fetch_identity(self, address: str, timeout: float) -> str:
        host, port = parse_address(address)
        ctx = self.ssl_context()
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
        if not der:
            raise ssl.SSLError("agent presented no certificate")
        return certificate_identity(der)

    async def peer_identity(self, address: str, timeout: float = 5.0) -> str:
        """Handshake with the agent (verifying chain and address) and return its certificate CN.

        A blocking handshake on a worker thread: asyncio's TLS transport stalled here when the
        agent's gRPC server shared the event loop (tests, the fleet simulator).
        """
        return await asyncio.to_thread(self._fetch_identity, address, timeout)
