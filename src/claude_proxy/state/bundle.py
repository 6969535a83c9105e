"""`claude-proxy ca --bundle`: the system's trust roots plus our CA, in one PEM file.

Tools inside the sandbox (curl, git, Python, OpenSSL-based programs) each read one CA file. With
this one they trust the public roots as before, and claude-proxy's interception too.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from claude_proxy.errors import ProxyError
from claude_proxy.state import files

PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
MACOS_ROOTS = "/System/Library/Keychains/SystemRootCertificates.keychain"
HEADER = "# claude-proxy CA bundle: "  # a bundle's first line begins so
MAX_FILE_BYTES = 10 * 1024 * 1024  # a CA folder holds certificates, not anything this large


@dataclass(frozen=True)
class Bundle:
    path: Path
    roots: int  # system roots in it, besides our CA
    source: str  # where they came from, for the user


def certificates(pem: bytes) -> list[bytes]:
    """The DER of every PEM certificate block in `pem`; anything else is skipped."""
    found = []
    for match in PEM.finditer(pem):
        try:
            found.append(base64.b64decode(b"".join(match[1].split()), validate=True))
        except binascii.Error:
            continue
    return found


def system_roots(exclude: Path) -> tuple[list[bytes], str]:
    """The roots OpenSSL and (on macOS) the system keychain trust; certifi's if neither has any.

    `exclude` is the bundle itself: once SSL_CERT_FILE points at it, it must not be its own source.
    """
    roots: dict[bytes, None] = {}
    sources = []
    verify = ssl.get_default_verify_paths()
    cafile = _usable(verify.cafile, exclude) or _usable(verify.openssl_cafile, exclude)
    capath = _usable(verify.capath, exclude) or _usable(verify.openssl_capath, exclude)
    if cafile and (found := certificates(_read(Path(cafile)))):
        roots.update(dict.fromkeys(found))
        sources.append(cafile)
    elif capath and (found := _folder(Path(capath))):
        roots.update(dict.fromkeys(found))
        sources.append(f"every certificate in {capath}")
    if sys.platform == "darwin" and (found := _macos_roots()):
        roots.update(dict.fromkeys(found))
        sources.append(f"the macOS system roots ({MACOS_ROOTS})")
    if not roots:
        try:
            import certifi
        except ImportError:
            raise ProxyError(
                "found no trust roots on this system, and certifi is missing"
            ) from None
        roots.update(dict.fromkeys(certificates(_read(Path(certifi.where())))))
        sources.append(f"certifi ({certifi.where()}): the system offered none")
    return list(roots), " and ".join(sources)


def write_bundle(path: Path, ca_cert: Path, ca_sha256: str) -> Bundle:
    """Write the system's roots plus our CA to `path` (0644, atomically); check it parses first.
    What is at `path` already is replaced only if it is a bundle written here before."""
    refuse_to_replace(path)
    ours = certificates(_read(ca_cert))
    if len(ours) != 1:
        raise ProxyError(f"{ca_cert} should hold exactly one certificate, not {len(ours)}")
    roots, source = system_roots(exclude=path)
    roots = [der for der in roots if der != ours[0]]
    parts = [
        f"{HEADER}{len(roots)} system roots, then claude-proxy's CA.\n",
        f"# Roots from {source}. Remake it with `claude-proxy ca --bundle`.\n",
        *(ssl.DER_cert_to_PEM_cert(der) for der in roots),
        f"# claude-proxy's CA, SHA-256 {ca_sha256}\n",
        ssl.DER_cert_to_PEM_cert(ours[0]),
    ]
    text = "".join(parts)
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        check.load_verify_locations(cadata=text)
    except ssl.SSLError as e:
        raise ProxyError(f"the bundle for {path} does not parse ({e}): {path} not written") from e
    if ours[0] not in check.get_ca_certs(binary_form=True):
        raise ProxyError(f"the bundle for {path} lacks claude-proxy's CA: {path} not written")
    try:
        files.write_atomically(path, text.encode(), 0o644)
    except OSError as e:
        raise ProxyError(f"cannot write {path}: {e.strerror}") from e
    return Bundle(path, len(roots), source)


def refuse_to_replace(path: Path) -> None:
    """A ProxyError unless `path` is free or holds a bundle this command wrote (a regular file
    that starts with its header): never a user's file, a link, a device or the CA's own key."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise ProxyError(f"cannot look at {path}: {e.strerror}") from e
    why = None
    if stat.S_ISLNK(info.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISREG(info.st_mode):
        why = "is not a regular file"
    else:
        try:
            with path.open("rb") as file:
                first = file.read(len(HEADER))
        except OSError as e:
            raise ProxyError(f"cannot read {path}: {e.strerror}") from e
        if first != HEADER.encode():
            why = "is not a CA bundle claude-proxy wrote"
    if why is not None:
        raise ProxyError(
            f"{path} {why}: not replaced; name a new file for the bundle, or move that one away"
        )


def _usable(name: str | None, exclude: Path) -> str | None:
    if not name or not os.path.exists(name):
        return None
    return None if os.path.realpath(name) == os.path.realpath(exclude) else name


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ProxyError(f"cannot read {path}: {e.strerror}") from e


def _folder(folder: Path) -> list[bytes]:
    """Every certificate in an OpenSSL CA folder (its hash links repeat them: deduplicated)."""
    found = []
    for entry in sorted(folder.iterdir()):
        try:
            if entry.is_file() and entry.stat().st_size <= MAX_FILE_BYTES:
                found += certificates(entry.read_bytes())
        except OSError:
            continue  # a dangling link or an unreadable file is not a root
    return found


def _macos_roots() -> list[bytes]:
    try:
        result = subprocess.run(
            ["security", "find-certificate", "-a", "-p", MACOS_ROOTS],
            capture_output=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return certificates(result.stdout) if result.returncode == 0 else []
