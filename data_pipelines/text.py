"""Caption and report text: report-aware sentence splitting, sub-caption sampling, and which
report sentences state absence or normality.

Radiology reports and long captions have section headers ("FINDINGS:", "Impression:"),
numbered lists ("1. No effusion. 2. ...") and decimals ("3.5 cm") that a naive split on "."
would cut. `split_sentences` strips headers and enumerators and splits only on a sentence end
(., ! or ? followed by whitespace) that is not an abbreviation.
"""

from __future__ import annotations

import json
import random
import re
from typing import Sequence

# Section names matched case-insensitively ("Findings:", "FINDINGS:", "findings:").
_KNOWN_SECTIONS = (
    "findings", "impression", "impressions", "conclusion", "conclusions", "comparison",
    "comparisons", "technique", "indication", "indications", "history", "clinical history",
    "clinical information", "clinical indication", "reason for exam", "reason for examination",
    "examination", "exam", "procedure", "recommendation", "recommendations", "report",
    "summary", "diagnosis", "opinion", "result", "results", "addendum", "note", "notes",
)
# A header is a known section name, or any ALL-CAPS phrase (2-40 chars), followed by ':'.
_HEADER = re.compile(
    r"(?:(?<=^)|(?<=[\s.;]))"
    r"(?P<name>(?i:" + "|".join(sorted(map(re.escape, _KNOWN_SECTIONS), key=len, reverse=True)) + r")"
    r"|[A-Z][A-Z /&()-]{1,39})\s*:(?=\s|$)"
)
# Words after which a period does not end a sentence. Units ("cm.") are not here: in reports
# they end sentences far more often than they abbreviate.
_ABBREVIATIONS = {"e.g", "i.e", "vs", "approx", "dr", "mr", "mrs", "ms", "prof", "fig", "cf", "al", "resp", "incl", "ca"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ENUMERATOR = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")


def split_report_sections(text: str) -> dict[str, str]:
    """Sections of a report by header: {"findings": "...", "impression": "..."}.

    Header names are lower-cased; text before the first header is under "body". A header
    that appears twice has its texts joined with a space.
    """
    sections: dict[str, str] = {}
    name, start = "body", 0
    for match in _HEADER.finditer(text):
        _add_section(sections, name, text[start:match.start()])
        name, start = match.group("name").strip().lower(), match.end()
    _add_section(sections, name, text[start:])
    return sections


def _add_section(sections: dict[str, str], name: str, chunk: str) -> None:
    chunk = " ".join(chunk.split())
    if chunk:
        sections[name] = f"{sections[name]} {chunk}" if name in sections else chunk


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, section headers and list enumerators removed.

    >>> split_sentences("FINDINGS: A 3.5 cm nodule, e.g. in the lobe. No effusion.\\nIMPRESSION: Nodule.")
    ['A 3.5 cm nodule, e.g. in the lobe.', 'No effusion.', 'Nodule.']
    """
    sentences: list[str] = []
    for section in split_report_sections(text).values():
        pending = ""
        for piece in _SENTENCE_END.split(section):
            pending = f"{pending} {piece}" if pending else piece
            if _continues(pending):
                continue
            _add_sentence(sentences, pending)
            pending = ""
        _add_sentence(sentences, pending)
    return sentences


def _continues(piece: str) -> bool:
    """Whether the period ending `piece` is not a sentence end (abbreviation, enumerator)."""
    if not piece.endswith("."):
        return False
    last_word = piece[:-1].rsplit(None, 1)[-1].lower() if piece[:-1].strip() else ""
    # "1." / "(2)." alone: a list enumerator, not a sentence.
    return last_word in _ABBREVIATIONS or (last_word.strip("()").isdigit() and len(piece.split()) == 1)


def _add_sentence(sentences: list[str], piece: str) -> None:
    piece = _ENUMERATOR.sub("", piece).strip()
    if any(ch.isalnum() for ch in piece):
        sentences.append(piece)


def caption_sentences(caption: str) -> list[str]:
    """Sentences of a caption; a caption that is a JSON list of strings is taken as its sentences."""
    stripped = caption.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError:
            items = None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items if item.strip()]
    return split_sentences(caption)


def sample_sub_captions(caption: str, k: int, rng: random.Random, max_sentences: int = 3) -> list[str]:
    """`k` sub-captions of 1 to `max_sentences` (FLAIR: 3) sentences each, drawn from the
    sentences of `caption`.

    Each draw is, with equal chance, a run of consecutive sentences or sentences picked at
    random (kept in reading order). Deterministic given `rng`'s state. A caption with no
    sentence boundary yields itself `k` times. `caption` may be a JSON list of sentences.
    """
    sentences = caption_sentences(caption) or [caption.strip()]
    draws = []
    for _ in range(k):
        count = rng.randint(1, min(max_sentences, len(sentences)))
        if rng.random() < 0.5:
            start = rng.randrange(len(sentences) - count + 1)
            picked = sentences[start:start + count]
        else:
            picked = [sentences[i] for i in sorted(rng.sample(range(len(sentences)), count))]
        draws.append(" ".join(picked))
    return draws


def report_sentences(text: str, sections: Sequence[str] = ("findings", "impression")) -> list[str]:
    """The sentences of the wanted sections of a report, in section order.

    Section and sentence splitting are this module's (headers, enumerators, decimals,
    abbreviations); a report without any of the wanted headers gives all its sentences.
    """
    parts = split_report_sections(text)
    chosen = [parts[name] for name in sections if name in parts]
    if not chosen:
        chosen = list(parts.values())
    return [sentence for part in chosen for sentence in split_sentences(part)]


_NORMAL = re.compile(
    r"\b(no|not|without|absent|negative for|free of|unremarkable|normal|within normal limits|"
    r"preserved|clear|intact|patent|none)\b",
    re.IGNORECASE,
)
_ABNORMAL_DESPITE = re.compile(r"\b(but|however|except|although)\b", re.IGNORECASE)


def is_normal_sentence(sentence: str) -> bool:
    """True for a sentence that states absence or normality ("No pleural effusion.", "The
    heart is not enlarged."). Such sentences describe no region, so the alignment head must not
    pull them onto a patch. A sentence that also turns ("no effusion, but a nodule") counts as
    abnormal: misflagging an abnormal sentence as normal only drops its alignment term, while
    the reverse would force a normal statement onto a patch."""
    return bool(_NORMAL.search(sentence)) and not _ABNORMAL_DESPITE.search(sentence)
