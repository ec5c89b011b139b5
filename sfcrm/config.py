"""Settings: where each one comes from, its default, and which ones are secret.

Precedence, highest first: command-line flag > process environment > ``.env`` (beside the
office's ``sfcrm.toml``) > ``sfcrm.toml`` > built-in default. Secrets are read from the
environment or ``.env`` only; a secret found in ``sfcrm.toml`` is an error, so it cannot sit in a
file that gets shared.

The office is found, never made by accident: ``--config FILE``, else ``sfcrm.toml`` in the
current folder or the nearest parent that has one (as git finds ``.git``), else the file
``SFCRM_CONFIG`` names, else ``$XDG_CONFIG_HOME/sfcrm/sfcrm.toml`` (``~/.config/sfcrm/``). With
none of them and no ``SFCRM_DATABASE_URL``, asking for the database is a ConfigError: no empty
``sfcrm.db`` appears wherever a command happened to run.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from sfcrm.errors import ConfigError

Kind = Literal["str", "int", "float", "bool", "list", "path"]

SANDBOX_URL = "https://sandbox.safaricom.co.ke"
PRODUCTION_URL = "https://api.safaricom.co.ke"

# Source addresses most published lists agree Daraja calls back from (see the README).
SAFARICOM_CALLBACK_ADDRESSES = (
    "196.201.214.200",
    "196.201.214.206",
    "196.201.213.114",
    "196.201.214.207",
    "196.201.214.208",
    "196.201.213.44",
    "196.201.212.127",
    "196.201.212.138",
    "196.201.212.129",
    "196.201.212.136",
    "196.201.212.74",
    "196.201.212.69",
)


@dataclass(frozen=True)
class Spec:
    """One setting: its attribute, environment variable, TOML key and default."""

    name: str
    env: str
    toml: str | None
    default: str | None
    kind: Kind = "str"
    secret: bool = False
    help: str = ""
    low: float | None = None  # bounds of an int or float setting, both included
    high: float | None = None


SPECS: tuple[Spec, ...] = (
    Spec("mpesa_consumer_key", "MPESA_CONSUMER_KEY", None, None, secret=True,
         help="Daraja app consumer key"),
    Spec("mpesa_consumer_secret", "MPESA_CONSUMER_SECRET", None, None, secret=True,
         help="Daraja app consumer secret"),
    Spec("mpesa_business_short_code", "MPESA_BUSINESS_SHORT_CODE", "mpesa.business_short_code",
         None, help="PayBill number, or the store number of a till (sandbox 174379)"),
    Spec("mpesa_pass_key", "MPESA_PASS_KEY", None, None, secret=True,
         help="Lipa na M-Pesa Online passkey"),
    Spec("mpesa_initiator_name", "MPESA_INITIATOR_NAME", "mpesa.initiator_name", None,
         help="API operator name (kept for the old .env; STK Push does not use it)"),
    Spec("mpesa_initiator_password", "MPESA_INITIATOR_PASSWORD", None, None, secret=True,
         help="API operator password (kept for the old .env; STK Push does not use it)"),
    Spec("mpesa_environment", "MPESA_ENVIRONMENT", "mpesa.environment", "sandbox",
         help="sandbox or production: chooses the Daraja host"),
    Spec("mpesa_base_url", "MPESA_BASE_URL", "mpesa.base_url", None,
         help="Daraja host, overriding MPESA_ENVIRONMENT (the emulator, tests)"),
    Spec("mpesa_callback_url", "MPESA_CALLBACK_URL", None, None, secret=True,
         help="public URL Daraja posts results to; its path holds a secret"),
    Spec("mpesa_transaction_type", "MPESA_TRANSACTION_TYPE", "mpesa.transaction_type",
         "CustomerPayBillOnline", help="CustomerPayBillOnline or CustomerBuyGoodsOnline"),
    Spec("mpesa_till_number", "MPESA_TILL_NUMBER", "mpesa.till_number", None,
         help="till number (PartyB) for CustomerBuyGoodsOnline"),
    Spec("mpesa_timeout", "MPESA_TIMEOUT", "mpesa.timeout", "30", kind="float", high=600,
         help="seconds to wait for any Daraja answer (more than 0, at most 600)"),
    Spec("mpesa_confirm_by_query", "MPESA_CONFIRM_BY_QUERY", "mpesa.confirm_by_query", "false",
         kind="bool", help="confirm every 'paid' callback with an STK Push Query first"),
    Spec("database_url", "SFCRM_DATABASE_URL", "database.url", None, kind="path",
         help="SQLite file (path or sqlite:///path), or postgresql+psycopg://user:password@host"
         "/db (its password from the environment or .env only); default sfcrm.db beside the "
         "config"),
    Spec("timezone", "SFCRM_TIMEZONE", "timezone", "Africa/Nairobi",
         help="wall-clock time zone for dates shown and typed"),
    Spec("log_file", "SFCRM_LOG_FILE", "logging.file", None, kind="path",
         help="append one line per payment, callback and email to this file"),
    Spec("templates_dir", "SFCRM_TEMPLATES_DIR", "templates_dir", None, kind="path",
         help="folder of templates overriding the built-in ones"),
    Spec("listener_allowlist", "SFCRM_CALLBACK_ALLOWLIST", "listener.allowlist", None,
         kind="list", help="source addresses trusted for callbacks ('safaricom' = the list)"),
    Spec("listener_trusted_proxies", "SFCRM_TRUSTED_PROXIES", "listener.trusted_proxies", None,
         kind="list", help="proxy addresses whose X-Forwarded-For is believed"),
    Spec("listener_max_body", "SFCRM_CALLBACK_MAX_BODY", "listener.max_body", "65536",
         kind="int", low=1, high=2**30, help="largest callback body accepted, in bytes"),
    Spec("listener_threads", "SFCRM_LISTENER_THREADS", "listener.threads", "1", kind="int",
         low=1, high=100,
         help="worker threads of serve-callback (writes take turns; more threads only contend)"),
    Spec("listener_request_timeout", "SFCRM_LISTENER_REQUEST_TIMEOUT",
         "listener.request_timeout", "10", kind="float", low=1, high=300,
         help="seconds a client has to send a whole request, from connecting or from the "
         "previous answer"),
    Spec("listener_connections_per_address", "SFCRM_LISTENER_CONNECTIONS_PER_ADDRESS",
         "listener.connections_per_address", "32", kind="int", low=0, high=100_000,
         help="open connections one address may hold (0: no cap); 127.0.0.1, trusted proxies "
         "and the allowlist are not capped"),
    Spec("listener_max_connections", "SFCRM_LISTENER_MAX_CONNECTIONS",
         "listener.max_connections", "4000", kind="int", low=1, high=100_000,
         help="open connections in all"),
    Spec("email_backend", "EMAIL_BACKEND", "email.backend", None,
         help="smtp, console or file (Django names accepted)"),
    Spec("email_host", "EMAIL_HOST", "email.host", "localhost", help="SMTP server"),
    Spec("email_port", "EMAIL_PORT", "email.port", "25", kind="int", low=1, high=65535,
         help="SMTP port"),
    Spec("email_use_tls", "EMAIL_USE_TLS", "email.use_tls", "false", kind="bool",
         help="STARTTLS after connecting"),
    Spec("email_use_ssl", "EMAIL_USE_SSL", "email.use_ssl", "false", kind="bool",
         help="TLS from the first byte (port 465)"),
    Spec("email_host_user", "EMAIL_HOST_USER", "email.host_user", None,
         help="SMTP login; none means no login"),
    Spec("email_host_password", "EMAIL_HOST_PASSWORD", None, None, secret=True,
         help="SMTP password"),
    Spec("email_file_path", "EMAIL_FILE_PATH", "email.file_path", None, kind="path",
         help="folder of the file backend (default: outbox/ beside the database)"),
    Spec("default_from_email", "DEFAULT_FROM_EMAIL", "email.default_from",
         "Sound Fusion <noreply@soundfusion.invalid>", help="From: of every email"),
    Spec("public_url", "SFCRM_PUBLIC_URL", "public_url", None,
         help="address where serve-callback is reachable (crew RSVP links and pages)"),
    Spec("secret_key", "SFCRM_SECRET_KEY", None, None, secret=True,
         help="signs crew RSVP links and each crew member's page link"),
    Spec("show_crew_phones", "SFCRM_SHOW_CREW_PHONES", "crew.show_phones", "false",
         kind="bool", help="show crew each other's phones on their own pages' rosters"),
    Spec("listener_page_rate", "SFCRM_LISTENER_PAGE_RATE", "listener.page_rate", "60",
         kind="int", low=1, high=100_000,
         help="crew page and RSVP requests one address may make a minute"),
    Spec("org_name", "SFCRM_ORG_NAME", "org.name", "Sound Fusion", help="company name"),
    Spec("org_phone", "SFCRM_ORG_PHONE", "org.phone", None, help="office contact phone"),
    Spec("org_email", "SFCRM_ORG_EMAIL", "org.email", None, help="office contact email"),
)  # fmt: skip

SPECS_BY_NAME = {spec.name: spec for spec in SPECS}
SECRET_MASK = "********"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Setting:
    spec: Spec
    raw: str | None
    source: str  # "flag", "environment", ".env", "sfcrm.toml", "default"


@dataclass(frozen=True)
class Settings:
    """Effective settings. Values are typed; ``repr`` never shows a secret."""

    values: Mapping[str, Any] = field(repr=False)
    sources: Mapping[str, str]
    config_path: Path | None
    base_dir: Path
    dotenv_path: Path | None = None  # the .env read, when there was one
    found_by: str | None = None  # how config_path was found: see CONFIG_FOUND_BY
    # what is wrong but harmless, for stderr: keys of sfcrm.toml that mean nothing to sfcrm
    warnings: tuple[str, ...] = ()

    @property
    def office(self) -> bool:
        """An office was found: an sfcrm.toml, or a database named by SFCRM_DATABASE_URL."""
        return self.config_path is not None or self.values.get("database_url") is not None

    def require_office(self) -> None:
        """Refuse, rather than make an empty sfcrm.db wherever the command ran."""
        if not self.office:
            raise NoOfficeError()

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def require(self, *names: str) -> None:
        """Raise ConfigError naming the first missing setting's variable."""
        for name in names:
            if self.values.get(name) in (None, ""):
                spec = SPECS_BY_NAME[name]
                where = "the environment or .env" if spec.secret else f"{spec.env} or sfcrm.toml"
                raise ConfigError(
                    f"{spec.env} is not set",
                    hint=f"set {spec.env} in {where}; see `sfcrm config show`",
                )

    def secret_values(self) -> list[str]:
        """Every secret string in force, for redaction of output and logs."""
        out: list[str] = []
        for spec in SPECS:
            value = self.values.get(spec.name)
            if spec.secret and isinstance(value, str) and value:
                out.append(value)
        callback = self.values.get("mpesa_callback_url")
        if isinstance(callback, str) and callback:
            path = urlsplit(callback).path.strip("/")
            if path:
                out.append(path)
        database = self.values.get("database_url")
        if isinstance(database, str):
            out.extend(url_passwords(database))
        return out

    @property
    def daraja_base_url(self) -> str:
        base = self.values.get("mpesa_base_url")
        if base:
            return str(base).rstrip("/")
        return PRODUCTION_URL if self.values["mpesa_environment"] == "production" else SANDBOX_URL

    @property
    def database(self) -> Path | str:
        """What the database is opened from: the SQLite file, or the PostgreSQL URL (its
        password included: show ``database_shown`` instead). No office: a NoOfficeError."""
        value = self.values.get("database_url")
        return value if isinstance(value, str) else self.database_path

    @property
    def database_path(self) -> Path:
        """The SQLite file. A PostgreSQL database has none: this is then where the default file
        would be, and what sfcrm keeps beside its database (the outbox) goes beside it."""
        self.require_office()
        value = self.values.get("database_url")
        return value if isinstance(value, Path) else self.base_dir / "sfcrm.db"

    @property
    def database_shown(self) -> str:
        """The database, fit to print: the file, or the URL with its password masked."""
        if not self.office:
            return "none (no sfcrm office here)"
        value = self.values.get("database_url")
        return shown_url(value) if isinstance(value, str) else str(self.database_path)

    @property
    def callback_path(self) -> str | None:
        """The path of MPESA_CALLBACK_URL, which is all the listener serves for Daraja."""
        url = self.values.get("mpesa_callback_url")
        if not url:
            return None
        return urlsplit(str(url)).path or "/"

    def shown(self, name: str) -> str:
        """A value fit to print: secrets masked, the callback URL's path hidden."""
        spec = SPECS_BY_NAME[name]
        value = self.values.get(name)
        if value is None or value == "":
            return ""
        if name == "mpesa_callback_url":
            parts = urlsplit(str(value))
            return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/{SECRET_MASK}"
        if name == "database_url":
            return self.database_shown
        if spec.secret:
            return SECRET_MASK
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


# Words Safaricom rejects some callback URLs for holding (see the README's listener section).
CALLBACK_URL_WORDS = ("mpesa", "safaricom", "sql", "query", "exec", "cmd")
# The shortest last path segment of MPESA_CALLBACK_URL taken for a secret nobody guesses.
MIN_CALLBACK_SECRET_LENGTH = 16
MIN_SECRET_KEY_LENGTH = 32
SECRET_RECIPE = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def callback_secret_guessable(path: str) -> bool:
    """The callback path's last segment is too short to be a secret."""
    return len(path.rstrip("/").rsplit("/", 1)[-1]) < MIN_CALLBACK_SECRET_LENGTH


CONFIG_NAME = "sfcrm.toml"
NO_OFFICE = "no sfcrm office here — run `sfcrm init` or cd to the office folder"
# How the config file in force was found (``Settings.found_by``), in the order looked, and
# how that reads in a message.
CONFIG_FOUND_BY = {
    "--config": "given by --config",
    "folder": "found in this folder or a parent",
    "SFCRM_CONFIG": "named by SFCRM_CONFIG",
    "user config": "the user's own",
}


class NoOfficeError(ConfigError):
    """No sfcrm.toml was found and no SFCRM_DATABASE_URL is set: there is no database to use."""

    code = "NO_OFFICE"

    def __init__(self) -> None:
        super().__init__(
            NO_OFFICE,
            hint=f"sfcrm looks for {CONFIG_NAME} in this folder and its parents, then the file "
            "SFCRM_CONFIG names, then ~/.config/sfcrm/sfcrm.toml; or set SFCRM_DATABASE_URL",
        )


def user_config_file(environ: Mapping[str, str]) -> Path | None:
    """``$XDG_CONFIG_HOME/sfcrm/sfcrm.toml``, else ``~/.config/sfcrm/sfcrm.toml`` (the XDG
    rule: a relative XDG_CONFIG_HOME is ignored); None for a user without a home folder."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "sfcrm" / CONFIG_NAME
    try:
        home = environ.get("HOME") or str(Path.home())
    except RuntimeError:  # no HOME and no password entry (a bare container)
        return None
    return Path(home) / ".config" / "sfcrm" / CONFIG_NAME


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a folder on the way this user may not look into
        return False


def find_config_file(
    explicit: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    cwd: Path | None = None,
) -> tuple[Path, str] | None:
    """The office's sfcrm.toml and how it was found, or None.

    ``--config FILE``; else ``sfcrm.toml`` in ``cwd`` or the nearest parent holding one; else
    the file SFCRM_CONFIG names; else the user's own (see :func:`user_config_file`).
    """
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError("config file not found", value=str(path))
        return path, "--config"
    here = (cwd or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_NAME
        if _is_file(candidate):
            # (one in the current folder is shown as "sfcrm.toml", as it always was)
            return (Path(CONFIG_NAME) if cwd is None and folder == here else candidate), "folder"
    if environ.get("SFCRM_CONFIG"):
        path = Path(environ["SFCRM_CONFIG"])
        if not path.is_file():
            raise ConfigError("config file named by SFCRM_CONFIG not found", value=str(path))
        return path, "SFCRM_CONFIG"
    user = user_config_file(environ)
    return (user, "user config") if user is not None and _is_file(user) else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("the config file is not UTF-8 text", value=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _read_dotenv(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # Notepad starts UTF-8 with a BOM
    except UnicodeDecodeError:
        raise ConfigError("the .env file is not UTF-8 text", value=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the .env file: {exc.strerror}", value=str(path)) from None
    import io

    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def _toml_lookup(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _check_toml_has_no_secrets(data: Mapping[str, Any], path: Path) -> None:
    secret_keys = {
        "consumer_key", "consumer_secret", "pass_key", "passkey", "initiator_password",
        "callback_url", "password", "host_password", "secret_key",
    }  # fmt: skip
    secret_keys |= {spec.env.lower() for spec in SPECS if spec.secret}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif key.lower() in secret_keys:
                raise ConfigError(
                    f"{path} holds a secret ({prefix}{key})",
                    hint="remove it from the file and set it in the environment or .env",
                )

    walk(data, "")
    database = _toml_lookup(data, "database.url")
    if isinstance(database, str) and url_passwords(database):
        raise ConfigError(
            f"{path} holds a secret (the password in database.url)",
            hint="set SFCRM_DATABASE_URL, password and all, in the environment or .env; "
            "sfcrm.toml may name the database without a password",
        )


def unknown_toml_keys(data: Mapping[str, Any], path: Path) -> list[str]:
    """A warning for each key and section of sfcrm.toml that no setting reads (a typo keeps
    the default silently otherwise), naming the nearest known key when one is close."""
    import difflib

    known = {spec.toml for spec in SPECS if spec.toml}
    sections = {key.split(".")[0] for key in known if "." in key}
    found: list[str] = []

    def nearest(name: str, choices: set[str], shown: str = "{}") -> str:
        leaf = name.rsplit(".", 1)[-1]
        same_leaf = sorted(c for c in choices if c.rsplit(".", 1)[-1] == leaf)
        close = same_leaf or difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.75)
        return f" (did you mean {shown.format(close[0])}?)" if close else ""

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in known:
                continue
            if isinstance(value, Mapping) and dotted in sections:
                walk(value, f"{dotted}.")
            elif isinstance(value, Mapping) and not prefix:
                hint = nearest(dotted, sections, "[{}]")
                found.append(f"{path.name}: unknown section [{dotted}], ignored{hint}")
            else:
                found.append(f"{path.name}: unknown key {dotted}, ignored{nearest(dotted, known)}")

    walk(data, "")
    return found


_WHOLE = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")


def _convert(spec: Spec, raw: str, base: Path) -> Any:
    if spec.kind == "str":
        return raw
    if spec.kind in ("int", "float"):
        return _number(spec, raw)
    if spec.kind == "bool":
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{spec.env} must be true or false", value=raw)
    if spec.kind == "list":
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if spec.name == "database_url":
        url = postgres_url(raw)
        return url if url is not None else _path(spec, database_file(raw), base)
    return _path(spec, raw, base)


def _path(spec: Spec, text: str, base: Path) -> Path:
    """A path setting; relative paths from sfcrm.toml are relative to that file."""
    if "\x00" in text:
        raise ConfigError(f"{spec.env} holds a NUL character", value=repr(text))
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user of a user this machine does not know
        raise ConfigError(f"{spec.env} starts with an unknown home folder", value=text) from None
    return path if path.is_absolute() else base / path


def _number(spec: Spec, raw: str) -> int | float:
    """Digits only (no 1e3, 1_000, nan or inf), within the spec's bounds."""
    text = raw.strip()
    whole = spec.kind == "int"
    if not (_WHOLE if whole else _DECIMAL).fullmatch(text):
        what = "a whole number" if whole else "a number (digits, like 30 or 2.5)"
        raise ConfigError(f"{spec.env} must be {what}", value=raw)
    # (int() of thousands of digits is refused by Python itself; no bound is that long)
    value: int | float = math.inf if len(text) > 30 else int(text) if whole else float(text)
    low = -math.inf if spec.low is None else spec.low
    high = math.inf if spec.high is None else spec.high
    if not low <= value <= high:
        if spec.low is None:
            bounds = f"at most {spec.high:g}"
        elif spec.high is None:
            bounds = f"at least {spec.low:g}"
        else:
            bounds = f"from {spec.low:.0f} to {spec.high:.0f}"
        raise ConfigError(f"{spec.env} must be {bounds}", value=raw)
    return value


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# postgres:// is what many hosts hand out; every form is run on psycopg (3)
POSTGRES_SCHEMES = ("postgresql+psycopg", "postgresql", "postgres")


def postgres_url(raw: str) -> str | None:
    """The PostgreSQL URL SFCRM_DATABASE_URL names, as ``postgresql+psycopg://…``; None when
    it names a SQLite file."""
    text = raw.strip()
    match = _SCHEME.match(text)
    if match is None or match.group(1).lower() not in POSTGRES_SCHEMES:
        return None
    shown = shown_url(text)
    hint = "for example postgresql+psycopg://sfcrm:PASSWORD@127.0.0.1:5432/sfcrm"
    if not text.isprintable() or " " in text:
        raise ConfigError("SFCRM_DATABASE_URL must be a URL without spaces", value=shown,
                          hint=hint)  # fmt: skip
    try:
        parts = urlsplit(text)
        _ = parts.port
    except ValueError as exc:  # a port that is no number, an unclosed [
        raise ConfigError(f"SFCRM_DATABASE_URL is not a valid URL: {exc}", value=shown,
                          hint=hint) from None  # fmt: skip
    if not parts.path.strip("/"):
        raise ConfigError(
            "SFCRM_DATABASE_URL must name the database after the host", value=shown, hint=hint
        )
    return "postgresql+psycopg://" + text[match.end() :]


def url_passwords(url: str) -> list[str]:
    """The password in a database URL as written and as meant (percent-decoded), for
    redaction; none when the URL holds no password."""
    try:
        password = urlsplit(url.strip()).password
    except ValueError:
        return []
    if not password:
        return []
    return sorted({password, unquote(password)})


def database_file(raw: str) -> str:
    """The file SFCRM_DATABASE_URL names, parsed here once for every opener of the file.

    A path is taken as written (``%`` and ``?`` are letters of a file name). A
    ``sqlite:///path`` URL is URL-decoded as SQLAlchemy decodes it (``%20`` is a space);
    three slashes then a relative path, four for an absolute one.
    """
    match = _SCHEME.match(raw.strip())
    if match is None:
        return raw
    scheme = match.group(1).lower()
    if scheme not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(
            f"SFCRM_DATABASE_URL names a database sfcrm does not support ({scheme})",
            value=shown_url(raw),
            hint="give a SQLite file path, sqlite:///path or postgresql+psycopg://…",
        )
    rest = raw.strip()[match.end() :]
    if not rest.startswith("/"):
        raise ConfigError(
            "SFCRM_DATABASE_URL must be sqlite:///path (three slashes, then the file)",
            value=raw,
        )
    if "?" in rest or "#" in rest:
        raise ConfigError(
            "SFCRM_DATABASE_URL holds options sfcrm does not use ('?' or '#')",
            value=raw,
            hint="name only the file; write a '?' or '#' in its name as %3F or %23",
        )
    try:
        path = unquote(rest[1:], errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(
            "SFCRM_DATABASE_URL has a %-escape that is not UTF-8", value=raw
        ) from None
    if path in ("", ":memory:"):
        raise ConfigError(
            "SFCRM_DATABASE_URL must name a file (an in-memory database ends with the command)",
            value=raw,
        )
    return path


def shown_url(url: str) -> str:
    """A URL fit for an error message: any password in it masked."""
    try:
        parts = urlsplit(url.strip())
        if parts.password is None:
            return url
    except ValueError:  # unparsable: mask whatever stands before an @
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}{SECRET_MASK}@{rest.rpartition('@')[2]}" if "@" in rest else url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{SECRET_MASK}@{host}").geturl()


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    dotenv_path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    files: bool = True,
) -> Settings:
    """Build the effective settings from every source; nothing here touches the network.

    With ``files=False`` no sfcrm.toml and no .env is read: the settings are ``environ`` and
    the defaults alone (the demo's embedded ones, a test's).
    """
    env = dict(os.environ if environ is None else environ)
    found = find_config_file(config_path, env) if files else None
    path, found_by = found if found else (None, None)
    toml_data = _read_toml(path) if path else {}
    warnings: tuple[str, ...] = ()
    if path:
        _check_toml_has_no_secrets(toml_data, path)
        warnings = tuple(unknown_toml_keys(toml_data, path))
    dotenv: dict[str, str] = {}
    if dotenv_path is None:  # the office's .env: beside its sfcrm.toml, else here
        dotenv_path = path.parent / ".env" if path else Path(".env")
    dotenv_file = dotenv_path if files and dotenv_path.is_file() else None
    if dotenv_file:
        dotenv = _read_dotenv(dotenv_file)

    toml_base = path.parent.resolve() if path else Path.cwd()
    # A relative path is relative to the file that says it: sfcrm.toml's or .env's folder
    # (the office folder, wherever in it the command runs); from the environment, to here.
    dotenv_base = dotenv_file.parent.resolve() if dotenv_file else Path.cwd()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in SPECS:
        toml_value = _toml_lookup(toml_data, spec.toml) if spec.toml else None
        layers: tuple[tuple[str | None, str, Path], ...] = (
            (
                _as_text(overrides[spec.name])
                if overrides and overrides.get(spec.name) is not None
                else None,
                "flag",
                Path.cwd(),
            ),
            (env.get(spec.env), "environment", Path.cwd()),
            (dotenv.get(spec.env), ".env", dotenv_base),
            (None if toml_value is None else _as_text(toml_value), "sfcrm.toml", toml_base),
        )
        # The highest layer that sets it. An empty value ("MPESA_TIMEOUT=" in an old .env, a
        # blank line of .env.example) means "not set" there: the layers below it still count.
        raw, source, base = next(
            ((value, name, where) for value, name, where in layers if value and value.strip()),
            (spec.default, "default", Path.cwd()),
        )
        if raw is not None and not raw.isascii():
            try:
                raw.encode("utf-8")  # bytes that are not UTF-8 come in as lone surrogates
            except UnicodeEncodeError:
                raise ConfigError(f"{spec.env} is not UTF-8 text", hint=f"from {source}") from None
        values[spec.name] = None if raw is None or raw == "" else _convert(spec, raw, base)
        sources[spec.name] = source

    _validate(values)
    return Settings(
        values=values,
        sources=sources,
        config_path=path,
        base_dir=toml_base,
        dotenv_path=dotenv_file,
        found_by=found_by,
        warnings=warnings,
    )


def _validate(values: Mapping[str, Any]) -> None:
    if values["mpesa_environment"] not in ("sandbox", "production"):
        raise ConfigError(
            "MPESA_ENVIRONMENT must be sandbox or production", value=values["mpesa_environment"]
        )
    if values["mpesa_transaction_type"] not in ("CustomerPayBillOnline", "CustomerBuyGoodsOnline"):
        raise ConfigError(
            "MPESA_TRANSACTION_TYPE must be CustomerPayBillOnline or CustomerBuyGoodsOnline",
            value=values["mpesa_transaction_type"],
        )
    for name in ("mpesa_base_url", "mpesa_callback_url", "public_url"):
        if values.get(name):
            _check_url(SPECS_BY_NAME[name], str(values[name]))
    for name in ("listener_allowlist", "listener_trusted_proxies"):
        for item in values.get(name) or ():
            _check_network(SPECS_BY_NAME[name], item)
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(values["timezone"])
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file
        raise ConfigError(
            "SFCRM_TIMEZONE is not a known time zone", value=values["timezone"]
        ) from None
    if values["mpesa_timeout"] <= 0:
        raise ConfigError("MPESA_TIMEOUT must be more than 0", value=f"{values['mpesa_timeout']:g}")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _check_url(spec: Spec, url: str) -> None:
    """An http(s) URL whose host and port a client can use. The callback URL's path is a
    secret: its error shows no part of it."""
    shown = None if spec.secret else shown_url(url)
    example = {
        "mpesa_callback_url": "https://pay.example.co.ke/cb/<long random secret>",
        "mpesa_base_url": "http://127.0.0.1:8900 (the emulator); unset means MPESA_ENVIRONMENT's",
        "public_url": "https://pay.example.co.ke",
    }[spec.name]
    hint = f"for example {example}"
    if not url.isprintable() or " " in url:
        raise ConfigError(f"{spec.env} must be an http(s) URL without spaces", value=shown,
                          hint=hint)  # fmt: skip
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:  # an unclosed [ of an IPv6 address, a port that is no number
        raise ConfigError(f"{spec.env} is not a valid URL: {exc}", value=shown,
                          hint=hint) from None  # fmt: skip
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{spec.env} must be an http(s) URL", value=shown, hint=hint)
    if port == 0:
        raise ConfigError(f"{spec.env} has port 0, which no server listens on", value=shown)
    if not valid_host(host):
        raise ConfigError(f"{spec.env} has a host name that is not valid", value=shown,
                          hint=hint)  # fmt: skip


def valid_host(host: str) -> bool:
    """An IP address or a syntactically valid DNS name (not looked up)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.removesuffix(".").split(".")
    return len(ascii_host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _check_network(spec: Spec, item: str) -> None:
    if spec.name == "listener_allowlist" and item.lower() == "safaricom":
        return
    try:
        ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ConfigError(
            f"{spec.env} holds something that is not an address or network",
            value=item,
            hint="list addresses or CIDR networks, comma-separated: 10.0.0.0/8,127.0.0.1"
            + (", or 'safaricom'" if spec.name == "listener_allowlist" else ""),
        ) from None


def allowlist(settings: Settings) -> frozenset[str] | None:
    """The callback source allowlist, or None when it is off."""
    items: tuple[str, ...] = settings.values.get("listener_allowlist") or ()
    if not items:
        return None
    expanded: set[str] = set()
    for item in items:
        if item.lower() == "safaricom":
            expanded.update(SAFARICOM_CALLBACK_ADDRESSES)
        else:
            expanded.add(item)
    return frozenset(expanded)
