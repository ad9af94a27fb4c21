"""Answer extraction: the answer a completion commits to (a ``\\boxed{}``, or its last number),
and the reference answer of a GSM8K record."""

from __future__ import annotations

import re

ANSWER_MODES = ("boxed", "last_number", "boxed_or_last")

_BOXED_PATTERN = re.compile(r"\\(?:boxed|fbox)\s*\{")

# An unsigned number: digits with optional thousands separators, an optional decimal part.
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# A minus sign counts only where it cannot be a binary minus ("10-5" ends in 5, not -5).
_SIGN = r"(?:(?<![\w)\]}])[-\u2212])?"
_NUMBER_PATTERN = re.compile(
    rf"\\[dt]?frac\{{\s*(?P<frac_num>-?(?:{_UNSIGNED}))\s*\}}\{{\s*(?P<frac_den>{_UNSIGNED})\s*\}}"
    rf"|(?P<num>{_SIGN}(?:{_UNSIGNED}))(?:\s*/\s*(?P<den>{_UNSIGNED}))?"
)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched.

    Returns the stripped content (``""`` for an empty box), or None when there is no box or
    the last box is not closed.
    """
    matches = list(_BOXED_PATTERN.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for position in range(start, len(text)):
        character = text[position]
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return text[start:position].strip()
    return None


def _normalize_number(match: re.Match[str]) -> str:
    if match.group("frac_num") is not None:
        numerator, denominator = match.group("frac_num"), match.group("frac_den")
    else:
        numerator, denominator = match.group("num"), match.group("den")
    numerator = numerator.replace("\u2212", "-").replace(",", "")
    if denominator is None:
        return numerator
    return f"{numerator}/{denominator.replace(',', '')}"


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, normalized: ``"1,234"`` -> ``"1234"``, ``"-5"`` stays.

    Fractions are kept whole (``"3/4"``, and ``\\frac{3}{4}`` becomes ``"3/4"``); a sentence's
    final period is not part of the number.
    """
    matches = list(_NUMBER_PATTERN.finditer(text))
    return _normalize_number(matches[-1]) if matches else None


def extract_answer(text: str, mode: str = "boxed_or_last") -> str | None:
    """The answer a completion commits to.

    ``mode``: ``"boxed"`` (only a non-empty ``\\boxed{}``), ``"last_number"`` (the last number
    anywhere), or ``"boxed_or_last"`` (the box when there is one, else the last number).
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer mode {mode!r}; expected one of {ANSWER_MODES}")
    if mode == "last_number":
        return extract_last_number(text)
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    return None if mode == "boxed" else extract_last_number(text)


def parse_gsm8k_answer(answer_field: str) -> str:
    """The final number of a GSM8K ``answer`` field (the text after the last ``#### ``).

    Thousands separators are removed: ``"... #### 1,234"`` -> ``"1234"``.
    """
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer_field[-80:]!r}")
    final = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", final):
        raise ValueError(f"GSM8K answer after '####' is not a number: {final!r}")
    return final
