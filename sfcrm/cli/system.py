"""Top-level commands: ``init``, ``doctor``, ``serve-callback``, ``demo``, ``backup`` and ``db``."""

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sfcrm.cli.runtime import JsonOption, command, host_option, port_option, started
from sfcrm.errors import ConfigError, ExitCode, ValidationError
from sfcrm.wording import plural

if TYPE_CHECKING:
    import logging

    from sfcrm.db import SchemaState


def init(json_output: JsonOption = False) -> None:
    """Write a starter sfcrm.toml and .env.example here (when absent) and create the database.

    Example: sfcrm init
    """
    with command(json_output) as rt:
        from sfcrm.resources import example_config, template_path

        written: list[str] = []
        for target, source in (
            (Path("sfcrm.toml"), example_config()),
            (Path(".env.example"), template_path("env.example")),
        ):
            if not target.exists():
                try:
                    target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
                except OSError as exc:
                    raise ConfigError(
                        f"cannot write {target}: {exc.strerror or exc}",
                        value=str(Path.cwd()),
                        hint="run `sfcrm init` in a folder you may write",
                    ) from None
                written.append(str(target))
        rt.options.config = rt.options.config or (
            Path("sfcrm.toml") if Path("sfcrm.toml").is_file() else None
        )
        where = rt.db.where
        _ = rt.db.engine  # creates and upgrades the file
        rt.emit(
            {"written": written, "database": where},
            lambda: rt.print(
                (f"Wrote {', '.join(written)}. " if written else "Config files already there. ")
                + f"Database ready at {where}. Put your secrets in .env (see .env.example), "
                "then `sfcrm doctor` says what is still missing."
            ),
        )


def doctor(
    offline: Annotated[
        bool, typer.Option("--offline", help="skip the checks that use the network")
    ] = False,
    host: Annotated[str, host_option("address the listener was started on")] = "127.0.0.1",
    port: Annotated[int, port_option("port the listener was started on (1-65535)")] = 8000,
    json_output: JsonOption = False,
) -> None:
    """Check that this office is ready for real use: one line per check, with its fix.

    It checks the Daraja keys, the callback URL (public https, a long secret path, none of the
    words Daraja rejects), the RSVP settings, the SMTP login, that the listener answers on
    HOST:PORT, that Daraja gives a token, and that no payment is left pending and no email
    unsent. It writes nothing. Exit 0 when every check passes, 1 when any fails.

    Example: sfcrm doctor --offline
    """
    with command(json_output) as rt:
        from sfcrm.doctor import run_checks

        checks = run_checks(
            rt.settings,
            lambda: rt.db,
            clock=rt.clock,
            offline=offline,
            listener_host=host,
            listener_port=port,
        )
        failed = [check for check in checks if not check.ok]
        # (the names are sfcrm's own words: only what a check found is redacted)
        doc = [
            {**check.json(), "detail": rt.redact(check.detail),
             "fix": rt.redact(check.fix) if check.fix else None}
            for check in checks
        ]  # fmt: skip
        width = max(len(check.name) for check in checks)

        def render() -> None:
            for row in doc:
                line = f"{'ok  ' if row['ok'] else 'FAIL'}  {row['name']:<{width}}  {row['detail']}"
                if row["fix"]:
                    line += f" — fix: {row['fix']}"
                rt.print(line)
            skipped = " (network checks skipped: --offline)" if offline else ""
            rt.say(
                f"{len(checks) - len(failed)} of {plural(len(checks), 'check')} passed{skipped}."
            )

        rt.emit(doc, render)
        if failed:
            raise typer.Exit(int(ExitCode.FAILED))


def serve_callback(
    host: Annotated[str, host_option()] = "127.0.0.1",
    port: Annotated[int, port_option()] = 8000,
    json_output: JsonOption = False,
) -> None:
    """Run the listener Daraja posts payment results to (put it behind HTTPS).

    It serves the path of MPESA_CALLBACK_URL (keep a long random secret in that path) and,
    when SFCRM_SECRET_KEY is set, the crew's confirm/decline pages under /crew/rsvp/.

    Each request must arrive whole within 10 s, and one address may hold 32 connections
    (127.0.0.1, SFCRM_TRUSTED_PROXIES and SFCRM_CALLBACK_ALLOWLIST are not capped).

    Example: sfcrm serve-callback --host 127.0.0.1 --port 8000
    """
    with command(json_output) as rt:
        import logging

        from sfcrm.config import callback_secret_guessable
        from sfcrm.logs import LocalTimeFormatter, RedactingFilter, Redactor
        from sfcrm.server import make_server

        settings = rt.settings
        path = settings.callback_path
        if path is None and not settings.secret_key:
            raise ConfigError(
                "MPESA_CALLBACK_URL is not set",
                hint="the listener serves that URL's path; set it in the environment or .env",
            )
        # Callbacks stored but not acted on when the listener last stopped: act on them now.
        replayed = rt.payments.replay_callbacks()
        if replayed:
            rt.say(f"Applied {plural(replayed, 'stored callback')} left from the last run.")
        app = rt.services.callback_app()
        limits = rt.services.listener_limits()
        handler = logging.StreamHandler()
        handler.setFormatter(LocalTimeFormatter(settings.timezone, "%(asctime)s %(message)s"))
        handler.addFilter(RedactingFilter(Redactor(settings.secret_values())))
        # waitress warns "Task queue depth is N" on every request of a burst: noise here.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        for name in ("sfcrm", "waitress"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)
        # The handler writes to this run's stderr: it goes when the run ends.
        rt.on_close(lambda: _remove_handler(handler, "sfcrm", "waitress"))
        try:
            server = make_server(app, host, port, settings.listener_threads, limits=limits)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        except ValueError:  # waitress: the host name resolves to no address
            raise ValidationError(
                f"cannot listen on {host}:{port}: not an address of this machine", value=host
            ) from None
        try:
            if path is not None and callback_secret_guessable(path):
                rt.warn(
                    "Warning: the path of MPESA_CALLBACK_URL looks guessable; anyone who "
                    "guesses it can post a fake payment. Put a long random secret in it "
                    "(see the README)."
                )
            address = f"http://{host}:{server.effective_port}"
            rt.emit(
                started("serve-callback", address, threads=settings.listener_threads),
                lambda: rt.say(
                    f"Listening on {address}/******** (the path of MPESA_CALLBACK_URL). "
                    "Ctrl-C stops."
                ),
                now=True,
            )
            # waitress takes Ctrl-C's KeyboardInterrupt and returns; one outside its loop too
            with contextlib.suppress(KeyboardInterrupt):
                server.run()
            rt.say("Stopping.")
        finally:
            server.close()
            app.stop()
        # The only way a listener ends is Ctrl-C: 130, as for any command it stops.
        raise typer.Exit(int(ExitCode.INTERRUPTED))


def _remove_handler(handler: "logging.Handler", *names: str) -> None:
    import logging

    for name in names:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def demo(
    clean: Annotated[
        bool, typer.Option("--clean", help="delete the demo folder afterwards")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Run both jobs on embedded defaults: a payment through the built-in Daraja emulator, then
    an event, an invitation email and a confirmation through its RSVP link.

    It needs no configuration and leaves its database and outbox in a temporary folder.

    Example: sfcrm demo
    """
    import shutil
    import tempfile

    with command(json_output) as rt:
        from sfcrm.demo import run_demo
        from sfcrm.events import event_json
        from sfcrm.money import format_cents
        from sfcrm.payments import payment_json
        from sfcrm.people import person_json
        from sfcrm.phone import display

        folder = Path(tempfile.mkdtemp(prefix="sfcrm-demo-"))
        try:
            result = run_demo(folder, progress=rt.say)
            import zoneinfo

            tz = zoneinfo.ZoneInfo("Africa/Nairobi")
            doc = {
                "folder": None if clean else str(folder),
                "payment": payment_json(result.payment, tz),
                "person_before": person_json(result.person_before),
                "person_after": person_json(result.person_after),
                "event": event_json(result.event),
                "crew_status": result.crew_status,
                "email": None if clean else str(result.email_path),
                "seconds": round(result.seconds, 2),
            }

            def render() -> None:
                p = result.payment
                rt.print(
                    f"Payment {p.id}: {p.status}, receipt {p.receipt_number}, "
                    f"KES {p.amount} from {display(p.phone_number)}."
                )
                rt.print(
                    f"{result.person_after.name} owed KES "
                    f"{format_cents(result.person_before.balance_cents)}, now owes KES "
                    f"{format_cents(result.person_after.balance_cents)}."
                )
                rt.print(
                    f"Invited to {result.event.name} on {result.event.date}; "
                    f"{result.crew_status} through the RSVP link."
                )
                if not clean:
                    rt.print(f"The invitation email: {result.email_path}")
                    rt.print(f"The demo database:    {folder / 'sfcrm.db'}")
                rt.print(f"Done in {result.seconds:.1f} s.")

            rt.emit(doc, render)
        finally:
            if clean:
                shutil.rmtree(folder, ignore_errors=True)


def backup(
    file: Annotated[Path, typer.Argument(help="the copy to write; must not exist yet")],
    json_output: JsonOption = False,
) -> None:
    """Copy the SQLite database to FILE, consistent even while the listener takes callbacks.

    An existing FILE is never overwritten. A PostgreSQL database is backed up with pg_dump.

    Example: sfcrm backup sfcrm-2026-01-31.db
    """
    with command(json_output) as rt:
        target = rt.db.backup(file)
        rt.emit(
            {"database": rt.db.where, "backup": str(target)},
            lambda: rt.print(f"Backed up {rt.db.where} to {target}."),
        )


db_app = typer.Typer(
    help="The database's schema: where it stands, upgrading it, moving it to another engine.",
    no_args_is_help=True,
)


@db_app.command("upgrade")
def db_upgrade(json_output: JsonOption = False) -> None:
    """Bring the database's schema to the newest revision now.

    Any command does this on first use; this does it at a time you choose, say right after
    installing a new release.

    Example: sfcrm db upgrade
    """
    with command(json_output) as rt:
        before, after = rt.db.upgrade()
        if before.current:
            text = f"the database is at schema {after.revision} already"
        elif before.empty:
            text = f"created the database at schema {after.revision}"
        else:
            text = f"upgraded the database from schema {_shown(before)} to {after.revision}"
        rt.emit(
            {
                "database": rt.db.where,
                "from": before.revision,
                "from_user_version": before.legacy_version,
                "to": after.revision,
                "upgraded": not before.current,
            },
            lambda: rt.print(text),
        )


@db_app.command("current")
def db_current(json_output: JsonOption = False) -> None:
    """Show the database's schema revision and whether it is the newest; never upgrades it.

    Example: sfcrm db current
    """
    with command(json_output) as rt:
        from sfcrm.db import SchemaState

        db = rt.db
        if db.dialect == "sqlite" and not db.path.exists():  # looking must not create it
            state = SchemaState(None, None)
            text = f"no database at {db.where} yet; the first command creates it"
        else:
            state = db.schema()
            text = _schema_text(state)
        rt.emit(
            {
                "database": db.where,
                "revision": state.revision,
                "user_version": state.legacy_version,
                "head": state.head,
                "newest": state.current,
            },
            lambda: rt.print(text),
        )


@db_app.command("copy")
def db_copy(
    source: Annotated[
        Path, typer.Option("--from", help="the SQLite file whose rows to copy", show_default=False)
    ],
    json_output: JsonOption = False,
) -> None:
    """Copy every row of a SQLite file into the configured database, which must be empty:
    how an office moves to PostgreSQL. Ids are kept, so links already emailed keep working.

    First point SFCRM_DATABASE_URL at the new database (in .env) and stop the listener and cron.

    Example: sfcrm db copy --from sfcrm.db
    """
    with command(json_output) as rt:
        from sfcrm.db import Database

        if not source.is_file():
            raise ValidationError("no such database file", value=str(source))
        origin = Database(source)
        try:
            copied = origin.copy_to(rt.db)
        finally:
            origin.close()
        total = sum(copied.values())
        rt.emit(
            {"from": str(source), "to": rt.db.where, "rows": copied},
            lambda: rt.print(f"Copied {plural(total, 'row')} from {source} into {rt.db.where}."),
        )


def _shown(state: "SchemaState") -> str:
    """A schema as the office knows it: its revision, with the user_version of a file a
    release before Alembic wrote."""
    if state.legacy_version is None:
        return str(state.revision)
    return f"{state.revision or 'unknown'} (user_version {state.legacy_version})"


def _schema_text(state: "SchemaState") -> str:
    if state.empty:
        return f"the database is empty; the first command creates schema {state.head} in it"
    if state.current:
        return f"the database is at schema {state.head}, the newest"
    where = f"the database is at schema {_shown(state)}"
    # (revisions are numbered 0001, 0002, ...: their order is the order of their text)
    if state.revision is None or state.revision > state.head:
        return f"{where}, newer than this sfcrm knows ({state.head}); upgrade sfcrm"
    return f"{where}; {state.head} is the newest (`sfcrm db upgrade` or any command upgrades it)"


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("doctor")(doctor)
    app.command("serve-callback")(serve_callback)
    app.command("demo")(demo)
    app.command("backup")(backup)
    app.add_typer(db_app, name="db")
