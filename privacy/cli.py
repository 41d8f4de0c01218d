"""`medfed keys`: create Ed25519 key pairs and print key fingerprints.

User mistakes raise :class:`~privacy.errors.PrivacyError` subclasses; ``medfed.cli.main``
prints them as one line and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

import typer

from privacy.keys import fingerprint, generate_keypair, load_public_key

__all__ = ["keys_app"]

keys_app = typer.Typer(
    help="Create and inspect Ed25519 keys (research partners sign specs; nodes sign their audit log).",
    no_args_is_help=True,
)


@keys_app.command("new")
def new(
    out: Path = typer.Option(..., "--out", help="Folder to write <name>.key and <name>.pub into."),
    name: str = typer.Option(..., "--name", help="Key name, e.g. acme_research; also the key's comment."),
) -> None:
    """Create a key pair: a private key (mode 0600, never overwritten) and its public key."""
    pair = generate_keypair(out, name)
    typer.echo(f"private key: {pair.private_key_path} (keep it secret; never send it)")
    typer.echo(f"public key:  {pair.public_key_path} (give this to the node officers)")
    typer.echo(f"fingerprint: {pair.fingerprint}")


@keys_app.command("fingerprint")
def show_fingerprint(
    public_key_file: Path = typer.Argument(..., help="A public key file (<name>.pub)."),
) -> None:
    """Print a public key's SHA256 fingerprint, as `ssh-keygen -lf` does."""
    typer.echo(fingerprint(load_public_key(public_key_file)))
