"""Templates: strict variables, escaping by file type, the override folder first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sfcrm import render
from sfcrm.errors import ExitCode
from sfcrm.render import Renderer, TemplateError


@pytest.fixture
def builtin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stands in for the shipped templates/ folder, which these tests must not depend on."""
    folder = tmp_path / "builtin"
    folder.mkdir()
    monkeypatch.setattr(render, "templates_dir", lambda: folder)
    return folder


@pytest.fixture
def override_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "override"
    folder.mkdir()
    return folder


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text, encoding="utf-8")


def test_missing_variable_raises_template_error_naming_template_and_variable(
    builtin_dir: Path,
) -> None:
    write(builtin_dir, "invite.txt.j2", "Hello {{ person.name }}, you are {{ role }}.\n")

    with pytest.raises(TemplateError) as caught:
        Renderer(None).render("invite.txt.j2", person={"name": "Achieng"})

    assert "invite.txt.j2" in str(caught.value)
    assert "'role' is undefined" in str(caught.value)
    assert caught.value.exit_code == ExitCode.CONFIG


def test_missing_attribute_of_a_given_variable_is_an_error_not_a_blank(builtin_dir: Path) -> None:
    write(builtin_dir, "invite.txt.j2", "Hello {{ person.name }}\n")

    with pytest.raises(TemplateError, match="name"):
        Renderer(None).render("invite.txt.j2", person={})


def test_html_template_escapes_markup_while_text_template_keeps_it_literal(
    builtin_dir: Path,
) -> None:
    write(builtin_dir, "note.html.j2", "<p>{{ name }}</p>\n")
    write(builtin_dir, "note.txt.j2", "Name: {{ name }}\n")
    renderer = Renderer(None)
    name = "<script>alert(1)</script>"

    html = renderer.render("note.html.j2", name=name)
    text = renderer.render("note.txt.j2", name=name)

    assert html == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>\n"
    assert text == "Name: <script>alert(1)</script>\n"


def test_override_folder_wins_and_other_templates_fall_back_to_builtin(
    builtin_dir: Path, override_dir: Path
) -> None:
    write(builtin_dir, "invite.txt.j2", "built-in {{ x }}\n")
    write(builtin_dir, "remind.txt.j2", "built-in reminder {{ x }}\n")
    write(override_dir, "invite.txt.j2", "office copy {{ x }}\n")
    renderer = Renderer(override_dir)

    assert renderer.render("invite.txt.j2", x=1) == "office copy 1\n"
    assert renderer.render("remind.txt.j2", x=2) == "built-in reminder 2\n"


def test_has_tells_whether_a_template_exists_in_either_folder(
    builtin_dir: Path, override_dir: Path
) -> None:
    write(builtin_dir, "a.txt.j2", "a\n")
    write(override_dir, "b.html.j2", "b\n")
    renderer = Renderer(override_dir)

    assert renderer.has("a.txt.j2")
    assert renderer.has("b.html.j2")
    assert not renderer.has("c.html.j2")


def test_trailing_newline_is_kept(builtin_dir: Path) -> None:
    write(builtin_dir, "t.txt.j2", "line\n\n")

    assert Renderer(None).render("t.txt.j2") == "line\n\n"


def test_unknown_template_raises_template_error(builtin_dir: Path) -> None:
    with pytest.raises(TemplateError, match=r"template nope\.txt\.j2 not found"):
        Renderer(None).render("nope.txt.j2")


def test_syntax_error_names_template_and_line(builtin_dir: Path) -> None:
    write(builtin_dir, "bad.txt.j2", "ok\n{% if %}\n")

    with pytest.raises(TemplateError, match=r"bad\.txt\.j2 line 2"):
        Renderer(None).render("bad.txt.j2")


def test_line_break_in_a_value_stays_inside_the_body(builtin_dir: Path) -> None:
    write(builtin_dir, "t.txt.j2", "Dear {{ name }},\n")

    out = Renderer(None).render("t.txt.j2", name="Ann\r\nBcc: x@evil.test")

    assert out == "Dear Ann\r\nBcc: x@evil.test,\n"  # body text only; headers are mail.py's job


def test_importing_render_does_not_import_jinja2() -> None:
    code = "import sys, sfcrm.render; print('jinja2' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )

    assert out.stdout.strip() == "False"


def test_template_variable_called_name_does_not_clash_with_the_template_name(
    builtin_dir: Path,
) -> None:
    write(builtin_dir, "t.txt.j2", "{{ name }}\n")

    assert Renderer(None).render("t.txt.j2", name="Wanjiru") == "Wanjiru\n"


def test_templates_get_article_phone_and_tel_filters_and_tel_escapes(tmp_path: Path) -> None:
    (tmp_path / "t.html.j2").write_text(
        "{{ role | article }} {{ role }}; {{ p | phone }}; {{ p | tel }}; {{ bad | tel }}; "
        "{{ two | tel }}"
    )
    (tmp_path / "t.txt.j2").write_text("{{ role | article }} {{ role }}, {{ p | phone }}")
    renderer = Renderer(tmp_path)
    html = renderer.render("t.html.j2", role="Usher", p="254722111002", bad="<b>0</b>",
                           two="0711 000111 / 0722 <b>")  # fmt: skip
    assert html == (
        'an Usher; 0722 111 002; <a href="tel:+254722111002">0722 111 002</a>; '
        "&lt;b&gt;0&lt;/b&gt;; 0711 000111 / 0722 &lt;b&gt;"
    )
    assert renderer.render("t.txt.j2", role="Usher", p="254722111002") == "an Usher, 0722 111 002"
