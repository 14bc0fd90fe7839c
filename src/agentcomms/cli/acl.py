"""``agentcomms acl``: a Redis ACL user per identity (rules in ``agentcomms.security.acl``), as a file or applied.

Passwords go to ``<passwords>/<id>.redis-password`` (mode 0600; an existing file is reused)
and never to the output: the ACL file and the commands carry only their SHA-256. A process
then logs in with ``REDIS_URL=redis://<id>@host:port`` (or ``REDIS_USERNAME=<id>``) and
``REDIS_PASSWORD`` from its file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from agentcomms.broker import MessageBroker
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
    tilde,
    write_out,
)
from agentcomms.exceptions import ConfigError, IdentityError
from agentcomms.security import TrustStore, load_anchors
from agentcomms.security.acl import AclUser, Kind, acl_users, render_acl_file, setuser_commands
from agentcomms.settings import Settings

logger = logging.getLogger(__name__)

acl_app = typer.Typer(
    help="Redis ACL users per identity: generate an ACL file, or apply the users to Redis.", no_args_is_help=True
)

IdentitiesOption = Annotated[
    list[str] | None,
    typer.Option(
        "--identity",
        "-i",
        metavar="ID:KIND",
        help="An identity and its kind: agent, sender, dashboard or admin (repeat for more).",
        show_default=False,
    ),
]
FromTrustStoreOption = Annotated[
    bool,
    typer.Option(
        "--from-trust-store",
        help="Every valid record of the trust store too (admins as admin; the others as --default-kind).",
    ),
]
DefaultKindOption = Annotated[
    Kind, typer.Option("--default-kind", help="Kind of trust-store identities not given with --identity.")
]
PasswordsOption = Annotated[
    Path | None,
    typer.Option(
        "--passwords",
        metavar="DIR",
        help="Folder of <ID>.redis-password files, made if missing (default: AGENTCOMMS_IDENTITY_DIR).",
        show_default=False,
    ),
]


@acl_app.callback()
def _acl(log_level: LogLevelOption = None) -> None:
    configure_logging(log_level)


def _parse(values: list[str] | None) -> dict[str, Kind]:
    """``ID:KIND`` values by id (the kind is after the last colon: ids may hold colons)."""
    found: dict[str, Kind] = {}
    for value in values or ():
        identity_id, _, kind = value.rpartition(":")
        try:
            found[identity_id] = Kind(kind.strip().lower())
        except ValueError:
            kinds = ", ".join(k.value for k in Kind)
            raise typer.BadParameter(f"{value!r} is not ID:KIND (KIND: {kinds})", param_hint="'--identity'") from None
        if not identity_id:
            raise typer.BadParameter(f"{value!r} has no id", param_hint="'--identity'")
    return found


async def _trust_store_kinds(broker: MessageBroker, settings: Settings, default: Kind) -> dict[str, Kind]:
    """The kind of each valid trust-store record: ``admin`` for admins, else ``default``; invalid ones are skipped."""
    anchors = load_anchors(settings)
    if not anchors:
        raise ConfigError("--from-trust-store needs the admins' public keys (AGENTCOMMS_TRUST_ANCHORS)")
    found: dict[str, Kind] = {}
    for record, why in await TrustStore(broker.pipeliner, anchors).records():
        if record is None or why:
            errors.print(f"[yellow]skipped:[/] {esc(why)}", highlight=False, soft_wrap=True)
            continue
        found[record.id] = Kind.ADMIN if record.admin else default
    return found


def _users(kinds: dict[str, Kind], passwords: Path) -> list[AclUser]:
    if not kinds:
        raise typer.BadParameter("give --identity ID:KIND (repeat for more) or --from-trust-store")
    with reported():
        return acl_users(sorted(kinds.items()), passwords)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600, whole or not at all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise IdentityError(f"cannot write {path}: {exc.strerror}") from None


@acl_app.command("generate")
def generate(
    identity: IdentitiesOption = None,
    from_trust_store: FromTrustStoreOption = False,
    default_kind: DefaultKindOption = Kind.AGENT,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the ACL file here (mode 0600) instead of stdout.", show_default=False),
    ] = None,
    passwords: PasswordsOption = None,
    commands: Annotated[
        bool, typer.Option("--commands", help="ACL SETUSER commands (for redis-cli) instead of an ACL file.")
    ] = False,
    log_level: LogLevelOption = None,
) -> None:
    """An ACL file (Redis 7 aclfile) with a user per identity; passwords are kept in files, only hashes shown."""
    configure_logging(log_level)
    kinds = _parse(identity)
    settings = load_settings()
    if from_trust_store:

        async def read() -> dict[str, Kind]:
            async with open_broker(settings, client_name="acl") as broker:
                return await _trust_store_kinds(broker, settings, default_kind)

        kinds = {**run(read()), **kinds}
    folder = passwords or settings.identities_folder
    users = _users(kinds, folder)
    text = "\n".join(setuser_commands(users)) + "\n" if commands else render_acl_file(users)
    if out is None:
        write_out(text)
    else:
        with reported():
            _write_private(out, text)
    errors.print(
        f"[dim]{plural(len(users), 'user')}"
        + (f" in {esc(tilde(out))} (mode 0600)" if out is not None else "")
        + f"; passwords in {esc(tilde(folder))}/<id>.redis-password[/]",
        highlight=False,
        soft_wrap=True,
    )


@acl_app.command("apply")
def apply(
    identity: IdentitiesOption = None,
    from_trust_store: FromTrustStoreOption = False,
    default_kind: DefaultKindOption = Kind.AGENT,
    passwords: PasswordsOption = None,
    disable_default: Annotated[
        bool,
        typer.Option(
            "--disable-default", help="Then turn Redis's 'default' user off (only with an admin user to log in as)."
        ),
    ] = False,
    log_level: LogLevelOption = None,
) -> None:
    """Create or replace the users in Redis (ACL SETUSER), logged in as REDIS_URL's user (an admin, or default)."""
    configure_logging(log_level)
    kinds = _parse(identity)
    settings = load_settings()
    folder = passwords or settings.identities_folder

    async def send() -> list[AclUser]:
        async with open_broker(settings, client_name="acl") as broker:
            merged = (
                {**(await _trust_store_kinds(broker, settings, default_kind)), **kinds} if from_trust_store else kinds
            )
            users = _users(merged, folder)
            pipeliner = broker.pipeliner
            if disable_default:
                me = await pipeliner.call("ACL", "WHOAMI", replay=True)
                if me == b"default" and not any(user.kind is Kind.ADMIN for user in users):
                    raise ConfigError(
                        "--disable-default would leave no user to administer Redis: "
                        "apply an admin too (--identity ID:admin)"
                    )
            for user in users:
                await pipeliner.call(*user.setuser(), replay=True)  # replaces the user whole: safe to repeat
            if disable_default:
                await pipeliner.call("ACL", "SETUSER", "default", "off", replay=True)
            return users

    users = run(send())
    console.print(
        f"applied {plural(len(users), 'ACL user')}: " + ", ".join(f"{esc(u.name)} ({u.kind})" for u in users),
        highlight=False,
        soft_wrap=True,
    )
    if disable_default:
        console.print("the 'default' user is off: log in as one of these users", highlight=False)
