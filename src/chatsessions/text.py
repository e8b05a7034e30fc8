"""Full-text rules shared by every backend: what a word is, how a query reads, what a snippet shows.

Both stores index the *tokens* made here, not the raw text, so that words match
the same way everywhere: case-insensitively (Unicode case folding) and
accent-insensitively (NFKD, combining marks dropped), a word being a run of
letters and digits. A query is words and `"quoted phrases"`; every one must
match. Nothing a client types reaches a search engine as syntax: the engines
only ever see tokens made of letters and digits.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from chatsessions.errors import InvalidInput
from chatsessions.models import content_text as content_text  # the text a message is searched by

_WORD = re.compile(r"[^\W_]+")
# The combining diacritical-mark blocks: what accent-folding drops after NFKD (as SQLite's
# unicode61 remove_diacritics does; vowel signs of other scripts are letters, and stay).
_DIACRITICS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")
_PHRASE = re.compile(r'"([^"]*)"?')  # a quote left open runs to the end of the query
SNIPPET_CHARS = 300
# Words a message contributes to the index at most (PostgreSQL keeps positions up to 16,383).
MAX_INDEXED_WORDS = 16_000
# Longer "words" (a base64 blob, a hash) are not indexed: PostgreSQL refuses lexemes over 2 KiB.
MAX_WORD_CHARS = 200


def fold(text: str) -> str:
    """Case- and accent-folded text: what matching compares."""
    if text.isascii():
        return text.lower()
    return _DIACRITICS.sub("", unicodedata.normalize("NFKD", text.casefold()))


def words(text: str) -> list[str]:
    """The folded words of `text`, in order."""
    return _WORD.findall(fold(text))


def index_words(text: str) -> list[str]:
    """The words a message is indexed under: its first MAX_INDEXED_WORDS."""
    # A word is rarely longer than 40 characters: the first MAX_INDEXED_WORDS fit in this prefix.
    found = _WORD.findall(fold(text[: MAX_INDEXED_WORDS * 40]))
    return [word for word in found if len(word) <= MAX_WORD_CHARS][:MAX_INDEXED_WORDS]


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed `q`: each entry is a phrase of one or more words; all must match."""

    phrases: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, q: str) -> SearchQuery:
        """Raises InvalidInput when `q` holds no word at all (only punctuation or spaces)."""
        phrases: list[tuple[str, ...]] = []
        rest: list[str] = []
        position = 0
        for match in _PHRASE.finditer(q):
            rest.append(q[position : match.start()])
            position = match.end()
            found = tuple(words(match.group(1)))
            if found:
                phrases.append(found)
        rest.append(q[position:])
        phrases += [(word,) for word in words(" ".join(rest))]
        unique = tuple(dict.fromkeys(phrases))
        if not unique:
            raise InvalidInput("q has no word to search for (letters or digits)", loc=("query", "q"))
        return cls(unique)

    @property
    def terms(self) -> set[str]:
        return {word for phrase in self.phrases for word in phrase}


def snippet(text: str, query: SearchQuery, *, limit: int = SNIPPET_CHARS) -> str:
    """At most `limit` characters of `text` around its first match of a query word."""
    if len(text) <= limit:
        return text
    terms = query.terms
    start = 0
    for match in _WORD.finditer(text):
        if fold(match.group(0)) in terms or any(w in terms for w in _WORD.findall(fold(match.group(0)))):
            start = match.start()
            break
    begin = max(0, min(start - limit // 3, len(text) - limit))
    return text[begin : begin + limit]


# Every indexed word carries a prefix naming its tenant and its message's role, so a word's list
# in the index holds only that tenant's (and role's) messages: a search never walks another
# tenant's matches, nor a list of all the tenant's messages.
_ROLE_CODES = {"system": "s", "developer": "d", "user": "u", "assistant": "a", "tool": "t"}


def tenant_token(tenant: str) -> str:
    """A tenant's part of the word prefix (letters and digits only, fixed length)."""
    return "t" + hashlib.blake2b(tenant.encode(), digest_size=8).hexdigest()


def word_prefix(tenant: str, role: str) -> str:
    return tenant_token(tenant) + _ROLE_CODES.get(role, "x")


def _prefixes(tenant: str, role: str | None) -> list[str]:
    codes = [_ROLE_CODES.get(role, "x")] if role is not None else list(_ROLE_CODES.values())
    token = tenant_token(tenant)
    return [token + code for code in codes]


def scoped_words(tenant: str, role: str, text: str) -> list[str]:
    """The words of `text` as the index keeps them (see `word_prefix`)."""
    prefix = word_prefix(tenant, role)
    return [prefix + word for word in index_words(text)]


def match_expression(tenant: str, role: str | None, query: SearchQuery) -> str:
    """The query as an FTS5 expression of quoted scoped words (no client syntax can reach FTS5).

    Each phrase matches under any role's prefix (or the one asked for): a message has one
    role, so all its words share one prefix.
    """
    prefixes = _prefixes(tenant, role)
    parts = []
    for phrase in query.phrases:
        options = ['"' + " ".join(prefix + word for word in phrase) + '"' for prefix in prefixes]
        parts.append("(" + " OR ".join(options) + ")")
    return " AND ".join(parts)


def tsvector_literal(found: list[str]) -> str:
    """A PostgreSQL tsvector of `found` (scoped words), with positions from 1."""
    positions: dict[str, list[int]] = {}
    for at, word in enumerate(found, start=1):
        positions.setdefault(word, []).append(at)
    # Words hold letters and digits only: nothing in them needs quoting beyond the quotes.
    return " ".join(f"'{word}':{','.join(map(str, at))}" for word, at in positions.items())


def tsquery_literal(tenant: str, role: str | None, query: SearchQuery) -> str:
    """A PostgreSQL tsquery: every phrase of `query`, as scoped words, under any (or one) role."""
    prefixes = _prefixes(tenant, role)
    parts = []
    for phrase in query.phrases:
        options = [" <-> ".join(f"'{prefix}{word}'" for word in phrase) for prefix in prefixes]
        parts.append("(" + " | ".join(f"({option})" for option in options) + ")")
    return " & ".join(parts)
