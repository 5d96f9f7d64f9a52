"""`regionkd-sign`: Ed25519 keys and signatures for model bundles (see `regionkd.sdk.signing`).

    regionkd-sign keygen vendor                     # vendor.key (private, 0600) and vendor.pub
    regionkd-sign sign model.bundle --key vendor.key
    regionkd-sign verify model.bundle --trusted-key vendor.pub
"""
from __future__ import annotations

from pathlib import Path

import click

from .console import run_cli, version_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
def sign_group():
    """Sign model bundles so that scanner software runs only the models its vendor released."""


@sign_group.command("keygen")
@click.argument("prefix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace existing PREFIX.key / PREFIX.pub.")
@click.option("-q", "--quiet", is_flag=True, help="No messages; errors only.")
def keygen(prefix, overwrite, quiet):
    """Write an Ed25519 key pair: PREFIX.key (private, mode 0600; keep it off the scanners) and
    PREFIX.pub (the public key the scanners trust). Set REGIONKD_SIGN_PASSPHRASE to encrypt the key."""
    from .signing import generate_keypair

    key, pub, key_id = generate_keypair(prefix, overwrite=overwrite)
    if not quiet:
        click.echo(f"wrote {key} (private) and {pub} (public), key id {key_id}")
    return 0


@sign_group.command("sign")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Private key (PEM) from `regionkd-sign keygen`.")
@click.option("-q", "--quiet", is_flag=True, help="No messages; errors only.")
def sign(bundle, key, quiet):
    """Verify BUNDLE (schema, every checksum) and write its manifest.sig."""
    from .signing import sign_bundle

    doc = sign_bundle(bundle, key)
    if not quiet:
        click.echo(f"signed {bundle}/manifest.json (sha256 {doc['manifest_sha256'][:16]}...) with key {doc['key_id']}")
    return 0


@sign_group.command("verify")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Public key (PEM) to trust (repeatable; REGIONKD_TRUSTED_KEYS adds more).")
@click.option("-q", "--quiet", is_flag=True, help="No messages; errors only.")
def verify(bundle, trusted_keys, quiet):
    """Load BUNDLE as the SDK would with these trusted keys: exit 0 when its signature and every file verify."""
    from .bundle import load_bundle
    from .errors import BundleError
    from .signing import resolve_trusted_keys

    keys = resolve_trusted_keys(list(trusted_keys))
    if not keys:
        raise BundleError("verify: give --trusted-key PUB (or set REGIONKD_TRUSTED_KEYS)")
    b = load_bundle(bundle, trusted_keys=keys)
    if not quiet:
        click.echo(f"{bundle}: {b.signature.describe()}; {len(b.files)} files verified")
    return 0


def main(argv=None):
    return run_cli(sign_group, argv)


if __name__ == "__main__":
    main()
