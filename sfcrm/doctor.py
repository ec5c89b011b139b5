"""``sfcrm doctor``: is this office ready for real money and real crew? One check per setting
or service an office needs, each with what is wrong and how to fix it.

The checks read the settings, the database (never creating or upgrading it) and, unless told
to stay offline, ask the listener and Daraja over the network with short timeouts. No check
writes a row, sends a push or an email.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sfcrm.config import (
    CALLBACK_URL_WORDS,
    CONFIG_FOUND_BY,
    MIN_SECRET_KEY_LENGTH,
    SECRET_RECIPE,
    Settings,
    callback_secret_guessable,
)
from sfcrm.errors import DarajaError, SfcrmError
from sfcrm.wording import plural

if TYPE_CHECKING:
    import requests

    from sfcrm.db import Database

# An open payment whose last push is older than this should have been settled by a callback or
# by `mpesa reconcile` (the prompt is gone from the phone after a minute and a half).
STALE_AFTER = timedelta(minutes=15)
# Network checks answer within this many seconds or fail: a doctor must not hang.
NETWORK_TIMEOUT = 5.0
NETWORK_CHECKS = ("listener", "daraja token")


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``fix`` says what to do when it failed (None when it passed)."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def json(self) -> dict[str, Any]:
        return asdict(self)


def _where_secrets_go(settings: Settings) -> str:
    if settings.dotenv_path is not None:
        return str(settings.dotenv_path)
    if settings.config_path is not None:
        return str(settings.config_path.parent / ".env")
    return ".env"


def _shown_ids(ids: list[int], limit: int = 10) -> str:
    shown = " ".join(str(i) for i in ids[:limit])
    return shown + (" …" if len(ids) > limit else "")


def _public_https(url: str) -> str | None:
    """Why ``url`` cannot be reached by Daraja or a phone on the internet, or None."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        return "is not https"
    host = (parts.hostname or "").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
            return f"names a host only this network knows ({host})"
        if "." not in host:
            return f"names a host that is not a public name ({host})"
        if host.endswith((".invalid", ".example", ".test")) or host.startswith("example."):
            return f"names an example host ({host})"
        return None
    if not address.is_global:
        return f"names an address the internet cannot reach ({host})"
    return None


# -- the checks ---------------------------------------------------------------------------


def check_office(
    settings: Settings, open_db: Callable[[], Database]
) -> tuple[Check, Database | None]:
    """The office and its database: found, there, and at the newest schema (never made or
    upgraded here). The database comes back when the checks that read it may run."""
    fix_office = "run `sfcrm init` in the office folder, or cd to it (or set SFCRM_CONFIG)"
    if not settings.office:
        detail = (
            "no sfcrm.toml in this folder or its parents, none named by SFCRM_CONFIG or in "
            "~/.config/sfcrm, and no SFCRM_DATABASE_URL"
        )
        return Check("office", False, detail, fix_office), None
    where = (
        f"{settings.config_path} ({CONFIG_FOUND_BY[settings.found_by or '--config']})"
        if settings.config_path
        else "no sfcrm.toml (SFCRM_DATABASE_URL names the database)"
    )
    try:
        db = open_db()
        if db.dialect == "sqlite" and not db.path.exists():
            return Check(
                "office",
                False,
                f"{where}; no database at {db.where} yet",
                "run `sfcrm init` (or `sfcrm db upgrade`) in the office folder",
            ), None
        state = db.schema()
    except SfcrmError as exc:
        return Check(
            "office",
            False,
            f"{where}; the database cannot be read: {exc}",
            exc.hint or "check SFCRM_DATABASE_URL",
        ), None
    if not state.current:
        return Check(
            "office",
            False,
            f"{where}; the database {db.where} is at schema {state.revision}, not {state.head}",
            "run `sfcrm db upgrade` (or upgrade sfcrm, when the database is the newer)",
        ), None
    return Check("office", True, f"{where}; database {db.where}"), db


def check_daraja_keys(settings: Settings) -> Check:
    names = ["mpesa_consumer_key", "mpesa_consumer_secret", "mpesa_pass_key"]
    names.append("mpesa_business_short_code")
    if settings.mpesa_transaction_type == "CustomerBuyGoodsOnline":
        names.append("mpesa_till_number")
    from sfcrm.config import SPECS_BY_NAME

    missing = [SPECS_BY_NAME[n].env for n in names if not settings.values.get(n)]
    if missing:
        return Check(
            "daraja keys",
            False,
            f"{', '.join(missing)} not set",
            f"set {', '.join(missing)} in {_where_secrets_go(settings)} (the keys of your app "
            "on developer.safaricom.co.ke; the passkey Safaricom gave for your shortcode)",
        )
    environment = settings.mpesa_environment
    shortcode = str(settings.mpesa_business_short_code)
    if environment == "production" and shortcode == "174379":
        return Check(
            "daraja keys",
            False,
            "MPESA_ENVIRONMENT is production with the sandbox shortcode 174379",
            "set MPESA_BUSINESS_SHORT_CODE to your own PayBill (or store number)",
        )
    test_money = " (test money only)" if environment == "sandbox" else ""
    return Check("daraja keys", True, f"set, for {environment}{test_money}, shortcode {shortcode}")


def check_callback_url(settings: Settings) -> Check:
    url = settings.mpesa_callback_url
    recipe = f"https://<your host>/cb/<output of: {SECRET_RECIPE}>"
    if not url:
        return Check(
            "callback url",
            False,
            "MPESA_CALLBACK_URL is not set",
            f"set MPESA_CALLBACK_URL in {_where_secrets_go(settings)} to {recipe}",
        )
    shown = settings.shown("mpesa_callback_url")
    problem = _public_https(str(url))
    if problem:
        return Check(
            "callback url",
            False,
            f"{shown} {problem}",
            "give the public https address of your reverse proxy or tunnel in front of "
            f"`sfcrm serve-callback`: {recipe}",
        )
    lowered = str(url).lower()
    words = [word for word in CALLBACK_URL_WORDS if word in lowered]
    if words:
        return Check(
            "callback url",
            False,
            f"{shown} holds {', '.join(repr(w) for w in words)}, which Daraja rejects in "
            "callback URLs",
            f"choose a URL without {', '.join(CALLBACK_URL_WORDS)}: {recipe}",
        )
    if callback_secret_guessable(settings.callback_path or "/"):
        return Check(
            "callback url",
            False,
            f"{shown}: its path holds no long secret, so anyone could post a fake payment",
            f"end the path with a long random secret: {recipe}",
        )
    return Check("callback url", True, f"{shown}: public https with a long secret path")


def check_rsvp(settings: Settings) -> Check:
    problems: list[str] = []
    fixes: list[str] = []
    public = settings.public_url
    if not public:
        problems.append("SFCRM_PUBLIC_URL is not set (invitations go out without RSVP links)")
        fixes.append("set SFCRM_PUBLIC_URL to the public https address of serve-callback")
    else:
        problem = _public_https(str(public))
        if problem:
            problems.append(f"SFCRM_PUBLIC_URL {problem}")
            fixes.append("set SFCRM_PUBLIC_URL to the public https address crew phones can open")
    key = settings.secret_key or ""
    if len(key) < MIN_SECRET_KEY_LENGTH:
        problems.append(
            "SFCRM_SECRET_KEY is not set"
            if not key
            else f"SFCRM_SECRET_KEY is {len(key)} characters, under {MIN_SECRET_KEY_LENGTH}"
        )
        fixes.append(
            f"set SFCRM_SECRET_KEY in {_where_secrets_go(settings)} to the output of: "
            f"{SECRET_RECIPE}"
        )
    if problems:
        return Check("rsvp", False, "; ".join(problems), "; ".join(fixes))
    return Check("rsvp", True, f"links to {public}, signed with a long key")


def check_smtp(settings: Settings) -> Check:
    from sfcrm.mail.settings import backend_kind

    try:
        kind = backend_kind(settings)
    except SfcrmError as exc:
        return Check("smtp", False, str(exc), exc.hint)
    fill_in = "EMAIL_HOST, EMAIL_PORT, EMAIL_USE_TLS, EMAIL_HOST_USER and EMAIL_HOST_PASSWORD"
    if kind != "smtp":
        where = "the terminal" if kind == "console" else "files in the outbox"
        return Check(
            "smtp",
            False,
            f"EMAIL_BACKEND is {kind}: emails go to {where}, not to crew",
            f"set EMAIL_BACKEND=smtp and {fill_in} in {_where_secrets_go(settings)}",
        )
    host = str(settings.email_host or "")
    user, password = settings.email_host_user, settings.email_host_password
    local = host in ("localhost", "127.0.0.1", "::1")
    if bool(user) != bool(password):
        missing = "EMAIL_HOST_PASSWORD" if user else "EMAIL_HOST_USER"
        return Check(
            "smtp",
            False,
            f"{missing} is not set (a login needs both)",
            f"set {missing} in {_where_secrets_go(settings)}",
        )
    if not user and not local:
        return Check(
            "smtp",
            False,
            f"no SMTP login for {host} (most servers refuse mail without)",
            f"set EMAIL_HOST_USER and EMAIL_HOST_PASSWORD in {_where_secrets_go(settings)}",
        )
    if user and not local and not (settings.email_use_tls or settings.email_use_ssl):
        return Check(
            "smtp",
            False,
            f"the login to {host} would cross the network unencrypted",
            "set EMAIL_USE_TLS=true (port 587) or EMAIL_USE_SSL=true (port 465)",
        )
    sender = str(settings.default_from_email or "")
    if sender.rstrip(">").lower().endswith(".invalid"):
        return Check(
            "smtp",
            False,
            f"DEFAULT_FROM_EMAIL is {sender}, which no server delivers from",
            "set DEFAULT_FROM_EMAIL to the office's own address",
        )
    login = f" as {user}" if user else ""
    return Check("smtp", True, f"{host}:{settings.email_port}{login}")


def check_listener(
    settings: Settings, host: str, port: int, session: requests.Session, timeout: float
) -> Check:
    """Asks the listener, with a GET that changes nothing: on the callback path it answers 405
    (POST only); anywhere else 404."""
    import requests

    path = settings.callback_path or "/"
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    start = f"start `sfcrm serve-callback --port {port}` and keep it running (see the README)"
    try:
        answer = session.get(f"http://{address}{path}", timeout=timeout, allow_redirects=False)
    except requests.RequestException:
        return Check("listener", False, f"nothing answers on {address}", start)
    if answer.status_code == 405 and "POST" in answer.headers.get("Allow", ""):
        return Check("listener", True, f"answers on {address}, on the path of MPESA_CALLBACK_URL")
    if answer.status_code == 404 and settings.callback_path:
        return Check(
            "listener",
            False,
            f"{address} answers, but not on the path of MPESA_CALLBACK_URL",
            "restart serve-callback after changing MPESA_CALLBACK_URL (or another "
            "program holds the port: pass --port)",
        )
    if answer.status_code == 404:
        return Check(
            "listener",
            False,
            f"{address} answers, but MPESA_CALLBACK_URL is not set to say its path",
            "set MPESA_CALLBACK_URL (see the callback url check)",
        )
    return Check(
        "listener",
        False,
        f"{address} answers HTTP {answer.status_code}: not sfcrm's listener",
        f"check what listens there; {start}",
    )


def check_daraja_token(
    settings: Settings,
    db: Database | None,
    session: requests.Session,
    timeout: float,
    clock: Callable[[], datetime],
) -> Check:
    """Fetches a new token (kept in the office's token cache, which every sfcrm process reads,
    so the one it replaces is not missed)."""
    from sfcrm.daraja import DarajaClient, token_cache_key

    keys = ("mpesa_consumer_key", "mpesa_consumer_secret")
    if not all(settings.values.get(name) for name in keys):
        return Check(
            "daraja token",
            False,
            "not tried: the consumer key or secret is not set",
            "see the daraja keys check",
        )
    cache = None
    if db is not None:
        from sfcrm.payments.client import DatabaseTokenCache

        cache = DatabaseTokenCache(db)
    client = DarajaClient(
        settings.daraja_base_url,
        settings.mpesa_consumer_key,
        settings.mpesa_consumer_secret,
        str(settings.mpesa_business_short_code or ""),
        settings.mpesa_pass_key or "",
        session=session,
        timeout=min(float(settings.mpesa_timeout), timeout),
        clock=clock,
        token_cache=cache,
    )
    try:
        cached = (
            cache.load(token_cache_key(client.base_url, settings.mpesa_consumer_key))
            if cache
            else None
        )
        client.token(replacing=cached[0] if cached else None)
    except DarajaError as exc:
        return Check(
            "daraja token",
            False,
            f"{settings.daraja_base_url}: {exc}",
            exc.hint or "check MPESA_CONSUMER_KEY, MPESA_CONSUMER_SECRET and MPESA_ENVIRONMENT",
        )
    return Check("daraja token", True, f"{settings.daraja_base_url} gave a token for these keys")


def check_pending_payments(db: Database, now: datetime) -> Check:
    from sqlmodel import col, select

    from sfcrm.models import MpesaPayment, PaymentStatus

    cutoff = now - STALE_AFTER
    with db.read() as session:
        ids = [
            i
            for i in session.exec(
                select(MpesaPayment.id)
                .where(col(MpesaPayment.status).in_(PaymentStatus.OPEN))
                .where(col(MpesaPayment.last_pushed_at) <= cutoff)
                .order_by(col(MpesaPayment.id))
            ).all()
            if i is not None
        ]
    minutes = int(STALE_AFTER.total_seconds() // 60)
    if ids:
        return Check(
            "pending payments",
            False,
            f"{len(ids)} open for more than {plural(minutes, 'minute')}: {_shown_ids(ids)}",
            "run `sfcrm mpesa reconcile` (and from cron every few minutes, see the "
            "README); it names what it cannot settle",
        )
    return Check("pending payments", True, f"none open for more than {plural(minutes, 'minute')}")


def check_unsent_emails(db: Database) -> Check:
    from sqlmodel import col, select

    from sfcrm.models import EmailNotification

    with db.read() as session:
        rows = session.exec(
            select(EmailNotification.id, EmailNotification.permanent_failure)
            .where(col(EmailNotification.is_sent).is_(False))
            .where(col(EmailNotification.superseded_at).is_(None))  # never to be sent
            .order_by(col(EmailNotification.id))
        ).all()
    if not rows:
        return Check("unsent emails", True, "every email written has been sent")
    ids = [int(i) for i, _ in rows if i is not None]
    refused = sum(1 for _, permanent in rows if permanent)
    detail = f"{len(ids)} not sent: {_shown_ids(ids)}"
    if refused:
        detail += f" ({refused} refused permanently)"
    return Check(
        "unsent emails",
        False,
        detail,
        "`sfcrm mail list` shows why; `sfcrm mail retry` sends them (a permanent "
        "refusal only when named by id, once the address is fixed)",
    )


def run_checks(
    settings: Settings,
    open_db: Callable[[], Database],
    *,
    clock: Callable[[], datetime],
    offline: bool = False,
    listener_host: str = "127.0.0.1",
    listener_port: int = 8000,
    timeout: float = NETWORK_TIMEOUT,
) -> list[Check]:
    """Every check, in the order an office sets things up; ``offline`` leaves out the ones
    that use the network (NETWORK_CHECKS)."""
    office, db = check_office(settings, open_db)
    checks = [
        office,
        check_daraja_keys(settings),
        check_callback_url(settings),
        check_rsvp(settings),
        check_smtp(settings),
    ]
    if not offline:
        import requests

        # The listener is asked directly, never through a proxy the environment names;
        # Daraja the way the office's client reaches it (HTTPS_PROXY included).
        local, http = requests.Session(), requests.Session()
        local.trust_env = False
        try:
            checks.append(check_listener(settings, listener_host, listener_port, local, timeout))
            checks.append(check_daraja_token(settings, db, http, timeout, clock))
        finally:
            local.close()
            http.close()
    if db is not None:
        checks.append(check_pending_payments(db, clock()))
        checks.append(check_unsent_emails(db))
    return checks
