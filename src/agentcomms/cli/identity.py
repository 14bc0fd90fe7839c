"""``agentcomms identity``: create key pairs, show them, enrol them in the trust store (admin), list, revoke.

An identity file (``<folder>/<id>.json``, mode 0600) holds private keys; nothing here ever
prints them. What an operator copies around is the public token: one JSON line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from agentcomms.cli._common import (
    LogLevelOption,
    configure_logging,
    console,
    errors,
    esc,
    load_settings,
    open_broker,
    plural,
    reported,
    run,
    write_out,
)
from agentcomms.exceptions import IdentityError, PermissionDeniedError, TrustError
from agentcomms.security import Identity, PublicIdentity, TrustRecord, TrustStore, b64decode, b64encode, load_anchors
from agentcomms.security.identity import check_id
from agentcomms.settings import Settings

logger = logging.getLogger(__name__)

identity_app = typer.Typer(
    help="Identities: create key pairs, enrol them in the trust store (an admin), list, revoke.",
    no_args_is_help=True,
)

ANCHORS_FILE = "trust_anchors"

AsOption = Annotated[
    Path | None,
    typer.Option("--as", help="The admin's identity file (default: AGENTCOMMS_IDENTITY).", show_default=False),
]


@identity_app.callback()
def _identity(log_level: LogLevelOption = None) -> None:
    configure_logging(log_level)


def _folder(given: Path | None, settings: Settings) -> Path:
    return given if given is not None else settings.identities_folder


def _describe(record: TrustRecord) -> str:
    roles = ", ".join(record.roles) or "no role"
    return f"{record.id} ({roles}{'; admin' if record.admin else ''}), fingerprint {record.identity.fingerprint}"


# -- create, show ----------------------------------------------------------------------------


def _replace_anchor(anchors: Path, old: bytes | None, new: bytes) -> None:
    """Add ``new`` to the anchors file, dropping ``old`` (the key of the identity file just replaced)."""
    lines = anchors.read_text(encoding="utf-8").splitlines() if anchors.exists() else []
    kept = [line for line in lines if old is None or line.strip() != b64encode(old)]
    kept.append(b64encode(new))
    anchors.write_text("\n".join(kept) + "\n", encoding="utf-8")


@identity_app.command("create")
def create(
    identity_id: Annotated[str, typer.Argument(metavar="ID", help="The identity's id (an agent id's rules).")],
    folder: Annotated[
        Path | None,
        typer.Option("--dir", help="Where to write <ID>.json (default: AGENTCOMMS_IDENTITY_DIR).", show_default=False),
    ] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="An admin: add its public key to <dir>/trust_anchors too.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity file.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """Create a key pair: write <dir>/<ID>.json (mode 0600) and print its public token (one JSON line)."""
    configure_logging(log_level)
    settings = load_settings()
    where = _folder(folder, settings)
    with reported():
        check_id(identity_id)
        path = where / f"{identity_id}.json"
        old: bytes | None = None
        if force and path.exists():
            try:
                old = Identity.load(path).public.ed25519
            except IdentityError:
                old = None  # not a readable identity: nothing to take out of the anchors
        identity = Identity.generate(identity_id)
        identity.save(path, overwrite=force)
        if admin:
            try:
                _replace_anchor(where / ANCHORS_FILE, old, identity.public.ed25519)
            except OSError as exc:
                raise IdentityError(f"cannot write {where / ANCHORS_FILE}: {exc.strerror}") from None
    write_out(identity.public.token() + "\n")
    if admin:
        write_out(f"AGENTCOMMS_TRUST_ANCHORS={b64encode(identity.public.ed25519)}\n")
    errors.print(
        f"[dim]wrote {esc(path)} (mode 0600): {esc(identity_id)}, fingerprint {identity.public.fingerprint}"
        + (f"; its public key is in {esc(where / ANCHORS_FILE)}" if admin else "")
        + "[/]",
        soft_wrap=True,
        highlight=False,
    )


def _held(target: str | None, settings: Settings) -> Path:
    """The identity file ``target`` names: a file, an id in the identity folder, or this process's own."""
    if target is None:
        if settings.identity_file is not None:
            return settings.identity_file
        found = sorted(settings.identities_folder.glob("*.json"))
        if len(found) != 1:
            raise IdentityError(
                f"name an identity: {plural(len(found), 'identity file')} in {settings.identities_folder} "
                "and no AGENTCOMMS_IDENTITY"
            )
        return found[0]
    path = Path(target)
    if path.suffix == ".json" or path.exists():
        return path
    return settings.identities_folder / f"{check_id(target)}.json"


@identity_app.command("show")
def show(
    target: Annotated[
        str | None,
        typer.Argument(metavar="[ID|FILE]", help="An id in the identity folder, or a file (default: your own)."),
    ] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Print the public token (one JSON line) of an identity held here; its fingerprint on stderr."""
    configure_logging(log_level)
    settings = load_settings()
    with reported():
        path = _held(target, settings)
        identity = Identity.load(path)
    write_out(identity.public.token() + "\n")
    errors.print(
        f"[dim]{esc(identity.id)}: fingerprint {identity.public.fingerprint} ({esc(path)})[/]",
        soft_wrap=True,
        highlight=False,
    )


# -- the trust store (admin) -----------------------------------------------------------------


def _public(text: str, *, origin: str) -> PublicIdentity:
    """The public identity in ``text`` (a token, or a public or private identity file's JSON)."""
    try:
        raw: Any = json.loads(text)
    except ValueError:
        raise IdentityError(f'{origin} is not a public identity: JSON {{"id", "ed25519", "x25519"}}') from None
    if isinstance(raw, dict) and "agentcomms_identity" in raw:  # a private identity file: its public half only
        if origin == "the token":
            raise IdentityError(
                "that is a private identity file, not a token: never paste it; "
                "`agentcomms identity show` prints the public token"
            )
        raw = raw.get("public")
    return PublicIdentity.from_json(raw)


def _admin(settings: Settings, as_file: Path | None) -> Identity:
    """The admin identity this process holds (``--as`` or ``AGENTCOMMS_IDENTITY``), checked against the anchors.

    Raises:
        PermissionDeniedError: none given, or its key is not a trust anchor.
    """
    path = as_file or settings.identity_file
    if path is None:
        raise PermissionDeniedError(
            "the trust store is written by an admin: set AGENTCOMMS_IDENTITY to the admin's identity file, "
            "or pass --as FILE"
        )
    admin = Identity.load(path)
    try:
        anchors = {b64decode(anchor) for anchor in load_anchors(settings)}
    except ValueError:
        raise IdentityError("a trust anchor is not base64url (AGENTCOMMS_TRUST_ANCHORS)") from None
    if admin.public.ed25519 not in anchors:
        raise PermissionDeniedError(
            f"{admin.id!r} is not an admin: its key is not among the trust anchors "
            f"(AGENTCOMMS_TRUST_ANCHORS, {settings.identities_folder / ANCHORS_FILE})"
        )
    return admin


@identity_app.command("trust")
def trust(
    token: Annotated[
        str | None, typer.Argument(metavar="[TOKEN]", help="The public token (`identity create` / `show` prints it).")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Read the public identity from a file.", show_default=False)
    ] = None,
    by_id: Annotated[
        str | None, typer.Option("--id", help="An identity in the identity folder.", show_default=False)
    ] = None,
    role: Annotated[
        list[str] | None, typer.Option("--role", help="A role it may act in (repeat for more).", show_default=False)
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Enrol it as an admin.")] = False,
    as_file: AsOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Enrol a public identity with its roles in the trust store (replacing its record); needs an admin identity."""
    configure_logging(log_level)
    if sum(given is not None for given in (token, file, by_id)) != 1:
        raise typer.BadParameter("give exactly one of TOKEN, --file PUBLIC.json or --id ID")
    settings = load_settings()
    with reported():
        if token is not None:
            public = _public(token, origin="the token")
        elif file is not None:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise IdentityError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
            public = _public(text, origin=str(file))
        else:
            assert by_id is not None
            public = Identity.load(settings.identities_folder / f"{check_id(by_id)}.json").public
        signer = _admin(settings, as_file)

    async def enrol() -> TrustRecord:
        async with open_broker(settings, client_name="identity") as broker:
            store = TrustStore(broker.pipeliner, load_anchors(settings))
            return await store.enroll(signer, public, roles=role or (), is_admin=admin)

    record = run(enrol())
    console.print(f"enrolled {esc(_describe(record))}", highlight=False, soft_wrap=True)


@identity_app.command("revoke")
def revoke(
    identity_id: Annotated[str, typer.Argument(metavar="ID", help="The identity to remove.")],
    as_file: AsOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Remove an identity from the trust store (peers refuse it within 30 s); needs an admin identity."""
    configure_logging(log_level)
    settings = load_settings()
    with reported():
        check_id(identity_id)
        signer = _admin(settings, as_file)

    async def remove() -> None:
        async with open_broker(settings, client_name="identity") as broker:
            if not await TrustStore(broker.pipeliner, load_anchors(settings)).revoke(signer, identity_id):
                raise TrustError(f"identity {identity_id!r} is not in the trust store")

    run(remove())
    console.print(f"revoked {esc(identity_id)}", highlight=False)
    errors.print(
        f"[dim]its Redis ACL user, if it has one, stays until removed: ACL DELUSER {esc(identity_id)}[/]",
        highlight=False,
        soft_wrap=True,
    )


@identity_app.command("list")
def list_identities(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    log_level: LogLevelOption = None,
) -> None:
    """The trust store's records (id, roles, admin, fingerprint), and the invalid ones with why."""
    configure_logging(log_level)
    settings = load_settings()
    with reported():
        anchors = load_anchors(settings)
    if not anchors:
        errors.print(
            "[yellow]no trust anchors (AGENTCOMMS_TRUST_ANCHORS): no record can be verified[/]", highlight=False
        )

    async def read() -> list[tuple[TrustRecord | None, str]]:
        async with open_broker(settings, client_name="identity") as broker:
            return await TrustStore(broker.pipeliner, anchors).records()

    found = run(read())
    valid = sorted((r for r, why in found if r is not None and not why), key=lambda r: r.id)
    invalid = sorted(why for r, why in found if why)
    if as_json:
        document = {
            "identities": [
                {
                    "id": r.id,
                    "roles": list(r.roles),
                    "admin": r.admin,
                    "fingerprint": r.identity.fingerprint,
                    "enrolled_by": r.enrolled_by,
                }
                for r in valid
            ],
            "invalid": invalid,
        }
        write_out(json.dumps(document, indent=2) + "\n")
        return
    count = f"{len(valid)} {'identity' if len(valid) == 1 else 'identities'}"
    table = Table(title=f"{count} in the trust store")
    for column in ("id", "roles", "admin", "fingerprint", "enrolled by"):
        table.add_column(column)
    for r in valid:
        table.add_row(
            esc(r.id), esc(", ".join(r.roles)), "yes" if r.admin else "", r.identity.fingerprint, r.enrolled_by
        )
    console.print(table)
    for why in invalid:
        errors.print(f"[red]invalid:[/] {esc(why)}", highlight=False, soft_wrap=True)
