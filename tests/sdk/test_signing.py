"""Signed bundles: Ed25519 over manifest.json; with trusted keys an unsigned,
foreign-signed or changed bundle is refused before any model loads; without keys it loads and
says whether it was signed."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat

import pytest
from tests.helpers import run_main

from regionkd.sdk.bundle import load_bundle
from regionkd.sdk.cli_segment import main as segment_main
from regionkd.sdk.cli_sign import main as sign_main
from regionkd.sdk.errors import BundleError, RegionKDError
from regionkd.sdk.segmenter import Segmenter
from regionkd.sdk.signing import TRUSTED_KEYS_ENV, generate_keypair, sign_bundle


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    vendor = generate_keypair(d / "vendor")
    other = generate_keypair(d / "other")
    return {"key": vendor[0], "pub": vendor[1], "id": vendor[2], "other_key": other[0], "other_pub": other[1]}


@pytest.fixture
def signed(tiny_bundle, tmp_path, keys):
    root = tmp_path / "signed.bundle"
    shutil.copytree(tiny_bundle, root)
    sign_bundle(root, keys["key"])
    return root


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch):
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)


def _no_session(monkeypatch):
    import onnxruntime
    made = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: made.append(a))
    return made


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    assert stat.S_IMODE(os.stat(keys["key"]).st_mode) == 0o600
    assert keys["pub"].read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(keys["id"]) == 16
    with pytest.raises(FileExistsError):
        generate_keypair(keys["key"].with_suffix(""))


def test_a_signed_bundle_loads_with_its_key_and_says_so(signed, keys, phantom_nifti, tmp_path):
    b = load_bundle(signed, trusted_keys=[keys["pub"]])
    assert b.signature.verified and b.signature.key_id == keys["id"]
    with Segmenter(signed, backend="onnxruntime", trusted_keys=[keys["pub"]]) as seg:
        result = seg.segment_file(phantom_nifti, tmp_path / "m.nii.gz")
    assert result.bundle_signature == f"signature verified (key {keys['id']})"
    assert load_bundle(signed).signature.describe() == \
        f"signed by key {keys['id']}, not verified (no trusted key configured)"


def test_without_keys_an_unsigned_bundle_loads_as_before(tiny_bundle, phantom_nifti, tmp_path):
    with Segmenter(tiny_bundle, backend="onnxruntime") as seg:
        result = seg.segment_file(phantom_nifti, tmp_path / "m.nii.gz")
    assert result.bundle_signature == "unsigned (no trusted key configured)"


def _swap_model_and_rehash(root, tmp_path):
    """What an attacker with write access does: another model, a manifest re-hashed to match."""
    manifest = json.loads((root / "manifest.json").read_text())
    other = (root / "model.fp16.onnx").read_bytes()
    (root / "model.fp32.onnx").write_bytes(other)
    entry = next(e for e in manifest["files"] if e["path"] == "model.fp32.onnx")
    entry.update(sha256=hashlib.sha256(other).hexdigest(), bytes=len(other))
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("damage, message", [
    ("unsigned", r"unsigned \(no manifest\.sig\), but trusted keys are configured"),
    ("other key", r"signed by key [0-9a-f]{16}, which is not a trusted key"),
    ("re-hashed", r"manifest\.json was changed after it was signed"),
    ("forged", r"not a valid signature of manifest\.json by key"),
    ("file changed", r"model\.fp32\.onnx has the wrong checksum"),
    ("garbage sig", r"manifest\.sig: not a regionkd signature file"),
])
def test_with_a_trusted_key_anything_else_is_refused_before_loading(signed, keys, tmp_path, monkeypatch, damage,
                                                                     message):
    if damage == "unsigned":
        (signed / "manifest.sig").unlink()
    elif damage == "other key":
        sign_bundle(signed, keys["other_key"])
    elif damage == "re-hashed":
        _swap_model_and_rehash(signed, tmp_path)
    elif damage == "forged":       # same key id and digest, made-up signature bytes
        doc = json.loads((signed / "manifest.sig").read_text())
        _swap_model_and_rehash(signed, tmp_path)
        doc["manifest_sha256"] = hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
        doc["signature"] = base64.b64encode(bytes(64)).decode()
        (signed / "manifest.sig").write_text(json.dumps(doc))
    elif damage == "file changed":
        path = signed / "model.fp32.onnx"
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "garbage sig":
        (signed / "manifest.sig").write_text("not json")
    made = _no_session(monkeypatch)
    with pytest.raises(BundleError, match=message):
        Segmenter(signed, backend="onnxruntime", trusted_keys=[keys["pub"]])
    assert made == []


def test_a_re_hashed_bundle_is_accepted_only_without_keys(signed, keys, tmp_path):
    _swap_model_and_rehash(signed, tmp_path)
    assert load_bundle(signed).signature.state == "not verified"        # what nothing protects without keys
    with pytest.raises(BundleError):
        load_bundle(signed, trusted_keys=[keys["pub"]])


def test_the_environment_variable_enforces_keys(signed, tiny_bundle, keys, monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["pub"]))
    assert load_bundle(signed).signature.verified
    with pytest.raises(BundleError, match="unsigned"):
        Segmenter(tiny_bundle, backend="onnxruntime")
    with pytest.raises(BundleError, match="unsigned"):
        Segmenter(tiny_bundle, backend="onnxruntime", trusted_keys=[])     # code cannot switch it off
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["pub"].with_name("missing.pub")))
    with pytest.raises(RegionKDError, match=r"trusted key .*missing\.pub: file does not exist"):
        load_bundle(signed)


def test_a_bundle_object_loaded_without_keys_is_verified_when_keys_are_given(signed, keys, tmp_path):
    b = load_bundle(signed)
    _swap_model_and_rehash(signed, tmp_path)
    with pytest.raises(BundleError):
        Segmenter(b, backend="onnxruntime", trusted_keys=[keys["pub"]])


def test_cli_trusted_key(signed, tiny_bundle, keys, phantom_nifti, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    code, _, err = run_main(segment_main, [tiny_bundle, phantom_nifti, "-o", out, "--backend", "onnxruntime",
                                           "--trusted-key", keys["pub"]], capsys)
    assert code == 1 and "unsigned (no manifest.sig), but trusted keys are configured" in err and not out.exists()
    code, _, err = run_main(segment_main, [signed, phantom_nifti, "-o", out, "--backend", "onnxruntime",
                                           "--trusted-key", keys["pub"]], capsys)
    assert code == 0 and f"bundle signature verified (key {keys['id']})" in err and out.is_file()


def test_sign_command_group(tiny_bundle, tmp_path, capsys):
    prefix = tmp_path / "k" / "acme"
    code, out, _ = run_main(sign_main, ["keygen", prefix], capsys)
    assert code == 0 and "acme.key" in out and "acme.pub" in out
    root = tmp_path / "b.bundle"
    shutil.copytree(tiny_bundle, root)
    code, _, err = run_main(sign_main, ["verify", root, "--trusted-key", prefix.with_name("acme.pub")], capsys)
    assert code == 1 and "unsigned" in err
    code, out, _ = run_main(sign_main, ["sign", root, "--key", prefix.with_name("acme.key")], capsys)
    assert code == 0 and "signed" in out and (root / "manifest.sig").is_file()
    code, out, _ = run_main(sign_main, ["verify", root, "--trusted-key", prefix.with_name("acme.pub")], capsys)
    assert code == 0 and "signature verified" in out and "4 files verified" in out
    code, _, err = run_main(sign_main, ["sign", root, "--key", prefix.with_name("acme.pub")], capsys)
    assert code == 1 and "not a PEM private key" in err
    # a damaged bundle is never signed
    (root / "model.fp16.onnx").write_bytes(b"swapped")
    code, _, err = run_main(sign_main, ["sign", root, "--key", prefix.with_name("acme.key")], capsys)
    assert code == 1 and "model.fp16.onnx" in err
    code, out, _ = run_main(sign_main, ["--help"], capsys)
    assert code == 0 and "keygen" in out and "verify" in out


def test_an_engine_built_for_a_signed_bundle_never_rewrites_its_manifest(signed, keys):
    b = load_bundle(signed, trusted_keys=[keys["pub"]])
    before = (signed / "manifest.json").read_bytes()
    (signed / "engines").mkdir()
    (signed / "engines" / "rtx1.7.1-fp16.engine").write_bytes(b"plan")
    entry = b.register_file(signed / "engines" / "rtx1.7.1-fp16.engine", format="tensorrt-rtx-engine",
                            precision="fp16", backends=["tensorrt-rtx"], trt_version="1.7.1")
    assert (signed / "manifest.json").read_bytes() == before          # the signature still holds
    assert b.read_verified(entry) == b"plan"                          # and the engine is run from checked bytes
    assert load_bundle(signed, trusted_keys=[keys["pub"]]).signature.verified


def test_an_encrypted_signing_key_needs_its_passphrase(tiny_bundle, tmp_path, monkeypatch):
    from regionkd.sdk.signing import PASSPHRASE_ENV, KeyFileError

    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    key, pub, _ = generate_keypair(tmp_path / "enc")
    assert b"ENCRYPTED" in key.read_bytes()
    root = tmp_path / "b.bundle"
    shutil.copytree(tiny_bundle, root)
    sign_bundle(root, key)
    assert load_bundle(root, trusted_keys=[pub]).signature.verified
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(KeyFileError, match=f"set {PASSPHRASE_ENV}"):
        sign_bundle(root, key)
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        sign_bundle(root, key)
