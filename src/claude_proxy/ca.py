"""The proxy's certificate authority: made once, then reused; never silently replaced.

Replacing a CA the user has trusted would break every client that trusts it, so a damaged or
unreadable CA is an error that names the files, not a reason to make a new one.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from claude_proxy.errors import ExitCode, ProxyError

logger = logging.getLogger(__name__)

BASENAME = "mitmproxy"  # mitmproxy's tlsconfig addon looks for <confdir>/mitmproxy-ca.pem
KEY_SIZE = 2048


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    key_path: Path  # private key and certificate, 0600
    cert_path: Path  # the certificate alone: what clients trust
    sha1: str  # hex, uppercase, no colons (what `security -Z` takes)
    sha256: str

    @staticmethod
    def colons(hex_digest: str) -> str:
        return ":".join(hex_digest[i : i + 2] for i in range(0, len(hex_digest), 2))


def key_path(confdir: Path) -> Path:
    return confdir / f"{BASENAME}-ca.pem"


def cert_path(confdir: Path) -> Path:
    return confdir / f"{BASENAME}-ca-cert.pem"


def bundle_path(confdir: Path) -> Path:
    """The system's roots plus our CA, for tools that read one file (`ca --bundle` writes it)."""
    return confdir / "ca-bundle.pem"


def ensure_ca(confdir: Path) -> CertificateAuthority:
    """Load the CA in `confdir`, making the folder (0700) and a new CA only when neither exists."""
    key_file, cert_file = key_path(confdir), cert_path(confdir)
    if not key_file.exists():
        if cert_file.exists():
            raise _damaged(confdir, f"{cert_file.name} exists but {key_file.name} does not")
        _create(confdir)
    return load_ca(confdir)


def load_ca(confdir: Path) -> CertificateAuthority:
    key_file, cert_file = key_path(confdir), cert_path(confdir)
    try:
        for private in (key_file, confdir / f"{BASENAME}-ca.p12"):
            _restrict(private)
        bundle = key_file.read_bytes()
        public = cert_file.read_bytes()
    except OSError as e:
        raise _damaged(confdir, f"cannot read it ({e.strerror}: {e.filename})") from e
    try:
        key = serialization.load_pem_private_key(bundle, password=None)
        cert = x509.load_pem_x509_certificate(bundle)
        trusted = x509.load_pem_x509_certificate(public)
    except (ValueError, TypeError) as e:
        raise _damaged(confdir, f"cannot parse it ({e})") from e
    if trusted != cert:
        raise _damaged(confdir, f"{cert_file.name} is not the certificate in {key_file.name}")
    if key.public_key() != cert.public_key():
        raise _damaged(confdir, f"the key in {key_file.name} does not belong to its certificate")
    return CertificateAuthority(
        key_path=key_file,
        cert_path=cert_file,
        sha1=cert.fingerprint(hashes.SHA1()).hex().upper(),
        sha256=cert.fingerprint(hashes.SHA256()).hex().upper(),
    )


def _create(confdir: Path) -> None:
    from mitmproxy import certs  # only here: commands that find a CA need no mitmproxy

    try:
        confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        certs.CertStore.create_store(confdir, BASENAME, KEY_SIZE)
    except OSError as e:
        raise ProxyError(
            f"cannot create the CA in {confdir}: {e.strerror}; "
            "check that the folder is writable (or set XDG_CONFIG_HOME)",
            ExitCode.CA,
        ) from e
    logger.info("created a new CA in %s", confdir)


def _restrict(path: Path) -> None:
    """Private keys are for the owner alone: tighten a key file that others could read."""
    if not path.exists():
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        logger.warning("%s was readable by others (mode %o); set it to 0600", path, mode)


def _damaged(confdir: Path, why: str) -> ProxyError:
    return ProxyError(
        f"the CA in {confdir} is unusable: {why}. It is never replaced automatically, because "
        "clients trust it; restore it, or move the folder aside to make a new CA (then trust the "
        "new one again)",
        ExitCode.CA,
    )
