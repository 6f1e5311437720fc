"""Verifiable rewards: answer extraction, per-type parsing and comparison (DESIGN §5, §6).

Model output is arbitrary text, so nothing here raises on it: an answer that cannot be found or
parsed is judged wrong and reported with `parse_ok=False` so the trainer can count it. Bad
*configuration* (unknown answer type or format) raises, naming the allowed values.

Extraction order, on the text after the last `</think>` (a response still inside `<think>`
when it was cut off has no answer): the last complete `\\boxed{...}`, else
the text after the last "Answer:" / "The answer is" that states one (not "the answer is
supported by ..."), else the last non-empty line. When
`<answer>...</answer>` tags are present the same search runs on the tag content alone, falling
back to that content as a whole. An adverb before the answer goes ("the answer is clearly 12"),
and a cue with nothing after it does not replace an earlier one. The span is then parsed for the
sample's `answer_type`; a reference answer that does not parse for its type is compared as
normalised text instead (a `number` reference such as "4\\sqrt{2}" or "10:45").
A span that does not commit to one answer earns no reward: several options ("A, C", "A C",
"A. B. C."), a rejected or hedged option ("B (not sure)", "Probably B"), yes and no together
("yes no", "True False") or a hedge ("Probably yes", "Not necessarily"), numbers offered as
alternatives ("5 or 6", "5, 6, 7", "5 6 7"), ranges or bounds ("at least 5", "< 5", "over 5"),
boxes side by side with different contents ("\\boxed{5} or \\boxed{6}", "\\boxed{A} \\boxed{B}"). A numeral that is part of an
expression ("2\\sqrt{3}", "3\\pi", "x^2", "\\log_2 8") or of a time or ratio ("10:45", "3:2")
states no number. Decimal commas ("2,5") are not read (they cannot be told from a list).
"""

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

ANSWER_TYPES = ("choice", "number", "yesno", "text", "math")
ANSWER_FORMATS = ("boxed", "answer", "boxed_or_answer")

# The answer sits at the end of a response; bounding the scanned tail bounds the verifier's cost
# on degenerate, very long outputs (it runs on the trainer's critical path).
_MAX_SCAN_CHARS = 16384

# Relative only: an absolute tolerance credits "0" for any small reference (6.67e-11, 1.6e-19).
# Integers below 2**53 (exact in a float) compare exactly: 1000001 is not 1000000.
_NUMBER_REL_TOL = 1e-6
_INTEGER_REL_TOL = 1e-9  # when one side is a whole number
_EXACT_INTEGER_LIMIT = 2.0**53


@dataclass(frozen=True)
class RewardSpec:
    """How a verdict becomes a scalar reward; defaults are DAPO's ±1 with no format bonus."""

    correct_reward: float = 1.0
    wrong_reward: float = -1.0
    # Added to the reward (right or wrong) when the response uses `answer_format`.
    format_reward: float = 0.0
    answer_format: str = "boxed_or_answer"

    def __post_init__(self):
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}"
            )


@dataclass(frozen=True)
class RewardResult:
    reward: float
    correct: bool
    parsed: Optional[str]  # canonical form of the extracted answer, None when nothing parsed
    parse_ok: bool
    format_ok: bool = False


# --- extraction -------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARKER = re.compile(
    r"(?:\bthe\s+)?(?:\bfinal\s+)?\banswer\b\**\s*(?:\bis\b\s*:?|:)", re.IGNORECASE
)
# Not before a bare option letter: "A. B. C." lists options rather than ending a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])(?![A-Z][)\]]?(?:[.,;:]|\s*$))")
# What follows "the answer is" when the sentence talks about the answer instead of giving it
# ("the answer is clear from ...", "the answer is clearly shown ...").
_NOT_AN_ANSWER = re.compile(
    r"(?:supported|based|derived|determined|found|given|shown|confirmed|justified|consistent"
    r"|because|that|clear|obvious|evident|apparent|visible|reached|seen|stated|indicated"
    r"|displayed|depicted|marked|labell?ed|written|illustrated|demonstrated|established"
    r"|implied|suggested|mentioned|provided|described|explained|noticeable|observable)\b")
# An adverb before the answer itself goes ("the answer is clearly 12" -> "12"); not the
# affirming ones, which answer a yes/no question on their own ("Answer: Definitely").
_ANSWER_ADVERB = re.compile(
    r"(?:clearly|obviously|evidently|undoubtedly|unquestionably)\b[\s,]*", re.IGNORECASE)
# A cue with nothing after it ("Answer: 5\nAnswer:") states no answer: the earlier one stands.
_NO_CONTENT = re.compile(r"[\s.,;:!?*]*")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
# NFKC reads "1½" as "11⁄2" (5.5) and "3²" as "32": before it, a vulgar fraction becomes LaTeX
# ("1\frac{1}{2}", a mixed number after a digit) and superscript digits an exponent ("3^{2}").
_VULGAR_FRACTIONS = "".join(
    chr(c) for c in range(0x80, 0x2190) if "VULGAR FRACTION" in unicodedata.name(chr(c), ""))
_VULGAR_FRACTION = re.compile(f"[{_VULGAR_FRACTIONS}]")
_SUPERSCRIPTS = {"\u207b": "-", "\u207a": "+", "\u00b9": "1", "\u00b2": "2", "\u00b3": "3",
                 **{chr(0x2070 + d): str(d) for d in (0, 4, 5, 6, 7, 8, 9)}}
_SUPERSCRIPT_RUN = re.compile(f"[{''.join(_SUPERSCRIPTS)}]+")


def _vulgar_fraction(m: re.Match) -> str:
    num, den = unicodedata.normalize("NFKC", m.group()).split("\u2044")
    return f"\\frac{{{num}}}{{{den}}}"


def _superscript(m: re.Match) -> str:
    return "^{" + "".join(_SUPERSCRIPTS[ch] for ch in m.group()) + "}"


def _nfkc(text: str) -> str:
    """NFKC, with vulgar fractions and superscript digits kept apart from the digits before."""
    text = _VULGAR_FRACTION.sub(_vulgar_fraction, text)
    return unicodedata.normalize("NFKC", _SUPERSCRIPT_RUN.sub(_superscript, text))


def _response_tail(text) -> str:
    """The part of a response that can hold the final answer, NFKC-normalised."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    end_of_thought = text.rfind("</think>")
    if end_of_thought >= 0:
        text = text[end_of_thought + len("</think>") :]
    elif text.lstrip().startswith("<think>"):
        return ""  # still thinking when it was cut off: no answer was given
    text = _nfkc(text[-_MAX_SCAN_CHARS:])[-_MAX_SCAN_CHARS:]  # "½" expands to 11 characters
    # One character per whitespace run (a newline where the run has one): patterns with \s*
    # would otherwise restart at every character of a long run (quadratic in the tail).
    return _WHITESPACE_RUN.sub(lambda m: "\n" if "\n" in m.group() else " ", text)


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last complete `\\boxed{...}` (nested braces allowed), or None. Boxes
    side by side ("\\boxed{5} or \\boxed{6}", "$\\boxed{A}$, $\\boxed{B}$") are one answer
    ("5 or 6", "A, B") unless they all hold the same: the parsers then see the alternatives."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return None
    # One pass pairs every brace, so many (possibly unclosed) \boxed{ stay linear in cost.
    closing, stack = {}, []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    complete = [(m.start(), m.end() - 1) for m in boxes if m.end() - 1 in closing]
    if not complete:
        return None
    box, brace = complete[-1]  # walked back to the first box of the run; lists in reverse
    contents, joiners = [text[brace + 1 : closing[brace]]], [""]
    for previous, previous_brace in reversed(complete[:-1]):
        gap = closing[previous_brace] + 1
        joiner = _BOX_JOINER.fullmatch(text, gap, box) if 0 <= box - gap <= 32 else None
        if joiner is None:
            break
        contents.append(text[previous_brace + 1 : closing[previous_brace]])
        joiners.append(" or " if joiner.group(1) else ", ")
        box = previous
    if len({"".join(content.split()) for content in contents}) == 1:
        return contents[0]
    return "".join(c + j for c, j in zip(reversed(contents), reversed(joiners)))


# What may stand between boxes that together state one answer: spaces, "$", a comma, "and",
# "or" ("\\text{ or }"), a slash.
_BOX_JOINER = re.compile(
    r"[\s$]*(?:(?:\\text\s*\{\s*)?(?:(\bor\b|/)|,|;|&|\band\b|\\quad|\\qquad)\s*\}?)?[\s$]*",
    re.IGNORECASE)


def _answer_tag(text: str) -> Optional[str]:
    close = text.rfind("</answer>")
    if close < 0:
        return None
    open_ = text.rfind("<answer>", 0, close)
    return None if open_ < 0 else text[open_ + len("<answer>") : close]


def _after_answer_marker(text: str) -> Optional[str]:
    # The last cue that states an answer: "the answer is supported by ..." in a closing
    # explanation does not replace an earlier "Answer: B".
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        # "Answer:\n12" puts the answer on the next line.
        rest = text[marker.end() :].lstrip(" \t\r\n*:")
        if adverb := _ANSWER_ADVERB.match(rest):
            rest = rest[adverb.end() :]
        if _NOT_AN_ANSWER.match(rest):
            continue
        line = rest.split("\n", 1)[0]
        # "The answer is B. Because ..." -> "B."
        span = _SENTENCE_END.split(line, 1)[0]
        if not _NO_CONTENT.fullmatch(span):
            return span
    return None


def _marked_span(text: str) -> tuple[Optional[str], bool]:
    """(the last boxed content, else the text after the last answer cue; whether it was cued)."""
    span = _last_boxed(text)
    if span is not None:
        return span, False
    span = _after_answer_marker(text)
    return span, span is not None


def _locate_answer(text) -> tuple[Optional[str], bool]:
    """`extract_answer`'s span, and whether an explicit "Answer:" / "the answer is" cue led to it
    (the parsers may then trust the span's first token over the prose after it)."""
    text = _response_tail(text)
    tagged = _answer_tag(text)
    if tagged is not None:
        # The tag holds the answer but may still phrase it ("<answer>Answer: red</answer>").
        span, cued = _marked_span(tagged)
        if span is None:
            span = tagged
    else:
        span, cued = _marked_span(text)
        if span is None:
            lines = [line for line in text.splitlines() if line.strip()]
            span = lines[-1] if lines else None
    if span is None:
        return None, False
    span = span.strip().strip("*").strip()
    return (span, cued) if span else (None, False)


def extract_answer(text) -> Optional[str]:
    """The final-answer span of a response (see module docstring), stripped; None if empty."""
    return _locate_answer(text)[0]


def has_answer_format(text, answer_format: str = "boxed_or_answer") -> bool:
    """Whether a response states its answer in the required format."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    text = _response_tail(text)
    boxed = _last_boxed(text) is not None
    marked = _answer_tag(text) is not None or _ANSWER_MARKER.search(text) is not None
    return {"boxed": boxed, "answer": marked, "boxed_or_answer": boxed or marked}[answer_format]


# --- normalisation shared by the parsers ------------------------------------------------------

_LATEX_WRAPPERS = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_LATEX_SPACING = re.compile(r"\\left\b|\\right\b|\\[!,;:]|\\quad\b|\\qquad\b|~")
# An escaped \$ is a currency sign rather than a delimiter, but it goes too, backslash and all
# (dropping only the "$" turned \$18.90 into \18.90).
_MATH_DELIMITERS = re.compile(r"\\?\$|\\\(|\\\)|\\\[|\\\]")


def _unwrap_latex(span: str) -> str:
    """Drop math delimiters, spacing commands and \\text{}-style wrappers (keep their content)."""
    span = _MATH_DELIMITERS.sub(" ", span)
    span = _LATEX_SPACING.sub(" ", span)
    span = _LATEX_WRAPPERS.sub(r"\1", span)
    return span.replace("\u2212", "-").strip()


def normalize_text(text: str) -> str:
    """SQuAD-style: lowercase, no punctuation, no articles, single spaces."""
    text = _unwrap_latex(unicodedata.normalize("NFKC", text)).lower()
    text = re.sub(r"\^\{(\w+)\}", r"\1", text)  # "m²" became "m^{2}": "m2", as NFKC alone reads it
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    # Articles go unless they are all there is: the answer "A" (a blood type, a label) stays.
    words = re.sub(r"\b(?:a|an|the)\b", " ", text).split()
    return " ".join(words or text.split())


# --- choice -----------------------------------------------------------------------------------

_CHOICE_ALONE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?")
_CHOICE_LEADING = re.compile(r"(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])\)|([A-Z])[.:])(?=\s|$)")
_CHOICE_KEYWORD = re.compile(r"\b(?:option|choice)\b\s*[(\[]?([A-Za-z])\b", re.IGNORECASE)
_CHOICE_PARENTHESISED = re.compile(r"\(([A-Z])\)")
# "A" and "I" followed by a lowercase word ("A cat", "I think") are the English article and
# pronoun, not options; "A or B", "A is correct" still name options.
_CAPITAL_WORD = re.compile(r"\b(?![AI]\s+(?!(?:or|and|is|was)\b)[a-z])([A-Z])\b")
# Right after an answer cue, a capital letter standing alone names the option even when prose
# follows ("B because A is too small") -- unless it is the article or pronoun ("A dog",
# "I think B"), or one of several options ("A or B", "A, C").
_CHOICE_CUED = re.compile(r"[(\[]?([A-Z])[)\]]?(?![\w'])")
_CHOICE_ARTICLE = re.compile(r"\s+(?!(?:because|since|as|is|was|seems|fits|matches)\b)[a-z]")
# Another option right after the named one: "A or B", "(A) (B)", "A; B", "A|B", "A-D", "A (or B)",
# "A+B", "A, also B", and a bare letter after a space or a full stop ("A C", "A. B. C.") unless
# a sentence about it follows ("A. B is too small").
_CHOICE_ANOTHER = re.compile(
    r"(?:\s*(?:,|/|&|;|\||-|\+|\(\s*or\b|\bor\b|\band\b)\s*"
    r"(?:(?:maybe|possibly|perhaps|also)\s+)?"
    r"(?:[(\[][A-Za-z][)\]]|(?![AI]\s+[a-z])[A-Z](?![\w']))"
    r"|\s*[(\[][A-Za-z][)\]]"
    r"|\.?\s+[(\[]?[A-Z][)\]]?(?![\w'])(?!\s*[a-z]))"
)
# The named option rejected by the words right after it: "B is incorrect", "B is not correct",
# "(D) can be ruled out", an elimination list's "(D) yellow - no". Narrow on purpose: option
# texts and explanations often hold negations ("There is no dog", "B, as A is wrong").
_CHOICE_REJECTED = re.compile(
    r"^\s*(?:(?:is|are|was|seems)\s+)?(?:(?:not|isn't|is\s+not)\s+(?:correct|right|true|"
    r"the\s+answer)\b"
    r"|incorrect\b|wrong\b|(?:(?:can|could|should|must|is|are)\s+(?:be\s+)?)?"
    r"(?:ruled\s+out|eliminated|excluded)\b)",
    re.IGNORECASE,
)
_CHOICE_STRUCK = re.compile(
    r"(?:^|[-:\u2013\u2014])\s*(?:no|false|incorrect|wrong)\W*$"  # "(D) yellow - no", "(B) no"
    r"|\bwait\b\W+(?:[(\[]?[A-Z][)\]]?)(?![\w'])",  # "B, no wait, C"
    re.IGNORECASE)
_CHOICE_NEGATED = re.compile(r"\s*(?i:not|never)\s+[(\[]?[A-Z][)\]]?(?![\w'])")  # "Not B"
# Where the words about the named option end: punctuation, or an explanation.
_CHOICE_CLAUSE_END = re.compile(r"[,.!?;\n]|\b(?:because|since|as|but|so)\b", re.IGNORECASE)


def _rejects(rest: str, letter: str, choices: Optional[Sequence[str]]) -> bool:
    """Whether the words after a named option hedge to another option or reject it. The
    option's own text after its letter ("(D) O", "(B) The man is not wearing a hat, as ...")
    is neither."""
    index = ord(letter) - ord("A")
    option = normalize_text(str(choices[index])) if choices and index < len(choices) else ""
    words = normalize_text(rest)
    if _CHOICE_STRUCK.search(rest) and words != option:
        return True  # "(D) yellow - no"
    if option and (words + " ").startswith(option + " "):
        return False
    if _CHOICE_ANOTHER.match(rest):
        return True
    return _rejected_after(rest, 0)


def _cued_choice(span: str, valid: Optional[set],
                 choices: Optional[Sequence[str]] = None) -> Optional[str]:
    m = _CHOICE_CUED.match(span)
    if m is None or (valid is not None and m.group(1) not in valid):
        return None
    rest = span[m.end() :]
    if m.group(1) in "AI" and m.group(0) == m.group(1) and _CHOICE_ARTICLE.match(rest):
        return None
    return "" if _rejects(rest, m.group(1), choices) else m.group(1)  # "": named, rejected


def parse_choice(span: Optional[str], choices: Optional[Sequence[str]] = None) -> Optional[str]:
    """The option letter ("A".."Z") a span names, or None when absent or ambiguous.

    In order: a bare letter ("B", "(b)", "B."), a leading label ("(B) red", "B. red"),
    "option B" / "choice (B)", a unique parenthesised letter, the exact text of one of `choices`,
    and finally a unique capital letter standing alone, restricted to the choices' letters when
    `choices` is given (so "I think B" parses, while "A or B" does not parse at all).
    """
    return _parse_choice(span, choices, cued=False)


def _parse_choice(
    span: Optional[str], choices: Optional[Sequence[str]], cued: bool
) -> Optional[str]:
    """`parse_choice`; with `cued` (the span followed an explicit answer cue) a capital letter
    that opens the span wins over letters in the prose after it ("B because A is too small")."""
    if not span:
        return None
    letter = _named_choice(_unwrap_latex(span), choices, cued)
    return None if letter is None or _hedges_choice(span, letter, choices) else letter


def _hedges_choice(span: str, letter: str, choices: Optional[Sequence[str]]) -> bool:
    """Whether a span that names ``letter`` hedges it: the speaker's doubt anywhere ("B (not
    sure)", "B, I guess"), a hedge word right next to the letter ("Probably B", "B (most
    likely)") or a negation right before it ("It is not B", "Neither A nor B"). Words of the options' own texts ("(C) Not sure", "(B) Possibly red") and hedges
    about the image ("the rim is unclear", "it is probably a cup, so A") do not count."""
    for option in choices or ():
        if str(option).strip():
            # A placeholder, not nothing: "A. It is a cat, probably a tabby" must not become
            # "A. , probably" (a hedge next to the letter).
            span = re.sub(re.escape(str(option).strip()), " _ ", span, flags=re.IGNORECASE)
    if _CHOICE_DOUBT.search(" ".join(_yesno_words(span))):
        return True
    named = rf"[(\[]?{letter}[)\]]?(?![\w'])"  # case-sensitive: "probably a cup" is no "A"
    # A negation before the letter rejects it ("It is not A", "Neither A nor B").
    return re.search(rf"(?:{_CHOICE_HEDGE_BEFORE}|(?i:\b(?:not|never|neither|nor)))\s+"
                     rf"(?:(?i:option|choice)\s+)?{named}"
                     rf"|(?<![\w']){named}[\s,.:;\-\u2013\u2014]*\(?{_CHOICE_HEDGE_AFTER}",
                     span) is not None


_CHOICE_DOUBT = re.compile(
    r"\b(?:not (?:\w+ )?(?:sure|certain)|unsure|no idea|(?:do|did) not know|i guess"
    r"|(?:can|could) not (?:tell|say|know) for (?:sure|certain)|hard to say)\b")
_CHOICE_HEDGE_BEFORE = (r"(?i:\b(?:(?:most\s+)?likely|probably|maybe|perhaps|possibly"
                        r"|(?:could|might|may)\s+be))")
_CHOICE_HEDGE_AFTER = r"(?i:(?:most\s+)?likely|probably|maybe|perhaps|possibly|uncertain)\b"


def _named_choice(
    span: str, choices: Optional[Sequence[str]], cued: bool
) -> Optional[str]:
    if m := _CHOICE_ALONE.fullmatch(span):
        return m.group(1).upper()
    if m := _CHOICE_LEADING.match(span):
        letter = next(g for g in m.groups() if g).upper()
        return None if _rejects(span[m.end():], letter, choices) else letter
    valid = {chr(ord("A") + i) for i in range(min(len(choices), 26))} if choices else None
    if cued and (letter := _cued_choice(span, valid, choices)) is not None:
        return letter or None
    if _CHOICE_NEGATED.match(span):
        return None  # "The answer is not B": naming an option to reject it answers nothing
    keyword = list(_CHOICE_KEYWORD.finditer(span))
    if keyword:
        m = keyword[-1]
        return None if _rejected_after(span, m.end()) else m.group(1).upper()
    parenthesised = set(_CHOICE_PARENTHESISED.findall(span))
    if len(parenthesised) == 1:
        return parenthesised.pop()
    if choices:
        normalized = normalize_text(span)
        matches = [i for i, c in enumerate(choices) if normalize_text(str(c)) == normalized]
        if len(matches) == 1 and matches[0] < 26:
            return chr(ord("A") + matches[0])
    letters = {letter for letter in _CAPITAL_WORD.findall(span) if valid is None or letter in valid}
    if len(letters) != 1:
        return None
    letter = letters.pop()
    m = re.search(rf"\b{letter}\b[)\]]?", span)
    return None if m and _rejected_after(span, m.end()) else letter  # "B is incorrect."


def _rejected_after(span: str, end: int) -> bool:
    """Whether the words right after an option named at ``span[:end]`` reject it."""
    return _CHOICE_REJECTED.match(_CHOICE_CLAUSE_END.split(span[end:], maxsplit=1)[0]) is not None


# --- yes / no ---------------------------------------------------------------------------------

# Answer words: a leading one decides ("Yes, there is none" -> yes).
_YES_WORDS = {"yes", "yeah", "yep", "yup", "true", "correct", "affirmative"}
_NO_WORDS = {"no", "nope", "false", "incorrect", "negative", "not", "never"}
# Intensifiers and discourse markers: they affirm on their own ("Sure.", "Absolutely!") but yield
# to what follows them ("Absolutely no." -> no, "Sure, there is no cat." -> no).
_YES_ADVERBS = {"indeed", "certainly", "definitely", "absolutely", "sure", "surely"}
_YES_ADVERB_PHRASES = (("no", "doubt"), ("of", "course"))
_NEGATIONS = {"not", "no", "never", "none", "nothing", "neither", "nor", "nobody", "nowhere"}
_NOBODY = {"none", "nobody", "nothing", "nowhere"}  # opening a statement, they answer no
# A statement about the speaker ("I don't know", "We can't tell") answers nothing.
_SPEAKERS = {"i", "we", "you"}
_AUXILIARIES = {
    "is", "are", "was", "were", "does", "do", "did", "can", "could", "has", "have", "had",
    "will", "would", "should", "am", "may", "might", "must",
}
_BOTH_POLARITIES = re.compile(r"\b(?:yes\s*(?:or|and|/)\s*no|no\s*(?:or|and|/)\s*yes)\b")
# Hedges commit to neither answer, whatever else the span says ("Not sure." is not "no").
_HEDGE = re.compile(
    r"\b(?:not (?:sure|certain)|unsure|uncertain|unclear|no idea|(?:do|did) not know"
    r"|(?:not enough|insufficient) (?:information|evidence|details?)|not clear"
    r"|no way to (?:tell|know)"
    r"|(?:can|could) not (?:tell|say|determine|know|be (?:sure|certain|determined|told))"
    r"|(?:impossible|not possible|hard|difficult) to (?:tell|say|determine|know))\b"
)
# Hedging words that count only in a span where no clause opens with yes or no ("It could be"
# hedges; "Yes, it may be partially hidden" and "Based on the image, yes, it is likely a puppy"
# answer), or right next to the answer word (_HEDGED_ANSWER).
_SOFT_HEDGE = re.compile(
    r"\b(?:(?:could|might|may) be|maybe|possibly|perhaps|probably|(?:un)?likely|neither(?! of)"
    r"|ambiguous|not necessarily)\b")
# A hedge word right next to the answer word hedges the answer itself.
_HEDGE_WORDS = r"(?:most )?(?:likely|probably)|maybe|perhaps|possibly"
_HEDGED_ANSWER = re.compile(
    rf"\b(?:{_HEDGE_WORDS}) (?:yes|no|not)\b|\b(?:yes|no) (?:{_HEDGE_WORDS})\b")


def _yesno_words(span: str) -> list[str]:
    span = _unwrap_latex(span).lower().replace("\u2019", "'")
    # Expand contractions so negation is a word of its own: "isn't" -> "is not".
    span = re.sub(r"\bcan't\b|\bcannot\b", "can not", span)
    span = re.sub(r"\bwon't\b", "will not", span)
    span = re.sub(r"n't\b", " not", span)
    span = re.sub(r"'s\b", " is", span)
    span = re.sub(r"'re\b", " are", span)
    return re.findall(r"[a-z]+", span)


def _leading_adverbs(words: list[str]) -> int:
    """How many of the leading words are affirming adverbs ("absolutely", "of course", ...)."""
    i = 0
    while i < len(words):
        if words[i] in _YES_ADVERBS:
            i += 1
            continue
        phrase = next((p for p in _YES_ADVERB_PHRASES if tuple(words[i : i + len(p)]) == p), None)
        if phrase is None:
            break
        i += len(phrase)
    return i


def parse_yesno(span: Optional[str]) -> Optional[str]:
    """"yes" / "no" from a span, or None when it commits to neither.

    In order: "yes or no" / "yes and no" and hedges ("Not sure", "I don't know", "It cannot be
    determined") -> None; a leading answer word decides ("Yes, there is" -> yes, "No." /
    "Not at all" -> no); leading adverbs ("Certainly", "Sure,", "No doubt") affirm unless what
    follows answers ("Certainly not", "Absolutely no", "Sure, there is no cat" -> no); an explicit
    yes or no inside ("I'd say yes"; both -> None); a short statement, an auxiliary verb among its
    first four words ("It is not", "There are two", "The shirt isn't red"), is yes unless negated.
    A hedge word next to the answer ("Probably yes", "Yes, most likely") or, in a span where no
    clause opens with yes or no, anywhere ("It is likely", "Not necessarily") -> None.
    Statements about the speaker ("I don't know") and anything else -> None.
    """
    if not span:
        return None
    words = _yesno_words(span)
    joined = " ".join(words)
    if not words or _BOTH_POLARITIES.search(joined) or _HEDGE.search(joined):
        return None
    answers = _clause_answers(span)
    if len(answers) > 1 or _both_answer_words(words):  # "Yes/No", "No, wait, yes.", "yes no"
        return None
    if _HEDGED_ANSWER.search(joined):  # "Probably yes", "Yes, most likely", "Likely not"
        return None
    # Elsewhere a soft hedge hedges only a span without an answer word opening it or one of its
    # clauses ("It could be", "Not necessarily"; not "Based on the image, yes, it is likely a
    # puppy").
    if not answers and words[0] not in _YES_WORDS | _NO_WORDS - {"not"} \
            and _SOFT_HEDGE.search(joined):
        return None
    return _yesno_from_words(words)


# Clauses: split at punctuation and "but"; a clause's answer is its leading yes or no word
# after discourse markers ("but actually no", "wait, yes").
_CLAUSE_BREAK = re.compile(r"[.,;:!?/|()\n]+|\bbut\b", re.IGNORECASE)
_CLAUSE_MARKERS = {"actually", "wait", "or", "and", "then", "well", "hmm", "oh", "so", "rather"}
_CLAUSE_SUBJECTS = {"it", "there", "they", "that", "this", "he", "she", "i", "not"}


def _clause_answers(span: str) -> set:
    answers = set()
    for clause in _CLAUSE_BREAK.split(span):
        words = [w for w in _yesno_words(clause) if w not in _CLAUSE_MARKERS]
        # A clause's "no" answers only alone or before a subject ("No, it is not"); "no one",
        # "no doubt", "no cars are visible" are phrases.
        if words[:1] == ["yes"] or (words[:1] == ["no"] and (
                len(words) == 1 or words[1] in _CLAUSE_SUBJECTS)):
            answers.add(words[0])
    return answers


_POLAR_WORDS = {**dict.fromkeys(_YES_WORDS, "yes"),
                **dict.fromkeys(_NO_WORDS - {"not", "never"}, "no")}


def _both_answer_words(words: list[str]) -> bool:
    """Whether the answer words opening a span give both answers ("yes no", "True False",
    "correct, incorrect"). A "no" that opens a phrase ("Yes, no one is there", "Yes, no doubt")
    is no answer word."""
    polarities = set()
    for i, word in enumerate(words):
        if word in _CLAUSE_MARKERS:
            continue
        if word not in _POLAR_WORDS or (word == "no" and i + 1 < len(words) and (
                words[i + 1] not in _POLAR_WORDS and words[i + 1] not in _CLAUSE_SUBJECTS)):
            break
        polarities.add(_POLAR_WORDS[word])
    return len(polarities) > 1


_TRUTH_WORDS = {"true": "yes", "correct": "yes", "false": "no", "incorrect": "no"}


def _yesno_from_words(words: list[str]) -> Optional[str]:
    if not words:
        return None
    if words[0] in _YES_WORDS:
        return "no" if words[1:2] == ["not"] else "yes"
    adverbs = _leading_adverbs(words)
    if adverbs:
        rest = words[adverbs:]
        decided = _yesno_from_words(rest)
        if decided is not None:
            return decided
        # "Definitely, I think so" affirms; "Sure, nothing" is no clear answer.
        return None if _NEGATIONS.intersection(rest) else "yes"
    if words[0] in ("not", "never") and _POLAR_WORDS.get(words[1] if len(words) > 1 else "") \
            == "no":
        return None  # "Not no", "not false": a negated no commits to nothing (a statement,
        # "The answer is not false", is read by its truth word below: yes)
    if words[0] in _NO_WORDS or words[0] in _NOBODY or words[:2] == ["neither", "of"]:
        return "no"  # "None of the people are wearing hats", "Neither of them is"
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    if has_yes:
        return None
    verb = next((i for i, w in enumerate(words[1:4], start=1) if w in _AUXILIARIES), None)
    if verb is None or _SPEAKERS.intersection(words[:verb]):
        return None
    # A statement's truth value answers: "It's false", "The statement is incorrect" -> no.
    negated = words[verb + 1 : verb + 2] == ["not"]
    truth = _TRUTH_WORDS.get(" ".join(words[verb + 1 + negated : verb + 2 + negated]))
    if truth is not None and len(words) <= verb + 3 + negated:
        return {"yes": "no", "no": "yes"}[truth] if negated else truth
    # A negation anywhere answers no: "There is a dog, but no cat" reads as an answer about the
    # cat. Which clause answers depends on the question, which the verifier does not see; a
    # negation in a statement far more often answers it ("The man, however, is not wearing a hat").
    return "no" if _NEGATIONS.intersection(words) else "yes"


# --- numbers ----------------------------------------------------------------------------------

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(
    rf"(?P<sign>[-+]?)\s*(?P<num>{_UNSIGNED})(?:\s*/\s*(?P<den_sign>[-+]?)(?P<den>{_UNSIGNED}))?"
    r"(?P<percent>\s*(?:%|\bpercent\b))?"
)
_MIXED_FRACTION = re.compile(r"(?<!\d)(\d+)\s*\\[dtc]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_FRACTION = re.compile(r"\\[dtc]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRACTION_SHORT = re.compile(r"\\[dtc]?frac\s*(\d)\s*(\d)")
_TIMES_POWER_OF_TEN = re.compile(
    r"(?<=\d)\s*(?:\\times|\\cdot|[×*x\u00b7])\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?")
# A numeral raised to an integer power ("2^{10}", "10^-3", "3^{2}" from "3²").
_POWER = re.compile(
    r"(?<![\w.^])(\d+(?:\.\d+)?)\s*\^\s*(?:\{\s*([-+]?\d{1,4})\s*\}|([-+]?\d{1,4})(?!\d))")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
# Counting answers are often spelled out ("There are two dogs").
_NUMBER_WORDS = {
    word: float(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ZERO_PHRASES = r"no\s+one|nobody|none"
_NUMBER_WORD = re.compile(
    r"\b(" + _ZERO_PHRASES + "|" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE
)
# "one" is also a pronoun ("any one", "the one on the left", "one another"): no count then.
# "one of them" stays a count ("Only one of them is red" -> 1).
# "no one" / "nobody" / "none" do count, as zero.
_PRONOUN_ONE = re.compile(
    r"\b(?:any|every|each|some|the|this|that|which|whichever|another|other)\s+one\b"
    r"|\bone\s+another\b",
    re.IGNORECASE,
)
_ZERO_WORDS = re.compile(_ZERO_PHRASES, re.IGNORECASE)


_THOUSANDS_LATEX = re.compile(r"(?<=\d)(?:\\,|\{,\})(?=\d{3}(?!\d))")
# Thousands separated by spaces ("1 000 000", "12 345"): groups of exactly three digits.
_THOUSANDS_SPACED = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?![\d.,/^-])")
# A mixed number in plain text ("2 1/2"), a proper fraction after the whole part.
_MIXED_PLAIN = re.compile(r"(?<![\d.,/])(\d+) (\d+)\s*/\s*(\d+)(?![\d.,/])")
# LaTeX commands that leave a numeral next to them a number: units, styling, arrows, "\approx".
_NOT_OPERATORS = (
    r"(?:text[a-z]*|math(?:rm|it|bf|sf|tt|normal)|[mh]box|rm|it|bf|operatorname|unit|si|SI|qty"
    r"|mu[a-z]?|Omega|ohm|AA|circ|degree|quad|qquad|approx|sim|simeq|displaystyle|textstyle"
    r"|boxed|fbox|underline|[Rr]ightarrow|Longrightarrow|implies|to|therefore|colon|pounds|euro"
    r"|yen|dollar|cent|[Bb]igg?[lr]?)(?![A-Za-z])")
# A numeral inside an expression states no number: one followed by a root, pi, a power or
# subscript, a factorial or an operator command ("2\sqrt{3}", "3\pi", "2^x", "5!", "2 \times 3",
# "1 + \sqrt{2}"; not "30^o", a degree) ...
_EXPRESSION_AFTER = re.compile(
    rf"!|\s*(?:\^(?!\s*\{{?\s*o\s*\}}?(?![A-Za-z]))|_|[\u221a\u221b\u03c0\u00b1\u2213]"
    rf"|\)\s*[\^_!]"  # "(-2)^2" is 4, not -2
    rf"|\\(?!{_NOT_OPERATORS})[A-Za-z]"
    rf"|[-+*/]\s*(?:\\(?!{_NOT_OPERATORS})[A-Za-z]|[\u221a\u221b\u03c0]))")
# ... or one that is an exponent, a subscript, a function's or root's argument, or after a
# variable and an operator ("x^2", "e^{-2}", "\log_2 8", "\sqrt{9}", "x + 5"; not
# "approximately -5"; a numeral glued to a word, "cho3R", is still read).
_EXPRESSION_BEFORE = re.compile(
    rf"(?:[\^_]\s*\{{?|\\(?!{_NOT_OPERATORS})[A-Za-z]+\s*(?:\[[^\]]{0,16}\]\s*)?\{{?"
    r"|[\u221a\u221b]\s*\{?|[\u00b1\u2213])\s*[-+]?\s*$"
    r"|[A-Za-z\u0370-\u03ff})](?:[-+*/]\s*|\s+[-+*/]\s+)$")
# A time or a ratio ("10:45", "3:2") is not one number.
_RATIO = re.compile(r"\s*:\s*\d")
_DASH_MINUS = re.compile(r"(?<![\w)}])[\u2013\u2012](?=\s*\d)")
# A negated number or a bound commits to no count ("not 5", "at least 5", "5 or more", "5+").
_NUMBER_NEGATED = re.compile(r"^\s*(?:not|never)\b", re.IGNORECASE)
_NUMBER_BOUND = re.compile(
    r"\b(?:at\s+(?:least|most)|(?:more|fewer|less|greater)\s+than|no\s+(?:more|fewer|less)"
    r"\s+than|up\s+to|under|over|below|above)\s+[-+]?\.?\d"
    r"|\d\s*(?:\+(?!\s*\d)|\s+or\s+(?:more|fewer|less)\b)"
    # "<5", "x >= 5", "≤ 5", "5 < x": a comparison, not a value ("->" is an arrow)
    r"|(?<![-=<>])[<>\u2264\u2265\u2a7d\u2a7e]=?\s*[-+]?\.?\d"
    r"|\d\s*[<>\u2264\u2265\u2a7d\u2a7e]=?\s*(?:[-+]?\d|\\?[A-Za-z](?![A-Za-z]))",  # not "5 <br>"
    re.IGNORECASE)
# An equals sign, not part of a comparison ("x >= 5", "x != 5", "5 => 6").
_EQUALS = re.compile(r"(?<![<>!=])=(?![=>])")
# A sign spelled out ("negative 5", "minus 3 degrees").
_SIGN_WORD = re.compile(r"\b(?:negative|minus)\s+(?=\.?\d)", re.IGNORECASE)
_SIGN_WORD_BEFORE = re.compile(r"\b(?:negative|minus)\s+$", re.IGNORECASE)


@dataclass(frozen=True)
class Number:
    value: float
    percent: bool = False

    def __str__(self) -> str:
        return format(self.value, ".10g") + ("%" if self.percent else "")


def _plain_number_text(span: str) -> str:
    """LaTeX numerals as text: \\frac{3}{4} -> 3/4, 2\\frac{1}{2} and 2 1/2 -> 2.5,
    3\\times10^{4} -> 3e4, 1 000 000 -> 1000000."""
    # Thousands written 1\,000 or 1{,}000 (LaTeX), and an en dash used as a minus sign ("–3").
    span = _THOUSANDS_LATEX.sub(lambda m: "," if "{" in m.group() else "", span)
    span = _DASH_MINUS.sub("-", span)
    span = re.sub(r"(?<=\d)\s*~\s*(?=\d)", " to ", span)  # "5~6" (LaTeX's ~ is a space)
    span = _unwrap_latex(span).replace("\\%", "%").replace("\u2044", "/")
    span = _SIGN_WORD.sub("-", span)  # after unwrapping: "\text{minus }5"
    span = _DEGREES.sub(" ", span)

    def mixed(m: re.Match) -> str:
        whole, num, den = (float(g) for g in m.groups())
        return f" {whole + num / den!r} " if den else " "  # x/0 states no number

    def mixed_plain(m: re.Match) -> str:
        whole, num, den = (float(g) for g in m.groups())
        return f" {whole + num / den!r} " if num < den else m.group()

    span = _MIXED_FRACTION.sub(mixed, span)
    span = _MIXED_PLAIN.sub(mixed_plain, span)
    span = _THOUSANDS_SPACED.sub(lambda m: m.group().replace(" ", ""), span)
    span = _FRACTION.sub(r" \1/\2 ", span)
    span = _FRACTION_SHORT.sub(r" \1/\2 ", span)
    return _POWER.sub(_power, _TIMES_POWER_OF_TEN.sub(r"e\1", span))


def _power(m: re.Match) -> str:
    base, exponent = float(m.group(1)), int(m.group(2) or m.group(3))
    try:
        value = base**exponent if abs(exponent) <= 1024 else math.inf
    except (OverflowError, ZeroDivisionError):
        value = math.inf
    return f" {value!r} " if math.isfinite(value) else " inf "  # inf: no number ("0^{-1}")


def _to_number(m: re.Match) -> Optional[Number]:
    value = float(m.group("num").replace(",", ""))
    if m.group("den") is not None:
        den = float(m.group("den").replace(",", ""))
        if den == 0:
            return None
        value = value / den * (-1 if m.group("den_sign") == "-" else 1)
    value = -value if m.group("sign") == "-" else value
    if not math.isfinite(value):
        return None
    return Number(value, percent=bool(m.group("percent")))


def parse_number(span: Optional[str], strict: bool = False) -> Optional[Number]:
    """The number a span states ("1,234", "-0.5", "3/4", "\\dfrac{1}{2}", "50%", "12 cm", "two").

    After an "=" only the right-hand side counts ("x = 5", "2 + 3 = 5"); then the first number
    is taken, so units and trailing words are ignored; number words (zero..twenty, and "no one" /
    "nobody" / "none" as zero) only count when no numeral is present, and "one" not when it is a
    pronoun ("anyone", "every one", "the one on the left", "one another"). Integer powers of
    numerals are evaluated ("2^{10}", "3²" -> 9; "1½" and "1 1/2" -> 1.5; "1 000" -> 1000). A
    span that offers numbers as alternatives or a range ("5 or 6", "5, 6, 7", "5-6", "between 5
    and 6"), negates its number ("not 5"), bounds it ("at least 5", "under 5", "x >= 5"), or
    whose first numeral is part of an expression ("2\\sqrt{3}", "3\\pi", "x^2", "e^{2}",
    "\\sqrt{9}", "5!", "x + 5", "(-2)^2", "5 ± 1") or of a time or ratio ("10:45") states none;
    units after it do not make one ("5 cm", "5\\,\\mu m", "45°"). "negative 5" and "minus
    five" are -5. `strict` requires the whole span to be one number, after at most one "x ="
    (used for `math`, where "2x", "\\sqrt{2}" or "x = 2 or x = 3" must not read as a number).
    """
    if not span:
        return None
    text = _plain_number_text(span)
    if strict:  # the last side of "x = 5", "\\theta = 30", "3 \\times 4 = 12"; not of "x = 2 or
        if re.search("[<>!\u2264\u2265\u2a7d\u2a7e]", text):
            return None  # "x >= 5", "x != 5": a comparison
        if "=" in text:  # x = 3" (a side lists answers) or "2 = 3" (two different numbers)
            sides = [side.strip().rstrip(".") for side in text.split("=")]
            # Prose before the first "=" may hold commas ("Thus, x = 4"); a middle side that
            # lists values does not ("x = 2 or x = 3", "x = 3, y = 4").
            if re.search(r"\bor\b|\band\b", sides[0]) or any(
                    re.search(r"\d\W*(?:\bor\b|\band\b|[,;])", side) for side in sides[1:-1]):
                return None
            values = {n.value for n in (_strict_number(side) for side in sides) if n}
            if len(values) > 1:
                return None
            text = sides[-1]
        return _strict_number(text.strip().rstrip("."))
    text = _EQUALS.split(text)[-1]
    text = text.strip().rstrip(".")
    if _NUMBER_NEGATED.match(text):
        return None  # "not 5"
    if _NUMBER_BOUND.search(text):
        return None  # "at least 5", "5 or more", "5+": a bound, not a count
    m = _NUMBER.search(text)
    if m:
        if (_EXPRESSION_AFTER.match(text, m.end()) or _RATIO.match(text, m.end())
                or _EXPRESSION_BEFORE.search(text[max(0, m.start("num") - 64):m.start("num")])
                or _offers_alternatives(text, m)):
            return None
        return _to_number(m)
    pronouns = [p.span() for p in _PRONOUN_ONE.finditer(text)]
    for word in _NUMBER_WORD.finditer(text):
        if _ZERO_WORDS.fullmatch(word.group(1)):
            return Number(0.0)
        if not any(start <= word.start() < end for start, end in pronouns):
            value = _NUMBER_WORDS[word.group(1).lower()]
            return Number(-value if _SIGN_WORD_BEFORE.search(text[:word.start()]) else value)
    return None


def _strict_number(text: str) -> Optional[Number]:
    m = _NUMBER.fullmatch(text)
    return _to_number(m) if m else None


def _offers_alternatives(text: str, m: re.Match) -> bool:
    """Whether the first number ``m`` is one of several offered as alternatives or a range:
    three or more joined by list separators ("5, 6, 7", "5 or 6 or 7", "5; 6; 7", "5 6 7"); two
    joined by "or" / "to" ("5 or 6 red apples"); by a dash, "and", or a space with nothing but a
    unit after the second ("5-6", "5 and 6", "5 6"); by a comma or semicolon with nothing after
    ("1, 2"); "between 5 and 6". Not "4, 2 on each side", "2 - 1 red and 1 blue",
    "3, and 2 are red"."""
    items, separators = [m], []
    while len(items) < 3 and (after := _NUMBER.search(text, items[-1].end())) is not None:
        # The match may open with the spaces before the second number: "5 6" is "5", " 6".
        sign = after.start("sign") if after.group("sign") else after.start("num")
        separator = _list_separator(text[items[-1].end():sign], after)
        if separator not in _LIST_SEPARATORS:
            break
        items.append(after)
        separators.append(separator)
    if len(items) > 2:
        return True
    if len(items) < 2:
        return False
    separator = separators[0]
    tail = text[items[1].end():].strip(" .!)")
    only_unit = len(tail.split()) <= 1
    if re.search(r"\bbetween\s*$", text[:m.start()], re.IGNORECASE):
        return separator == "and" and only_unit
    if separator in ("or", "to"):  # "~" became " to " already
        return True
    if separator in (",", ";"):
        return not tail
    return only_unit  # "5-6", "5 \u2014 6", "5 and 6"; not "10 \u2013 3 on the left and 7 ..."


# What joins the numbers of a list, a range or alternatives (" " for a space alone).
_LIST_SEPARATORS = {",", ";", "or", "to", "and", "-", "\u2013", "\u2014", " "}


def _list_separator(between: str, after: re.Match) -> str:
    """The separator ``between`` two numbers, normalised ("and/or", ", or possibly", "(or")."""
    if not between.strip():  # "5-6", "5 -6": the range's dash reads as the second number's sign
        return after.group("sign") or (" " if between else "")  # "5 +6" is no list
    separator = " ".join(between.lower().replace("and/or", "or").split())
    separator = re.sub(r"\s*\b(?:maybe|perhaps|possibly)$", "", separator.lstrip("("))
    separator = re.sub(r"^[,(]\s*(?=or$|and$)", "", separator)  # ", or", "(or", ", and"
    if not separator and after.group("sign") == "-":
        return "-"
    return separator


def numbers_equal(response: Number, reference: Number) -> bool:
    """Equal within a relative tolerance (integers exactly; no absolute slack, so 0 equals only
    0); a percent on exactly one side may also mean value/100."""
    candidates = [(response.value, reference.value)]
    if response.percent and not reference.percent:
        candidates.append((response.value / 100.0, reference.value))
    elif reference.percent and not response.percent:
        candidates.append((response.value, reference.value / 100.0))
    return any(_close(a, b) for a, b in candidates)


def _close(a: float, b: float) -> bool:
    whole = [x.is_integer() and abs(x) < _EXACT_INTEGER_LIMIT for x in (a, b)]
    if all(whole):
        return a == b
    # One whole number: a near miss of a large integer is no match (1000000.5 is not 1000000),
    # float noise is (3.0000000001 is 3).
    return math.isclose(a, b, rel_tol=_INTEGER_REL_TOL if any(whole) else _NUMBER_REL_TOL,
                        abs_tol=0.0)


# --- math -------------------------------------------------------------------------------------

# A trailing unit after a value ("5\text{ cm}"); a bare "\text{east}" is the answer itself.
_MATH_UNITS = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}\s*$")
_MATH_LHS = re.compile(r"^[A-Za-z]\w*\s*=(?!=)")


def normalize_math(span: str) -> str:
    """Canonical string of a math answer (MATH-benchmark-style cleanup, no CAS)."""
    span = unicodedata.normalize("NFKC", span).strip().rstrip(".")
    span = _MATH_DELIMITERS.sub("", span)
    span = _MATH_UNITS.sub("", span.strip())
    span = _MATH_LHS.sub("", span)
    span = _LATEX_SPACING.sub("", span)
    span = _DEGREES.sub("", span)
    span = re.sub(r"\\[dtc]frac", r"\\frac", span)
    span = _FRACTION_SHORT.sub(r"\\frac{\1}{\2}", span)
    span = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", span)
    span = re.sub(r"([_^])\s*\{\s*(\w)\s*\}", r"\1\2", span)  # x^{2} -> x^2
    span = _LATEX_WRAPPERS.sub(r"\1", span)
    span = span.replace("\\%", "").replace("%", "").replace("\u2212", "-")
    return "".join(span.split())


def _math_equal(response: str, reference: str) -> bool:
    a, b = parse_number(response, strict=True), parse_number(reference, strict=True)
    if a is not None and b is not None:
        return numbers_equal(a, b)
    a_norm, b_norm = normalize_math(response), normalize_math(reference)
    if a_norm == b_norm:
        return True
    # After cleanup ("x = \dfrac{3}{4} \text{ m}" -> "\frac{3}{4}"), try numbers once more; not
    # where an "=" is left, which the cleanup may have glued to words ("2orx=3").
    if "=" in a_norm or "=" in b_norm:
        return False
    a, b = parse_number(a_norm, strict=True), parse_number(b_norm, strict=True)
    return a is not None and b is not None and numbers_equal(a, b)


# --- verdicts ---------------------------------------------------------------------------------


def _judge(
    span: Optional[str],
    answer: str,
    answer_type: str,
    choices: Optional[Sequence[str]],
    cued: bool = False,
) -> tuple[Optional[str], bool]:
    """(canonical parsed answer or None, correct) for one extracted span; `cued` as returned by
    `_locate_answer`."""
    if answer_type == "choice":
        parsed = _parse_choice(span, choices, cued)
        reference = parse_choice(answer, choices)
    elif answer_type == "yesno":
        parsed, reference = parse_yesno(span), parse_yesno(answer)
    elif answer_type == "number":
        number, ref_number = parse_number(span), parse_number(answer)
        if ref_number is None:  # "4\sqrt{2}", "10:45": compared as text (below), parsed or not
            parsed = str(number) if number is not None else normalize_text(span or "") or None
        elif number is None:
            return None, False
        else:
            return str(number), numbers_equal(number, ref_number)
        reference = None
    elif answer_type == "math":
        if not span:
            return None, False
        return normalize_math(span) or None, _math_equal(span, answer)
    else:  # text
        parsed = normalize_text(span) if span else None
        return parsed or None, bool(parsed) and parsed == normalize_text(answer)
    if parsed is None:
        return None, False
    if reference is None:
        # The label itself does not parse for its type (a data issue): fall back to text match.
        return parsed, normalize_text(span) == normalize_text(answer)
    return parsed, parsed == reference


def compute_reward(
    response_text,
    answer,
    answer_type: str,
    choices: Optional[Sequence[str]] = None,
    spec: RewardSpec = RewardSpec(),
) -> RewardResult:
    """Verify one response against its reference answer and turn the verdict into a reward."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    span, cued = _locate_answer(response_text)
    answer = "" if answer is None else _nfkc(str(answer))  # as responses are (_response_tail)
    parsed, correct = _judge(span, answer, answer_type, choices, cued)
    format_ok = has_answer_format(response_text, spec.answer_format)
    reward = spec.correct_reward if correct else spec.wrong_reward
    if format_ok:
        reward += spec.format_reward
    return RewardResult(
        reward=float(reward),
        correct=bool(correct),
        parsed=parsed,
        parse_ok=parsed is not None,
        format_ok=format_ok,
    )


@dataclass
class BatchRewards:
    reward: torch.Tensor  # [n] float32, verifier reward (+ format bonus), before overlong shaping
    accuracy: torch.Tensor  # [n] float32 in {0, 1}
    parse_ok: torch.Tensor  # [n] bool
    format_ok: torch.Tensor  # [n] bool
    results: list[RewardResult] = field(repr=False)

    @property
    def num_unparsed(self) -> int:
        return int((~self.parse_ok).sum())


def compute_rewards(
    responses: Sequence,
    answers: Sequence,
    answer_types: Union[str, Sequence[str]],
    choices: Optional[Sequence[Optional[Sequence[str]]]] = None,
    spec: RewardSpec = RewardSpec(),
) -> BatchRewards:
    """`compute_reward` over a batch of rollouts (one entry per rollout, not per prompt)."""
    n = len(responses)
    if isinstance(answer_types, str):
        answer_types = [answer_types] * n
    if choices is None:
        choices = [None] * n
    if not len(answers) == len(answer_types) == len(choices) == n:
        raise ValueError(
            f"compute_rewards needs one entry per rollout: {n} responses, {len(answers)} answers, "
            f"{len(answer_types)} answer_types, {len(choices)} choices"
        )
    results = [
        compute_reward(r, a, t, c, spec)
        for r, a, t, c in zip(responses, answers, answer_types, choices)
    ]
    return BatchRewards(
        reward=torch.tensor([r.reward for r in results], dtype=torch.float32),
        accuracy=torch.tensor([float(r.correct) for r in results], dtype=torch.float32),
        parse_ok=torch.tensor([r.parse_ok for r in results], dtype=torch.bool),
        format_ok=torch.tensor([r.format_ok for r in results], dtype=torch.bool),
        results=results,
    )
