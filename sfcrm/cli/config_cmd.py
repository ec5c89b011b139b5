"""``sfcrm config``: what sfcrm is running with."""

import typer

from sfcrm.cli.runtime import JsonOption, command, text_cell

app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)


@app.command("show")
def show(json_output: JsonOption = False) -> None:
    """Print every effective setting, where it came from, secrets masked.

    It works outside an office too (it opens no database): it then says none was found.

    Example: sfcrm config show
    """
    with command(json_output) as rt:
        from sfcrm.config import CONFIG_FOUND_BY, SPECS

        settings = rt.settings
        rows = [
            {
                "setting": spec.env,
                "toml": spec.toml,
                "value": settings.shown(spec.name),
                "source": settings.sources[spec.name],
                "secret": spec.secret,
            }
            for spec in SPECS
        ]
        doc = {
            "config_file": str(settings.config_path) if settings.config_path else None,
            "found_by": settings.found_by,
            "env_file": str(settings.dotenv_path) if settings.dotenv_path else None,
            "database": settings.database_shown,
            "daraja": settings.daraja_base_url,
            "settings": rows,
        }

        def render() -> None:
            from rich.table import Table

            found = f" ({CONFIG_FOUND_BY[settings.found_by]})" if settings.found_by else ""
            rt.print(f"config file: {doc['config_file'] or '(none)'}{found}")
            rt.print(f"env file:    {doc['env_file'] or '(none)'}")
            rt.print(f"database:    {doc['database']}")
            rt.print(f"daraja:      {doc['daraja']}")
            table = Table("variable", "sfcrm.toml key", "value", "from")
            for row in rows:
                table.add_row(
                    text_cell(row["setting"]),
                    text_cell(row["toml"] or "(secret: env only)"),
                    text_cell(row["value"]),
                    text_cell(row["source"]),
                )
            rt.out.print(table)

        rt.emit(doc, render)
