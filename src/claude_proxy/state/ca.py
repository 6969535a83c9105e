"""The proxy's certificate authority: made once, then reused; never silently replaced.

Replacing a CA the user has trusted would break every client that trusts it, so a damaged or
unreadable CA is an error that names the files, not a reason to make a new one.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from claude_proxy.errors import ExitCode, ProxyError

if TYPE_CHECKING:
    import logging


def logger() -> logging.Logger:
    """This module's logger; logging is imported only when there is something to say (the
    commands that merely name these files start faster without it)."""
    import logging

    return logging.getLogger(__name__)


BASENAME = "mitmproxy"  # mitmproxy's tlsconfig addon looks for <confdir>/mitmproxy-ca.pem
KEY_SIZE = 2048
# What mitmproxy writes for a CA; the key (with its certificate) is moved into place last.
CA_FILES = (
    f"{BASENAME}-ca-cert.pem",
    f"{BASENAME}-ca-cert.cer",
    f"{BASENAME}-ca-cert.p12",
    f"{BASENAME}-dhparam.pem",
    f"{BASENAME}-ca.p12",
    f"{BASENAME}-ca.pem",
)
STAGING = ".new-ca"  # a CA is made here, inside the config folder, then moved into place


class CertificateAuthority(NamedTuple):  # not a dataclass: that import is slow
    key_path: Path  # private key and certificate, 0600
    cert_path: Path  # the certificate alone: what clients trust
    sha1: str  # hex, uppercase, no colons (what `security -Z` takes)
    sha256: str

    @staticmethod
    def colons(hex_digest: str) -> str:
        return ":".join(hex_digest[i : i + 2] for i in range(0, len(hex_digest), 2))


def key_path(confdir: Path) -> Path:
    return confdir / f"{BASENAME}-ca.pem"


def p12_path(confdir: Path) -> Path:
    """The key again, with the certificate, in PKCS#12 (0600 like the key)."""
    return confdir / f"{BASENAME}-ca.p12"


def cert_path(confdir: Path) -> Path:
    return confdir / f"{BASENAME}-ca-cert.pem"


def bundle_path(confdir: Path) -> Path:
    """The system's roots plus our CA, for tools that read one file (`ca --bundle` writes it)."""
    return confdir / "ca-bundle.pem"


def ensure_ca(confdir: Path) -> CertificateAuthority:
    """Load the CA in `confdir`, making the folder (0700) and a new CA only when neither exists."""
    key_file, cert_file = key_path(confdir), cert_path(confdir)
    if (confdir / STAGING).exists():
        _finish_or_clear(confdir)
    if not key_file.exists():
        if cert_file.exists():
            raise _damaged(confdir, f"{cert_file.name} exists but {key_file.name} does not")
        if left := [name for name in CA_FILES if (confdir / name).exists()]:
            raise _damaged(confdir, f"{', '.join(left)} exist but {key_file.name} does not")
        _create(confdir)
    return load_ca(confdir)


def load_ca(confdir: Path) -> CertificateAuthority:
    # Only here: commands that merely name the CA's files (env, check, --help) start faster.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

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
    """Make the CA in a staging folder beside its files, then move them in, the key last.

    Until the key is in place no proxy can serve with the new CA and no command hands out its
    certificate; so an interrupted creation (a full disk, a kill) leaves only the staging folder
    and perhaps some public files, which the next start recognises and clears.
    """
    import shutil

    from mitmproxy import certs  # only here: commands that find a CA need no mitmproxy

    staging = confdir / STAGING
    try:
        confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
        certs.CertStore.create_store(staging, BASENAME, KEY_SIZE)
        for name in CA_FILES:
            _sync(staging / name)
        for name in CA_FILES:  # the key last: it is what makes the CA exist
            os.replace(staging / name, confdir / name)
    except OSError as e:
        _clear(confdir)
        raise ProxyError(
            f"cannot create the CA in {confdir}: {e.strerror or e}; nothing was kept. "
            "Check that the folder is writable and its disk not full (or set XDG_CONFIG_HOME)",
            ExitCode.CA,
        ) from e
    with contextlib.suppress(OSError):
        _sync(confdir)
    shutil.rmtree(staging, ignore_errors=True)  # if it stays, the next start removes it
    logger().info("created a new CA in %s", confdir)


def _finish_or_clear(confdir: Path) -> None:
    """A staging folder is left: the last creation was interrupted, before or after its end."""
    import shutil

    if key_path(confdir).exists():  # the key was moved in: the creation had finished
        shutil.rmtree(confdir / STAGING, ignore_errors=True)
        return
    removed = _clear(confdir)
    logger().warning(
        "removed what an unfinished CA creation left in %s (%s); no certificate of it was ever "
        "used; making a new CA",
        confdir,
        ", ".join(removed) or STAGING,
    )


def _clear(confdir: Path) -> list[str]:
    """Remove an unfinished creation: the staging folder, and public files it had moved in.

    Called only while the key is not in place: creation starts only when no CA file is there,
    so any CA file beside the staging folder comes from it.
    """
    import shutil

    removed, stuck = [], False
    if not key_path(confdir).exists():
        for name in CA_FILES:
            if not (confdir / name).exists():
                continue
            try:
                (confdir / name).unlink()
                removed.append(name)
            except OSError:
                stuck = True
    if not stuck:  # else the staging folder stays, so that the next start tries again
        shutil.rmtree(confdir / STAGING, ignore_errors=True)
    return removed


def _sync(path: Path) -> None:
    """Written to the disk before it counts: a power cut must not leave an empty key file."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _restrict(path: Path) -> None:
    """Private keys are for the owner alone: tighten a key file that others could read."""
    if not path.exists():
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        logger().warning("%s was readable by others (mode %o); set it to 0600", path, mode)


def _damaged(confdir: Path, why: str) -> ProxyError:
    import shlex

    present = [name for name in CA_FILES if (confdir / name).exists()] or list(CA_FILES)
    aside = f"cd {shlex.quote(str(confdir))} && mkdir -p old-ca && mv {' '.join(present)} old-ca/"
    return ProxyError(
        f"the CA in {confdir} is unusable: {why}. It is never replaced automatically, because "
        f"clients trust it; restore it, or move its files aside to make a new CA ({aside}; "
        "config.toml stays), then trust the new one again",
        ExitCode.CA,
    )
