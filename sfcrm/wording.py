"""Words built from data and counts, so that text reads as a person would write it: "an Usher",
"1 person" and "2 people", "payment 7 is completed" said once."""

from __future__ import annotations

# Letters whose spoken name starts with a vowel sound: "an MC", "an SUV", but "a DJ".
_VOWEL_NAMED_LETTERS = frozenset("AEFHILMNORSX")
# Words that break the first-letter rule: a vowel said as "you"/"w", a silent h.
_A_BEFORE = ("uni", "use", "usu", "uti", "eu", "one", "once")
_AN_BEFORE = ("hour", "honest", "honor", "honour", "heir")


def article(word: str) -> str:
    """``"a"`` or ``"an"`` for the word it goes before: an Usher, a Sound Engineer, an MC,
    a DJ, a unit lead, an hour. Enough for roles and names; not a dictionary."""
    text = word.strip()
    if not text:
        return "a"
    first = text.split()[0]
    if len(first) > 1 and first.isupper() and first.isalpha():  # an acronym: said letter by letter
        return "an" if first[0] in _VOWEL_NAMED_LETTERS else "a"
    lower = first.lower()
    if lower.startswith(_AN_BEFORE):
        return "an"
    if lower.startswith(_A_BEFORE):
        return "a"
    return "an" if lower[0] in "aeiou" else "a"


def with_article(word: str) -> str:
    """``"an Usher"``: the word with its article."""
    return f"{article(word)} {word}"


def plural(count: int, one: str, many: str | None = None) -> str:
    """The count with its noun: ``plural(1, "person", "people")`` is ``"1 person"``,
    ``plural(2, "email")`` is ``"2 emails"``."""
    noun = one if count == 1 else (many if many is not None else one + "s")
    return f"{count} {noun}"


def verb(count: int, one: str, many: str) -> str:
    """The verb that agrees with the count: ``verb(1, "was", "were")``."""
    return one if count == 1 else many


def about(subject: str, text: str) -> str:
    """``text`` said of ``subject`` once: ``payment 7: Daraja is busy``, but ``payment 7 is
    completed`` as it is (never ``payment 7: payment 7 is completed``)."""
    if text == subject or text.startswith((subject + " ", subject + ":", subject + ",")):
        return text
    return f"{subject}: {text}"
