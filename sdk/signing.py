"""Signed bundles: an Ed25519 signature over the exact bytes of `manifest.json`, in `manifest.sig`.

The manifest lists every model file with its sha256, so signing the manifest signs the files.
With trusted public keys configured (`trusted_keys=[...]`, `--trusted-key`, or the
REGIONKD_TRUSTED_KEYS environment variable: key files separated by os.pathsep), a bundle is
loaded only when `manifest.sig` holds a valid signature of its manifest by one of them; the
manifest is then parsed from the very bytes that were verified. Without trusted keys a bundle
loads as before and `SignatureStatus` says whether it was signed at all.

`manifest.sig` (JSON, at most 64 kB):
    {"format": "regionkd-signature/1", "algorithm": "ed25519", "key_id": "<16 hex>",
     "manifest_sha256": "<64 hex>", "signature": "<base64 of 64 bytes>"}
The signed message is SIGNED_PREFIX + the manifest's bytes. key_id is the first 16 hex digits of
the sha256 of the raw 32-byte public key. Keys are PEM files: PKCS#8 private keys, SubjectPublicKeyInfo
public keys (`regionkd-sign keygen` writes both; `cryptography` does the maths).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import BundleError, RegionKDError, require

SIGNATURE_NAME = "manifest.sig"
SIGNATURE_FORMAT = "regionkd-signature/1"
SIGNED_PREFIX = b"regionkd-bundle-manifest/1\0"
TRUSTED_KEYS_ENV = "REGIONKD_TRUSTED_KEYS"
PASSPHRASE_ENV = "REGIONKD_SIGN_PASSPHRASE"
MAX_SIGNATURE_BYTES = 64 * 1024
MAX_KEY_BYTES = 64 * 1024


class KeyFileError(RegionKDError):
    """A key file that cannot be used (missing, not PEM, not Ed25519)."""


def _crypto():
    require("cryptography", purpose="signed bundles")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return serialization, ed25519, InvalidSignature


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    path: str
    public_key: object          # cryptography Ed25519PublicKey


@dataclass(frozen=True)
class SignatureStatus:
    """How a bundle's signature was checked: state 'verified' (by the trusted key key_id),
    'unsigned' (no manifest.sig, no keys configured) or 'not verified' (signed, no keys configured)."""
    state: str
    key_id: str | None = None

    @property
    def verified(self) -> bool:
        return self.state == "verified"

    def describe(self) -> str:
        if self.state == "verified":
            return f"signature verified (key {self.key_id})"
        if self.state == "not verified":
            return f"signed by key {self.key_id}, not verified (no trusted key configured)"
        return "unsigned (no trusted key configured)"


def key_id_of(public_key) -> str:
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_KEY_BYTES:
            raise KeyFileError(f"{what} {path}: {path.stat().st_size} bytes, not a key file")
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path}: file does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path}: is a directory, not a key file") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def load_public_key(path: str | os.PathLike) -> TrustedKey:
    """An Ed25519 public key from a PEM file (KeyFileError naming the file otherwise)."""
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    data = _read_key_file(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"trusted key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"trusted key {path}: a {type(key).__name__}, not an Ed25519 public key")
    return TrustedKey(key_id_of(key), str(path), key)


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key from a PEM file; an encrypted one needs REGIONKD_SIGN_PASSPHRASE."""
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    data = _read_key_file(path, "signing key")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError as exc:
        raise KeyFileError(f"signing key {path}: {exc} (set {PASSPHRASE_ENV} for an encrypted key)") from None
    except ValueError as exc:
        raise KeyFileError(f"signing key {path}: not a PEM private key, or a wrong passphrase ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def trusted_keys_from_env() -> list[str]:
    value = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [p for p in value.split(os.pathsep) if p.strip()]


def resolve_trusted_keys(trusted_keys: Iterable | None = None) -> list[TrustedKey]:
    """The keys to enforce: those given (paths or TrustedKey) plus those named by REGIONKD_TRUSTED_KEYS.
    The environment variable cannot be switched off from code: a deployment that sets it gets it."""
    keys, seen = [], set()
    for item in list(trusted_keys or []) + trusted_keys_from_env():
        key = item if isinstance(item, TrustedKey) else load_public_key(item)
        if key.key_id not in seen:
            seen.add(key.key_id)
            keys.append(key)
    return keys


def signature_document(manifest_bytes: bytes, private_key) -> dict:
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    signature = private_key.sign(SIGNED_PREFIX + manifest_bytes)
    return {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key_id_of(private_key.public_key()),
            "manifest_sha256": digest, "signature": base64.b64encode(signature).decode("ascii")}


def _read_signature(root: Path) -> dict | None:
    path = root / SIGNATURE_NAME
    if not path.exists() and not path.is_symlink():
        return None
    from .bundle import read_inside   # the same containment and size rules as every bundle file
    raw = read_inside(root, SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path}: not a regionkd signature file ({exc})") from None
    ok = (isinstance(doc, dict) and doc.get("format") == SIGNATURE_FORMAT and doc.get("algorithm") == "ed25519"
          and all(isinstance(doc.get(k), str) for k in ("key_id", "manifest_sha256", "signature")))
    if not ok:
        raise BundleError(f"{path}: not a {SIGNATURE_FORMAT} Ed25519 signature file")
    return doc


def check_signature(root: Path, manifest_bytes: bytes, trusted: list[TrustedKey]) -> SignatureStatus:
    """Verify manifest.sig against `trusted` keys (BundleError naming the reason when any key is
    configured and the bundle is unsigned, signed by another key, or changed since it was signed)."""
    doc = _read_signature(root)
    if not trusted:
        return SignatureStatus("not verified", doc.get("key_id")) if doc else SignatureStatus("unsigned")
    ids = ", ".join(k.key_id for k in trusted)
    if doc is None:
        raise BundleError(f"bundle {root}: unsigned (no {SIGNATURE_NAME}), but trusted keys are configured "
                          f"({ids}); only signed bundles are loaded")
    key = next((k for k in trusted if k.key_id == doc["key_id"]), None)
    if key is None:
        raise BundleError(f"bundle {root}: signed by key {doc['key_id']}, which is not a trusted key ({ids})")
    if hashlib.sha256(manifest_bytes).hexdigest() != doc["manifest_sha256"].lower():
        raise BundleError(f"bundle {root}: manifest.json was changed after it was signed (its sha256 differs "
                          f"from the one in {SIGNATURE_NAME})")
    _, _, InvalidSignature = _crypto()
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
        key.public_key.verify(signature, SIGNED_PREFIX + manifest_bytes)
    except (binascii.Error, ValueError, InvalidSignature):
        raise BundleError(f"bundle {root}: the signature in {SIGNATURE_NAME} is not a valid signature of "
                          f"manifest.json by key {key.key_id} ({key.path})") from None
    return SignatureStatus("verified", key.key_id)


def sign_bundle(root: str | os.PathLike, private_key) -> dict:
    """Check the bundle (schema, containment, every checksum), then write manifest.sig for the
    manifest's current bytes. `private_key`: a key file or a key from `load_private_key`.
    Returns the signature document."""
    from .atomic import atomic_write_text
    from .bundle import MANIFEST_NAME, load_bundle, read_inside

    root = Path(root)
    key = load_private_key(private_key) if isinstance(private_key, (str, os.PathLike)) else private_key
    bundle = load_bundle(root, trusted_keys=[])
    doc = signature_document(bundle.manifest_bytes, key)
    if read_inside(root, MANIFEST_NAME) != bundle.manifest_bytes:
        raise BundleError(f"bundle {root}: manifest.json changed while it was being signed; sign again")
    atomic_write_text(root / SIGNATURE_NAME, json.dumps(doc, indent=2) + "\n")
    return doc


def generate_keypair(prefix: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub (PEM); returns (key, pub, key_id)."""
    from .atomic import atomic_write_bytes

    serialization, ed25519, _ = _crypto()
    prefix = Path(prefix)
    key_path, pub_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists (pass --overwrite to replace it)")
    key = ed25519.Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    encryption = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
                  else serialization.NoEncryption())
    atomic_write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   encryption), mode=0o600)
    atomic_write_bytes(pub_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path, key_id_of(key.public_key())
