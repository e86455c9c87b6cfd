"""Development PKI for gpusoc mTLS, built with `cryptography` only (no openssl CLI).

Two separate CAs from the start, so a stolen agent certificate can never act as a console
(and operator certificates/roles can later hang off the console CA without reissuing agents):

    out_dir/
      agent-ca.pem   agent-ca.key      CA that signs agent (server) certificates
      console-ca.pem console-ca.key    CA that signs console (client) certificates
      agents/<host>.pem   <host>.key   agent server cert: CN=<host>, SAN <host> localhost 127.0.0.1 ::1,
                                       EKU serverAuth only (TLS refuses it as a client certificate)
      consoles/<name>.pem <name>.key   console client cert: CN=<name>, EKU clientAuth only

Keys are ECDSA P-256 (PKCS#8 PEM, unencrypted, mode 0600). See docs/pki.md.

A third CA signs operator identities for signed control commands (`create_operator`):

      operator-ca.pem operator-ca.key  CA that signs operator signing certificates
      operators/<name>.pem <name>.key  Ed25519 signing key; subject OU = role (viewer|responder|admin)

Operator certificates never serve or dial TLS; agents check them inside signed commands
(`verify_operator_certificate`). See docs/response.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_MIN_DAYS",
    "OPERATOR_ROLES",
    "LeafPaths",
    "OperatorIdentity",
    "OperatorPaths",
    "PkiError",
    "PkiPaths",
    "cert_dns_names",
    "cert_identity",
    "channel_credentials",
    "create_dev_pki",
    "create_operator",
    "load_operator_cas",
    "load_operator_key",
    "server_credentials",
    "verify_issued_by",
    "verify_operator_certificate",
]

#: A CA created by `create_dev_pki` lives at least this long, so names added later still chain to it.
CA_MIN_DAYS = 365
#: Backdate notBefore a little so hosts with slightly skewed clocks accept fresh certificates.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_ORG = "gpusoc"
_AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_CONSOLE_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._@-]*[A-Za-z0-9])?$")
_MAX_CN = 64  # X.509 upper bound for commonName

Role = Literal["agent", "console", "operator"]
PathArg = str | os.PathLike[str]


class PkiError(Exception):
    """A PKI file is missing, unreadable, malformed or would be overwritten; the message names the file."""


@dataclass(frozen=True, slots=True)
class LeafPaths:
    """Certificate and private key of one agent or console."""

    cert: Path
    key: Path


@dataclass(slots=True)
class PkiPaths:
    """Where `create_dev_pki` put everything, so the CLI can print it and tests can use it."""

    out_dir: Path
    agent_ca_cert: Path
    agent_ca_key: Path
    console_ca_cert: Path
    console_ca_key: Path
    agents: dict[str, LeafPaths] = field(default_factory=dict)
    consoles: dict[str, LeafPaths] = field(default_factory=dict)
    #: Files written by this call, in order (CAs only appear when they were created now).
    written: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        """Human summary for `gpusoc-agent pki init`: what to copy where."""
        lines = [
            f"agent CA:   {self.agent_ca_cert}  (give to consoles)",
            f"console CA: {self.console_ca_cert}  (give to agents as tls_client_ca)",
        ]
        lines += [f"agent {n}: {p.cert} {p.key}" for n, p in self.agents.items()]
        lines += [f"console {n}: {p.cert} {p.key}" for n, p in self.consoles.items()]
        lines.append(f"{len(self.written)} file(s) written under {self.out_dir}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- creation


def create_dev_pki(
    out_dir: Path,
    agents: list[str],
    consoles: list[str],
    days: int = 30,
    overwrite: bool = False,
) -> PkiPaths:
    """Create (or extend) a dev PKI so agents and consoles can run mTLS without external tooling.

    Existing CAs in `out_dir` are loaded and reused, so re-running with new names adds certificates
    that chain to the CAs already deployed; missing CAs are created. CAs are never replaced, even with
    `overwrite=True` (rotate by using a fresh directory). Leaf files that already exist are refused
    with a `PkiError` listing them unless `overwrite=True`, in which case they are reissued.
    Nothing is written when any check fails.
    """
    if days < 1:
        raise PkiError(f"days must be >= 1, got {days}")
    out_dir = Path(out_dir)
    agent_names = _check_names("agent", agents)
    console_names = _check_names("console", consoles)

    paths = PkiPaths(
        out_dir=out_dir,
        agent_ca_cert=out_dir / "agent-ca.pem",
        agent_ca_key=out_dir / "agent-ca.key",
        console_ca_cert=out_dir / "console-ca.pem",
        console_ca_key=out_dir / "console-ca.key",
    )
    for name in agent_names:
        paths.agents[name] = _leaf_paths(out_dir, "agent", name)
    for name in console_names:
        paths.consoles[name] = _leaf_paths(out_dir, "console", name)

    if out_dir.exists() and not out_dir.is_dir():
        raise PkiError(f"{out_dir}: exists and is not a directory")

    # Preflight: decide everything before writing anything.
    agent_ca_exists = _ca_state(paths.agent_ca_cert, paths.agent_ca_key)
    console_ca_exists = _ca_state(paths.console_ca_cert, paths.console_ca_key)
    if not overwrite:
        clashes = [
            p
            for leaf in [*paths.agents.values(), *paths.consoles.values()]
            for p in (leaf.cert, leaf.key)
            if p.exists() or p.is_symlink()
        ]
        if clashes:
            listed = ", ".join(str(p) for p in clashes[:6]) + (" ..." if len(clashes) > 6 else "")
            raise PkiError(
                f"refusing to overwrite existing file(s): {listed} (pass overwrite=True to reissue)"
            )

    now = dt.datetime.now(dt.UTC)
    agent_ca = _load_ca(paths.agent_ca_cert, paths.agent_ca_key, now) if agent_ca_exists else None
    console_ca = _load_ca(paths.console_ca_cert, paths.console_ca_key, now) if console_ca_exists else None
    if (
        agent_ca is not None
        and console_ca is not None
        and _spki(agent_ca[0].public_key()) == _spki(console_ca[0].public_key())
    ):
        raise PkiError(
            f"{paths.agent_ca_cert} and {paths.console_ca_cert} share one key; the CAs must be separate"
        )

    _mkdir(out_dir)
    if agent_ca is None:
        agent_ca = _make_ca("agent", now, max(days, CA_MIN_DAYS))
        _write_pair(paths.agent_ca_cert, paths.agent_ca_key, agent_ca, overwrite=False, written=paths.written)
    if console_ca is None:
        console_ca = _make_ca("console", now, max(days, CA_MIN_DAYS))
        _write_pair(
            paths.console_ca_cert, paths.console_ca_key, console_ca, overwrite=False, written=paths.written
        )

    if paths.agents:
        _mkdir(out_dir / "agents")
    if paths.consoles:
        _mkdir(out_dir / "consoles")
    for name, leaf in paths.agents.items():
        pair = _make_leaf("agent", name, agent_ca, now, days)
        _write_pair(leaf.cert, leaf.key, pair, overwrite=overwrite, written=paths.written)
    for name, leaf in paths.consoles.items():
        pair = _make_leaf("console", name, console_ca, now, days)
        _write_pair(leaf.cert, leaf.key, pair, overwrite=overwrite, written=paths.written)
    return paths


def _leaf_paths(out_dir: Path, role: Role, name: str) -> LeafPaths:
    folder = out_dir / ("agents" if role == "agent" else "consoles")
    return LeafPaths(cert=folder / f"{name}.pem", key=folder / f"{name}.key")


def _check_names(role: Role, names: Iterable[str]) -> list[str]:
    """Names become a CN and a file name, so keep them short and free of path characters."""
    out: list[str] = []
    pattern = _AGENT_NAME_RE if role == "agent" else _CONSOLE_NAME_RE
    for name in names:
        if not isinstance(name, str):
            raise PkiError(f"{role} name must be a string, got {name!r}")
        ok = len(name) <= _MAX_CN and (pattern.match(name) is not None or (role == "agent" and _as_ip(name)))
        if not ok:
            raise PkiError(
                f"invalid {role} name {name!r}: use 1-{_MAX_CN} characters "
                "from letters, digits, '.', '-', '_'"
                + (", '@'" if role != "agent" else " (or an IP address)")
            )
        if name in out:
            raise PkiError(f"{role} name {name!r} given twice")
        out.append(name)
    return out


def _as_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _ca_state(cert: Path, key: Path) -> bool:
    """True when the CA exists; a half-present CA is an error rather than something to paper over."""
    has_cert, has_key = cert.exists(), key.exists()
    if has_cert != has_key:
        present, missing = (cert, key) if has_cert else (key, cert)
        raise PkiError(
            f"{present} exists but {missing} does not; restore it or remove both to create a new CA"
        )
    return has_cert


_Pair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _load_ca(cert_path: Path, key_path: Path, now: dt.datetime) -> _Pair:
    cert = _parse_certs(_read_file(cert_path, "CA certificate"), cert_path)[0]
    key = _parse_key(_read_file(key_path, "CA private key"), key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: CA key is not an EC key; this dev PKI only signs with ECDSA")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise PkiError(f"{key_path} does not match {cert_path}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PkiError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE missing)")
    if cert.not_valid_after_utc <= now + dt.timedelta(days=1):
        raise PkiError(
            f"{cert_path}: CA expires {cert.not_valid_after_utc:%Y-%m-%d}; create a new PKI directory"
        )
    return cert, key


def _make_ca(role: Role, now: dt.datetime, days: int) -> _Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{role}-ca"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"gpusoc dev {role} CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_builder(
    name: str, ou: str, public_key: PublicKeyTypes, ca: _Pair, now: dt.datetime, not_after: dt.datetime,
    *, content_commitment: bool,
) -> x509.CertificateBuilder:
    """What every leaf (agent, console, operator) shares: subject O/OU/CN, validity, key ids, not a CA."""
    ca_cert, ca_key = ca
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=content_commitment,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(aki, critical=False)
    )


def _make_leaf(role: Role, name: str, ca: _Pair, now: dt.datetime, days: int) -> _Pair:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if role == "agent":
        ip = _as_ip(name)
        dns = ["localhost"] if ip is not None else [name, "localhost"]
        ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
        if ip is not None and ip not in ips:
            ips.insert(0, ip)
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns)]
        san += [x509.IPAddress(i) for i in ips]
        # serverAuth only: without clientAuth, TLS refuses an agent's certificate as a client certificate,
        # so a stolen one cannot act as a console even where an agent trusts the agent CA by mistake.
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
    else:
        san = []  # consoles are identified by CN alone; they never serve TLS
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = _leaf_builder(name, role, key.public_key(), ca, now, not_after, content_commitment=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _mkdir(path: Path) -> None:
    """Create with 0700: the tree holds CA keys. Existing directories keep their mode."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {path}: {exc.strerror or exc}") from exc
    if not path.is_dir():
        raise PkiError(f"{path}: exists and is not a directory")


def _write_pair(
    cert_path: Path, key_path: Path, pair: _Pair, *, overwrite: bool, written: list[Path]
) -> None:
    cert, key = pair
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Key first: a crash in between leaves a key without a cert, never a cert whose key is lost.
    _write_file(key_path, key_pem, 0o600, overwrite=overwrite)
    written.append(key_path)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=overwrite)
    written.append(cert_path)


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write via a temp file so readers never see a partial key, and never clobber unless asked."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        try:
            os.fchmod(fd, mode)  # umask-proof
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError as exc:
                raise PkiError(f"refusing to overwrite existing file {path} (pass overwrite=True)") from exc
            except OSError:
                if path.exists():
                    raise PkiError(
                        f"refusing to overwrite existing file {path} (pass overwrite=True)"
                    ) from None
                os.replace(tmp, path)  # filesystem without hard links
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- inspection


def cert_identity(pem: bytes) -> str:
    """The certificate's CN: the host name an agent claims, or the console/operator name."""
    cert = _parse_certs(pem, None)[0]
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise PkiError("certificate has no commonName")
    value = cns[0].value
    return value if isinstance(value, str) else value.decode()


def cert_dns_names(pem: bytes) -> list[str]:
    """SAN DNS names then IP addresses as strings, so a console can check an agent's claimed host."""
    cert = _parse_certs(pem, None)[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def verify_issued_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """True when `ca_pem` signed `cert_pem` (signature and issuer name); for diagnostics and tests."""
    cert = _parse_certs(cert_pem, None)[0]
    ca = _parse_certs(ca_pem, None)[0]
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --------------------------------------------------------------------------- gRPC credentials


def server_credentials(
    cert_file: PathArg, key_file: PathArg, client_ca_file: PathArg
) -> grpc.ServerCredentials:
    """mTLS server credentials for the agent: clients must present a cert from `client_ca_file`.

    Files are checked up front (readable, PEM, key matches cert) because gRPC's own errors for these
    surface late and without the file name.
    """
    cert, key = _read_cert_and_key(cert_file, key_file)
    ca = _read_ca(client_ca_file, "client CA")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(ca_file: PathArg, cert_file: PathArg, key_file: PathArg) -> grpc.ChannelCredentials:
    """mTLS channel credentials for a console: trust agents signed by `ca_file`, present our cert."""
    ca = _read_ca(ca_file, "CA")
    cert, key = _read_cert_and_key(cert_file, key_file)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _read_cert_and_key(cert_file: PathArg, key_file: PathArg) -> tuple[bytes, bytes]:
    cert_path, key_path = Path(cert_file), Path(key_file)
    cert_pem = _read_file(cert_path, "certificate")
    key_pem = _read_file(key_path, "private key")
    cert = _parse_certs(cert_pem, cert_path)[0]
    key = _parse_key(key_pem, key_path)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise PkiError(f"private key {key_path} does not match certificate {cert_path}")
    return cert_pem, key_pem


def _read_ca(ca_file: PathArg, what: str) -> bytes:
    path = Path(ca_file)
    pem = _read_file(path, what)
    _parse_certs(pem, path)
    return pem


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise PkiError(f"{what} file {path} is a directory") from None
    except OSError as exc:
        raise PkiError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _parse_certs(pem: bytes, path: Path | None) -> list[x509.Certificate]:
    where = f"{path}: " if path is not None else ""
    if not isinstance(pem, bytes | bytearray):
        raise PkiError(f"{where}expected PEM bytes, got {type(pem).__name__}")
    try:
        certs = x509.load_pem_x509_certificates(bytes(pem))
    except ValueError as exc:
        why = re.sub(r"\s*See https?://\S+ for more details\.?", "", str(exc)).strip()
        raise PkiError(f"{where}not a PEM certificate ({why})") from None
    if not certs:
        raise PkiError(f"{where}no certificate found")
    return certs


def _parse_key(pem: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise PkiError(f"{path}: private key is encrypted; gRPC needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path}: not a PEM private key ({exc})") from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- operators

#: Roles an operator certificate can carry (subject OU). viewer: nothing; responder: freeze,
#: resume, rollback; admin: also break-glass rollback. The agent enforces them (agent.act.commands).
OPERATOR_ROLES: tuple[str, ...] = ("viewer", "responder", "admin")
#: Operator certificates are short-lived by default (reliability goal: <= 24 h).
OPERATOR_DEFAULT_DAYS = 1


@dataclass(slots=True)
class OperatorPaths:
    """Where `create_operator` put the operator CA and one operator's certificate and key."""

    out_dir: Path
    operator_ca_cert: Path
    operator_ca_key: Path
    name: str
    role: str
    cert: Path
    key: Path
    written: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        """Human summary for `gpusoc-agent pki operator`."""
        return "\n".join(
            [
                f"operator CA: {self.operator_ca_cert}  (give to agents as operator_ca)",
                f"operator {self.name} ({self.role}): {self.cert} {self.key}",
                f"{len(self.written)} file(s) written under {self.out_dir}",
            ]
        )


@dataclass(frozen=True, slots=True)
class OperatorIdentity:
    """A verified operator certificate: who signed, with which role and key."""

    name: str
    role: str
    key_id: str  # hex SHA-256 of the raw Ed25519 public key
    cert_sha256: str  # hex SHA-256 of the certificate DER (for denylists)
    serial: int
    not_after: dt.datetime
    public_key: Ed25519PublicKey


def create_operator(
    out_dir: Path, name: str, role: str, days: int = OPERATOR_DEFAULT_DAYS, overwrite: bool = False
) -> OperatorPaths:
    """Issue an operator signing identity (Ed25519 key, role in the certificate) from the operator CA.

    A separate CA from the agent and console CAs, so neither a GPU host's certificate nor a console's
    TLS identity can ever sign a control command. The CA is created in `out_dir` when missing and
    reused otherwise; existing operator files are refused unless `overwrite=True`.
    """
    if days < 1:
        raise PkiError(f"days must be >= 1, got {days}")
    if role not in OPERATOR_ROLES:
        raise PkiError(f"invalid role {role!r}: use one of {', '.join(OPERATOR_ROLES)}")
    out_dir = Path(out_dir)
    (name,) = _check_names("operator", [name])
    paths = OperatorPaths(
        out_dir=out_dir,
        operator_ca_cert=out_dir / "operator-ca.pem",
        operator_ca_key=out_dir / "operator-ca.key",
        name=name,
        role=role,
        cert=out_dir / "operators" / f"{name}.pem",
        key=out_dir / "operators" / f"{name}.key",
    )
    if out_dir.exists() and not out_dir.is_dir():
        raise PkiError(f"{out_dir}: exists and is not a directory")
    ca_exists = _ca_state(paths.operator_ca_cert, paths.operator_ca_key)
    if not overwrite:
        clashes = [p for p in (paths.cert, paths.key) if p.exists() or p.is_symlink()]
        if clashes:
            listed = ", ".join(str(p) for p in clashes)
            raise PkiError(f"refusing to overwrite existing file(s): {listed} (pass overwrite=True to reissue)")
    now = dt.datetime.now(dt.UTC)
    ca = _load_ca(paths.operator_ca_cert, paths.operator_ca_key, now) if ca_exists else None
    if ca is not None:
        for other in (out_dir / "agent-ca.pem", out_dir / "console-ca.pem"):
            if other.exists() and _spki(_parse_certs(other.read_bytes(), other)[0].public_key()) == _spki(
                ca[0].public_key()
            ):
                raise PkiError(f"{paths.operator_ca_cert} and {other} share one key; the CAs must be separate")
    _mkdir(out_dir)
    if ca is None:
        ca = _make_ca("operator", now, max(days, CA_MIN_DAYS))
        _write_pair(paths.operator_ca_cert, paths.operator_ca_key, ca, overwrite=False, written=paths.written)
    _mkdir(out_dir / "operators")
    cert, key = _make_operator_leaf(name, role, ca, now, days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(paths.key, key_pem, 0o600, overwrite=overwrite)
    paths.written.append(paths.key)
    _write_file(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=overwrite)
    paths.written.append(paths.cert)
    return paths


def _make_operator_leaf(
    name: str, role: str, ca: _Pair, now: dt.datetime, days: int
) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    ca_cert, ca_key = ca
    key = Ed25519PrivateKey.generate()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    # content_commitment: operator signatures stand for decisions (non-repudiation).
    cert = _leaf_builder(name, role, key.public_key(), ca, now, not_after, content_commitment=True).sign(
        ca_key, hashes.SHA256()
    )
    return cert, key


def load_operator_key(path: PathArg) -> Ed25519PrivateKey:
    """An operator's (or checkpoint signer's) Ed25519 private key from PEM; PkiError otherwise."""
    p = Path(path)
    key = _parse_key(_read_file(p, "operator private key"), p)
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{p}: not an Ed25519 private key")
    return key


def load_operator_cas(path: PathArg) -> list[x509.Certificate]:
    """The pinned operator CA certificate(s) (a bundle allows rotation); each must be a CA."""
    p = Path(path)
    certs = _parse_certs(_read_file(p, "operator CA"), p)
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise PkiError(f"{p}: not a CA certificate (basicConstraints CA:TRUE missing)")
    return certs


def verify_operator_certificate(
    cert_pem: bytes, cas: list[x509.Certificate], now: dt.datetime | None = None
) -> OperatorIdentity:
    """Accept only a leaf issued directly by a pinned operator CA, valid now, Ed25519, with a role.

    Raises PkiError naming the first check that failed: an agent or console certificate, a
    certificate from another CA, an expired one or one without a role never becomes an operator.
    """
    now = now or dt.datetime.now(dt.UTC)
    if not cert_pem:
        raise PkiError("no operator certificate")
    certs = _parse_certs(cert_pem, None)
    if len(certs) != 1:
        raise PkiError("expected exactly one operator certificate")
    cert = certs[0]
    issued = False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            issued = True
            break
    if not issued:
        raise PkiError("certificate is not issued by the pinned operator CA")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PkiError(
            f"operator certificate not valid now (valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
        )
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise PkiError("operator certificate lacks basicConstraints or keyUsage") from None
    if bc.ca or not ku.digital_signature:
        raise PkiError("operator certificate is a CA or may not sign")
    pub = cert.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise PkiError("operator certificate key is not Ed25519")
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    roles = [v.value if isinstance(v.value, str) else v.value.decode() for v in ous]
    if len(roles) != 1 or roles[0] not in OPERATOR_ROLES:
        raise PkiError(f"operator certificate carries no valid role (OU {roles})")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise PkiError("operator certificate needs exactly one commonName")
    name = cns[0].value if isinstance(cns[0].value, str) else cns[0].value.decode()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return OperatorIdentity(
        name=name,
        role=roles[0],
        key_id=hashlib.sha256(raw).hexdigest(),
        cert_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        public_key=pub,
    )
