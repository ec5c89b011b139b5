"""Email templates: jinja2 files, the ``templates_dir`` folder first, then the built-in ones.

A variable a template uses but nobody passed is an error, never a blank line in an email sent to
a crew member. HTML templates (``.html.j2``, ``.html``) are autoescaped, so a name like
``<script>`` shows as text; plain-text templates (``.txt.j2``) keep it literally.

Every template has these filters: ``{{ role | article }}`` ("an" before "Usher"),
``{{ phone | phone }}`` (``0722 111 002``) and, in HTML, ``{{ phone | tel }}`` (that phone as a
tap-to-call link).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfcrm.errors import ExitCode, SfcrmError
from sfcrm.phone import display, tel_uri
from sfcrm.resources import templates_dir
from sfcrm.wording import article

if TYPE_CHECKING:
    import jinja2

_HTML = ("html", "htm", "html.j2", "htm.j2")


class TemplateError(SfcrmError):
    """A template is missing, does not parse, or uses a variable it was not given."""

    exit_code = ExitCode.CONFIG
    code = "TEMPLATE_ERROR"


def tel_link(phone: str | None) -> Any:
    """``<a href="tel:+254722111002">0722 111 002</a>``: a phone to tap in an email or page."""
    from markupsafe import Markup

    if not phone:
        return ""
    uri = tel_uri(phone)
    if uri is None:  # not one number: shown as the office wrote it
        return Markup("{}").format(display(phone))
    return Markup('<a href="{}">{}</a>').format(uri, display(phone))


class Renderer:
    """Renders templates by name; the override folder wins over the built-in templates."""

    def __init__(self, override_dir: Path | None) -> None:
        self.override_dir = Path(override_dir) if override_dir is not None else None
        self._env: jinja2.Environment | None = None
        self._found: dict[str, bool] = {}  # the folders are read once a run, as the templates are

    def __repr__(self) -> str:
        return f"Renderer(override_dir={self.override_dir!r})"

    @property
    def folders(self) -> list[Path]:
        """Where templates are looked for, in order."""
        found = [templates_dir()]
        if self.override_dir is not None:
            found.insert(0, self.override_dir)
        return found

    @property
    def environment(self) -> jinja2.Environment:
        if self._env is None:
            import jinja2

            self._env = jinja2.Environment(
                loader=jinja2.FileSystemLoader([str(p) for p in self.folders]),
                undefined=jinja2.StrictUndefined,
                autoescape=jinja2.select_autoescape(
                    enabled_extensions=_HTML, default_for_string=False, default=False
                ),
                keep_trailing_newline=True,
                auto_reload=False,
            )
            self._env.filters.update(article=article, phone=display, tel=tel_link)
        return self._env

    def has(self, name: str) -> bool:
        """Whether a template of this name exists in either folder."""
        import jinja2

        if name in self._found:
            return self._found[name]
        env = self.environment
        assert env.loader is not None
        try:
            env.loader.get_source(env, name)
        except jinja2.TemplateNotFound:
            self._found[name] = False
        else:
            self._found[name] = True
        return self._found[name]

    def render(self, name: str, /, **context: Any) -> str:
        """The template filled in; :class:`TemplateError` names the template and the problem.

        ``name`` is positional-only, so a template may use a variable called ``name``.
        """
        import jinja2

        try:
            return self.environment.get_template(name).render(**context)
        except jinja2.TemplateNotFound as exc:
            where = " or ".join(str(p) for p in self.folders)
            raise TemplateError(
                f"template {exc.name or name} not found",
                value=where,
                hint="check SFCRM_TEMPLATES_DIR, or remove it to use the built-in templates",
            ) from None
        except jinja2.UndefinedError as exc:
            # jinja's text names the variable: "'person' is undefined" or
            # "'dict object' has no attribute 'name'"
            raise TemplateError(
                f"template {name} uses a variable it was not given: {exc.message}",
                hint="fix the template, or pass the variable",
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"template {exc.name or name} line {exc.lineno}: {exc.message}",
                value=exc.filename,
                hint="fix the template's syntax",
            ) from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {name}: {exc.message or exc}") from None
