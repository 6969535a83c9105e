"""Certificates as the tests look at them."""

from __future__ import annotations

from pathlib import Path


def sha1(cert: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    return certificate.fingerprint(hashes.SHA1()).hex().upper()
