"""What an SMS body is billed as, and how to make a reply fit a budget. Pure: no I/O.

Carriers bill per segment. A body that uses only the GSM 03.38 default alphabet (and its
extension table, whose characters take an escape septet too) goes as GSM-7: 160 septets in
one segment, 153 per segment once split (the rest carries the concatenation header). Any
other character sends the whole body as UCS-2: 70 UTF-16 code units in one segment, 67 per
segment once split, an emoji outside the BMP taking two. A segment never ends between an
escape and its character, nor between the two halves of a surrogate pair.
"""

import re
import unicodedata
from dataclasses import dataclass

GSM7, UCS2 = "GSM-7", "UCS-2"
SINGLE = {GSM7: 160, UCS2: 70}  # units in a body that is one segment
MULTI = {GSM7: 153, UCS2: 67}  # units per segment of a longer body
MOST_SEGMENTS = 10  # Twilio takes at most 1,600 characters: 10 GSM-7 segments always fit

# The default alphabet in code order; 0x1B (escape) is not a character of its own.
GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM_EXTENSION = frozenset("\x0c^{}\\[~]|€")  # escape + one septet: two septets each
ELLIPSIS = "..."  # marks a reply cut mid-sentence; GSM-7, unlike "…"


@dataclass(frozen=True)
class Size:
    """What a body is billed as: its encoding, segments, and units (septets or UTF-16 units)."""

    encoding: str
    segments: int
    units: int


def encoding_of(text):
    """'GSM-7' if every character is in the GSM 03.38 alphabet or its extension, else 'UCS-2'."""
    return GSM7 if all(c in GSM_BASIC or c in GSM_EXTENSION for c in text) else UCS2


def _widths(text, encoding):
    if encoding == GSM7:
        return [2 if c in GSM_EXTENSION else 1 for c in text]
    return [2 if ord(c) > 0xFFFF else 1 for c in text]


def count(text):
    """The Size of an SMS body (an empty body is still one segment)."""
    text = text or ""
    encoding = encoding_of(text)
    widths = _widths(text, encoding)
    units = sum(widths)
    if units <= SINGLE[encoding]:
        return Size(encoding, 1, units)
    segments, used = 1, 0
    for width in widths:  # a two-unit character that does not fit starts the next segment
        if used + width > MULTI[encoding]:
            segments, used = segments + 1, 0
        used += width
    return Size(encoding, segments, units)


def room(max_segments):
    """How many characters `max_segments` segments hold: (GSM-7 characters, UCS-2 characters)."""
    if max_segments <= 1:
        return SINGLE[GSM7], SINGLE[UCS2]
    return MULTI[GSM7] * max_segments, MULTI[UCS2] * max_segments


# -- smart encoding ------------------------------------------------------------------

# Twilio's Smart Encoding list (twilio.com/docs/messaging/services/smart-encoding-char-list):
# characters with a GSM-7 look-alike, grouped by what they become. Where that list's
# replacement reads wrong it is fixed here: every odd space becomes one space (not two),
# U+2039/U+203A become < and >, U+2017 (double low line) becomes _; the minus sign and the
# non-breaking and figure dashes are added beside the en and em dashes.
_LOOK_ALIKES = {
    '"': "\u00ab\u00bb\u201c\u201d\u201e\u201f\u02ba\u02ee\u275d\u275e\u301d\u301e\uff02",
    "'": "\u2018\u2019\u201b\u02b9\u02bb\u02bc\u02bd\u02c8\u02ca\u02cb\u00b4`\u275b\u275c\u0313\u0314"
         "\ufe10\ufe11\uff07",
    "-": "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2043\u2022\u23bc\u23bd\ufe63\uff0d",
    " ": "\t\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f"
         "\u205f\u3000",
    "/": "\u00f7\u0337\u0338\u2044\u2215\u29f8\uff0f",
    "\\": "\u20e5\u29f5\u29f9\ufe68\uff3c",
    "_": "\u0332\u2017\uff3f",
    "|": "\u20d2\u20d3\u2223\u239c\u239f\u23b8\u23b9\u23d0\uff5c",
    ",": "\u201a\u0326\u3001\ufe50\ufe51\uff0c\uff64",
    ".": "\u3002\ufe52\uff0e\uff61",
    ":": "\u02d0\u02f8\u2982\ua789\ufe13\uff1a",
    ";": "\u204f\ufe14\ufe54\uff1b",
    "!": "\u01c3\ufe15\ufe57\uff01",
    "?": "\ufe16\ufe56\uff1f",
    "(": "\u2768\u276a\u27ee\u2985\ufe59\uff08",
    ")": "\u2769\u276b\u27ef\u2986\ufe5a\uff09",
    "{": "\u2774\ufe5b\uff5b",
    "}": "\u2775\ufe5c\uff5d",
    "[": "\uff3b",
    "]": "\uff3d",
    "<": "\u2039\ufe64\uff1c",
    ">": "\u203a\ufe65\uff1e",
    "=": "\u0347\ua78a\ufe66\uff1d",
    "+": "\u02d6\ufe62\uff0b",
    "*": "\u204e\u2217\u229b\u2722\u2723\u2724\u2725\u2731\u2732\u2733\u273a\u273b\u273c\u273d\u2743"
         "\u2749\u274a\u274b\u29c6\ufe61\uff0a",
    "^": "\u02c6\u0302\u1dcd\uff3e",
    "~": "\u02dc\u02f7\u0303\u0330\u0334\u223c\uff5e",
    "@": "\ufe6b\uff20",
    "$": "\ufe69\uff04",
    "#": "\ufe5f\uff03",
    "%": "\ufe6a\uff05",
    "&": "\ufe60\uff06",
    # invisible: zero-width characters, and control characters a phone would not show
    "": "\u200b\u2060\ufeff" + "".join(chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)]
                                        if chr(c) not in "\t\n\r\x0c"),
}
_WORDS = {"\u2026": "...", "\u203c": "!!", "\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4"}
# Small capitals (Twilio's list) and fullwidth letters and digits.
_SMALL_CAPITALS = dict(zip("\u1d00\u0299\u1d04\u1d05\u1d07\ua730\u0262\u029c\u026a\u1d0a\u1d0b\u029f\u1d0d"
                           "\u0274\u1d0f\u1d18\u0280\ua731\u1d1b\u1d1c\u1d20\u1d21\u028f\u1d22",
                           "ABCDEFGHIJKLMNOPRSTUVWYZ"))
SMART = str.maketrans(
    {c: plain for plain, chars in _LOOK_ALIKES.items() for c in chars}
    | _WORDS | _SMALL_CAPITALS
    | {chr(0xff21 + i): chr(ord("A") + i) for i in range(26)}
    | {chr(0xff10 + i): str(i) for i in range(10)})


def smart_encode(text):
    """`text` with look-alikes replaced (curly quotes, dashes, odd spaces, "…", ...) when that
    makes it GSM-7 without costing more segments; else `text` unchanged. A reply with an
    emoji or a script that needs UCS-2 keeps every character it was written with: replacing
    its quotes would save nothing."""
    text = text or ""
    plain = text.translate(SMART)
    if plain == text or encoding_of(plain) != GSM7:
        return text
    return plain if count(plain).segments <= count(text).segments else text


# -- fitting a reply into its budget -------------------------------------------------

# The end of a sentence: its mark (and closing quotes or brackets), then a space or line break.
SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f][\"')\]]*(?=\s)|\n")


def fit(text, max_segments, smart=True):
    """The reply as it is sent: smart-encoded (unless `smart` is False), then, if longer
    than `max_segments` segments, cut at the last sentence end within them, else at a word
    boundary with "...", never inside a character (a surrogate pair, an emoji sequence, a
    letter and its accents)."""
    text = (text or "").strip()
    if smart:
        text = smart_encode(text).strip()
    if count(text).segments <= max_segments:
        return text
    fits = _longest_prefix(text, max_segments)
    ends = [m.end() for m in SENTENCE_END.finditer(text, 0, fits + 1) if m.end() <= fits]
    if ends and ends[-1] >= fits // 2:
        return text[:ends[-1]].rstrip()
    fits = _longest_prefix(text, max_segments, ELLIPSIS)
    space = max((i for i in range(fits + 1) if i < len(text) and text[i].isspace()), default=0)
    cut = space if space >= fits // 2 else _whole_characters(text, fits)
    return text[:cut].rstrip(" ,;:-\n") + ELLIPSIS


def _longest_prefix(text, max_segments, suffix=""):
    """The longest n such that text[:n] + suffix fits (segments only grow as n does)."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if count(text[:mid] + suffix).segments <= max_segments:
            low = mid
        else:
            high = mid - 1
    return low


def _joins(c):
    """Does `c` belong to the character before it (an accent, a joiner, a skin tone, a variant)?"""
    n = ord(c)
    return (unicodedata.combining(c) > 0 or n == 0x200D or 0xFE00 <= n <= 0xFE0F or 0x1F3FB <= n <= 0x1F3FF
            or 0xE0020 <= n <= 0xE007F)


def _whole_characters(text, n):
    """n, moved back so text[:n] does not end inside an emoji sequence or a letter and its accents."""
    cut = n
    while 0 < cut < len(text) and (_joins(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    return cut or n
