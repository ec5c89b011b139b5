"""Settings: precedence flag > environment > .env > sfcrm.toml > default, and secret handling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sfcrm.config import (
    PRODUCTION_URL,
    SANDBOX_URL,
    SECRET_MASK,
    SPECS,
    Settings,
    allowlist,
    load_settings,
)
from sfcrm.errors import ConfigError, ExitCode

CONSUMER_KEY = "ck-CANARY-7f3a9b"
CONSUMER_SECRET = "cs-CANARY-2d8e41"
PASS_KEY = "pk-CANARY-c0ffee"
SMTP_PASSWORD = "smtp-CANARY-pw"
SECRET_KEY = "sk-CANARY-rsvp"
CALLBACK_SECRET = "Zx81-CANARY-path"
CALLBACK_URL = f"https://pay.soundfusion.example/cb/{CALLBACK_SECRET}"

ALL_SECRETS_ENV = {
    "MPESA_CONSUMER_KEY": CONSUMER_KEY,
    "MPESA_CONSUMER_SECRET": CONSUMER_SECRET,
    "MPESA_PASS_KEY": PASS_KEY,
    "MPESA_INITIATOR_PASSWORD": "ip-CANARY-init",
    "MPESA_CALLBACK_URL": CALLBACK_URL,
    "EMAIL_HOST_PASSWORD": SMTP_PASSWORD,
    "SFCRM_SECRET_KEY": SECRET_KEY,
}

# Published Safaricom callback addresses, as listed in shared/daraja.md.
SAFARICOM_ADDRESSES = {
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
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, **kwargs: Any) -> Settings:
    """load_settings with an empty environment and no .env unless the test gives them."""
    kwargs.setdefault("environ", {})
    kwargs.setdefault("dotenv_path", tmp_path / "no.env")
    return load_settings(**kwargs)


# -- precedence ------------------------------------------------------------------------------

LAYERS = ("flag", "environment", ".env", "sfcrm.toml")


@pytest.mark.parametrize(
    ("present", "value", "source"),
    [
        (("flag", "environment", ".env", "sfcrm.toml"), "Flag Events", "flag"),
        (("flag", "sfcrm.toml"), "Flag Events", "flag"),
        (("flag",), "Flag Events", "flag"),
        (("environment", ".env", "sfcrm.toml"), "Env Events", "environment"),
        (("environment", "sfcrm.toml"), "Env Events", "environment"),
        (("environment",), "Env Events", "environment"),
        ((".env", "sfcrm.toml"), "Dotenv Events", ".env"),
        ((".env",), "Dotenv Events", ".env"),
        (("sfcrm.toml",), "Toml Events", "sfcrm.toml"),
        ((), "Sound Fusion", "default"),
    ],
)
def test_setting_comes_from_the_highest_source_present(
    tmp_path: Path, present: tuple[str, ...], value: str, source: str
) -> None:
    config = write(tmp_path / "sfcrm.toml", '[org]\nname = "Toml Events"\n')
    dotenv = write(tmp_path / "app.env", "SFCRM_ORG_NAME='Dotenv Events'\n")
    if "sfcrm.toml" not in present:
        config.write_text("", encoding="utf-8")
    if ".env" not in present:
        dotenv.write_text("", encoding="utf-8")

    settings = load_settings(
        config_path=config,
        environ={"SFCRM_ORG_NAME": "Env Events"} if "environment" in present else {},
        dotenv_path=dotenv,
        overrides={"org_name": "Flag Events"} if "flag" in present else None,
    )

    assert settings.org_name == value
    assert settings.sources["org_name"] == source


@pytest.mark.parametrize(
    ("present", "value", "source"),
    [
        (("flag", "environment", ".env", "sfcrm.toml"), 5.0, "flag"),
        (("environment", ".env", "sfcrm.toml"), 12.5, "environment"),
        ((".env", "sfcrm.toml"), 45.0, ".env"),
        (("sfcrm.toml",), 20.0, "sfcrm.toml"),
        ((), 30.0, "default"),
    ],
)
def test_typed_setting_is_converted_whatever_its_source(
    tmp_path: Path, present: tuple[str, ...], value: float, source: str
) -> None:
    toml = "[mpesa]\ntimeout = 20\n" if "sfcrm.toml" in present else ""
    config = write(tmp_path / "sfcrm.toml", toml)
    dotenv = write(tmp_path / "app.env", "MPESA_TIMEOUT=45\n" if ".env" in present else "")

    settings = load_settings(
        config_path=config,
        environ={"MPESA_TIMEOUT": "12.5"} if "environment" in present else {},
        dotenv_path=dotenv,
        overrides={"mpesa_timeout": 5} if "flag" in present else None,
    )

    assert settings.mpesa_timeout == value
    assert isinstance(settings.mpesa_timeout, float)
    assert settings.sources["mpesa_timeout"] == source


def test_false_flag_overrides_true_environment(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        environ={"MPESA_CONFIRM_BY_QUERY": "true"},
        overrides={"mpesa_confirm_by_query": False},
    )

    assert settings.mpesa_confirm_by_query is False
    assert settings.sources["mpesa_confirm_by_query"] == "flag"


def test_flag_set_to_none_means_not_given(tmp_path: Path) -> None:
    settings = load(
        tmp_path, environ={"SFCRM_ORG_NAME": "Env Events"}, overrides={"org_name": None}
    )

    assert settings.org_name == "Env Events"
    assert settings.sources["org_name"] == "environment"


def test_toml_booleans_and_lists_are_read(tmp_path: Path) -> None:
    config = write(
        tmp_path / "sfcrm.toml",
        '[mpesa]\nconfirm_by_query = true\n[listener]\nallowlist = ["10.0.0.1", "10.0.0.2"]\n',
    )

    settings = load(tmp_path, config_path=config)

    assert settings.mpesa_confirm_by_query is True
    assert settings.listener_allowlist == ("10.0.0.1", "10.0.0.2")


def test_dotenv_in_the_current_directory_is_read_without_touching_os_environ(
    tmp_path: Path,
) -> None:
    write(tmp_path / ".env", f"MPESA_PASS_KEY={PASS_KEY}\nSFCRM_ORG_NAME=Dotenv Events\n")

    settings = load_settings(environ={})

    assert settings.mpesa_pass_key == PASS_KEY
    assert settings.sources["mpesa_pass_key"] == ".env"
    assert "MPESA_PASS_KEY" not in os.environ
    assert "SFCRM_ORG_NAME" not in os.environ


def test_process_environment_is_used_when_none_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFCRM_ORG_NAME", "Process Events")

    settings = load_settings(dotenv_path=tmp_path / "no.env")

    assert settings.org_name == "Process Events"
    assert settings.sources["org_name"] == "environment"


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[mpesa]\nconsumer_key = "x"\n', "mpesa.consumer_key"),
        ('[mpesa]\nconsumer_secret = "x"\n', "mpesa.consumer_secret"),
        ('[mpesa]\npass_key = "x"\n', "mpesa.pass_key"),
        ('[mpesa]\npasskey = "x"\n', "mpesa.passkey"),
        ('[mpesa]\ninitiator_password = "x"\n', "mpesa.initiator_password"),
        ('[mpesa]\ncallback_url = "https://x.example/cb/s"\n', "mpesa.callback_url"),
        ('[email]\nhost_password = "x"\n', "email.host_password"),
        ('[email]\npassword = "x"\n', "email.password"),
        ('secret_key = "x"\n', "secret_key"),
    ],
)
def test_secret_in_toml_is_a_config_error_naming_the_key(
    tmp_path: Path, toml: str, key: str
) -> None:
    config = write(tmp_path / "sfcrm.toml", toml)

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, config_path=config)

    assert key in str(caught.value)
    assert "environment or .env" in (caught.value.hint or "")
    assert caught.value.exit_code == ExitCode.CONFIG


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('MPESA_PASS_KEY = "x"\n', "MPESA_PASS_KEY"),
        ('MPESA_CONSUMER_SECRET = "x"\n', "MPESA_CONSUMER_SECRET"),
        ('[email]\nEMAIL_HOST_PASSWORD = "x"\n', "EMAIL_HOST_PASSWORD"),
        ('SFCRM_SECRET_KEY = "x"\n', "SFCRM_SECRET_KEY"),
    ],
)
def test_secret_pasted_into_toml_under_its_env_name_is_a_config_error(
    tmp_path: Path, toml: str, key: str
) -> None:
    # Lines copied from .env into sfcrm.toml must not leave a secret in a shared file.
    config = write(tmp_path / "sfcrm.toml", toml)

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, config_path=config)

    assert key in str(caught.value)


def test_secret_value_in_toml_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    config = write(tmp_path / "sfcrm.toml", f'[mpesa]\npass_key = "{PASS_KEY}"\n')

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, config_path=config)

    assert PASS_KEY not in str(caught.value)
    assert PASS_KEY not in (caught.value.hint or "")


def test_secrets_have_no_toml_key() -> None:
    secret_specs = [spec for spec in SPECS if spec.secret]

    assert {spec.env for spec in secret_specs} >= set(ALL_SECRETS_ENV)
    assert [spec.env for spec in secret_specs if spec.toml is not None] == []


def test_secrets_come_from_environment_and_dotenv(tmp_path: Path) -> None:
    dotenv = write(tmp_path / "app.env", f"MPESA_CONSUMER_SECRET={CONSUMER_SECRET}\n")

    settings = load(tmp_path, environ={"MPESA_CONSUMER_KEY": CONSUMER_KEY}, dotenv_path=dotenv)

    assert settings.mpesa_consumer_key == CONSUMER_KEY
    assert settings.sources["mpesa_consumer_key"] == "environment"
    assert settings.mpesa_consumer_secret == CONSUMER_SECRET
    assert settings.sources["mpesa_consumer_secret"] == ".env"


def test_shown_masks_every_secret(tmp_path: Path) -> None:
    settings = load(tmp_path, environ=ALL_SECRETS_ENV)

    for spec in SPECS:
        shown = settings.shown(spec.name)
        for secret in ALL_SECRETS_ENV.values():
            assert secret not in shown, spec.name
        assert CALLBACK_SECRET not in shown
        if spec.secret and spec.name != "mpesa_callback_url":
            assert shown == SECRET_MASK


def test_shown_keeps_the_callback_host_but_hides_its_path(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"MPESA_CALLBACK_URL": CALLBACK_URL + "?source=daraja#frag"})

    shown = settings.shown("mpesa_callback_url")

    assert shown == f"https://pay.soundfusion.example/{SECRET_MASK}"
    assert CALLBACK_SECRET not in shown
    assert "/cb" not in shown


def test_shown_hides_credentials_in_the_callback_url_host(tmp_path: Path) -> None:
    url = f"https://sfcrm:{PASS_KEY}@pay.soundfusion.example:8443/cb/{CALLBACK_SECRET}"
    settings = load(tmp_path, environ={"MPESA_CALLBACK_URL": url})

    shown = settings.shown("mpesa_callback_url")

    assert PASS_KEY not in shown
    assert CALLBACK_SECRET not in shown
    assert "pay.soundfusion.example" in shown


def test_shown_prints_plain_settings_readably(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        environ={
            "SFCRM_ORG_NAME": "Sound Fusion Ltd",
            "SFCRM_CALLBACK_ALLOWLIST": "10.0.0.1, 10.0.0.2",
        },
    )

    assert settings.shown("org_name") == "Sound Fusion Ltd"
    assert settings.shown("mpesa_confirm_by_query") == "false"
    assert settings.shown("listener_allowlist") == "10.0.0.1,10.0.0.2"
    assert settings.shown("mpesa_consumer_key") == ""  # unset shows as empty, not masked


def test_secret_values_include_each_secret_and_the_callback_path(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={**ALL_SECRETS_ENV, "SFCRM_ORG_NAME": "Sound Fusion"})

    values = settings.secret_values()

    for secret in ALL_SECRETS_ENV.values():
        assert secret in values
    assert f"cb/{CALLBACK_SECRET}" in [value.strip("/") for value in values]
    assert "Sound Fusion" not in values
    assert "" not in values


def test_secret_values_is_empty_without_secrets(tmp_path: Path) -> None:
    assert load(tmp_path).secret_values() == []


def test_settings_repr_holds_no_secret(tmp_path: Path) -> None:
    settings = load(tmp_path, environ=ALL_SECRETS_ENV)

    text = repr(settings)

    for secret in [*ALL_SECRETS_ENV.values(), CALLBACK_SECRET]:
        assert secret not in text
    assert "CANARY" not in text


# -- require ---------------------------------------------------------------------------------


def test_require_names_the_missing_variable(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"MPESA_BUSINESS_SHORT_CODE": "174379"})

    with pytest.raises(ConfigError) as caught:
        settings.require("mpesa_business_short_code", "mpesa_pass_key", "mpesa_consumer_key")

    assert str(caught.value) == "MPESA_PASS_KEY is not set"
    assert "MPESA_PASS_KEY" in (caught.value.hint or "")
    assert "environment or .env" in (caught.value.hint or "")


def test_require_points_plain_settings_at_toml_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path).require("mpesa_business_short_code")

    assert "MPESA_BUSINESS_SHORT_CODE" in str(caught.value)
    assert "sfcrm.toml" in (caught.value.hint or "")


def test_require_treats_an_empty_value_as_missing(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"MPESA_CONSUMER_KEY": ""})

    with pytest.raises(ConfigError, match="MPESA_CONSUMER_KEY"):
        settings.require("mpesa_consumer_key")


def test_require_passes_when_everything_is_set(tmp_path: Path) -> None:
    settings = load(tmp_path, environ=ALL_SECRETS_ENV)

    settings.require("mpesa_consumer_key", "mpesa_consumer_secret", "mpesa_pass_key")


# -- finding the config file -----------------------------------------------------------------


def test_config_flag_to_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "sfcrm.toml"

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, config_path=missing)

    assert str(missing) in str(caught.value)
    assert caught.value.exit_code == ExitCode.CONFIG


def test_sfcrm_config_is_used_outside_any_office_folder(tmp_path: Path) -> None:
    config = write(tmp_path / "etc" / "crm.toml", '[org]\nname = "From SFCRM_CONFIG"\n')

    settings = load(tmp_path, environ={"SFCRM_CONFIG": str(config)})

    assert settings.config_path == config
    assert settings.org_name == "From SFCRM_CONFIG"
    assert settings.sources["org_name"] == "sfcrm.toml"


def test_config_flag_beats_sfcrm_config(tmp_path: Path) -> None:
    flagged = write(tmp_path / "flag.toml", '[org]\nname = "From flag"\n')
    env_file = write(tmp_path / "env.toml", '[org]\nname = "From SFCRM_CONFIG"\n')

    settings = load(tmp_path, config_path=flagged, environ={"SFCRM_CONFIG": str(env_file)})

    assert settings.org_name == "From flag"


def test_sfcrm_config_to_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SFCRM_CONFIG"):
        load(tmp_path, environ={"SFCRM_CONFIG": str(tmp_path / "missing.toml")})


def test_sfcrm_toml_in_the_current_directory_is_found(tmp_path: Path) -> None:
    write(tmp_path / "sfcrm.toml", '[org]\nname = "Local Events"\n')

    settings = load(tmp_path)

    assert settings.org_name == "Local Events"
    assert settings.config_path is not None
    assert settings.config_path.resolve() == (tmp_path / "sfcrm.toml").resolve()


def test_no_config_file_anywhere_gives_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path)

    assert settings.config_path is None
    assert set(settings.sources.values()) == {"default"}


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    config = write(tmp_path / "sfcrm.toml", "[mpesa\nenvironment = sandbox\n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, config_path=config)


# -- the database path -----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["data/crm.db", "sqlite:///data/crm.db"])
def test_relative_database_path_in_toml_resolves_beside_the_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    config = write(tmp_path / "conf" / "sfcrm.toml", f'[database]\nurl = "{url}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings = load(tmp_path, config_path=Path("..") / "conf" / "sfcrm.toml")

    assert settings.database_path == (config.parent / "data" / "crm.db").resolve()


def test_relative_database_path_from_environment_is_relative_to_cwd(tmp_path: Path) -> None:
    config = write(tmp_path / "conf" / "sfcrm.toml", "")

    settings = load(tmp_path, config_path=config, environ={"SFCRM_DATABASE_URL": "env.db"})

    assert settings.database_path.resolve() == (tmp_path / "env.db").resolve()


def test_absolute_database_path_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "crm.db"
    config = write(tmp_path / "conf" / "sfcrm.toml", f"[database]\nurl = '{target}'\n")

    assert load(tmp_path, config_path=config).database_path == target


def test_default_database_sits_beside_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "conf" / "sfcrm.toml", "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings = load(tmp_path, config_path=config)

    assert settings.database_path == (tmp_path / "conf" / "sfcrm.db").resolve()


def test_without_an_office_the_database_is_refused_not_made_here(tmp_path: Path) -> None:
    settings = load(tmp_path)

    assert not settings.office
    for attribute in ("database", "database_path"):
        with pytest.raises(ConfigError) as caught:
            getattr(settings, attribute)
        assert str(caught.value) == (
            "no sfcrm office here — run `sfcrm init` or cd to the office folder"
        )
        assert caught.value.exit_code == ExitCode.CONFIG
        assert "SFCRM_DATABASE_URL" in (caught.value.hint or "")
    assert settings.database_shown == "none (no sfcrm office here)"
    assert list(tmp_path.iterdir()) == []


def test_a_database_url_alone_is_an_office(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"SFCRM_DATABASE_URL": "crm.db"})

    assert settings.office
    assert settings.database_path == tmp_path / "crm.db"


# -- finding the office from anywhere in it, or elsewhere ------------------------------------


def office_folder(tmp_path: Path, name: str = "office", org: str = "Folder Events") -> Path:
    write(tmp_path / name / "sfcrm.toml", f'[org]\nname = "{org}"\n')
    return tmp_path / name


def test_sfcrm_toml_in_a_parent_folder_is_found_as_git_finds_dot_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    office = office_folder(tmp_path)
    deeper = office / "events" / "2026"
    deeper.mkdir(parents=True)
    monkeypatch.chdir(deeper)

    settings = load(tmp_path)

    assert settings.config_path == office / "sfcrm.toml"
    assert settings.found_by == "folder"
    assert settings.org_name == "Folder Events"
    assert settings.database_path == (office / "sfcrm.db").resolve()


def test_the_nearest_sfcrm_toml_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outer = office_folder(tmp_path, "outer", "Outer Events")
    inner = office_folder(outer, "inner", "Inner Events")
    monkeypatch.chdir(inner)

    assert load(tmp_path).org_name == "Inner Events"


def test_a_folder_office_beats_sfcrm_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    office = office_folder(tmp_path)
    other = write(tmp_path / "etc" / "sfcrm.toml", '[org]\nname = "Env Events"\n')
    monkeypatch.chdir(office)

    settings = load(tmp_path, environ={"SFCRM_CONFIG": str(other)})

    assert (settings.org_name, settings.found_by) == ("Folder Events", "folder")


def test_config_flag_beats_the_folder_office(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    office = office_folder(tmp_path)
    flagged = write(tmp_path / "flag.toml", '[org]\nname = "Flag Events"\n')
    monkeypatch.chdir(office)

    settings = load(tmp_path, config_path=flagged)

    assert (settings.org_name, settings.found_by) == ("Flag Events", "--config")


def test_the_user_config_folder_is_looked_in_last(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    user = write(xdg / "sfcrm" / "sfcrm.toml", '[org]\nname = "User Events"\n')

    settings = load(tmp_path, environ={"XDG_CONFIG_HOME": str(xdg)})

    assert (settings.config_path, settings.found_by) == (user, "user config")
    assert settings.org_name == "User Events"
    assert settings.database_path == (xdg / "sfcrm" / "sfcrm.db").resolve()
    env_file = write(tmp_path / "etc" / "sfcrm.toml", '[org]\nname = "Env Events"\n')
    both = {"XDG_CONFIG_HOME": str(xdg), "SFCRM_CONFIG": str(env_file)}
    assert load(tmp_path, environ=both).org_name == "Env Events"


def test_the_user_config_folder_defaults_to_dot_config_in_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write(home / ".config" / "sfcrm" / "sfcrm.toml", '[org]\nname = "Home Events"\n')

    assert load(tmp_path, environ={"HOME": str(home)}).org_name == "Home Events"
    # the XDG rule: a relative XDG_CONFIG_HOME is ignored
    relative = {"HOME": str(home), "XDG_CONFIG_HOME": "xdg"}
    assert load(tmp_path, environ=relative).org_name == "Home Events"


def test_the_dotenv_beside_the_found_sfcrm_toml_is_read_and_not_the_one_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    office = office_folder(tmp_path)
    write(office / ".env", f"MPESA_PASS_KEY={PASS_KEY}\nSFCRM_DATABASE_URL=data/crm.db\n")
    sub = office / "imports"
    write(sub / ".env", "MPESA_PASS_KEY=not-this-one\n")
    monkeypatch.chdir(sub)

    settings = load_settings(environ={})

    assert settings.mpesa_pass_key == PASS_KEY
    assert settings.dotenv_path == office / ".env"
    # a relative path in that .env is beside it, wherever in the office the command runs
    assert settings.database_path == (office / "data" / "crm.db").resolve()


def test_the_dotenv_beside_sfcrm_config_is_read(tmp_path: Path) -> None:
    config = write(tmp_path / "etc" / "sfcrm.toml", "")
    write(tmp_path / "etc" / ".env", f"MPESA_PASS_KEY={PASS_KEY}\n")
    write(tmp_path / ".env", "MPESA_PASS_KEY=not-this-one\n")

    settings = load_settings(environ={"SFCRM_CONFIG": str(config)})

    assert settings.mpesa_pass_key == PASS_KEY


def test_a_relative_database_path_from_the_environment_stays_relative_to_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    office = office_folder(tmp_path)
    (office / "sub").mkdir()
    monkeypatch.chdir(office / "sub")

    settings = load(tmp_path, environ={"SFCRM_DATABASE_URL": "env.db"})

    assert settings.database_path == office / "sub" / "env.db"


# -- a PostgreSQL database ------------------------------------------------------------------

DB_PASSWORD = "db-CANARY-p@ss/9"
DB_URL = "postgresql://sfcrm:db-CANARY-p%40ss%2F9@db.internal:5432/sfcrm"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://sfcrm@db.internal:5432/sfcrm",
        "postgresql://sfcrm@db.internal:5432/sfcrm",
        "postgres://sfcrm@db.internal:5432/sfcrm",
        "  postgresql://sfcrm@db.internal:5432/sfcrm ",
    ],
)
def test_a_postgresql_url_is_taken_as_one_for_psycopg(tmp_path: Path, url: str) -> None:
    settings = load(tmp_path, environ={"SFCRM_DATABASE_URL": url})

    assert settings.database == "postgresql+psycopg://sfcrm@db.internal:5432/sfcrm"
    assert settings.database_shown == settings.database
    # no file: what sfcrm keeps beside its database (the outbox) goes beside the config
    assert settings.database_path == Path.cwd() / "sfcrm.db"


def test_a_sqlite_path_is_the_database_and_its_file(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"SFCRM_DATABASE_URL": str(tmp_path / "crm.db")})

    assert settings.database == settings.database_path == tmp_path / "crm.db"
    assert settings.database_shown == str(tmp_path / "crm.db")


def test_the_password_in_a_database_url_is_a_secret(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"SFCRM_DATABASE_URL": DB_URL})

    assert DB_PASSWORD in settings.secret_values()  # as meant
    assert "db-CANARY-p%40ss%2F9" in settings.secret_values()  # as written
    shown = settings.shown("database_url")
    assert shown == f"postgresql+psycopg://sfcrm:{SECRET_MASK}@db.internal:5432/sfcrm"
    assert settings.database_shown == shown
    assert "CANARY" not in repr(settings)
    assert settings.database == DB_URL.replace("postgresql:", "postgresql+psycopg:")


def test_the_database_password_may_come_from_dotenv(tmp_path: Path) -> None:
    dotenv = write(tmp_path / "app.env", f"SFCRM_DATABASE_URL={DB_URL}\n")

    settings = load(tmp_path, dotenv_path=dotenv)

    assert settings.sources["database_url"] == ".env"
    assert DB_PASSWORD in settings.secret_values()


def test_a_database_url_with_a_password_in_toml_is_a_config_error_that_hides_it(
    tmp_path: Path,
) -> None:
    config = write(tmp_path / "sfcrm.toml", f'[database]\nurl = "{DB_URL}"\n')

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, config_path=config)

    assert str(caught.value) == f"{config} holds a secret (the password in database.url)"
    assert "environment or .env" in (caught.value.hint or "")
    assert "CANARY" not in str(caught.value) + (caught.value.hint or "")
    assert caught.value.exit_code == ExitCode.CONFIG


def test_a_database_url_without_a_password_in_toml_is_taken(tmp_path: Path) -> None:
    config = write(tmp_path / "sfcrm.toml", '[database]\nurl = "postgresql://sfcrm@db/sfcrm"\n')

    settings = load(tmp_path, config_path=config)

    assert settings.database == "postgresql+psycopg://sfcrm@db/sfcrm"
    assert settings.sources["database_url"] == "sfcrm.toml"
    assert settings.secret_values() == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgresql://sfcrm:db-CANARY-pw@db.internal:port/sfcrm",
            "SFCRM_DATABASE_URL is not a valid URL: Port could not be cast to integer value as "
            "'port' (postgresql://sfcrm:********@db.internal:port/sfcrm)",
        ),
        (
            "postgresql://sfcrm:db-CANARY-pw@db.internal",
            "SFCRM_DATABASE_URL must name the database after the host "
            "(postgresql://sfcrm:********@db.internal)",
        ),
        (
            "postgresql://sfcrm:db-CANARY-pw@db internal/sfcrm",
            "SFCRM_DATABASE_URL must be a URL without spaces "
            "(postgresql://sfcrm:********@db internal/sfcrm)",
        ),
        (
            "mysql://sfcrm:db-CANARY-pw@db.internal/sfcrm",
            "SFCRM_DATABASE_URL names a database sfcrm does not support (mysql) "
            "(mysql://sfcrm:********@db.internal/sfcrm)",
        ),
    ],
)
def test_a_database_url_sfcrm_cannot_use_is_a_config_error_that_hides_its_password(
    tmp_path: Path, url: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, environ={"SFCRM_DATABASE_URL": url})

    assert str(caught.value) == message
    assert "CANARY" not in (caught.value.hint or "")


# -- invalid values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MPESA_ENVIRONMENT", "staging"),
        ("MPESA_ENVIRONMENT", "Production"),
        ("MPESA_CONFIRM_BY_QUERY", "maybe"),
        ("EMAIL_USE_TLS", "2"),
        ("EMAIL_PORT", "twenty-five"),
        ("EMAIL_PORT", "25.5"),
        ("SFCRM_CALLBACK_MAX_BODY", "64k"),
        ("SFCRM_CALLBACK_MAX_BODY", "0"),
        ("SFCRM_LISTENER_THREADS", "-1"),
        ("MPESA_TIMEOUT", "soon"),
        ("MPESA_TIMEOUT", "0"),
        ("SFCRM_TIMEZONE", "Mars/Olympus_Mons"),
        ("SFCRM_TIMEZONE", "../../etc/passwd"),
        ("MPESA_TRANSACTION_TYPE", "CustomerPayBill"),
        ("MPESA_CALLBACK_URL", "ftp://pay.example/cb/x"),
        ("MPESA_CALLBACK_URL", "https://pay.example/cb/has space"),
        ("MPESA_CALLBACK_URL", "pay.example/cb/x"),
        ("MPESA_BASE_URL", "localhost:8000"),
    ],
)
def test_invalid_value_is_a_config_error_naming_the_variable(
    tmp_path: Path, name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, environ={name: value})

    assert name in str(caught.value)
    assert caught.value.exit_code == ExitCode.CONFIG


def test_invalid_callback_url_error_does_not_echo_the_url(tmp_path: Path) -> None:
    url = f"https://pay.example/cb/{CALLBACK_SECRET} oops"

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, environ={"MPESA_CALLBACK_URL": url})

    assert CALLBACK_SECRET not in str(caught.value)


def test_invalid_value_in_toml_is_a_config_error(tmp_path: Path) -> None:
    config = write(tmp_path / "sfcrm.toml", '[mpesa]\nenvironment = "live"\n')

    with pytest.raises(ConfigError, match="MPESA_ENVIRONMENT"):
        load(tmp_path, config_path=config)


@pytest.mark.parametrize(
    ("name", "attribute", "default"),
    [
        ("MPESA_TIMEOUT", "mpesa_timeout", 30.0),
        ("SFCRM_CALLBACK_MAX_BODY", "listener_max_body", 65536),
        ("SFCRM_LISTENER_THREADS", "listener_threads", 1),
        ("SFCRM_TIMEZONE", "timezone", "Africa/Nairobi"),
    ],
)
def test_empty_value_counts_as_unset_instead_of_crashing(
    tmp_path: Path, name: str, attribute: str, default: Any
) -> None:
    # Regression: `MPESA_TIMEOUT=` (an empty line in an old .env) raised TypeError.
    dotenv = write(tmp_path / "app.env", f"{name}=\n")

    settings = load(tmp_path, dotenv_path=dotenv)

    assert getattr(settings, attribute) == default


def test_an_empty_value_in_dotenv_leaves_the_sfcrm_toml_value_in_force(tmp_path: Path) -> None:
    # Regression: `MPESA_BUSINESS_SHORT_CODE=` in .env hid sfcrm.toml's shortcode.
    config = write(tmp_path / "sfcrm.toml", '[mpesa]\nbusiness_short_code = "600100"\n')
    dotenv = write(tmp_path / "app.env", "MPESA_BUSINESS_SHORT_CODE=\n")

    settings = load(tmp_path, config_path=config, dotenv_path=dotenv, environ={"MPESA_TIMEOUT": ""})

    assert settings.mpesa_business_short_code == "600100"
    assert settings.sources["mpesa_business_short_code"] == "sfcrm.toml"
    assert settings.sources["mpesa_timeout"] == "default"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("yes", True), ("ON", True), (" true ", True), ("0", False), ("no", False)],
)
def test_boolean_spellings(tmp_path: Path, value: str, expected: bool) -> None:
    settings = load(tmp_path, environ={"EMAIL_USE_TLS": value})

    assert settings.email_use_tls is expected


# -- derived values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, SANDBOX_URL),
        ({"MPESA_ENVIRONMENT": "production"}, PRODUCTION_URL),
        ({"MPESA_BASE_URL": "http://127.0.0.1:8099/"}, "http://127.0.0.1:8099"),
        (
            {"MPESA_ENVIRONMENT": "production", "MPESA_BASE_URL": "http://127.0.0.1:8099"},
            "http://127.0.0.1:8099",
        ),
    ],
)
def test_daraja_base_url_follows_environment_unless_overridden(
    tmp_path: Path, environ: dict[str, str], expected: str
) -> None:
    assert load(tmp_path, environ=environ).daraja_base_url == expected


def test_callback_path_is_the_path_of_the_callback_url(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"MPESA_CALLBACK_URL": CALLBACK_URL})

    assert settings.callback_path == f"/cb/{CALLBACK_SECRET}"
    assert load(tmp_path).callback_path is None


@pytest.mark.parametrize("word", ["safaricom", "Safaricom", "SAFARICOM"])
def test_allowlist_expands_safaricom_to_the_published_addresses(tmp_path: Path, word: str) -> None:
    settings = load(tmp_path, environ={"SFCRM_CALLBACK_ALLOWLIST": f"{word}, 10.0.0.5"})

    assert allowlist(settings) == frozenset(SAFARICOM_ADDRESSES | {"10.0.0.5"})


def test_allowlist_from_toml_list(tmp_path: Path) -> None:
    config = write(tmp_path / "sfcrm.toml", '[listener]\nallowlist = ["safaricom"]\n')

    assert allowlist(load(tmp_path, config_path=config)) == frozenset(SAFARICOM_ADDRESSES)


def test_allowlist_of_plain_addresses_is_kept_as_given(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"SFCRM_CALLBACK_ALLOWLIST": "10.0.0.5,10.0.0.6"})

    assert allowlist(settings) == frozenset({"10.0.0.5", "10.0.0.6"})


def test_allowlist_is_off_when_not_set(tmp_path: Path) -> None:
    assert allowlist(load(tmp_path)) is None


# -- the office on the command line: found, or refused ----------------------------------------

NO_OFFICE_LINE = "Error: no sfcrm office here — run `sfcrm init` or cd to the office folder"


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    from typer.testing import CliRunner

    from sfcrm.cli import app

    return CliRunner().invoke(app, list(args), env=env)


@pytest.mark.parametrize(
    "args",
    [
        ("people", "list"),
        ("people", "add", "--name", "A", "--phone", "0712345678"),
        ("mpesa", "status"),
        ("events", "list"),
        ("mail", "list"),
        ("history",),
        ("db", "current"),
        ("db", "upgrade"),
        ("backup", "copy.db"),
    ],
)
def test_a_command_outside_an_office_refuses_and_makes_no_database(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = cli(*args)

    assert result.exit_code == ExitCode.CONFIG
    assert result.stderr.splitlines()[0] == NO_OFFICE_LINE
    assert result.stderr.splitlines()[1].startswith("Hint: sfcrm looks for sfcrm.toml in this")
    assert list(tmp_path.iterdir()) == []


def test_the_refusal_under_json_is_one_error_document(tmp_path: Path) -> None:
    import json

    result = cli("people", "list", "--json")

    assert result.exit_code == ExitCode.CONFIG
    doc = json.loads(result.stdout)
    assert doc["code"] == "NO_OFFICE"
    assert doc["error"] == NO_OFFICE_LINE.removeprefix("Error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args", [("--help",), ("people", "--help"), ("--version",), ("config", "show")]
)
def test_help_version_and_config_show_need_no_office(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = cli(*args)

    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []


def test_config_show_outside_an_office_says_none_was_found(tmp_path: Path) -> None:
    import json

    doc = json.loads(cli("config", "show", "--json").stdout)

    assert (doc["config_file"], doc["found_by"], doc["env_file"]) == (None, None, None)
    assert doc["database"] == "none (no sfcrm office here)"


def test_a_command_in_a_subfolder_of_an_office_uses_the_office_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    assert cli("init").exit_code == 0
    sub = tmp_path / "imports" / "march"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)

    added = cli("people", "add", "--name", "Achieng", "--phone", "0712345678", "--json")

    assert added.exit_code == 0, added.output
    assert list(sub.iterdir()) == []  # no sfcrm.db here
    monkeypatch.chdir(tmp_path)
    assert [p["name"] for p in json.loads(cli("people", "list", "--json").stdout)] == ["Achieng"]


def test_a_subprocess_in_a_subfolder_finds_the_office_and_its_dotenv(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    office = tmp_path / "office"
    office.mkdir()
    write(office / "sfcrm.toml", '[database]\nurl = "data/crm.db"\n')
    write(office / ".env", "SFCRM_ORG_NAME=Dotenv Events\n")
    (office / "data").mkdir()
    sub = office / "reports"
    sub.mkdir()

    done = subprocess.run(
        [sys.executable, "-m", "sfcrm", "config", "show", "--json"],
        cwd=sub, env=dict(os.environ), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    rows = {row["setting"]: row for row in doc["settings"]}
    assert (rows["SFCRM_ORG_NAME"]["value"], rows["SFCRM_ORG_NAME"]["source"]) == (
        "Dotenv Events", ".env",
    )  # fmt: skip
    assert doc["found_by"] == "folder"
    assert doc["database"] == str((office / "data" / "crm.db").resolve())


def test_sfcrm_config_names_the_office_from_anywhere(tmp_path: Path) -> None:
    office = tmp_path / "office"
    office.mkdir()
    write(office / "sfcrm.toml", "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)

    result = cli("people", "list", env={"SFCRM_CONFIG": str(office / "sfcrm.toml")})

    assert result.exit_code == 0, result.output
    assert (office / "sfcrm.db").is_file()
    assert list(elsewhere.iterdir()) == []


def test_the_user_config_folder_names_the_office_last(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    write(xdg / "sfcrm" / "sfcrm.toml", f"[database]\nurl = '{tmp_path / 'user.db'}'\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)

    result = cli("people", "list", env={"XDG_CONFIG_HOME": str(xdg)})

    assert result.exit_code == 0, result.output
    assert (tmp_path / "user.db").is_file()


def test_an_explicit_database_url_is_an_office_without_any_sfcrm_toml(tmp_path: Path) -> None:
    result = cli("people", "list", env={"SFCRM_DATABASE_URL": str(tmp_path / "env.db")})

    assert result.exit_code == 0, result.output
    assert (tmp_path / "env.db").is_file()


def test_init_makes_an_office_where_there_was_none(tmp_path: Path) -> None:
    result = cli("init")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "sfcrm.toml").is_file()
    assert (tmp_path / "sfcrm.db").is_file()
    assert cli("people", "list").exit_code == 0


# -- the starter .env.example ----------------------------------------------------------------


def env_example() -> str:
    from sfcrm.resources import template_path

    return template_path("env.example").read_text(encoding="utf-8")


# Settings the starter file leaves out, and why (none today: every setting is in it).
NOT_IN_ENV_EXAMPLE: dict[str, str] = {}


def test_the_env_example_names_every_setting() -> None:
    import re

    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", env_example(), flags=re.MULTILINE))

    missing = {spec.env for spec in SPECS} - named - set(NOT_IN_ENV_EXAMPLE)
    assert missing == set()


def test_the_env_example_says_how_to_make_the_secret_key() -> None:
    text = env_example()

    assert "SFCRM_SECRET_KEY=\n" in text
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in text


def test_a_copied_env_example_sends_mail_nowhere_and_overrides_nothing_in_sfcrm_toml(
    tmp_path: Path,
) -> None:
    from sfcrm.mail.settings import backend_kind

    assert cli("init").exit_code == 0
    (tmp_path / ".env").write_text(env_example(), encoding="utf-8")

    settings = load_settings(environ={})

    assert backend_kind(settings) == "file"
    from_dotenv = {name for name, source in settings.sources.items() if source == ".env"}
    assert from_dotenv == {"email_backend"}
