"""Prompt templates (files users can replace) and the parsing of the replies they ask for.

A template is a text file: lines starting with ``#`` are comments, a line ``[SYSTEM]`` opens the system
message and a line ``[USER]`` the user message; ``{name}`` placeholders (``{n_images}``, and ``{explanation}``
in the detection prompt) are replaced by value, other braces are left as they are. The images follow the
user message's text. The packaged templates live in ``mmsae/templates/`` (``explain_prompt.txt``, after the
paper's explainer prompt, and ``detect_prompt.txt``).

Replies. An explanation is the text after the last ``[EXPLANATION]:``; one that starts with "Unable" is the
explicit no-pattern outcome. A detection answer is the last ``[ANSWER]:`` line, one 0/1 digit per image.
Anything else is a malformed reply, kept as it came.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from mmsae import storage
from mmsae.explainers.base import FAILED, OK, UNABLE, ExplainError

__all__ = [
    "DEFAULT_DETECT_TEMPLATE",
    "DEFAULT_EXPLAIN_TEMPLATE",
    "PAPER_UNABLE_TEXT",
    "PAPER_UNPARSED_TEXT",
    "PromptTemplate",
    "load_template",
    "parse_detection",
    "parse_explanation",
]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_EXPLAIN_TEMPLATE = TEMPLATE_DIR / "explain_prompt.txt"
DEFAULT_DETECT_TEMPLATE = TEMPLATE_DIR / "detect_prompt.txt"
PAPER_UNABLE_TEXT = "Unable to produce descriptions"
"""What the paper's prompt asks for when nothing is shared (and what its output layout holds for it)."""
PAPER_UNPARSED_TEXT = "Explanation could not be parsed."
"""What the paper's output layout holds for a reply without an explanation."""

_SECTION = re.compile(r"^\[(SYSTEM|USER)\]\s*$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_EXPLANATION = re.compile(r"\[EXPLANATION\]\s*:", re.IGNORECASE)
_UNABLE = re.compile(r"^\W*unable\b", re.IGNORECASE)
_ANSWER = re.compile(r"\[ANSWER\]\s*:\s*([^\n]*)", re.IGNORECASE)
_DIGITS = re.compile(r"^[01](?:\s*[,;\s]\s*[01])*$")


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: its two messages, where it came from and the hash of its text."""

    system: str
    user: str
    source: str
    digest: str
    """sha256 of the file's text, first 16 hex digits (``prompt_hash`` of every answer asked with it)."""

    def render(self, **values: object) -> tuple[str, str]:
        """(system, user) with each ``{name}`` replaced; a placeholder with no value is an error."""

        def fill(text: str) -> str:
            def one(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in values:
                    raise ExplainError(f"prompt template {self.source} uses {{{name}}}, which is not one of "
                                       f"{sorted(values)}")
                return str(values[name])

            return _PLACEHOLDER.sub(one, text)

        return fill(self.system), fill(self.user)


def load_template(uri: str, default: Path, setting: str) -> PromptTemplate:
    """Read and parse the template at ``uri`` (a path or s3:// URI), or the packaged ``default`` if empty."""
    source = uri or str(default)
    try:
        text = storage.read_text(uri) if uri else default.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ExplainError(f"{setting} {source} does not exist; expected a prompt template file "
                           f"(see {default} for the format)") from e
    return parse_template(text, source)


def parse_template(text: str, source: str) -> PromptTemplate:
    """A template from its text (see the module docstring for the format)."""
    parts: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        section = _SECTION.match(line)
        if section:
            current = parts.setdefault(section.group(1), [])
        elif current is not None:
            current.append(line)
        elif line.strip():
            raise ExplainError(f"prompt template {source}: text before the first [SYSTEM] or [USER] line "
                               f"({line.strip()[:60]!r})")
    if "USER" not in parts:
        raise ExplainError(f"prompt template {source} has no [USER] section")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    system, user = "\n".join(parts.get("SYSTEM", [])).strip(), "\n".join(parts["USER"]).strip()
    return PromptTemplate(system, user, source, digest)


def parse_explanation(reply: str | None) -> tuple[str, str | None]:
    """(status, explanation) of a reply: ``ok`` with the text after the last ``[EXPLANATION]:``; ``unable``
    when that text says it is unable; ``failed`` (no text) when there is no marker or nothing after it."""
    if not reply:
        return FAILED, None
    markers = list(_EXPLANATION.finditer(reply))
    if not markers:
        return FAILED, None
    text = " ".join(reply[markers[-1].end():].split()).strip().strip("\"'").strip()
    if not text:
        return FAILED, None
    if _UNABLE.match(text):
        return UNABLE, None
    return OK, text


def parse_detection(reply: str | None, n_images: int) -> list[bool] | None:
    """One bool per image from the last ``[ANSWER]:`` line; None when it is missing or does not hold exactly
    ``n_images`` digits 0/1."""
    if not reply:
        return None
    answers = list(_ANSWER.finditer(reply))
    if not answers:
        return None
    body = answers[-1].group(1).strip().strip(".").strip()
    if not _DIGITS.match(body):
        return None
    digits = [c == "1" for c in body if c in "01"]
    return digits if len(digits) == n_images else None
