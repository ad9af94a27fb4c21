"""Equivalence checks: is an extracted answer the reference answer?

* ``numeric``: exact rational comparison (with a relative tolerance for rounded decimals).
  Pure Python, microseconds per check; the choice for GSM8K and the synthetic arithmetic task.
* ``math_verify``: the ``math_verify`` package parses LaTeX with SymPy and compares the
  expressions symbolically, the choice for MATH500 / AIME / AMC style answers.

``_CHECKS`` maps each method to its per-completion check (extract, then compare); the checks are
module-level functions so that the sandbox's worker processes can unpickle them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from fractions import Fraction

from rlvr_lightning.rewards.extraction import extract_answer

METHODS = ("numeric", "math_verify")

# LaTeX and symbols that never change a number's value: spacing commands, $ and %, degrees.
_LATEX_NOISE = re.compile(r"\\[,!;: ]|\\?\$|\\?%|\^\s*\{?\\circ\}?|\\left|\\right")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
# A label before the number ("x = 5") and unit words after it ("18 dollars") are allowed;
# anything else around it ("5x", "x^2", "3 or 4") makes the answer not a plain number.
_LABELLED = re.compile(r"(?:[A-Za-z]\w*\s*=\s*)?(?P<value>.+?)(?:\s+[A-Za-z][A-Za-z\s]*)?")
# Exponents are capped at three digits: Fraction("1e999999999") would build a huge integer.
_PLAIN = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?"
_PLAIN_PATTERN = re.compile(_PLAIN)
_FRACTION_PATTERN = re.compile(
    rf"(?P<sign>[-+]?)(?:\\[dt]?frac\{{(?P<latex_num>{_PLAIN})\}}\{{(?P<latex_den>{_PLAIN})\}}"
    rf"|(?P<num>{_PLAIN})/(?P<den>{_PLAIN}))"
)


def _parse_plain(text: str) -> Fraction:
    return Fraction(text.replace(",", "").rstrip("."))


def _to_fraction(text: str) -> Fraction | None:
    """Parse a numeric answer exactly; None when it is not a single number."""
    text = _TEXT_WRAPPER.sub(r" \1 ", text)
    text = _LATEX_NOISE.sub(" ", text).replace("\u2212", "-").strip().rstrip(".").strip()
    labelled = _LABELLED.fullmatch(text)
    if labelled is None:
        return None
    value = re.sub(r"\s*([{}/])\s*", r"\1", labelled.group("value"))
    if _PLAIN_PATTERN.fullmatch(value):
        return _parse_plain(value)
    fraction = _FRACTION_PATTERN.fullmatch(value)
    if fraction is None:
        return None
    numerator = _parse_plain(fraction.group("latex_num") or fraction.group("num"))
    denominator = _parse_plain(fraction.group("latex_den") or fraction.group("den"))
    if denominator == 0:
        return None
    result = numerator / denominator
    return -result if fraction.group("sign") == "-" else result


def numeric_equal(pred: str, ref: str, rel_tol: float = 1e-6) -> bool:
    """Whether two answers are the same number.

    Accepts integers, decimals, thousands separators, a leading ``+``, a trailing ``.``,
    fractions ``a/b`` and ``\\frac{a}{b}``; ``"7.0"`` equals ``"7"``. Values within ``rel_tol``
    (relative to the larger magnitude) are equal, so ``"0.3333333"`` matches ``"1/3"``.
    False when either side is not a number.
    """
    try:
        pred_value, ref_value = _to_fraction(pred), _to_fraction(ref)
    except (ValueError, ZeroDivisionError, OverflowError):
        return False
    if pred_value is None or ref_value is None:
        return False
    if pred_value == ref_value:
        return True
    return abs(pred_value - ref_value) <= Fraction(rel_tol) * max(abs(pred_value), abs(ref_value))


class _DropTimeoutDisabledWarning(logging.Filter):
    """math_verify warns once that its timeouts are off; ours (a killable process) are on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_WARNING_FILTER = _DropTimeoutDisabledWarning()


def _gold_latex(ref: str) -> str:
    ref = ref.strip()
    if "\\boxed" in ref or (len(ref) > 1 and ref.startswith("$") and ref.endswith("$")):
        return ref
    return f"\\boxed{{{ref}}}"


def _math_verify_compare(pred_text: str, ref: str) -> tuple[bool, str | None]:
    """math_verify's verdict and the prediction text it extracted (None: nothing found)."""
    from math_verify import parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if _WARNING_FILTER not in logger.filters:
            logger.addFilter(_WARNING_FILTER)
    prediction = parse(pred_text, parsing_timeout=None)
    if not prediction:
        return False, None
    # parse returns [sympy expression, matched text]; the text is what the model committed to.
    extracted = prediction[-1] if isinstance(prediction[-1], str) else str(prediction[0])
    gold = parse(_gold_latex(ref), parsing_timeout=None) or parse(ref, parsing_timeout=None)
    if not gold:
        return False, extracted
    return bool(verify(gold, prediction, timeout_seconds=None)), extracted


def math_verify_equal(pred_text: str, ref: str) -> bool:
    """Whether a completion's answer equals the reference, by ``math_verify`` (SymPy).

    ``pred_text`` may be a whole completion: math_verify takes its last ``\\boxed{}`` or, failing
    that, its last LaTeX or plain expression. ``ref`` is a bare answer (``"\\frac{1}{2}"``,
    ``"18"``), which is boxed before parsing; an already boxed or ``$...$`` reference is kept.

    math_verify's own timeouts use ``signal.alarm`` and so fail outside the main thread; they
    are switched off here and ``RewardFunction`` bounds the time instead (a killable process).
    """
    return _math_verify_compare(pred_text, ref)[0]


# ---------------------------------------------------------------------------------------------
# One check per completion (module level so that worker processes can unpickle them)
# ---------------------------------------------------------------------------------------------


def _check_numeric(completion: str, answer: str, answer_mode: str) -> tuple[bool, str | None]:
    extracted = extract_answer(completion, answer_mode)
    return extracted is not None and numeric_equal(extracted, answer), extracted


def _check_math_verify(completion: str, answer: str, answer_mode: str) -> tuple[bool, str | None]:
    if answer_mode == "boxed_or_last":
        # math_verify finds the box or the last expression itself, including non-numbers (\pi).
        return _math_verify_compare(completion, answer)
    extracted = extract_answer(completion, answer_mode)
    if extracted is None:
        return False, None
    return math_verify_equal(f"\\boxed{{{extracted}}}", answer), extracted


_CHECKS: dict[str, Callable[[str, str, str], tuple[bool, str | None]]] = {
    "numeric": _check_numeric,
    "math_verify": _check_math_verify,
}
