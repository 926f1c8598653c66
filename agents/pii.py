"""PII detection and reversible redaction for text that would leave the cluster."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w+])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?(?:[ .-]?\d{2,4}){2,4}(?!\w)")
_ACCOUNT = re.compile(r"\b(?:acct|account|a/c)\.?\s*(?:no\.?|number|#)?\s*:?\s*(\d{6,17})\b", re.I)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass
class Redactor:
    """Replaces PII with placeholders like `[EMAIL_1]`; the same value gets the same placeholder
    across every text of one call, and `restore` puts the originals back."""

    names: Iterable[str] = ()
    mapping: dict[str, str] = field(default_factory=dict)  # placeholder -> original
    _reverse: dict[tuple[str, str], str] = field(default_factory=dict)

    def _placeholder(self, kind: str, value: str) -> str:
        key = (kind, value)
        if key not in self._reverse:
            n = sum(1 for k, _ in self._reverse if k == kind) + 1
            ph = f"[{kind}_{n}]"
            self._reverse[key] = ph
            self.mapping[ph] = value
        return self._reverse[key]

    def redact(self, text: str) -> str:
        text = _EMAIL.sub(lambda m: self._placeholder("EMAIL", m.group()), text)
        text = _IBAN.sub(lambda m: self._placeholder("ACCOUNT", m.group()), text)

        def card(m: re.Match[str]) -> str:
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and _luhn(digits):
                return self._placeholder("CARD", m.group())
            return m.group()

        text = _CARD.sub(card, text)
        text = _ACCOUNT.sub(
            lambda m: m.group().replace(m.group(1), self._placeholder("ACCOUNT", m.group(1))), text
        )

        def phone(m: re.Match[str]) -> str:
            digits = re.sub(r"\D", "", m.group())
            return self._placeholder("PHONE", m.group()) if 7 <= len(digits) <= 15 else m.group()

        text = _PHONE.sub(phone, text)
        for name in sorted((n for n in self.names if n.strip()), key=len, reverse=True):
            pattern = re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)
            text = pattern.sub(lambda m: self._placeholder("NAME", m.group()), text)
        return text

    def restore(self, text: str) -> str:
        for ph, original in self.mapping.items():
            text = text.replace(ph, original)
        return text

    @property
    def found(self) -> bool:
        return bool(self.mapping)


def contains_pii(texts: Iterable[str], names: Iterable[str] = ()) -> bool:
    r = Redactor(names=list(names))
    for t in texts:
        r.redact(t)
    return r.found
