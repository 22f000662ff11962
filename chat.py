#!/usr/bin/env python3
"""chat.py - a terminal chat: one server relays lines between many clients.

    python3 chat.py server        # listen on 127.0.0.1:50000
    python3 chat.py client        # join it (in as many terminals as you like)

One file, standard library only. It reads top to bottom:

  1. Wire codec: length-prefixed JSON frames (README.md, "Protocol"). Pure.
  2. Text rules: nicks, room names, cleaning text, showing it safely.
  3. Command tables: slash commands for the client and the operator console;
     the same table writes /help.
  4. The server's core: its state and rules, with no socket and no clock
     (rooms, output, relays and stores, the gate, intake, nicks, people,
     Chat and its parts: arrivals, renames, room modes, the directory; then
     IRC, a second dialect). It turns bytes from connections into bytes
     queued for connections.
  5. Server loop: one thread, one selector. Accepts, reads, writes, TLS
     handshakes, timers, signals. It only moves bytes.
  6. Cluster (optional): several servers as one chat through Redis, with a
     small RESP2 client that lives in the same loop.
  7. The terminal: reading lines and printing without breaking them.
  8. Client: its protocol core (Session), rendering, the program.
  9. Benchmark, then certificates and the command line.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import codecs
import collections
import contextlib
import dataclasses
import enum
import errno
import functools
import getpass
import hashlib
import heapq
import itertools
import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
from typing import (TYPE_CHECKING, Any, Callable, Collection, Dict, Generic, Iterable, List, NamedTuple, Optional,
                    Protocol, Sequence, Tuple, TypeVar, Union, overload)

if TYPE_CHECKING:   # for annotations alone (typing has TypeGuard from 3.10 only; chat.py runs on 3.8)
    from typing_extensions import TypeGuard

VERSION = "1.0"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50000
log = logging.getLogger("chat")


# ---------------------------------------------------------------------------
# 1. Wire codec
# ---------------------------------------------------------------------------

PROTOCOL = 3                    # the version of the wire contract in README.md ("Protocol"); welcome says it
MAX_CLIENT_PAYLOAD = 65536      # largest frame a client may send
MAX_SERVER_PAYLOAD = 1 << 20    # largest frame a server may send
_LENGTH = struct.Struct(">I")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ProtocolError(Exception):
    """Something a peer sent that the protocol refuses; `code` is the wire code."""

    def __init__(self, code: str, text: str, **fields):
        super().__init__(text)
        self.code = code
        self.text = text
        self.fields = fields    # more for the error frame, e.g. retry_after

    def frame(self) -> dict:
        return {"type": "error", "code": self.code, "text": self.text, **self.fields}


def encode(frame: dict) -> bytes:
    """One frame on the wire: 4-byte big-endian length, then compact UTF-8 JSON."""
    payload = _dumps(frame).encode("utf-8")
    return _LENGTH.pack(len(payload)) + payload


def parse_payload(payload: bytes) -> dict:
    """The JSON object inside a frame, or ProtocolError('bad-frame')."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("bad-frame", "frame is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ProtocolError("bad-frame", "frame is not valid JSON") from None
    if type(obj) is not dict:
        raise ProtocolError("bad-frame", "frame is not a JSON object")
    if type(obj.get("type")) is not str:
        raise ProtocolError("bad-frame", 'frame has no string "type"')
    if _SURROGATE_ESCAPE.search(payload) and _holds_lone_surrogate(obj):
        raise ProtocolError("bad-frame", "frame holds a lone surrogate (\\uD800-\\uDFFF), which is not text")
    return obj


# JSON may spell a lone UTF-16 surrogate as an escape ("\ud800"): json.loads
# accepts it, but such a string can be neither encoded nor printed, so it is
# refused like invalid UTF-8. Only frames that contain such an escape are
# walked (a valid pair is joined into one character by json.loads).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_lone_surrogate(value: object) -> bool:
    stack = [value]
    while stack:      # a loop, not recursion: nesting as deep as json.loads allows
        value = stack.pop()
        if type(value) is str:
            if _SURROGATE.search(value):
                return True
        elif type(value) is dict:
            stack.extend(value.keys())
            stack.extend(value.values())
        elif type(value) is list:
            stack.extend(value)
    return False


def _is_number(value: object) -> TypeGuard[float]:
    """A JSON number: an int or a float, never a bool (an int to isinstance)."""
    return type(value) in (int, float)


class FrameDecoder:
    """Reassembles frames from a byte stream, however TCP split or merged it.

    feed() bytes in, then call next_frame() until it returns None. It never
    allocates what a length prefix announces: a frame over `max_payload` is
    refused as soon as its 4-byte prefix is seen."""

    def __init__(self, max_payload: int = MAX_CLIENT_PAYLOAD):
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0   # start of the first unread frame; consumed bytes are dropped lazily

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos

    def next_frame(self) -> Optional[dict]:
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= 4:
            (size,) = _LENGTH.unpack_from(buf, pos)
            if size > self.max_payload:
                raise ProtocolError("frame-too-large",
                                    f"frame of {size} bytes announced; the limit is {self.max_payload}")
            end = pos + 4 + size
            if len(buf) >= end:
                self._pos = end
                return parse_payload(bytes(buf[pos + 4:end]))
        if pos:   # compact once per batch: deleting a bytearray's head is cheap in CPython
            del buf[:pos]
            self._pos = 0
        return None


def encode_fitted(frame: dict, fit: str, limit: int = MAX_SERVER_PAYLOAD) -> bytes:
    """`frame` on the wire, its list `fit` halved (the last items go) until
    the frame fits `limit`, and then marked "truncated"."""
    data = encode(frame)
    while fit and len(data) - 4 > limit and frame[fit]:
        frame[fit] = frame[fit][:len(frame[fit]) // 2]
        frame["truncated"] = True
        data = encode(frame)
    return data


class Audience:
    """The connections that read a room's frames as the same bytes: all
    those of one dialect spoken one way. The core encodes each room frame
    once per turn for each audience in the room, and queues those bytes for
    every member of it (see Output). Each frame comes with its encoding as a
    JSON frame (`data`); the frame itself may be None (a line relayed as
    bytes), to be parsed from `data` where a dialect needs it."""

    echo = False        # a sender gets its own room frames back (IRCv3 echo-message)
    once = False        # someone leaving the server is told once (a `quit`), not once for each room

    def room_bytes(self, frame: Optional[dict], data: bytes) -> bytes:
        """A room frame as this audience reads it."""
        return data

    def shared(self, frame: dict) -> Optional[bytes]:
        """A frame for several connections at once (a nick change, a notice),
        if it reads the same for each of them; None: encode it for each one."""
        return encode(frame)


FRAMES = Audience()     # the JSON frames of the protocol, the same for everyone


class FrameCodec:
    """A connection speaking the protocol in README.md: length-prefixed JSON
    frames in (as requests) and out. Each connection has a codec: what it
    sends becomes the requests the core handles, and what the core sends it
    becomes bytes its dialect reads; the core sees the same requests and
    events whatever the dialect (see Audience)."""

    audience = FRAMES

    def __init__(self, max_payload: int = MAX_CLIENT_PAYLOAD):
        self.decoder = FrameDecoder(max_payload)

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    def feed(self, data: bytes) -> None:
        self.decoder.feed(data)

    def next(self) -> Optional[dict]:
        """The next request, or None until more bytes come (ProtocolError if bad)."""
        return self.decoder.next_frame()

    def encode(self, frame: dict, fit: str = "") -> bytes:
        """A frame (stamped) for this connection alone; `fit`: see encode_fitted()."""
        return encode_fitted(frame, fit) if fit else encode(frame)

    def farewell(self, reason: str) -> bytes:
        """What the connection is sent last, as the server closes it (why)."""
        return b""

    def with_history(self, frame: dict, lines: List["HistoryLine"]) -> bytes:
        """`frame` (a welcome or joined) with `lines` as its "history". The
        lines are kept as they were sent, so they are spliced in, not encoded
        again; "users" is cut to fit what they leave of the 1 MiB limit."""
        spliced = b",".join([memoryview(line.data)[4:] for line in lines])
        head = encode_fitted(frame, "users", MAX_SERVER_PAYLOAD - len(spliced) - 16)
        payload = head[4:-1] + b',"history":[' + spliced + b"]}"
        return _LENGTH.pack(len(payload)) + payload


# ---------------------------------------------------------------------------
# 2. Text rules
# ---------------------------------------------------------------------------

NAME_MAX = 32          # nicks and room names
TEXT_MAX = 4096        # characters in one chat line
TEXT_MAX_LINES = 50    # newlines in one chat line, so one frame cannot fill a screen
REASON_MAX = 200       # quit and kick reasons (a kick's is told as 'kicked by NICK: REASON')
LOBBY = "lobby"


def check_name(name: object, what: str = "nick") -> str:
    """A valid nick or room name, NFKC-normalised, or ProtocolError.

    1-32 letters, digits, `_`, `-`, `.`: that rules out spaces, control,
    invisible and bidi-override characters by construction. Letters may be
    of any script, but of one script per name (or a CJK mix), so a name
    cannot hide a look-alike from another script; letters that draw nothing
    (Hangul fillers) are refused, and so are those Unicode TR39 does not
    allow in identifiers (IPA and phonetic letters, obsolete and rare ones:
    `ɑ`, `ʅ`, `ᴏ`, `ǀ`). NFKC turns fullwidth and mathematical letters into
    plain ones."""
    if type(name) is not str:
        raise ProtocolError("bad-nick" if what == "nick" else "bad-room", f"{what} must be a string")
    return _checked_name(name[:NAME_MAX + 1], what)


@functools.lru_cache(maxsize=4096)      # a room name comes with every line
def _checked_name(name: str, what: str) -> str:
    code = "bad-nick" if what == "nick" else "bad-room"
    name = unicodedata.normalize("NFKC", name)
    if not 1 <= len(name) <= NAME_MAX:
        raise ProtocolError(code, f"{what} must be 1-{NAME_MAX} characters long")
    for ch in name:
        if ch not in "_-." and unicodedata.category(ch) not in _NAME_CATEGORIES:
            raise ProtocolError(code, f"{what} may hold only letters, digits, '_', '-' and '.'"
                                      f" (not {shown(ch)!r})")
        if ch in _FILLERS:
            raise ProtocolError(code, f"{what} may not hold {ascii(ch)[1:-1]}, a letter that draws nothing")
    restricted = _NOT_ID_ALLOWED.search(name)
    if restricted:
        ch = restricted.group()
        raise ProtocolError(code, f"{what} may not hold {ch} ({ascii(ch)[1:-1]}), a letter Unicode does not"
                                  " recommend in names (technical, obsolete or rare)")
    scripts = {script for script in map(_script, name) if script}
    if len(scripts) > 1 and not any(scripts <= mix for mix in _SCRIPT_MIXES):
        raise ProtocolError(code, f"{what} mixes scripts ({' and '.join(sorted(s.title() for s in scripts))});"
                                  " use letters of one")
    return name


_NAME_CATEGORIES = {"Lu", "Ll", "Lt", "Lm", "Lo", "Nd"}
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")     # Hangul fillers, braille blank
# Scripts that may share a name (Unicode TR39's "highly restrictive" level).
_SCRIPT_MIXES = (frozenset({"LATIN", "CJK", "HIRAGANA", "KATAKANA"}), frozenset({"LATIN", "CJK", "BOPOMOFO"}),
                 frozenset({"LATIN", "CJK", "HANGUL"}))


def _script(ch: str) -> str:
    """The script of a name's character by its Unicode name ("LATIN SMALL
    LETTER A"), or "" for ASCII digits and _-. that go with any script."""
    if ch in "_-.0123456789":
        return ""
    word = unicodedata.name(ch, "?").split(" ", 1)[0]
    return "KATAKANA" if word == "KATAKANA-HIRAGANA" else word


def check_room(name: object) -> str:
    """A room name as the protocol carries it: without the '#' people type."""
    if type(name) is str and name.startswith("#"):
        name = name[1:]
    return check_name(name, "room")


def mask_matches(text: str, mask: str) -> bool:
    """Whether `text` matches an IRC mask: `*` any run of characters, `?`
    any one, the rest itself. In time linear in their sizes' product (a
    regex, as fnmatch makes, backtracks exponentially on Python 3.8 with
    masks like *a*a*a*a*b, and treats [ ] as classes)."""
    t = m = 0
    star, resume = -1, 0        # the last * seen in the mask, and where in text it took up to
    while t < len(text):
        if m < len(mask) and (mask[m] == "?" or mask[m] == text[t]):
            t, m = t + 1, m + 1
        elif m < len(mask) and mask[m] == "*":
            star, resume, m = m, t, m + 1
        elif star >= 0:         # let that * take one character more, and go on from there
            resume += 1
            t, m = resume, star + 1
        else:
            return False
    return all(c == "*" for c in mask[m:])


def name_key(name: str) -> str:
    """What makes two nicks or room names the same one: their skeleton, as
    Unicode TR39 draws it (see _CONFUSABLE_SOURCES, at the end of this
    section). Case, width and look-alike letters do not count, so `alice`,
    `ALICE`, `аlice` (Cyrillic а), `ａｌｉｃｅ`, `alıce`, `aIice` and
    all-Armenian `հսցօ` for `hugo` are one name each."""
    return _skeleton(name) if len(name) <= NAME_MAX else _skeleton.__wrapped__(name)   # only short ones cached


@functools.lru_cache(maxsize=4096)
def _skeleton(name: str) -> str:
    return _unmarked(unicodedata.normalize("NFKC", name).casefold()).translate(_STROKES).translate(_CONFUSABLES)


def _unmarked(name: str) -> str:
    """`name` without the accents on its Latin, Greek and Cyrillic letters
    (`alíce`, `ǎlice` and `trōll` are `alice` and `troll`), which TR39's
    skeleton keeps; other scripts' marks are letters' parts, and stay."""
    decomposed = unicodedata.normalize("NFD", name)
    kept: List[str] = []
    for ch in decomposed:
        if unicodedata.category(ch) == "Mn" and kept and ord(kept[-1]) < 0x0530:
            continue
        kept.append(ch)
    return unicodedata.normalize("NFC", "".join(kept))


# Latin letters drawn as another with a stroke through it, which no
# decomposition separates: `ałice` is `alice`.
_STROKES = str.maketrans("łđðøħŧƀɨƶǥɍɏŀƚɉ", "lddohtbizgryllj")


# Characters the server never relays: C0 and C1 controls except tab and
# newline, DEL, lone surrogates (not encodable), every format character
# (Unicode's Cf: bidi embeddings, overrides, isolates and marks, which
# reorder what others see; soft hyphen, zero-width space and non-joiner,
# word joiner and invisible operators, BOM, tag characters, interlinear
# annotations, musical and Egyptian format controls) but the zero-width
# joiner, and the letters that draw nothing (Hangul fillers, the combining
# grapheme joiner, Khmer's inherent vowels). (The joiner and variation
# selectors stay: emoji need them.) \r and U+2028/9 become \n.
_INVISIBLE = ("\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160\u17b4\u17b5"
              "\u180e\u200b\u200c\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\u3164\ufeff\uffa0"
              "\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
              "\U000e0001\U000e0020-\U000e007f")
MARKS_MAX = 4       # combining marks kept on one letter (Vietnamese needs 2; 3,900 are a smear)
_UNSAFE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029{_INVISIBLE}\ud800-\udfff]")
_ESCAPE_SEQUENCE = re.compile(
    "\x1b(?:\\[[0-?]*[ -/]*[@-~]"          # CSI: colours, cursor movement
    "|\\][^\x07\x1b]*(?:\x07|\x1b\\\\)?"   # OSC: window title, hyperlinks
    "|[ -~]?)"                             # any other two-byte escape
    "|\x9b[0-?]*[ -/]*[@-~]")              # 8-bit CSI
_NEWLINES = re.compile("\r\n?|[\u2028\u2029]")


def clean_text(text: str) -> str:
    """Text as the server relays it: escape sequences removed whole (so no
    stray '[31m' is left), other unsafe characters removed, newlines
    unified, at most MARKS_MAX combining marks on a letter."""
    if not text.isascii():
        text = _TOO_MANY_MARKS.sub(r"\1", text)
    if not _UNSAFE.search(text):   # the common case costs one C-level scan
        return text
    text = _NEWLINES.sub("\n", _ESCAPE_SEQUENCE.sub("", text))
    return _UNSAFE.sub("", text)


def check_text(text: object, limit: int = TEXT_MAX) -> str:
    """Chat text from a client, cleaned, or ProtocolError."""
    if type(text) is not str:
        raise ProtocolError("bad-field", '"text" must be a string')
    if len(text) > limit:
        raise ProtocolError("text-too-long", f"text of {len(text)} characters; the limit is {limit}")
    text = clean_text(text).strip("\n")
    if not text.strip():
        raise ProtocolError("bad-field", "text is empty")
    if text.count("\n") >= TEXT_MAX_LINES:
        raise ProtocolError("text-too-long", f"text has more than {TEXT_MAX_LINES} lines")
    return text


# What a terminal must never receive raw from someone else: every control
# character but newline, bidi controls and lone surrogates. The client shows
# them escaped (\x1b), so nothing is hidden and nothing is obeyed.
_UNPRINTABLE = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029{_INVISIBLE}\ud800-\udfff]")


def printable(text: str) -> str:
    """Text safe to write to a terminal: tabs become spaces, every other
    control or format character is shown as an escape, and combining marks
    past MARKS_MAX on a letter are dropped. Valid UTF-8 stays as it is."""
    if not text.isascii():
        text = _TOO_MANY_MARKS.sub(r"\1", text)
    if not _UNPRINTABLE.search(text):
        return text
    text = text.replace("\t", "    ")
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def shown(value: object, limit: int = 40) -> str:
    """A client's string as it may appear in a log line or an error text:
    cut to `limit` characters, and every control, format (invisible, bidi),
    line-separator or unassigned character escaped, so it can neither forge
    a log line nor reach a terminal raw."""
    text = value if type(value) is str else repr(value)[:limit + 1]
    cut = len(text) > limit
    text = "".join(ch if unicodedata.category(ch)[0] not in "CZ" or ch == " "
                   else ascii(ch)[1:-1] for ch in text[:limit])
    return text + "..." if cut else text


def plural(count: int, noun: str, nouns: str = "") -> str:
    """'1 line', '2 lines'; `nouns` where the plural is not noun + s ('lines you missed')."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def display_width(text: str) -> int:
    """Terminal columns `text` takes: wide East Asian characters take two,
    combining marks none. (Close enough to wcwidth for redrawing a prompt.)"""
    if text.isascii():
        return len(text)
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


# -- the Unicode tables the rules above use -----------------------------------
# Generated from Unicode data (the generators are not part of chat.py; the
# tests check the tables against the unicodedata of the Python running them).
# A table of code point ranges is written as the gaps between their bounds
# (start, end + 1, start, ...), each a base-32 number in _RANGE_DIGITS, most
# significant digit first, whose last digit is from the upper half.

_RANGE_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"


def _char_class(encoded: str) -> str:
    """The ranges of an encoded table as the inside of a regex character class."""
    bounds, n, bound = [], 0, 0
    for digit in map(_RANGE_DIGITS.index, encoded):
        n = n << 5 | digit & 31
        if digit > 31:
            bound, n = bound + n, 0
            bounds.append(bound)
    # Raw characters, not \U escapes, in the class: sre parses them twice as fast.
    return "".join(re.escape(chr(start)) + "-" + re.escape(chr(end - 1))
                   for start, end in zip(bounds[::2], bounds[1::2]))


# Letters and digits that look alike, mapped to one (generated by gen.py
# from Unicode TR39 confusables.txt, Version 18.0.0, Date 2026-08-06, 01:05:35 GMT;
# do not edit by hand: rerun gen.py on a newer confusables.txt).
# Every character whose TR39 prototype draws as ASCII letters or digits, mapped
# to that prototype lower-cased, with chat.py's folds l/1 -> i, 0 -> o, m -> rn,
# w -> vv (TR39 has 1 -> l, 0 -> O, m -> rn); fullwidth and mathematical letters
# are left to NFKC. No multi-character sources in the file.
# The key: NFKC, casefold, translate. So a small letter carries what its capital
# draws as (в: В -> b), and where TR39 reads the two differently the capital wins:
# Յ->3 յ->j, Ƽ->5 ƽ->s, Ϭ->6 ϭ->o, 𑢦->e 𑣆->7, Ν->n ν->v, 𑢵->o 𑣕->6, 𑢼->t 𑣜->y, Υ->y υ->u.
_CONFUSABLE_SOURCES = {
    "2": "ƨϩჷᒿᘖⴧꙅꛯꝛ\U0001ccf2",
    "3": "ȝɜʒзӡյ३૩ვᜂⲝⳅⳍꝫ𑣊𖼻\U0001ccf3𝈆",
    "4": "Ꮞ𑣏𖺂\U0001ccf4",
    "5": "ƽ𑣛\U0001ccf5",
    "6": "ϭбᏮⳓⳝꕃ\U0001ccf6",
    "7": "ᜪ𐓺𖺊\U0001ccf7\U0001d1fe𝈒",
    "8": "ȣ৪੪\u0b03ꖉ𐌚\U00011445𖧾\U0001ccf8\U0001e8cb",
    "9": "৭੧୨൭ⳋꝯ𑣌𑣖𖧁\U0001ccf9𞋲",
    "a": "ɑαаᎪᗅ⍺ꓮꭤ𐊠𖽀\U0001ccd6\U0001df5a\U0001df6a",
    "b": "ƅβвь\u07d5ᏏᏴᑲᖯᗷⲃꓐꕗꞵ𐊂𐊡𐌁𐌜\U00016eb6\U0001ccd7𝈇",
    "c": "сငၚᏟᴄⲥꓚ𐊢𐌂𐐽𐔛𑣩𑣲\U0001ccd8𝄴🝌",
    "d": "ԁᎠᏧᑯᗞᗪꓒꓓ𐆋\U0001ccd9",
    "e": "εеҽᎬ℮⋿ⴹꓰꗋꬲ𐊆𑣆𑣎\U0001ccda\U0001df81",
    "f": "ƒʄϝք\u07d3ᖴẝꓝꞙꬵ𐅾𐊇𐊥𐔥𑣂\U0001ccdb𝈓",
    "g": "ƍɡԍցᏀᏳᶃꓖ\U0001ccdc",
    "h": "ηнһհᎻᏂᕼⲏⴙꓧ𐋏\U0001ccdd",
    "i": "1l¡ıǀɩɪιіӏւ\u05c0\u05d5\u05df\u0627\u0661۱\u07ca।၊ᎥᏞᒪᛁᛐ—↿∣⍳⏽│┃ⲓⳑⵊⵏꓡꓲꕯꙇꞁꟾ꠰꣎꩝𐊊𐌉𐌠𐑃𐔎𐔦"
         "\U00010926\U00010c3e\U00010ce5\U00010cfa𑁇𑃀𑅁𑇅\U000113d4𑑋𑗅𑙁𑣃𑣒𑱁\U00011dda\U00011de1"
         "\U00016d63\U00016eaa𖼖𖼨\U0001ccde\U0001cce1\U0001ccf1𝄀𝈪𝍷𞅁\U0001e8c7\U0001ed01",
    "j": "ȷʝϳјᎫᒍꓙ\U0001ccdf",
    "k": "κкᏦᛕⲕꓗ𐔘\U0001cce0",
    "n": "νոռⲛꓠ𐔓𑪾\U0001cce3",
    "o": "0οσоօ\u05e1\u0647\u0665\u06be\u06c1\u06d5۵\u07c0\u07cb\u0840०০੦૦ଠ୦௦\u0c02౦\u0c82೦\u0d02ഠ൦"
         "\u0d82๐໐ဝ၀ჿᄋᆼዐ០ᩅ᪀᪐\u1beaᴏᴑⲟⵔ〇ꓳꬽ𐊒𐊫𐌏𐐬𐓪𐔖\U0001092c\U00010c17\U00010d07𑄤\U00011302𑓐𑣈𑣕𑣗𑣠"
         "\U00011de0𖫩\U0001cce4\U0001ccf0𞅀𞋰",
    "p": "þƿρϸрᏢᑭ⍴ⲣⳏꓑ𐊕\U0001cce5",
    "q": "ԛգզⵕ\U0001cce6",
    "r": "ɍʀгᎡᎱᏒᖇᴦⲅꓣꭇꭈ𐓜𖨙𖼵\U0001cce7𝈖",
    "s": "ѕտടჽᏕᏚⴝꓢꕶꜱ𐊖𐑈𑣁𖫖𖼺\U0001cce8",
    "t": "τт\u07e0Ꭲ⊤⟙ⲧㄒ丅ꓔꔋ𐊗𐊱𐌕𑣜𖼊\U0001cce9𝍳🝨",
    "u": "ʋսሀᑌᴜ∪⋃ꓴꞟꭎꭒ𐓶𑣘𖽂\U0001ccea",
    "v": "ѵ\u05d8\u0667۷Ꮩᐯᴠ∨⋁ⴸꓦꛟ𐔝\U00010c1f𑜆𑣀𖼈\U0001cceb\U0001cefc𝈍𞅅",
    "x": "×χхᕁᕽ᙭᙮ᚷᝣ\u1becᳵ╳⤫⤬⨯ⲭⵝꓫꭓ𐊐𐊴𐌗𐌢𐔧\U00010c13\U00010cc2\U00010cfc𑣬\U0001cced",
    "y": "ɣʏγυуү\u07ccყᎩᎽᶌỿⲩㄚ丫ꓬꭚ𐊲\U00010c20𑣄𖽃\U0001ccee",
    "z": "ζᏃᴢⱬⲍⴭꓜꛉ𐋵𐔇𑣉𑣥𑪼\U0001ccef",
    "aa": "ꜳ",
    "ae": "æӕ",
    "ao": "ꜵ",
    "ar": "🜇",
    "au": "ꜷ",
    "av": "ꜹꜻ",
    "ay": "ꜽ",
    "bi": "ы",
    "co": "ꭃ",
    "dz": "ʣ",
    "ie": "\U0001df5d",
    "ii": "ǁ\u05f0॥။ỻ‖∥꣏𑁈𑃁𑅂𑇆\U000113d5𑑌𑙂𑱂\U0001d262",
    "iii": "ꔖ",
    "io": "ю⏨",
    "is": "ʪ",
    "it": "₶",
    "iz": "ʫ",
    "oe": "œ",
    "oi": "\U0001df5e",
    "oo": "ᅇᇮ∞ꚙꝏ",
    "ou": "\U0001df5f",
    "oy": "ѹ",
    "qe": "🜀",
    "rn": "mμϻмՠᎷᗰᛖⲙꓟ𐊰𐌑\U00010c21𑜀𑣣\U0001cce2",
    "rnb": "🝫",
    "sss": "🝜",
    "t3": "ꜩ",
    "tf": "ꝷ",
    "th": "\U0001df64",
    "ts": "ʦ",
    "ue": "ᵫ",
    "uo": "ꭣ",
    "vb": "🝬",
    "vv": "wɯшѡԝաᎳᏔᴡ⧢ⲽꓪꟺ𑜊𑜎𑜏𑣦𑣯\U0001ccec𝈌\U0001df7d",
    "vvh": "\U0001df65",
}
_CONFUSABLES = str.maketrans({ch: target for target, chars in _CONFUSABLE_SOURCES.items()
                              for ch in chars})


# Characters Unicode allows in identifiers (generated by gen_allowed.py from Unicode TR39
# IdentifierStatus.txt, Version 18.0.0, Date 2026-04-13, 16:55:34 GMT;
# sha256 5863c7d99ca18f21...; do not edit by hand: rerun gen_allowed.py on a newer file).
# The 33792 code points with Identifier_Status=Allowed, in 1613 ranges; all others are
# Restricted (technical, obsolete, uncommon, limited-use, not NFKC, ...). chat.py's names are
# NFKC-normalised and hold only letters, digits and _-. before this test, so what it adds is
# refusing restricted letters: IPA, phonetic (U+0251 U+0285 U+01C0 U+1D0F), archaic, uncommon.
# _ID_ALLOWED: the range bounds (start, end + 1, start, end + 1, ...) as gaps from the bound
# before, each a base-32 number in _ID_DIGITS, most significant digit first, whose last digit
# is from the upper half. Needs `import re`.
_ID_ALLOWED = (
    "1DxByxHCWAxxW1YxETx/xYySyAyAxCyExAyCyGyXyxAxyyzBxxxAzxyyJyxzyxREExEAAyEy+A1ExDyByxyxxxxDxAyExS"
    "xxxCx1Ey2zBxDKxDxyzEx2QxxzxxxQx1I1OIx2yxIxy1MIyEyMyDKHyKAEyy1GyH1CG1Czx2BXEy1HXyxzOxyGGCxxxxxA"
    "TxGAyxxxExBxxxzyBxQxxUIzz2NyzxFxxyyzxxzAK1O6ZxMxxENEAx1VzxDxYxGxExCxFxxCyKGyCzyxyxzxDzyySxDxxz"
    "AyxxDyyyATIMxyCAyySxDxxyxyyyxxBAyyzKxPyMyxFxzxSxDxyxByxxExzxzUGNzxDzyySxDxyyAyxxCzyyzExExNxNxx"
    "CzzxAzyxxxyzyzzzIABzzxA1QyxDyzxTxDxyxBADxzxA1QyxDyzxTxDxyxBACyzxAUGOyxDyzxTxMACyzxyxxFx1yCyyxF"
    "zCzAxPxFxxyDzxACxxxDPxK1OxDBKyG1DyxxyyxxyxCAxDxzxxxxyyxyxzxCxzyBxxxCyG1NxQGSzxAxAxAxAxAxIEyxxB"
    "DzxHzxAxAxAxAxAxxzExz2z2GMHMSAx1TxBxy1x8LDx2xxAyDxxxAy1DxxxAy/xxxAyDxxxAyLx1wELxxxAyDx1DxO11CZ"
    "yAyzyGyUyxxxJG15C1HyzaIyAyIyyyMyAAyGKyCyEyyyWyAyGxx2W5CMyz1Tx1zxExJx3uZz1V2SCyx2/qEx1Hx3Mx4Ox1"
    "CxyxHxNxKx1AxGxLxHxnZx2DxJx3wyGxzxUxBxVx1VxFxGxHx6BxQx2Qx6Gx3Nx8Cxzx4Ex2XxcBxKxAx2Mx1zx2Tx1Dxe"
    "Tx3QxAx1xxFx3Bx4OxPx8Xx2BxQx6xxBx2OxMx3Cx4Jx6Ax1OxyxAyxyQxzxSy2Wx5Bxd+xBxzxzxTD3LD4Qx2NOxSx1+x"
    "MxYxIxUxLxWxMzxxxxExKxNxExzxxxExzx1IxWxxxPxWxExxxzxRxVyOx1zxzxAxAxLxBx1zxAxNxzxDzTxFxQxCxxyExE"
    "xyx1zxIxyxSxDxAxzxAxDxzxJxHxAyFxOxxxFxGxxxDxLyHxIxxxzx3wxOxOxHxEx1RxzxzxxxyxyxIxzxExQyPxyxyxEx"
    "xxExyyHxUxxxIxyxOx1wxEyzxGxGxFxJyExTyVxDx1FxMxHx1wx1Gx2wx+xyy1JxUxVx3BxTxNyQxGxHxAxDxCxBxAxExx"
    "xPxDxGxyxGxDxXxQxFxIxLxxxyyExHxBxFxyxUxBxAxIyxxGxQxExBxKxNx1xxCxFx1Xy1TxBxFxByLxZxQxHxFxyyExyx"
    "MxAxKxHxzxyxExxxLxLxyx1yxxx2Xx1Lx1YxxxBxzx1zxAxRxxxRxBxZx1DxXyVxyx1HxIxExyxJyJxFxAxDxFxUxExAxA"
    "xHxNx1BxWxDxyxyxIx1zx1Gx1KxAxXxDxTx1RxzxHxTxzxEx1yxOxIyCxDxBxGxOxyxxxVxXx1RxEx2wx1DxBx1GxJxQx1"
    "Ixxx2NxGxEyHxNxHxIxCxFxLx1Cx1OxGxLxyxYxxxNx1IxzxDxCxTxAxAxFxIxOxxxxxyy1CxWxzxCxMxAxYxxxTxxxSxy"
    "xRx1LxzxZx1RxLx2wxHx/xIxVxBx1zx1LxDx1Zx3FyIxMx1zxDxWxJxCxNxIxUxCxzxExDxQxExTxxxTxAxZxIxLxWxExF"
    "yDxCxzxDxBxKxAxUxQxGyLxAxOxyx1KxFxxxJy1yxyxzxDxLxOxAxNxGxAx1Zx1wxJx1CxxxRxxx1xxDxPxNxEx1Dxxxzx"
    "XxWxzxHxOxGxRxExyx1zx1QxKx2NxyxZxMyyz1HxUxDxOxOxNxNxxxRxzxAxFxzxPxIxxxzxAxKxMx1AxIxOxCxGxSyAxG"
    "xzxxxyxzxDx1Wx1MxDxyxBxLxNxMxKxEx1Cxxx1Nx1TxXxJxVxDx2IxLxQxVyAx2DyxyzxHxBxNx1xx/xKzJxFx2BxDx1w"
    "xCx1SxBxxx1Kx+xxxAxTxJxGxyx1xxDxOxyx1Pxzxyx1zyDxBxHxFxzxKxDxzx+x1ExFxXxKy1yxPxxx/xExLxAxGxRxCx"
    "/xCxMxBxzxxxExzyFxAxMxExxxAx2RxOx2zxJxTx1Gx2Ex1Ax1NxDxYx1wxAxExxxKx1yxExNxCx1Fxxxyx+x1Qx1wxMxy"
    "xExyxLxFxFx1zxJx1AxNx1ZxTyHxzxZxVxPyyxyxGxyxGxFxJxNxQxxxHxOxFxPxyx1xx1NxJxVxyxMxGxCxxxJy1KxNxH"
    "xzxAx1GxNx1VxAxGxZxDxDxDxAxDxFyNxzx1yxOxxxCyLySxGxOxDxyxAxDxyx1FxBxxx1yxHxxx1FxBxAxOxTyZxxzAxz"
    "x1yxHxCxGxTxDxxxUxMx2LxxxGxxx2Dx1wxOy1yxyxDxUxMxHxCxNx1CxCyBxxxxyRxyx1zxCxyxWxAxIxFxPxFxOxyxHx"
    "zx1AxBxNxBxNzUx2yxEx1Ux4ZyAxAxOx1GxHxCxxxWx1xxCxCx1Bx1AxIxzx1Bx1xxBxBxNzGxBx1Bx1zy1Ly2KxHxBx1Q"
    "xUxGy1yxMxYx1zx1Cx1Bx1LxVxJxBx/x1Ax3Ex1DxCx1CxxyDx1Ux1GxNx1xxHx1FxTxGx1xyUxzx1KxPx+xExMx1xxAxE"
    "xCxFyxxAxDxVx/xZxPxExJxBx1KxGxCxRx/xNxJxDx1HxYxGx2wxRxSxGxWxIxIxMxzxyxWx3HxyxzxRxHxQx2wxLxDxLx"
    "yxzxAxSxzxCy1NxCxzxzxDyJxAxCyFxNxJxUxPxAxGxSxLxDxUxXx1YxExBxCx1xyCxHxCxAxBxBxxxHx4YxDxzxIzAxXx"
    "GxzxzxzxLxGx1AxGxxxMxJxFxLy3Fx1FxVx1AxXxFx1CxPxEx+xCxxxxx1xxCxMxyyFxyxQxSx+xZxIxCx2XxCxKxLxCxY"
    "x2yxxxGxExBx3Ax1wyAx1zxPx1NyXx1xxVxyxMxRxAxXxKx1zxHxyx1wx1BySxyxVx+xSxCxCx1VxPy1MxBxyxzxzxAxCx"
    "xxFxMxzxGxLx1AxOxKxQxAxxyAx+xGxZxKx7YyAxCxNxXyzxExTxzx2DyyxQxTy1xxxxzxxyFxFxzxyxxxHxzxBx1KxxyQ"
    "xTxyxyyTyyxEyHxFxHxNxNxxxNxJxCyzxExxxNx1Fx1yxBxAxExCxzxzxAxKxLxxx2KxOxVxDxAxCxyxZx1xxExRxyx3xx"
    "1wxBxAxFxWxCy1yxRxCxAxBx2BxPxGxKxExzxzyCxLxxxCxGxCxUxExyxLxCxGxLxSxyxIx1Ex1PxFyxx1+xIxxxLxyxSx"
    "4MyzxRxJxCx1Mx1DxUxKxyx1FxNxNxDxBx2+xPyDxBxzxEyAx1WxAxNxJxyxNx+xJxVx1Pxxxy1vDxYxmMxcAatAeqZxxx"
    "1Ux1uJx1j6RDxAxyxL7oLx1yx2Dx16Vx1AxZx1UxBx1/x3Cxyx4Ky3Dx1BxAx1Qx1xy1OyZx3DxDx1Jx3NxOxByAx2BxDx"
    "8Lx3nJx1nJxo/x3Jx4Cx4Cxzx3Ix2Bx2zxWxaHx3gzx20Xx27Ax1Nxqwx49Ix1bPxhBxDx42zx1o+x5Fx6Wx2fDxyxAx46"
    "Bx")
_NOT_ID_ALLOWED = re.compile(f"[^{_char_class(_ID_ALLOWED)}]")   # .search(name): the first letter not allowed

# Combining marks (Mn, Mc, Me) of Unicode 14.0, in 299 ranges: more than
# MARKS_MAX of them in a row on one letter are cut to MARKS_MAX.
_MARKS = (
    "ow3M8PD8D1Jxxxyxyxx2EH1MRMx3BDyCyyxA1zx+X2XH1WFFxUAxFxzxB1Hz1YE1GUx1x1SzxOxDGyZz1UxxDyyyzFxGyW"
    "xyz1UxxBAyyzzx+yzxHz1UxxExzxzQySCxz1UxxDyyyzDzGy+x1XBzzxAFx1EB1TxxDxzxADyHyZz1UxxDxzxADyHyYA1T"
    "yxDxzxAFxGyZz2CxACxxxEOy1ZxyDIE3yxyFHC2GyXxxxxxAy1NQxyBHx1AFx3AQTAAzxzyDzAJIxxGAl/ztOAYzZy+y2w"
    "1wFx1Jzxx3Ry1yx3SIAI6XB1VGxZyx1M/1NB1LN1CFIz+J1UK1MQ4UzxRAxCxyz6C2wmM1x2v+z4Jx3w1whGC3FyteQAxG"
    "1wy2My8MxzxAxTBAx2Py1OOWOJx1CEVJ1IA1LK1Ax2zKIxEy1Jz1OxxzyyByxx1FBBy7IExyjpMxnxMMMuJx7yx4RB1kCz"
    "xyBA1EzAx5ByhZAczy4VH1NA3Wz1RL1FxyyGA1JHDx1Zz1AKMy1IxIz1MKEAxy2YICx5wIRA1TyxDyyyzFxGyyDzB6wOTx"
    "2NQ7HDyFXy2ON3GJ3BL8wL7RCxyyAxxxy4JDyDzxYG1EDxAExFH1KMcRExE2OSxK3WCzxxyxDxx2yBxyxBaXAivVB1XD10"
    "Uxx1TDA2NxHyj5Hy4jx1KyTg+BzCEEyD+A4Qz1tX1TA1OExKxSBxL1aMDxNyDxyxB8BDbTx1ZA1fwD3JDo5tR7M")
_TOO_MANY_MARKS = re.compile(f"([{_char_class(_MARKS)}]{{{MARKS_MAX}}})[{_char_class(_MARKS)}]+")


# ---------------------------------------------------------------------------
# 3. Command tables
# ---------------------------------------------------------------------------

class Command(NamedTuple):
    name: str
    usage: str          # e.g. "NICK TEXT" or "[REASON]": the last parameter takes the rest of the line
    help: str
    run: Callable       # run(*arguments); arguments as parsed from `usage`


class CommandTable:
    """Slash commands: parses '/name args' by each command's usage line and
    writes /help from the same table, so the two never disagree."""

    def __init__(self, commands: Iterable[Command]):
        self.commands = {c.name: c for c in commands}

    def parse(self, line: str) -> Tuple[Command, List[str]]:
        """The command a '/...' line names and its arguments, or ValueError
        with a message fit for the user."""
        name, _, rest = line[1:].partition(" ")
        command = self.commands.get(name.lower())
        if command is None:
            raise ValueError(f"unknown command /{name}; /help lists them")
        groups, rest = re.findall(r"\[[^\]]*\]|\S+", command.usage), rest.strip()
        params = [word for group in groups for word in group.strip("[]").split()]
        words = rest.split(None, len(params) - 1) if params else []
        required = sum(1 for group in groups if not group.startswith("["))
        optional = [len(group.split()) for group in groups if group.startswith("[")]
        # a bracketed group is given whole or not at all: "[OLD NEW]" is two words or none
        whole = len(words) - required in {sum(optional[:n]) for n in range(len(optional) + 1)}
        if len(words) < required or (not params and rest) or not whole:
            raise ValueError(f"usage: /{command.name} {command.usage}".rstrip())
        return command, words

    def run(self, line: str) -> None:
        command, words = self.parse(line)
        command.run(*words)

    def help_lines(self, columns: int = 0) -> List[str]:
        """/help: a command a line, its help wrapped under the help column
        when `columns` (the terminal's width) is given."""
        width = max(len(f"/{c.name} {c.usage}") for c in self.commands.values()) + 2
        return [fit(f"/{c.name} {c.usage}".ljust(width) + c.help, columns, width) for c in self.commands.values()]


# ---------------------------------------------------------------------------
# 4. The server's core: state and rules, with no socket and no clock
# ---------------------------------------------------------------------------
#
# A loop (section 5, or the tests' Harness) drives the core through Chat:
#
#   chat.tick(now, wall)        a turn begins, at this time (the core reads no clock)
#   chat.open(conn)             a connection came; False if it was refused
#   chat.received(conn, data)   bytes from it
#   (the timers it asked for)   fire as plain calls
#   chat.end_turn()             -> the connections to write to now
#   chat.wrote(conn, n)         the kernel took n bytes of conn.out (0: none); the core
#                               drops what was sent, and decides who is too slow
#   chat.closed(conn, reason)   its socket is gone
#
# and the core asks the loop only for what ServerIO lists. A connection's
# state (State) is the core's, moved only by Chat.move() along MOVES; what
# stops the loop reading it is Intake's (hold/release, by reason); its queue
# (`out`, `queued`) is Output's; its socket and TLS handshake are the loop's. Where lines are
# numbered, and what crosses to other servers, is a Relay's job: LocalRelay
# for one server, Cluster (section 6) for several.

@dataclasses.dataclass
class ServerConfig:
    """Every server setting, with its default: the command line takes its
    defaults from here."""
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_connections: int = 100
    max_payload: int = MAX_CLIENT_PAYLOAD
    max_buffer: int = 1 << 20          # unsent bytes per client before it counts as too slow
    history: int = 50                  # lines kept per room for welcome and replay
    history_bytes: int = 32 << 20      # what the history of all rooms together may hold
    history_file: Optional[str] = None
    history_file_max: int = 4 << 20    # bytes before the file is compacted (or twice its compacted size)
    flood_rate: float = 100.0          # requests per second per client, sustained...
    flood_burst: int = 1000            # ...after a burst of this many
    hello_timeout: float = 10.0
    ping_interval: float = 30.0
    idle_timeout: float = 75.0
    nick_hold: float = 60.0            # seconds a lost connection's nick waits for its owner to reconnect
    auth_delay: float = 1.0            # an address's wait after its first wrong password (it doubles)
    password: Optional[str] = None
    ops: Tuple[str, ...] = ()          # accounts that are server operators (--op)
    registered_only: bool = False      # guests may not join: only accounts
    motd: str = ""                     # shown at welcome (--motd FILE)
    db: Optional[str] = None           # the SQLite file that keeps everything (--db)
    db_history: int = 10000            # lines per room the database keeps, to catch up on
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    max_rooms: int = 1000
    rooms_per_user: int = 20
    rooms_per_source: int = 0          # rooms one source (address, IPv6 /64) may have opened at once; 0: a
                                       # 50th of max_rooms, at least rooms_per_user
    connections_per_source: int = 0    # connections one source may hold; 0: a tenth of max_connections,
                                       # at least 20 (an office behind one NAT; more: raise it)
    redis: Optional[str] = None        # redis://HOST:PORT/DB: one chat with the other servers there
    cluster_ttl: float = 15.0          # seconds without a heartbeat before a server counts as gone
    reuse_port: bool = False           # share the port with other processes (--workers)
    supervisor: Optional[int] = None   # a worker's parent: if it goes, the worker goes too
    name: str = f"chat.py {VERSION}"
    server_name: str = "chat.py"       # this server's name in IRC (--server-name): a hostname, say
    irc_port: Optional[int] = None     # a second port where every connection speaks IRC (--irc-port)

    def __post_init__(self) -> None:
        if not self.rooms_per_source:
            self.rooms_per_source = max(self.rooms_per_user, self.max_rooms // 50)
        if not self.connections_per_source:
            self.connections_per_source = max(20, self.max_connections // 10)


class State(enum.Enum):
    """Where a connection is in its session (a TLS handshake in progress is
    the loop's business, not a state here)."""
    HELLO = "hello"         # connected; nothing taken from it yet but hello or quit
    AUTH = "auth"           # its hello is being answered (the nick claimed, a password checked)
    JOINED = "joined"       # welcomed: it chats
    CLOSING = "closing"     # its last frames are being delivered; nothing more is read from it
    CLOSED = "closed"       # its socket is gone


HELLO, AUTH, JOINED, CLOSING, CLOSED = State
# The moves a connection may make: only down, never back.
MOVES: Dict[State, Tuple[State, ...]] = {
    HELLO: (AUTH, CLOSING, CLOSED),
    AUTH: (JOINED, HELLO, CLOSING, CLOSED),     # (back to HELLO: a hello that may try another nick)
    JOINED: (CLOSING, CLOSED),
    CLOSING: (CLOSED,),
    CLOSED: (),
}

# Why a connection is not read (Conn.holds, a set of these bits): while any
# holds, its frames wait in its socket and TCP slows the sender; nothing is lost.
FLOOD = 1           # out of flood tokens until a timer gives one back
BACKLOG = 2         # more than its share is queued for it, until it reads
ANSWER = 4          # its hello, rename or password waits for an answer (Redis, a hash)
REPLY_BYTES_PER_TOKEN = 4096   # after hello every frame costs a flood token, and a reply one more per this
FANOUT_BUDGET = 64 << 20    # bytes one turn may queue for all recipients together: bounds a turn's
                            # work (the recipients share the bytes, so not its memory), and so latency

Chunk = Union[bytes, memoryview]    # queued output: bytes, or the unsent tail of some (see _consume)


class Conn:
    """One client connection: the socket side and the session side, each
    field with one owner that changes it (the others only read it):

    - the loop: sock, fd, tls, handshake, shut, events;
    - Chat: state (through Chat.move), nick, key, session, claimed, rooms,
      since, said, echo; People: account, away, told_away;
    - Intake: holds (through hold/release), codec, tokens, refilled, held,
      deferred, last_heard, flood_noticed;
    - Output: out, the chunks of bytes queued for the client, and queued,
      their total (a line fanned out to a room is one bytes object shared by
      every member's list, never a copy per member)."""

    __slots__ = ("sock", "fd", "addr", "ip", "source", "tls", "handshake", "shut", "events", "state", "codec",
                 "out", "queued",
                 "nick", "key", "session", "claimed", "rooms", "account", "device", "away", "awaiting",
                 "username", "realname", "label", "verified", "heard", "told_away", "since", "said", "echo",
                 "tokens", "refilled", "held", "holds", "deferred", "last_heard", "flood_noticed")

    def __init__(self, sock, addr: str, ip: str, max_payload: int, now: float, burst: float):
        self.sock = sock
        self.fd = sock.fileno() if sock is not None else -1   # None: a test's connection in memory
        self.addr, self.ip = addr, ip
        self.source = "" if _on_this_machine(ip) else network_of(ip)   # what per-source limits count by
        self.tls = False                # TLS established
        self.handshake: Optional[str] = None    # None, or the TLS step the loop waits for
        self.shut = False               # our side of the TCP stream is closed
        self.events = 0                 # what the selector watches for
        self.state = HELLO
        self.codec: Union[FrameCodec, IrcCodec] = FrameCodec(max_payload)    # the dialect it speaks
        self.out: List[Chunk] = []
        self.queued = 0
        self.nick = self.key = self.session = ""    # "" until its hello is welcomed (Login.welcome)
        self.claimed = 0.0              # when it got its nick (wall clock): the earlier claim wins
        self.rooms: List[Room] = []
        self.account = ""               # the account it is logged in to ("": a guest)
        self.device = ""                # and the device token it was given for it (see People.logged_in)
        self.awaiting = 0               # its requests answered later (Chat.awaiting): frames after them wait
        self.username = self.realname = ""  # what its hello says it is called besides its nick (IRC's USER)
        self.label: Optional[str] = None    # the `label` of the request being handled: echoed in its answers
        self.verified = ""              # an account whose password it gave before its hello (IRC's SASL)
        self.heard = False              # its first bytes came (and told its dialect)
        self.away: Optional[str] = None     # its away text
        self.told_away: set = set()     # who was told it is away, since it went away
        self.since = self.said = 0.0    # when it joined, and when it last said something (wall clock)
        self.echo = False               # it wants its own private messages back (protocol 3)
        self.tokens, self.refilled = float(burst), now    # flood-control token bucket
        self.held: Optional[dict] = None   # a frame waiting for a token
        self.holds = 0                  # why it is not read (FLOOD, BACKLOG, ANSWER bits); 0: it is
        self.deferred = False           # has frames waiting for the next turn's budget
        self.last_heard = now
        self.flood_noticed = -1e9

    def __repr__(self) -> str:
        return f"{self.nick or '?'}@{self.addr}"

    @property
    def paused(self) -> bool:
        """Not read for now, for one reason or more (see Intake.hold)."""
        return self.holds != 0


class ServerIO(Protocol):
    """What the core may ask of the loop that drives it (ServerLoop, or the
    tests' Harness). Nothing more: the core never touches a socket."""

    def call_later(self, delay: float, function: Callable, *args) -> None:
        """Call function(*args) in a turn `delay` seconds from now. An error
        in it costs the connection among `args`, if any, never the loop."""

    def update_interest(self, conn: Conn) -> None:
        """conn.holds (or conn.out) changed: read from it only while nothing holds it."""

    def close_soon(self, conn: Conn) -> None:
        """Deliver what is queued for `conn`, then close it (at once over an
        unfinished TLS handshake: nothing can be said there)."""

    def stop(self, why: str = "") -> None:
        """Say bye to everyone (through Chat.shutdown) and stop; `why` is for the log."""

    def work(self, function: Callable, *args, done: Callable[[object], None]) -> None:
        """Run function(*args) away from the loop's thread (a password hash
        takes tens of milliseconds), then done(its result, or the exception
        it raised) in a turn."""


# ---------------------------------------------------------------------------
# 4a. Rooms and their history

class HistoryLine(NamedTuple):
    """A room line as kept for replay: encoded once, as it was sent (with its
    length prefix), and spliced into welcome and joined frames as it is."""
    id: int
    room: str
    seq: int
    data: bytes


HISTORY_LINE_COST = 100     # what a kept line costs beyond its bytes (tuple, bytes header, deque slot)
REPLAY_MAX = 256 << 10      # history bytes one welcome or joined carries at most (the newest lines)


def _uncount(counter: Dict[str, int], key: str) -> None:
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


V = TypeVar("V")    # what a Shares holds
T = TypeVar("T")    # what a FairQueue holds


class Shares(Generic[V]):
    """Entries (a dict, oldest first) held for owners (a source: an address
    or an IPv6 /64), at most `limit` in all. Past the limit, the owner who
    holds the most gives up its oldest entry (of those who hold as many,
    the one whose oldest is oldest): so one source's churn pushes out its
    own entries, never another's while it holds more than they do. With
    `first_come`, a new entry whose owner holds as many as any is the one
    turned away: then many sources with one entry each cannot push out the
    entries there before them either."""

    def __init__(self, limit: int, first_come: bool = False):
        self.limit, self.first_come = limit, first_come
        self.entries: "collections.OrderedDict[str, Tuple[str, V]]" = collections.OrderedDict()  # -> (owner, value)
        self.counts: Dict[str, int] = collections.Counter()    # owner -> entries held

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str, default: Optional[V] = None) -> Optional[V]:
        entry = self.entries.get(key)
        return default if entry is None else entry[1]

    def put(self, key: str, owner: str, value: V) -> List[Tuple[str, V]]:
        """Hold `value` under `key` for `owner` (as the newest); returns the (key, value) pushed out."""
        self.pop(key)
        self.entries[key] = (owner, value)
        self.counts[owner] += 1
        if self.first_come and len(self.entries) > self.limit and self.counts[owner] == max(self.counts.values()):
            return [(key, self.pop(key, value))]     # (it is there: `value`)
        pushed = []
        while len(self.entries) > self.limit:
            victim = self._victim()
            pushed.append((victim, self.entries[victim][1]))
            self.pop(victim)
        return pushed

    @overload
    def pop(self, key: str) -> Optional[V]: ...
    @overload
    def pop(self, key: str, default: V) -> V: ...
    def pop(self, key: str, default: Optional[V] = None) -> Optional[V]:
        entry = self.entries.pop(key, None)
        if entry is None:
            return default
        owner = entry[0]
        self.counts[owner] -= 1
        if not self.counts[owner]:
            del self.counts[owner]
        return entry[1]

    def oldest(self) -> Optional[str]:
        """The key the next push would take out (None if empty)."""
        return self._victim() if self.entries else None

    def _victim(self) -> str:
        most = max(self.counts.values())
        owners = {owner for owner, count in self.counts.items() if count == most}
        return next(key for key, (owner, _) in self.entries.items() if owner in owners)


class RoomModes:
    """A room's modes, as IRC has them, while people are in it (an empty
    room starts afresh: +nt, nobody op). Flags: i (only the invited join),
    k (a key to join), l (a limit on members), m (only ops and voiced
    speak), n (no lines from outside), s (secret: not listed), t (only ops
    set the topic). Ops (o: the first one in, and whom ops make so) and
    voiced (v) here are the room's own, by nick key; the operators an
    account is made for good are People's (see People.is_room_op)."""

    FLAGS = "iklmnst"
    KEY_MAX = 32

    def __init__(self) -> None:
        self.flags = set("nt")
        self.key = ""
        self.limit = 0
        self.ops: set = set()           # nick keys
        self.voiced: set = set()
        self.invited: set = set()       # sessions let in past +i (once): the person asked, under any nick
        self.masks: Dict[str, Tuple[str, float]] = {}   # ban mask (casefolded) -> (who set it, when)
        self.created = 0.0              # when its first member came

    def shown(self, member: bool) -> Tuple[str, List[str]]:
        """'+nt' and its arguments (the key only to members)."""
        flags = "".join(sorted(self.flags))
        args = [self.key if member else "*"] if "k" in self.flags else []
        if "l" in self.flags:
            args.append(str(self.limit))
        return "+" + flags, args

    def banned(self, mask: str) -> bool:
        """Whether `mask` (nick!user@host, casefolded) matches a ban mask."""
        return any(mask_matches(mask, pattern) for pattern in self.masks)

    def change(self, on: bool, mode: str, args: List[str], member: Callable[[Optional[str]], Tuple[str, str]],
               by: str, now: float) -> Optional[str]:
        """Set (`on`) or unset one mode, taking its argument from the front of
        `args`: the argument as told ("" if none), or None when nothing
        changed; ProtocolError if it cannot be. `member` finds the room's
        member a nick names (for o and v), `by` and `now` say who set a ban mask."""
        if mode in "ov":
            key, nick = member(args.pop(0) if args else None)
            held = self.ops if mode == "o" else self.voiced
            if (key in held) == on:
                return None
            (held.add if on else held.discard)(key)
            return nick
        if mode == "k":
            return self._key(on, args.pop(0) if args else "")
        if mode == "l":
            return self._limit(args.pop(0) if args else "") if on else self._flag(False, "l")
        if mode == "b":
            return self._mask(on, args.pop(0) if args else "", by, now)
        if mode in self.FLAGS:
            return self._flag(on, mode)
        raise ProtocolError("bad-mode", f"there is no mode {shown(mode)}; modes: b i k l m n o s t v", mode=mode)

    def _flag(self, on: bool, mode: str) -> Optional[str]:
        if (mode in self.flags) == on:
            return None
        (self.flags.add if on else self.flags.discard)(mode)
        return ""

    def _key(self, on: bool, key: str) -> Optional[str]:
        if on and (not 0 < len(key) <= self.KEY_MAX or not key.isprintable() or " " in key or "," in key
                   or key.startswith(":")):     # (a leading ':' would end an IRC line's words)
            raise ProtocolError("bad-field", f"a room's key is 1-{self.KEY_MAX} characters, no spaces or commas",
                                mode="k")
        if not on and "k" not in self.flags:
            return None
        self.key = key if on else ""
        self._flag(on, "k")
        return key if on else "*"

    def _limit(self, limit: str) -> str:
        if not limit.isdigit() or not 0 < int(limit) <= 1_000_000:
            raise ProtocolError("bad-field", "a room's limit is a number of members, 1 or more", mode="l")
        self.limit = int(limit)
        self.flags.add("l")
        return limit

    def _mask(self, on: bool, mask: str, by: str, now: float) -> Optional[str]:
        mask = (mask if "!" in mask or "@" in mask else f"{mask}!*@*").casefold()
        if not 3 < len(mask) <= 100 or not mask.isprintable() or " " in mask or mask.startswith(":"):
            raise ProtocolError("bad-field", "a ban mask is like nick!user@host, * for any", mode="b")
        if on == (mask in self.masks) or (on and len(self.masks) >= 100):
            return None
        if on:
            self.masks[mask] = (by, now)
        else:
            del self.masks[mask]
        return mask

    def invite(self, session: str) -> None:
        """Let the holder of `session` in past +i, once (the oldest invitations go past 1,000)."""
        if len(self.invited) >= 1000:
            self.invited.pop()
        self.invited.add(session)


class Room:
    __slots__ = ("name", "key", "maker", "opener", "members", "audiences", "remote", "roster", "arrivals",
                 "history", "history_bytes", "seq", "base", "modes")

    def __init__(self, name: str, maker: str = ""):
        self.name, self.key = name, name_key(name)
        self.maker = maker or "#" + self.key        # the source that made it; a room of its own if none did
        self.opener = maker                         # the source whose rooms in use it counts among
        self.members: set = set()
        self.audiences: Dict[Audience, set] = {}    # the members by how they read it (see Output)
        self.remote: Dict[str, str] = {}            # key -> nick of members on other servers
        self.roster: List[Tuple[str, str]] = []     # (casefolded nick, nick) of members here, kept sorted
        self.arrivals: Dict[Conn, int] = {}         # newcomer -> where it arrived in Output.pending
        self.history: collections.deque = collections.deque()    # HistoryLine, oldest first (Rooms trims it)
        self.history_bytes = 0                      # what `history` costs, counted as Rooms.keep() does
        self.seq = 0        # the `seq` of the newest line said here (Rooms alone moves it, only up)
        self.base = 0       # the seq it began at: lines at or below it (if any) were said before it was forgotten
        self.modes = RoomModes()

    def add(self, conn: Conn) -> None:
        self.members.add(conn)
        self.audiences.setdefault(conn.codec.audience, set()).add(conn)
        bisect.insort(self.roster, (conn.nick.casefold(), conn.nick))

    def remove(self, conn: Conn) -> None:
        self.members.discard(conn)
        self.modes.ops.discard(conn.key)        # (a room's own op and voice last while you are in it)
        self.modes.voiced.discard(conn.key)
        if not self.count():
            self.modes = RoomModes()
        audience = self.audiences.get(conn.codec.audience)
        if audience is not None:
            audience.discard(conn)
            if not audience:
                del self.audiences[conn.codec.audience]
        self.arrivals.pop(conn, None)
        self._unlist(conn.nick)

    def renamed(self, conn: Conn, old_nick: str) -> None:
        self._unlist(old_nick)
        bisect.insort(self.roster, (conn.nick.casefold(), conn.nick))
        for held in (self.modes.ops, self.modes.voiced):
            if name_key(old_nick) in held:
                held.discard(name_key(old_nick))
                held.add(conn.key)

    def _unlist(self, nick: str) -> None:
        entry = (nick.casefold(), nick)
        index = bisect.bisect_left(self.roster, entry)
        if index < len(self.roster) and self.roster[index] == entry:
            del self.roster[index]

    def nicks(self) -> List[str]:
        """Who is here (on every server), in alphabetical order."""
        if self.remote:
            return sorted([nick for _, nick in self.roster] + list(self.remote.values()), key=str.casefold)
        return [nick for _, nick in self.roster]

    def count(self) -> int:
        return len(self.members) + len(self.remote)


class Rooms:
    """The room table and every room's history and numbering, within their limits.

    A room lives while someone is in it (here or on another server). An empty
    room is freed, or kept dormant while it has history; dormant rooms do not
    count against max_rooms, so nobody can fill the table. At most max_rooms
    are dormant and a source may have at most rooms_per_source rooms in use;
    past that, the rooms of the source with the most go first (see Shares), so
    one source's churn never pushes out other people's quiet rooms. The
    history of all rooms together stays under history_bytes: dormant rooms go
    first (by the same rule), then the oldest lines of the rooms holding most.

    Seqs never go back: a freed room's seq is remembered (by the same rule),
    and a room whose seq was forgotten begins above every seq forgotten so
    far (`floor`), so no seq is given twice in one room."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.table: Dict[str, Room] = {}            # name key -> room
        self.dormant: Shares[Room] = Shares(config.max_rooms)     # name key -> its Room, by maker
        self.purged: collections.deque = collections.deque(maxlen=100)  # (sender key, room key or "") purged lately
        self.retired: Shares[int] = Shares(10 * config.max_rooms)    # name key of a freed room -> its seq, by maker
        self.in_use: Dict[str, int] = collections.Counter()    # maker -> its rooms in use
        self.floor = 0                              # no room whose seq is forgotten ever went past this
        self.history_bytes = 0                      # all rooms' history, as keep() counts it
        self.lobby = self.open(LOBBY)

    def __iter__(self):
        return iter(list(self.table.values()))

    def __len__(self) -> int:
        return len(self.table)

    def get(self, name: str) -> Optional[Room]:
        return self.table.get(name_key(name))

    def open(self, name: str, source: str = "") -> Room:
        """The room called `name` (valid already), in use: made, or woken if
        dormant, for `source` (whose rooms in use it then counts among; ""
        for the server itself or another one, which have no such limit)."""
        key = name_key(name)
        room = self.table.get(key)
        if room is not None and key not in self.dormant:
            return room
        if len(self.table) - len(self.dormant) >= self.config.max_rooms:
            raise ProtocolError("too-many-rooms", f"the server has {self.config.max_rooms} rooms in use")
        if source and self.in_use[source] >= self.config.rooms_per_source:
            raise ProtocolError("too-many-rooms", f"{self.in_use[source]} rooms opened from your address are in"
                                                  " use; leave some first")
        if room is None:
            room = self.table[key] = Room(name, source)
            room.seq = room.base = self.retired.pop(key, self.floor)
        else:
            self.dormant.pop(key)
            room.opener = source
        self.in_use[source] += 1
        return room

    # -- seqs: numbering only goes up ----------------------------------------

    def next_seq(self, room: Room) -> int:
        """The seq for a new line said in `room` (where lines are numbered here)."""
        room.seq += 1
        return room.seq

    def numbered(self, room: Room, seq: int) -> None:
        """A line of `room` numbered elsewhere (Redis, a history file) has `seq`."""
        if seq > room.seq:
            room.seq = seq

    def rejoin(self, names: object, limit: int, source: str) -> List[Room]:
        """The rooms a reconnecting client says it was in (at most `limit`; names not valid are skipped)."""
        rooms: List[Room] = []
        for name in names[:limit] if type(names) is list else ():
            try:
                room = self.open(check_room(name), source)
            except ProtocolError:
                continue
            if room not in rooms:
                rooms.append(room)
        return rooms

    def listing(self) -> List[dict]:
        """The rooms in use, for `rooms`."""
        rooms = [{"name": room.name, "users": room.count()} for room in self.table.values()
                 if room.count() or room is self.lobby]
        return sorted(rooms, key=lambda r: r["name"].casefold())

    # -- rooms come and go ---------------------------------------------------

    def vacated(self, room: Room) -> None:
        """`room` may have lost its last member: free it, or keep it dormant
        while it has history (as its maker's newest dormant room)."""
        if room.count() or room is self.lobby or room.key in self.dormant or self.table.get(room.key) is not room:
            return
        _uncount(self.in_use, room.opener)
        if not room.history:
            self._free(room)
            return
        for _, pushed in self.dormant.put(room.key, room.maker, room):
            self._free(pushed)

    def _free(self, room: Room) -> None:
        """Forget a room that is not in use, but not its seq (a few bytes, so
        numbering never goes back; past 10 x max_rooms the floor rises instead)."""
        del self.table[room.key]
        self.dormant.pop(room.key)
        self.forget(room, len(room.history))
        if room.seq > self.floor:
            for _, seq in self.retired.put(room.key, room.maker, room.seq):
                self.floor = max(self.floor, seq)

    # -- history -------------------------------------------------------------

    def keep(self, room: Room, line: HistoryLine) -> None:
        """Add a line to `room`'s history, dropping its oldest past --history lines."""
        cost = len(line.data) + HISTORY_LINE_COST
        room.history.append(line)
        room.history_bytes += cost
        self.history_bytes += cost
        if len(room.history) > self.config.history:
            self.forget(room, 1)

    def forget(self, room: Room, count: int) -> None:
        """Drop `room`'s `count` oldest lines."""
        for _ in range(count):
            cost = len(room.history.popleft().data) + HISTORY_LINE_COST
            room.history_bytes -= cost
            self.history_bytes -= cost

    def end_turn(self) -> None:
        """Over the history budget: free dormant rooms, oldest first, then
        take the oldest lines of the rooms holding the most, down to 7/8 of
        the budget (so this runs now and then, not for every line)."""
        if self.history_bytes <= self.config.history_bytes:
            return
        target = self.config.history_bytes * 7 // 8
        while self.history_bytes > target and self.dormant:
            oldest = self.dormant.oldest()
            room = self.dormant.get(oldest) if oldest is not None else None
            assert room is not None         # dormant is not empty, so it has an oldest room
            self._free(room)
        heap = [(-room.history_bytes, room.key, room) for room in self.table.values() if room.history]
        heapq.heapify(heap)
        while self.history_bytes > target and heap:
            _, key, room = heapq.heappop(heap)
            self.forget(room, 1)
            if room.history:
                heapq.heappush(heap, (-room.history_bytes, key, room))

    def replay(self, rooms: List[Room], since: object) -> Tuple[List[HistoryLine], Optional[dict]]:
        """History for a welcome: each room's recent lines, or, for a client
        resuming, the lines after the last one it saw (`since`: room -> seq)
        and how many of those are no longer kept (`missed`)."""
        if not isinstance(since, dict):
            return sorted(line for room in rooms for line in room.history), None
        lines, missed = [], {}
        for room in rooms:
            last = since.get(room.name)
            if type(last) is not int:
                continue
            # Before `base`, the room was forgotten: what was said then is gone uncounted.
            last = max(last, room.base) if last <= room.seq else room.base
            newer = [line for line in room.history if line.seq > last]
            lines += newer
            first_kept = newer[0].seq if newer else room.seq + 1
            if first_kept - last - 1 > 0:
                missed[room.name] = first_kept - last - 1
        return sorted(lines), missed

    def load(self, saved: "Saved") -> None:
        """Rooms, their lines and their numbering from a store. The rooms are
        dormant (nobody is in them yet), so they lock nobody out; lines the
        store lost count as said (numbering goes on above them)."""
        for obj, payload in saved.lines:
            try:
                room = self.open(check_room(obj["room"]))
            except ProtocolError:
                continue
            self.keep(room, HistoryLine(obj["id"], room.name, obj["seq"], _LENGTH.pack(len(payload)) + payload))
            self.numbered(room, obj["seq"])
            self.vacated(room)      # (again) the newest dormant room
        for room in self:
            self.numbered(room, max(room.seq, saved.seqs.get(room.name, 0)) + saved.lost)
        for name, seq in saved.seqs.items():
            key = name_key(name)
            if key not in self.table and seq + saved.lost > self.floor:
                self.retired.put(key, "#" + key, seq + saved.lost)
        self.floor = max(self.floor, saved.floor + saved.lost)
        self.end_turn()

    def purge(self, sender: str, room: Optional[Room], older: Callable[[str, int, int], List[bytes]]) -> int:
        """Take the lines of `sender` (a nick key) out of `room`'s history
        (None: every room's), and fill it up again with the lines before
        (`older`: the store's lines_before) they had pushed out; how many
        were taken out here."""
        removed = 0
        self.purged.append((sender, room.key if room is not None else ""))
        for where in [room] if room is not None else list(self.table.values()):
            kept = [line.data[4:] for line in where.history if _sender_key(line.data[4:]) != sender]
            if len(kept) == len(where.history):
                continue
            removed += len(where.history) - len(kept)
            first = json.loads(kept[0])["seq"] if kept else where.seq + 1
            self.restore(where, (older(where.name, first, self.config.history) + kept)[-self.config.history:])
        return removed

    def snapshot(self) -> "Snapshot":
        """What a store compacts itself to: every kept line, and how far numbering went."""
        seqs = {key: seq for key, (_, seq) in self.retired.entries.items()}
        seqs.update((room.key, room.seq) for room in self.table.values() if room.seq)
        return Snapshot(self.in_memory(), seqs, self.floor)

    def restore(self, room: Room, payloads: List[bytes]) -> None:
        """Replace `room`'s history with these lines (from Redis, as they were sent)."""
        self.forget(room, len(room.history))
        self.refill(room, payloads)
        self.vacated(room)

    def refill(self, room: Room, payloads: List[bytes]) -> None:
        """Lines (as they were sent, oldest first) for `room`'s empty history
        (but those of senders purged lately: the store may not have let them
        go yet)."""
        purged = {sender for sender, where in self.purged if where in ("", room.key)}
        for payload in payloads:
            if purged and _sender_key(payload) in purged:
                continue
            line = json.loads(payload)
            self.keep(room, HistoryLine(line["id"], room.name, line["seq"], _LENGTH.pack(len(payload)) + payload))
            self.numbered(room, line["seq"])

    def in_memory(self) -> List[bytes]:
        """Every kept line as it was sent, oldest first (to compact a history file)."""
        return [line.data[4:] for line in sorted(line for room in self.table.values() for line in room.history)]


def _sender_key(payload: bytes) -> str:
    """Whose a kept line is (a nick key)."""
    return name_key(str(json.loads(payload).get("from")))


def _newest_within(lines: List[HistoryLine], budget: int) -> int:
    """Where the newest of `lines` that fit in `budget` bytes begin."""
    start, size = len(lines), 0
    while start and size + len(lines[start - 1].data) - 3 <= budget:    # the payload and a comma
        start -= 1
        size += len(lines[start].data) - 3
    return start


# ---------------------------------------------------------------------------
# 4b. Output: what the core sends, batched per loop turn

def _consume(chunks: List[Chunk], sent: int) -> None:
    """Drop the first `sent` bytes from `chunks` (whole chunks, then a slice)."""
    whole = 0
    for chunk in chunks:
        if sent < len(chunk):
            break
        sent -= len(chunk)
        whole += 1
    del chunks[:whole]
    if sent:
        chunks[0] = memoryview(chunks[0])[sent:]


class Output:
    """Frames for the clients, queued per connection and batched per turn.

    A frame for one connection goes on its `out` at once, after a flush(),
    so nobody sees lines out of order, encoded by its codec. Frames for a
    room wait in `pending` until flush(): each room's run of frames is
    encoded once for each audience in the room and joined into one bytes
    object queued for every member of that audience, so the per-recipient
    cost of a turn is one list append, not one per line. A turn's budget
    bounds what it may add for any one recipient (`share`) and in all
    (FANOUT_BUDGET); once spent, the core reads no more frames this turn.
    Every frame is stamped with the turn's time here, in stamp()."""

    def __init__(self, max_buffer: int):
        self.limit = max_buffer
        # What one turn may add for any one recipient, and what one connection
        # may have queued before its own frames are no longer read.
        self.share = max(4096, max_buffer // 4)
        self.ts = 0.0
        self.pending: List[tuple] = []      # (room, sender, frame bytes, frame or None) not yet fanned out
        self.arrived: List[Room] = []       # rooms with arrivals during `pending`
        self.dirty: List[Conn] = []         # connections whose `out` became non-empty
        self.slow: List[Conn] = []          # connections over their buffer limit
        self.turn_bytes = self.turn_fanout = 0
        self.spent = False                  # this turn's budget is used up

    def new_turn(self, wall: float) -> None:
        self.ts = round(wall, 3)
        self.turn_bytes = self.turn_fanout = 0
        self.spent = False

    def stamp(self, frame: dict) -> dict:
        """`frame` with the turn's time, unless it has one (a pong echoes its ping's)."""
        frame.setdefault("ts", self.ts)
        return frame

    def encode(self, frame: dict) -> bytes:
        """`frame` stamped, as a JSON frame (how lines are kept and relayed)."""
        return encode(self.stamp(frame))

    def encode_for(self, conn: Conn, frame: dict, fit: str = "") -> bytes:
        """`frame` stamped, as `conn` reads it (with the label of the request it answers); `fit`: see encode_fitted()."""
        if conn.label is not None:
            frame["label"] = conn.label
        return conn.codec.encode(self.stamp(frame), fit)

    def with_history(self, conn: Conn, frame: dict, lines: List[HistoryLine]) -> bytes:
        """`frame` (a welcome or joined) for `conn` with `lines` as its
        history, newest kept: the oldest are left out past REPLAY_MAX (and
        the frame then says "truncated")."""
        lines = lines[_newest_within(lines, REPLAY_MAX):] if lines else lines
        return conn.codec.with_history(self.stamp(frame), lines)

    def end(self) -> List[Conn]:
        """Fan out what is pending; the connections to write to: those with
        new bytes, and those over their limit (for a last try before they go)."""
        self.flush()
        dirty, slow = self.dirty, self.slow
        self.dirty, self.slow = [], []
        return list(dict.fromkeys(dirty + slow)) if slow else dirty

    def sent(self, conn: Conn, size: int) -> None:
        """The first `size` bytes queued for `conn` are on their way: drop them."""
        if size:
            _consume(conn.out, size)
            conn.queued -= size

    def discard(self, conn: Conn) -> None:
        """`conn`'s socket is gone: what waited for it never goes."""
        conn.out.clear()
        conn.queued = 0

    # -- to one connection ---------------------------------------------------

    def queue(self, conn: Conn, data: bytes) -> None:
        """Queue `data` for `conn` now, without a flush: for a connection that
        has nothing pending (a newcomer), or for bytes that may go first."""
        out = conn.out
        if not out:
            self.dirty.append(conn)
        out.append(data)
        conn.queued += len(data)
        if conn.queued > self.limit:
            self.slow.append(conn)

    def first(self, conn: Conn, frame: dict) -> None:
        """Queue a frame for a connection that has nothing pending (a newcomer), without a flush."""
        self.queue(conn, self.encode_for(conn, frame))

    def send(self, conn: Conn, frame: dict) -> None:
        """Queue one frame for one connection, after everything said before it."""
        self.send_data(conn, self.encode_for(conn, frame))

    def send_data(self, conn: Conn, data: bytes) -> None:
        """Queue bytes already encoded for `conn`, after everything said before them."""
        self.flush()
        self.queue(conn, data)

    def send_each(self, conns: Iterable[Conn], frame: dict) -> None:
        """One frame for each of `conns`: encoded once for each audience, where it reads the same."""
        self.flush()
        self.stamp(frame)
        shared: Dict[Audience, Optional[bytes]] = {}
        for conn in conns:
            audience = conn.codec.audience
            data = shared[audience] if audience in shared else shared.setdefault(audience, audience.shared(frame))
            self.queue(conn, data if data is not None else conn.codec.encode(frame))

    def charge(self, size: int) -> None:
        """An answer of `size` bytes was queued: it counts against the turn's budget."""
        self.turn_bytes += size
        if self.turn_bytes >= self.share:
            self.spent = True

    # -- to a room -----------------------------------------------------------

    def to_room(self, room: Room, frame: dict, sender: Optional[Conn] = None) -> None:
        """Queue a frame for everyone in `room` but `sender`, in order with its lines."""
        self.to_room_data(room, self.encode(frame), sender, frame)

    def to_room_data(self, room: Room, data: bytes, sender: Optional[Conn] = None,
                     frame: Optional[dict] = None) -> None:
        """Queue a room frame already encoded as a JSON frame (`data`; `frame`
        itself if at hand: a dialect other than frames reads it)."""
        self.pending.append((room, sender, data, frame))
        # Bound what one turn adds to buffers: any one recipient's growth
        # (turn_bytes) and the memory fan-out takes in all (turn_fanout).
        self.turn_bytes += len(data)
        self.turn_fanout += len(data) * len(room.members)
        if self.turn_bytes >= self.share or self.turn_fanout >= FANOUT_BUDGET:
            self.spent = True

    def arrive(self, conn: Conn, room: Room) -> None:
        """`conn` just joined `room`: what is pending for the room was said
        before it came, so fan-out starts it where it arrived. So a join
        needs no flush, and a storm of joins fans out in one go."""
        if self.pending:
            if not room.arrivals:
                self.arrived.append(room)
            room.arrivals[conn] = len(self.pending)

    def flush(self) -> None:
        """Fan out what this turn said. Called before every unicast (and
        before a member changes rooms), so nobody sees lines out of order.
        (Someone who leaves needs no flush: they just stop receiving.)"""
        while self.pending:
            batch, self.pending = self.pending, []
            start = 0
            while start < len(batch):   # runs of consecutive entries for one room
                room, end = batch[start][0], start + 1
                while end < len(batch) and batch[end][0] is room:
                    end += 1
                run = batch[start:end]
                for audience, members in room.audiences.items():
                    datas = [entry[2] for entry in run] if audience is FRAMES else \
                        [audience.room_bytes(entry[3], entry[2]) for entry in run]
                    self._fan_out(room, run, start, datas, members, audience.echo)
                start = end
            for room in self.arrived:
                room.arrivals.clear()
            self.arrived.clear()

    def _fan_out(self, room: Room, run: List[tuple], start: int, datas: List[bytes], members: set,
                 echo: bool) -> None:
        """Queue `datas` (a run of `room`'s frames, batch[start:...], as one
        audience reads them) for `members`. The hot path: per recipient, a
        set lookup and appending a shared bytes object."""
        senders: Collection[Conn]   # whose own lines these are (a tuple or a set)
        if len(run) == 1:
            senders, blob = (run[0][1],), datas[0]
        else:
            senders, blob = {entry[1] for entry in run}, b"".join(datas)
        if echo:
            senders = ()
        limit, dirty, slow, arrivals = self.limit, self.dirty, self.slow, room.arrivals
        size = len(blob)
        for member in members:
            data = blob
            arrived = arrivals.get(member, 0) if arrivals else 0
            if arrived > start:     # joined during this batch: only what came after
                if arrived >= start + len(run):
                    continue
                data = b"".join([datas[i] for i in range(arrived - start, len(run))
                                 if echo or run[i][1] is not member])
            elif member in senders:     # nobody gets their own lines back
                data = b"".join([datas[i] for i in range(len(run)) if run[i][1] is not member])
            if data is not blob:
                if not data:
                    continue
                queued = member.queued + len(data)
            else:
                queued = member.queued + size
            out = member.out
            if not out:
                dirty.append(member)
            out.append(data)
            member.queued = queued
            if queued > limit:
                slow.append(member)


# ---------------------------------------------------------------------------
# 4c. Relays: where lines are numbered, and what crosses to other servers

class Relay(Protocol):
    """Where lines get their ids, and what crosses to other servers:
    LocalRelay for one server on its own, Cluster (section 6) for several
    linked through Redis. Chosen once, at start; Chat asks it and never asks
    which one it is."""

    instance: str       # the history's identity: clients resume only within one
    up: bool            # linked to every server there is (always, on its own)

    def post(self, room: Room, sender: Conn, line: dict) -> None:
        """Give a room line its id and seq, and hand it to Chat.deliver_line(), now or later."""

    def new_id(self) -> int:
        """An id for a private message delivered on this server."""

    def pm(self, sender: Conn, key: str, line: dict) -> bool:
        """Number and deliver a private message to `key` (through other
        servers); False to leave it to Chat (it is for someone here, or nobody)."""

    def claim(self, conn: Conn, key: str, session: str, done: Callable[[bool], None]) -> None:
        """Claim the nick `key` for `conn` wherever users are; done(ok), now or later, but always."""

    def release(self, key: str) -> None:
        """The nick `key` is free again."""

    def vanished(self, key: str) -> None:
        """`key` lost its connection: out of the lists, its nick still held."""

    def presence(self, conn: Conn) -> None:
        """`conn` joined, or changed rooms or nick."""

    def event(self, rooms: Optional[List[str]], frame: dict) -> None:
        """A join, leave or nick event for the members of `rooms` elsewhere (None: everyone)."""

    def others(self) -> List[str]:
        """The nicks on the other servers."""

    def servers(self) -> List[str]:
        """The other servers that have users now."""

    records: Dict[str, Dict[str, dict]]     # the records (accounts, bans...) the store had at start

    def profile(self, key: str) -> Optional[dict]:
        """What another server says of its user `key` (for /whois, away), if it has one."""

    def act(self, act: str, key: str, by: str, reason: str, room: Optional[str]) -> None:
        """A kick or ban for `key`, who is not on this server: to the server that has them."""

    def end_turn(self) -> None:
        """The loop turn is over: write what it produced."""

    def close(self) -> None:
        """The server stops."""


class LocalRelay:
    """One server on its own: it numbers lines itself, and hands them to its
    store, which keeps them (and the numbering) across restarts.

    Ids are reserved in the store ahead of use, half a block early, so a
    store that cannot write (a full disk) leaves runway and none is given
    twice; a store that lost lines says how many at the next start, and
    every seq continues above them."""

    up = True
    ID_BLOCK = 1024     # ids reserved in the store at a time

    def __init__(self, chat: "Chat"):
        self.chat = chat
        self.store = chat.store
        saved = self.store.load()
        self.instance, self.next_id = saved.instance, saved.next_id
        self.reserved = saved.next_id       # ids below this may be given without asking the store
        self.records = saved.records
        chat.rooms.load(saved)
        if saved.lines:
            log.info("history: %s from %s", plural(len(saved.lines), "line"), self.store.where)

    def post(self, room: Room, sender: Conn, line: dict) -> None:
        line["id"], line["seq"] = self.new_id(), self.chat.rooms.next_seq(room)
        data = self.chat.out.encode(line)
        self.chat.deliver_line(room, sender, data, line["id"], line["seq"], line=line)
        self.store.line(data[4:], line, room.maker)

    def new_id(self) -> int:
        """The next id, reserved in the store well before it is given."""
        given = self.next_id
        self.next_id += 1
        if self.next_id + self.ID_BLOCK // 2 > self.reserved:
            self.reserved = self.next_id + self.ID_BLOCK
            self.store.reserve(self.reserved)
        return given

    def pm(self, sender: Conn, key: str, line: dict) -> bool:
        return False

    def claim(self, conn: Conn, key: str, session: str, done: Callable[[bool], None]) -> None:
        done(True)      # Chat has checked this server's users: there are no others

    def release(self, key: str) -> None:
        pass

    def vanished(self, key: str) -> None:
        pass

    def presence(self, conn: Conn) -> None:
        pass

    def event(self, rooms: Optional[List[str]], frame: dict) -> None:
        pass

    def others(self) -> List[str]:
        return []

    def servers(self) -> List[str]:
        return []

    def profile(self, key: str) -> Optional[dict]:
        return None

    def act(self, act: str, key: str, by: str, reason: str, room: Optional[str]) -> None:
        pass        # nobody on another server: there is none

    def end_turn(self) -> None:
        if self.store.end_turn(self.chat.rooms.snapshot):
            self.chat.io.call_later(1.0, self.store.sync)

    def close(self) -> None:
        self.store.end_turn(self.chat.rooms.snapshot)
        self.store.close()


class Saved(NamedTuple):
    """What a store held when the server started."""
    instance: str                       # the history's identity (clients resume only within one)
    next_id: int                        # no id below it is to be given again
    lines: List[Tuple[dict, bytes]]     # room lines kept, oldest first: parsed, and as they were sent
    seqs: Dict[str, int]                # room -> its newest seq, for rooms that may have no lines kept
    floor: int                          # rooms not known begin above this seq
    lost: int                           # lines numbered but never written: every seq goes on above them
    records: Dict[str, Dict[str, dict]]     # kind -> key -> record (accounts, bans, topics...)


class Store(Protocol):
    """What must outlive the process: the history (its identity, its lines,
    how far numbering went) and records (accounts, bans, mutes, topics, kept
    messages, where each account left off). Chosen once, at start:
    MemoryStore, HistoryFile (--history-file) or the database (--db); with
    --redis, Redis keeps it all (section 6). Writes are batched: what a turn
    added is written by end_turn()."""

    where: str          # what it is, for the log: a file name, or "memory"

    def load(self) -> Saved:
        """What it holds (nothing, the first time); from then on it is written to."""

    def line(self, payload: bytes, line: dict, maker: str = "") -> None:
        """A room line, numbered: its payload as it was sent, the line itself,
        and who made its room (the source whose rooms go first when too many are kept)."""

    def reserve(self, next_id: int) -> None:
        """Ids below `next_id` may be given from now on, never again after a restart."""

    def put(self, kind: str, key: str, value: Optional[dict]) -> None:
        """Keep a record (None: forget it)."""

    def purge(self, sender: str, room: Optional[str]) -> None:
        """Forget the lines of `sender` (a nick key) kept for `room` (None: every room)."""

    def lines_after(self, room: str, seq: int, before: int, budget: int) -> List[bytes]:
        """The newest lines of `room` after `seq` and before `before` that fit
        in `budget` bytes, oldest first, as they were sent: what it keeps
        beyond the server's memory, to catch up on."""

    def lines_before(self, room: str, seq: int, limit: int) -> List[bytes]:
        """The newest `limit` lines of `room` before `seq`, oldest first: what
        it keeps beyond the server's memory, to fill it again after a purge."""

    def end_turn(self, snapshot: Callable[[], "Snapshot"]) -> bool:
        """Write what this turn added (compacting from `snapshot` if needed);
        True when a sync() should now be scheduled."""

    def sync(self) -> None:
        """What is written reaches the disk itself."""

    def close(self) -> None:
        """The server stops: write what is left."""


class Snapshot(NamedTuple):
    """What the server keeps in memory, for a store to compact itself to."""
    lines: List[bytes]          # every kept line as it was sent, oldest first
    seqs: Dict[str, int]        # every room's newest seq known (rooms freed included)
    floor: int                  # rooms not among them begin above this


class MemoryStore:
    """A store that keeps everything in memory for the server's lifetime
    (records included: accounts, bans and topics last until it stops)."""

    where = "memory"

    def __init__(self) -> None:
        self.records: Dict[str, Dict[str, dict]] = {}

    def load(self) -> Saved:
        return Saved(secrets.token_hex(8), 1, [], {}, 0, 0, self.records)

    def line(self, payload: bytes, line: dict, maker: str = "") -> None:
        pass

    def reserve(self, next_id: int) -> None:
        pass

    def put(self, kind: str, key: str, value: Optional[dict]) -> None:
        table = self.records.setdefault(kind, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value

    def purge(self, sender: str, room: Optional[str]) -> None:
        pass        # the lines are in memory only: Rooms.purge took them

    def lines_after(self, room: str, seq: int, before: int, budget: int) -> List[bytes]:
        return []   # nothing beyond the server's memory

    def lines_before(self, room: str, seq: int, limit: int) -> List[bytes]:
        return []

    def end_turn(self, snapshot: Callable[[], Snapshot]) -> bool:
        return False

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class Watermark:
    """How far numbering went, in a small file beside a store, written in
    place every turn that numbered lines: its bytes are allocated when it is
    made, so writing them needs no free space. A store that could not write
    its lines (the disk full) then knows at the next start how many it lost,
    and numbering goes on above them."""

    SIZE = 256

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def read(self) -> Optional[dict]:
        try:
            with open(self.path, "rb") as f:
                obj = _json_or_none(f.read(self.SIZE).rstrip(b" \n\0"))
        except OSError:
            return None
        return obj if isinstance(obj, dict) and type(obj.get("given")) is int else None

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self.fd, b" " * (self.SIZE - 1) + b"\n", 0)

    def write(self, instance: str, given: int, ids: int) -> None:
        """`given` room lines were numbered in `instance`, and ids below `ids`
        may have been given (best effort: a full disk does not stop chat)."""
        record = _dumps({"instance": instance, "given": given, "ids": ids}).encode()
        try:
            os.pwrite(self.fd, record.ljust(self.SIZE - 1) + b"\n", 0)
        except OSError as error:
            log.error("history %s: cannot write: %s", self.path, error.strerror or error)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HistoryFile(MemoryStore):
    """Chat lines kept on disk as JSON lines, so a restart loses nothing (the
    store of --history-file: the history only; records stay in memory).

    The first line is a header with the history's instance id (clients use it
    to know that message ids they remember still mean the same lines) and
    how far numbering went when it was written: ids, every room's seq, and
    how many lines had been written in all. Then come the room lines as they
    were sent, and now and then an `{"ids": N}` record: ids below N may have
    been given (to private messages too, which are not kept), so after a
    restart ids continue from there and never repeat. Lines are written once
    per loop turn (flushed to the OS, so a crash or SIGKILL loses nothing)
    and fsync'd at most once a second (a power cut may lose that last
    second). Lines that cannot be written (a full disk) are kept and tried
    again each turn, and said loudly; the Watermark beside the file counts
    what was numbered, so lines lost for good are counted at the next start
    and no seq is given twice. A torn line is skipped with a warning. Past
    `max_bytes`, or twice the size of its last compaction, the file is
    rewritten with only what the server keeps in memory."""

    PENDING_MAX = 4 << 20       # bytes of lines kept for another try while the disk refuses them

    def __init__(self, path: str, max_bytes: int):
        super().__init__()
        self.path, self.max_bytes = path, max_bytes
        self.where = path
        self.watermark = Watermark(path + ".mark")
        self.instance = ""
        self.reserved = 1           # ids below this may have been used
        self.written = 0            # room lines written in this instance, ever
        self.given = 0              # room lines numbered in this instance, ever
        self._compacted = 0         # size of the file after its last rewrite
        self._pending: List[bytes] = []     # lines and records not written yet
        self._pending_lines = 0
        self._failing = False       # writes fail (the disk is full, say)
        self._purged = False        # lines were taken out of the history: rewrite the file
        self._unsynced = False
        self._fd = -1

    def check(self) -> None:
        """Before the server listens: StartupError unless the file is a chat.py
        history (or empty, or missing in a directory it can be made in)."""
        folder = os.path.dirname(os.path.abspath(self.path))
        what = f"cannot use the history file {self.path}"
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
        except FileNotFoundError:
            if not os.path.isdir(folder):
                raise StartupError(f"{what}: the directory {folder} does not exist") from None
            first = b""
        except OSError as error:
            raise StartupError(f"{what}: {_why(error)}") from None
        if first and not _is_history_header(_json_or_none(first)):
            raise StartupError(f"{self.path} is not a chat.py history file (its first line is not a chat.py"
                               " header); it was left as it is: choose another file")
        if not os.access(self.path if os.path.exists(self.path) else folder, os.W_OK):
            raise StartupError(f"{what}: permission denied (it must be writable)")

    def load(self) -> Saved:
        """What the file holds (a new instance for a new or empty file).
        ValueError for a file that is not a chat.py history (left untouched)."""
        lines, torn, seqs, floor, kept, after = [], 0, {}, 0, 0, 0
        try:
            with open(self.path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    obj = _json_or_none(raw)
                    if number == 1:
                        if not _is_history_header(obj):
                            raise ValueError(f"{self.path} is not a chat.py history file (its first line is"
                                             " not a chat.py header); it was left as it is")
                        self.instance = obj["instance"]
                        self.reserved = max(self.reserved, obj.get("ids", 1))
                        seqs = {k: v for k, v in obj.get("seqs", {}).items() if type(v) is int}
                        floor, self.written, kept = obj.get("floor", 0), obj.get("written", 0), obj.get("kept", 0)
                    elif obj is None:
                        torn += 1
                        log.warning("history %s: line %d is damaged; skipped", self.path, number)
                    elif _is_history_line(obj):
                        lines.append((obj, raw.strip()))
                        after += len(lines) > kept
                    elif isinstance(obj, dict) and type(obj.get("ids")) is int:
                        self.reserved = max(self.reserved, obj["ids"])
        except FileNotFoundError:
            pass
        if lines:
            self.reserved = max(self.reserved, max(obj["id"] for obj, _ in lines) + 1)
        self.written += after
        mark = self.watermark.read()
        lost = 0
        if mark and mark.get("instance") == self.instance:
            lost = max(0, mark["given"] - self.written)
            self.reserved = max(self.reserved, mark["ids"] if type(mark.get("ids")) is int else 0)
        if lost:
            log.error("history %s: %s numbered before the last stop never reached the file (was the disk"
                      " full?); line numbers go on above them", self.path, plural(lost, "line"))
        self.given = self.written = self.written + lost
        if not self.instance or torn or lost:
            self.instance = self.instance or secrets.token_hex(8)
            room_seqs = {obj["room"]: obj["seq"] for obj, _ in lines}
            self.rewrite(Snapshot([raw for _, raw in lines],
                                  {room: seq + lost for room, seq in {**seqs, **room_seqs}.items()}, floor + lost))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.watermark.open()
        self.watermark.write(self.instance, self.given, self.reserved)
        return Saved(self.instance, self.reserved, lines, seqs, floor, lost, self.records)

    def rewrite(self, snapshot: Snapshot) -> None:
        """Replace the file atomically with a header and the lines kept: all
        the server holds, so what waited to be written is in it."""
        header = {"instance": self.instance, "format": 1, "ids": self.reserved, "written": self.given,
                  "kept": len(snapshot.lines), "seqs": snapshot.seqs, "floor": snapshot.floor}
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_dumps(header).encode() + b"\n")
            f.writelines(bytes(line) + b"\n" for line in snapshot.lines)
            f.flush()
            os.fsync(f.fileno())
            self._compacted = f.tell()
        os.replace(tmp, self.path)
        self.written = self.given
        self._pending.clear()
        self._pending_lines = 0

    def line(self, payload: bytes, line: dict, maker: str = "") -> None:
        self._pending.append(payload)
        self._pending_lines += 1
        self.given += 1

    def reserve(self, next_id: int) -> None:
        self.reserved = next_id
        self._pending.append(_dumps({"ids": next_id}).encode())

    def purge(self, sender: str, room: Optional[str]) -> None:
        self._purged = True         # the file is rewritten from what the server keeps, at the end of the turn

    def end_turn(self, snapshot: Callable[[], Snapshot]) -> bool:
        """Write what this turn added (and what earlier turns could not);
        compact when too big. True when an fsync should now be scheduled."""
        if self._purged and self._fd >= 0:
            self._purged = False
            self._compact(snapshot)
        if not self._pending or self._fd < 0:
            return False
        self.watermark.write(self.instance, self.given, self.reserved)
        data = b"\n".join(self._pending) + b"\n"
        size = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as error:     # e.g. the disk is full: chat goes on, the lines are tried again
            os.ftruncate(self._fd, size)    # no torn line is left (shrinking needs no space)
            self._cannot_write(error)
            return False
        self.written += self._pending_lines
        self._pending.clear()
        self._pending_lines = 0
        if self._failing:
            log.warning("history %s: written again; nothing was lost", self.path)
            self._failing = False
        if size + written > max(self.max_bytes, 2 * self._compacted):
            self._compact(snapshot)
            return False
        was_synced, self._unsynced = not self._unsynced, True
        return was_synced

    def _compact(self, snapshot: Callable[[], Snapshot]) -> None:
        try:
            self.rewrite(snapshot())    # if this fails, the old file stays, whole and open
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            log.error("history %s: cannot compact it: %s", self.path, error.strerror or error)

    def _cannot_write(self, error: OSError) -> None:
        """Lines that did not reach the file wait for another try (up to
        PENDING_MAX bytes, then the oldest are lost), and the operator hears it."""
        lost = 0
        while sum(map(len, self._pending)) > self.PENDING_MAX:
            lost += _is_history_line(_json_or_none(self._pending.pop(0)))
        self._pending_lines -= lost
        self._failing = True
        log.error("history %s: cannot write: %s; %s waiting to be written (lost if the server stops now)%s",
                  self.path, error.strerror or error, plural(self._pending_lines, "line"),
                  f"; {plural(lost, 'line')} lost for good" if lost else "")

    def sync(self) -> None:
        if self._unsynced and self._fd >= 0:
            os.fsync(self._fd)
            self._unsynced = False

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
        self.watermark.close()


class Database(MemoryStore):
    """Everything kept in one SQLite file (--db): the history (every room's
    lines, the newest `keep` of each, for catching up far beyond what is in
    memory), the numbering, and every record. WAL, synchronous=NORMAL: a
    committed turn survives kill -9 (a power cut may lose the last ones).

    Writes are batched per loop turn and committed by a thread of its own,
    so the loop never waits for the disk; a batch the disk refuses (full) is
    kept and tried again, said loudly, and the Watermark beside the file
    counts what was numbered, so nothing is numbered twice after a restart.
    Reads (the load at start, catching up at a login) use a connection of
    the loop's own: WAL lets them run beside the writer."""

    FORMAT = "chat.py-db-1"
    ROOMS_KEPT = 10         # times --max-rooms: rooms whose lines the file keeps (their numbering it keeps always)

    def __init__(self, path: str, keep: int, in_memory: int, rooms: int = 1000, budget: int = 32 << 20):
        super().__init__()
        self.path, self.keep, self.where = path, keep, path
        self.in_memory = in_memory      # lines per room loaded at start (the server's --history)...
        self.rooms, self.budget = rooms, budget     # ...of the newest `rooms`, within `budget` bytes
        self.commits = 0
        self.makers: Dict[str, str] = {}    # room -> who made it, for this turn's lines
        self.import_from: Optional[str] = None      # a history file to take over, into a new database
        self.watermark = Watermark(path + ".mark")
        self.instance, self.reserved, self.given = "", 1, 0
        self.batch: List[tuple] = []        # (sql, rows) of this turn
        self.lines: List[tuple] = []        # this turn's lines: (room, seq, id, sender, payload)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()     # batches for the writer thread
        self.reader: Optional[sqlite3.Connection] = None
        self.writer: Optional[threading.Thread] = None

    def check(self) -> None:
        """Before the server listens: StartupError unless the file is a chat.py
        database (or missing, in a directory it can be made in)."""
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.exists(self.path):
            if not os.path.isdir(folder):
                raise StartupError(f"cannot use the database {self.path}: the directory {folder} does not exist")
            return
        try:
            with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(self.path)}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.Error:
            row = None
        if row is None or row[0] != self.FORMAT:
            raise StartupError(f"{self.path} is not a chat.py database; it was left as it is: choose another file")
        if not os.access(self.path, os.W_OK):
            raise StartupError(f"cannot use the database {self.path}: permission denied (it must be writable)")

    def load(self) -> Saved:
        db = self._connect()
        db.executescript(_SCHEMA)
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if "instance" not in meta:
            meta = {"format": self.FORMAT, "instance": secrets.token_hex(8), "ids": "1", "written": "0"}
            if self.import_from:
                meta.update(self._import(db, HistoryFile(self.import_from, 1 << 62)))
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            db.commit()
        self.instance, self.reserved = meta["instance"], int(meta["ids"])
        written = int(meta["written"])
        mark = self.watermark.read()
        lost = 0
        if mark and mark.get("instance") == self.instance:
            lost = max(0, mark["given"] - written)
            self.reserved = max(self.reserved, mark["ids"] if type(mark.get("ids")) is int else 0)
        if lost:
            log.error("database %s: %s numbered before the last stop never reached it (was the disk full?);"
                      " line numbers go on above them", self.path, plural(lost, "line"))
        self.given = written + lost
        seqs = dict(db.execute("SELECT room, seq FROM seqs"))
        if db.execute("SELECT 1 FROM active LIMIT 1").fetchone() is None:      # (a database from before it)
            db.execute("INSERT OR REPLACE INTO active SELECT room, MAX(id), '' FROM lines GROUP BY room")
        lines, budget = [], self.budget
        for (room,) in db.execute("SELECT room FROM active ORDER BY id DESC LIMIT ?", (self.rooms,)).fetchall():
            rows = db.execute("SELECT payload FROM lines WHERE room = ? ORDER BY seq DESC LIMIT ?",
                              (room, self.in_memory)).fetchall()
            budget -= sum(len(payload) + HISTORY_LINE_COST for (payload,) in rows)
            if budget < 0:
                break       # the newest rooms' lines fill memory; the others wait in the file
            lines += [(json.loads(payload), payload.encode()) for (payload,) in reversed(rows)]
        lines.sort(key=lambda line: line[0]["id"])
        for kind, key, value in db.execute("SELECT kind, key, value FROM records"):
            self.records.setdefault(kind, {})[key] = json.loads(value)
        db.execute("UPDATE meta SET value = ? WHERE key = 'written'", (str(self.given),))
        db.commit()
        self.reader = db
        self.watermark.open()
        self.watermark.write(self.instance, self.given, self.reserved)
        self.writer = threading.Thread(target=self._write_forever, args=(self._connect(),), name="db", daemon=True)
        self.writer.start()
        return Saved(self.instance, self.reserved, lines, seqs, 0, lost, self.records)

    def _import(self, db: sqlite3.Connection, history: "HistoryFile") -> Dict[str, str]:
        """A history file's lines and numbering, taken into a new database (the file is left as it is)."""
        saved = history.load()
        history.close()
        rows = [(obj["room"], obj["seq"], obj["id"], name_key(obj["from"]), raw.decode()) for obj, raw in saved.lines]
        db.executemany("INSERT OR REPLACE INTO lines VALUES (?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT OR REPLACE INTO seqs VALUES (?, ?)", saved.seqs.items())
        log.info("database %s: took %s from the history file %s (which is no longer written: remove it"
                 " from the command line)", self.path, plural(len(rows), "line"), history.path)
        return {"instance": saved.instance, "ids": str(saved.next_id), "written": str(len(rows))}

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    # -- what a turn adds (the loop's thread) --------------------------------

    def line(self, payload: bytes, line: dict, maker: str = "") -> None:
        self.lines.append((line["room"], line["seq"], line["id"], name_key(line["from"]), payload.decode("utf-8")))
        self.makers[line["room"]] = maker
        self.given += 1

    def reserve(self, next_id: int) -> None:
        self.reserved = next_id
        self.batch.append(("INSERT OR REPLACE INTO meta VALUES ('ids', ?)", [(str(next_id),)]))

    def put(self, kind: str, key: str, value: Optional[dict]) -> None:
        super().put(kind, key, value)
        if value is None:
            self.batch.append(("DELETE FROM records WHERE kind = ? AND key = ?", [(kind, key)]))
        else:
            self.batch.append(("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", [(kind, key, _dumps(value))]))

    def purge(self, sender: str, room: Optional[str]) -> None:
        if room is None:
            self.batch.append(("DELETE FROM lines WHERE sender = ?", [(sender,)]))
        else:
            self.batch.append(("DELETE FROM lines WHERE sender = ? AND room = ?", [(sender, room)]))

    def end_turn(self, snapshot: Callable[[], Snapshot]) -> bool:
        """Hand this turn's writes to the writer thread, as one transaction."""
        if not (self.lines or self.batch) or self.writer is None:
            return False
        if self.lines:
            self.watermark.write(self.instance, self.given, self.reserved)
            newest = {room: (room, id_, self.makers.get(room, "")) for room, _, id_, _, _ in self.lines}
            self.batch.append(("INSERT INTO active VALUES (?, ?, ?) ON CONFLICT(room) DO UPDATE SET"
                               " id = MAX(id, excluded.id)", list(newest.values())))
        self.queue.put((self.lines, self.batch, self.given))
        self.lines, self.batch, self.makers = [], [], {}
        return False

    def lines_after(self, room: str, seq: int, before: int, budget: int) -> List[bytes]:
        """See Store (what the writer has committed): read newest first, and
        no further than the budget (a resume costs what it can be sent)."""
        if self.reader is None:
            return []
        lines = []
        for (payload,) in self.reader.execute("SELECT payload FROM lines WHERE room = ? AND seq > ? AND seq < ?"
                                              " ORDER BY seq DESC", (room, seq, before)):
            budget -= len(payload) + 1
            if budget < 0:
                break
            lines.append(payload.encode())
        return lines[::-1]

    def lines_before(self, room: str, seq: int, limit: int) -> List[bytes]:
        """The newest `limit` lines of `room` before `seq`, oldest first (what the writer has committed)."""
        if self.reader is None:
            return []
        rows = self.reader.execute("SELECT payload FROM lines WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                                   (room, seq, limit)).fetchall()
        return [payload.encode() for (payload,) in reversed(rows)]

    def close(self) -> None:
        if self.writer is not None:
            self.end_turn(lambda: Snapshot([], {}, 0))
            self.queue.put(None)
            self.writer.join(10.0)
            self.writer = None
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.watermark.close()

    # -- the writer thread ---------------------------------------------------

    def _write_forever(self, db: sqlite3.Connection) -> None:
        """Commit each turn's batch; a batch that fails waits (merged with
        the next ones) and is tried again a second later, said loudly."""
        waiting: List[tuple] = []
        failing = False
        while True:
            try:
                item = self.queue.get(timeout=1.0) if waiting else self.queue.get()
            except queue.Empty:
                item = ()
            stop = item is None
            if item:
                waiting.append(item)
            if waiting:
                try:
                    self._commit(db, waiting)
                    if failing:
                        log.warning("database %s: written again; nothing was lost", self.path)
                    waiting, failing = [], False
                except sqlite3.Error as error:
                    db.rollback() if db.in_transaction else None
                    failing = True
                    log.error("database %s: cannot write: %s; %s waiting to be written (lost if the server stops"
                              " now)", self.path, error, plural(sum(len(lines) for lines, _, _ in waiting), "line"))
            if stop:
                db.close()
                return

    def _commit(self, db: sqlite3.Connection, batches: List[tuple]) -> None:
        db.execute("BEGIN")
        written: Dict[str, Tuple[int, int]] = {}    # room -> the first and last seq written now
        for lines, batch, given in batches:
            db.executemany("INSERT OR REPLACE INTO lines VALUES (?, ?, ?, ?, ?)", lines)
            db.executemany("INSERT INTO seqs VALUES (?, ?) ON CONFLICT(room) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                           [(room, seq) for room, seq, _, _, _ in lines])
            for room, seq, _, _, _ in lines:
                written[room] = (written.get(room, (seq, seq))[0], seq)
            for sql, rows in batch:
                db.executemany(sql, rows)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('written', ?)", (str(given),))
        for room, (first, last) in written.items():     # each room keeps its newest `keep` lines,
            if last // 100 > (first - 1) // 100:        # trimmed each time its seqs pass a hundred
                db.execute("DELETE FROM lines WHERE room = ? AND seq <= ?", (room, last - self.keep))
        self.commits += 1
        if self.commits % 100 == 0:
            self._keep_rooms(db)
        db.execute("COMMIT")

    def _keep_rooms(self, db: sqlite3.Connection) -> None:
        """The file keeps the lines of ROOMS_KEPT x --max-rooms rooms; past
        that, the source that made the most gives up its quietest first (as
        the rooms in memory do: see Shares), so one source's throwaway rooms
        never push out anyone else's."""
        limit = self.ROOMS_KEPT * self.rooms
        (count,) = db.execute("SELECT COUNT(*) FROM active").fetchone()
        while count > limit:
            maker, held = db.execute("SELECT maker, COUNT(*) AS held FROM active GROUP BY maker"
                                     " ORDER BY held DESC LIMIT 1").fetchone()
            rooms = db.execute("SELECT room FROM active WHERE maker = ? ORDER BY id LIMIT ?",
                               (maker, min(count - limit, max(1, held // 2)))).fetchall()
            for (room,) in rooms:
                db.execute("DELETE FROM lines WHERE room = ?", (room,))
                db.execute("DELETE FROM active WHERE room = ?", (room,))
            count -= len(rooms)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lines (room TEXT NOT NULL, seq INTEGER NOT NULL, id INTEGER NOT NULL,
                                  sender TEXT NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_by_sender ON lines (sender);
CREATE TABLE IF NOT EXISTS seqs (room TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS active (room TEXT PRIMARY KEY, id INTEGER NOT NULL, maker TEXT NOT NULL DEFAULT '')
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS active_by_id ON active (id);
CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                                    PRIMARY KEY (kind, key)) WITHOUT ROWID;
"""


def open_store(config: ServerConfig) -> Store:
    """The store the config asks for (with --redis, Redis is the store: see Cluster)."""
    if config.redis:
        return RedisStore()
    if config.db:
        database = Database(config.db, config.db_history, config.history, config.max_rooms, config.history_bytes)
        database.import_from = config.history_file
        return database
    if config.history_file:
        return HistoryFile(config.history_file, config.history_file_max)
    return MemoryStore()


def _json_or_none(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _is_history_header(obj: object) -> TypeGuard[dict]:
    return (isinstance(obj, dict) and type(obj.get("instance")) is str and obj.get("format") == 1
            and type(obj.get("ids", 1)) is int)


def _is_history_line(obj: object) -> TypeGuard[dict]:
    return (isinstance(obj, dict) and obj.get("type") == "msg" and type(obj.get("id")) is int
            and type(obj.get("seq")) is int and type(obj.get("room")) is str
            and type(obj.get("text")) is str and type(obj.get("from")) is str)


# ---------------------------------------------------------------------------
# 4d. Gate: who may hold a connection slot and try a password

def network_of(ip: str, prefix_v4: int = 32, prefix_v6: int = 64) -> str:
    """The network an address belongs to, for limits per source: by default
    an IPv4 address itself, or an IPv6 /64 (what one subscriber gets, so
    rotating through it changes nothing)."""
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    prefix = prefix_v4 if address.version == 4 else prefix_v6
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class Strikes:
    """Wrong passwords counted per key (an address, a network), each key's
    count forgotten after `forget` quiet seconds; at most `limit` keys."""

    def __init__(self, forget: float, limit: int = 10000):
        self.forget, self.limit = forget, limit
        self.table: Dict[str, Tuple[int, float]] = {}   # key -> (strikes, when the last one was)

    def get(self, key: str, now: float) -> Tuple[int, float]:
        count, last = self.table.get(key, (0, 0.0))
        return (count, last) if now - last < self.forget else (0, 0.0)

    def add(self, key: str, now: float) -> int:
        count = self.get(key, now)[0] + 1
        self.table[key] = (count, now)
        if len(self.table) > self.limit:    # forget the quiet, then the oldest half
            self.table = {k: v for k, v in self.table.items() if now - v[1] < self.forget}
            if len(self.table) > self.limit:
                kept = sorted(self.table.items(), key=lambda item: item[1][1])[self.limit // 2:]
                self.table = dict(kept)
        return count


class FairQueue(Generic[T]):
    """Items waiting their turn, queued by the address they came from, and
    taken in turn by block: round the /8s (IPv6: /16s) that have items
    waiting, within each round its /16s (/32s), then its /24s (/48s), and
    within one of those, oldest first. Whoever has addresses in few blocks
    gets few turns, whatever it sends."""

    LEVELS = {4: (8, 16, 24), 6: (16, 32, 48)}

    def __init__(self) -> None:
        self.root: "collections.OrderedDict[str, Union[collections.OrderedDict, collections.deque]]" = \
            collections.OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, ip: str, item: T) -> None:
        try:
            address = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            address = ipaddress.ip_address("0.0.0.0")
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        levels = self.LEVELS[address.version]
        node: Any = self.root   # an OrderedDict a level down each prefix, a deque at the last
        for prefix in levels:
            block = str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
            node = node.setdefault(block, collections.deque() if prefix == levels[-1] else collections.OrderedDict())
        node.append(item)
        self.size += 1

    def pop(self) -> T:
        """The next item in turn (IndexError if none waits)."""
        if not self.size:
            raise IndexError("nothing waits")
        self.size -= 1
        return self._take(self.root)

    @staticmethod
    def _take(node: "collections.OrderedDict[str, Union[collections.OrderedDict, collections.deque]]") -> T:
        block, child = node.popitem(last=False)     # whose turn it is...
        item = child.popleft() if isinstance(child, collections.deque) else FairQueue._take(child)
        if child:
            node[block] = child                     # ...goes to the back, if it has more
        return item


TRUST_NONE, TRUST_HOME, TRUST_DEVICE = 0, 1, 2     # how far a password try is trusted (see Gate.wait)


class Hashing:
    """Password hashes (tens of milliseconds each), off the loop and shared
    fairly: at most IN_FLIGHT at once with the worker thread; the rest wait
    in a queue per source, served in turn, so a source flooding logins or
    password changes waits behind its own jobs, never ahead of anyone
    else's, trusted or not. A source with QUEUED_MAX jobs waiting is
    refused: `rate-limited`. (Connections from the server's own machine,
    behind a local proxy, each count as a source of their own here.)"""

    IN_FLIGHT = 2
    QUEUED_MAX = 4

    def __init__(self, io: "ServerIO"):
        self.io = io
        self.busy = 0
        self.queues: "collections.OrderedDict[str, collections.deque[Tuple[Callable, tuple, Callable[[object], None]]]]" = \
            collections.OrderedDict()   # source -> jobs (function, args, done)

    def run(self, conn: "Conn", function: Callable, *args, done: Callable[[object], None]) -> None:
        queue = self.queues.setdefault(conn.source or conn.addr, collections.deque())
        if len(queue) >= self.QUEUED_MAX:
            raise ProtocolError("rate-limited", "the server is busy checking your passwords; try again"
                                                " in a second", retry_after=1)
        queue.append((function, args, done))
        self._next()

    def _next(self) -> None:
        while self.busy < self.IN_FLIGHT and self.queues:
            source, queue = self.queues.popitem(last=False)     # the source whose turn it is...
            function, args, done = queue.popleft()
            if queue:
                self.queues[source] = queue                     # ...goes to the back
            self.busy += 1
            self.io.work(function, *args, done=functools.partial(self._done, done=done))

    def _done(self, result: object, done: Callable[[object], None]) -> None:
        self.busy -= 1
        done(result)
        self._next()


class Gate:
    """Who may hold a connection slot and try a password. Sans-I/O, like Chat.

    Slots: at most max_connections; one source (an address, or an IPv6 /64)
    may hold at most connections_per_source of them (joined or not: enough
    for an office behind one NAT, not the whole server), and at most
    pending_per_source that have not joined; and when the server is full, a
    connection that has not joined after PREEMPT_AFTER seconds gives its
    slot to a newcomer, and failing that, the source holding the most (if
    it holds at least twice the newcomer's) gives up its newest. So silent
    connections, stalled TLS handshakes, slow guessers and a few busy
    addresses cannot lock people out. Connections from the server's own
    machine (a local proxy, say) count against no source.

    Passwords: each wrong one is a strike against its address, its network
    (IPv4 /24, IPv6 /48) and the whole server, and is answered at once (its
    slot is freed). The next try from a source still paying for its strikes
    is not refused: it waits on its own connection for its turn (at most
    HOLD_MAX; longer is `rate-limited` with `retry_after`, unchecked), then
    is checked. So one typo never keeps the right password out, and
    guessing goes no faster than the penalties allow, whatever addresses are
    used: an address waits auth_delay after its first strike, doubling with
    each (at most 5 minutes), a network doubles every 4 strikes, and the
    whole server allows a burst of GLOBAL_BURST strikes, then one per
    auth_delay; an address or network that logged in before, and a session
    coming back, skip the server-wide wait. A hello without a password is a
    question, not a strike."""

    PREEMPT_AFTER = 2.0         # seconds a connection may sit silent on a full server
    HOLD_MAX = 10.0             # seconds a password try may wait on its connection for its turn
    MAX_PENALTY = 300.0
    GLOBAL_BURST = 50
    FORGET = 900.0              # strikes are forgotten after this many quiet seconds

    def __init__(self, config: ServerConfig, io: ServerIO, clock: Callable[[], float]):
        self.config, self.io, self.clock = config, io, clock
        self.pending_per_source = max(8, config.max_connections // 10)
        self.unjoined: "collections.OrderedDict[Conn, float]" = collections.OrderedDict()  # -> when it came
        self.pending: Dict[str, int] = collections.Counter()    # source -> connections not joined
        self.slots: Dict[str, int] = collections.Counter()      # source -> connections, joined or not
        self.admitted: Dict[Conn, None] = {}                    # the connections counted in `slots`, oldest first
        self.waiting: "collections.OrderedDict[Conn, float]" = collections.OrderedDict()  # password try -> its turn
        self.by_address, self.by_network = Strikes(self.FORGET), Strikes(self.FORGET)
        self.by_account = Strikes(self.FORGET)     # an account's password guessed from anywhere
        self.allowance, self.refilled = float(self.GLOBAL_BURST), 0.0     # the whole server's, in strikes
        self.proven: "collections.OrderedDict[str, float]" = collections.OrderedDict()  # address -> last login
        # (conn, go) of tries waiting for the allowance, by address block:
        self.turns: FairQueue[Tuple[Conn, Callable[[], None]]] = FairQueue()
        self.turn_timer = False             # a timer waits for the allowance's next strike

    # -- slots ---------------------------------------------------------------

    def admit(self, conn: Conn, connections: int, now: float) -> Tuple[Optional[ProtocolError], Optional[Conn]]:
        """(refusal, None) for a newcomer that may not have a slot, or (None,
        a connection to drop to make room for it, if the server is full)."""
        source = conn.source
        if source and self.slots[source] >= self.config.connections_per_source:
            return ProtocolError("server-full", f"{self.slots[source]} connections from your address are here"
                                                " already, the most one address may have"), None
        if source and self.pending[source] >= self.pending_per_source:
            return ProtocolError("server-full", f"{self.pending[source]} connections from your address"
                                                " are already waiting to join; try again in a moment"), None
        victim = None
        if connections >= self.config.max_connections:
            victim = self._to_take_back(source, now)
            if victim is None:
                return ProtocolError("server-full", f"the server is full ({self.config.max_connections}"
                                                    " connections); try again later"), None
        self.unjoined[conn] = now
        self.pending[source] += 1
        self.slots[source] += 1
        self.admitted[conn] = None
        return None, victim

    def _to_take_back(self, source: str, now: float) -> Optional[Conn]:
        """On a full server, the connection that gives its slot to a newcomer
        from `source`: a try waiting its turn, else one silent too long, else
        the newest of the source holding the most, if it holds at least twice
        what the newcomer's does (and more than one); else none."""
        oldest = next(iter(self.waiting), None) or next(iter(self.unjoined.items()), (None, now))[0]
        if oldest is not None and (oldest in self.waiting or now - self.unjoined[oldest] >= self.PREEMPT_AFTER):
            return oldest
        counted = {held: count for held, count in self.slots.items() if held}
        if not source or not counted:
            return None
        biggest = max(counted, key=counted.__getitem__)
        if counted[biggest] < max(2, 2 * (self.slots[source] + 1)):
            return None
        return next(held for held in reversed(self.admitted) if held.source == biggest)

    def joined(self, conn: Conn) -> None:
        """`conn` joined: it no longer counts as waiting (its slot it keeps)."""
        self.waiting.pop(conn, None)
        if self.unjoined.pop(conn, None) is not None:
            _uncount(self.pending, conn.source)

    def preempted(self, conn: Conn, now: float) -> ProtocolError:
        """What `conn`, taken back by a full server for a newcomer, is told."""
        turn = self.waiting.get(conn)
        if conn not in self.unjoined:
            return ProtocolError("server-full", f"the server is full, and your address has the most connections"
                                                f" here ({self.slots[conn.source]}): this one made room for"
                                                " someone from elsewhere")
        if turn is None:
            return ProtocolError("timeout", "the server is full and you had not said hello")
        seconds = max(1, math.ceil(turn - now))
        return ProtocolError("rate-limited", f"the server is full; your password's turn comes in"
                                             f" {plural(seconds, 'second')}: try again then", retry_after=seconds)

    def left(self, conn: Conn) -> None:
        """`conn` is gone: its slot is free."""
        self.joined(conn)
        if conn in self.admitted:
            del self.admitted[conn]
            _uncount(self.slots, conn.source)

    # -- passwords -----------------------------------------------------------

    def wait(self, conn: Conn, now: float, trust: int = TRUST_NONE, account: str = "") -> Tuple[float, str]:
        """Seconds before `conn` may have a password checked (0: now), and
        whose strikes it waits for: its address's, its network's, the whole
        server's, or (`account`: a try at an account's password) that
        account's. With `trust` TRUST_HOME (a session coming back, an
        account's own network) it waits for neither the server nor the
        account; with TRUST_DEVICE (a device the account logged in on) for
        nobody. Connections from the server's own machine (behind a local
        proxy: everyone's address) wait for no address's or network's strikes."""
        if trust >= TRUST_DEVICE:
            return 0.0, ""
        trusted = trust >= TRUST_HOME
        delay, waits = self.config.auth_delay, [(0.0, "")]
        if conn.source:
            count, last = self.by_address.get(conn.ip, now)
            if count:
                waits.append((last + min(delay * 2 ** (count - 1), self.MAX_PENALTY) - now, "your address"))
            count, last = self.by_network.get(self._network(conn), now)
            if count >= 4:
                waits.append((last + min(delay * 2 ** (count // 4 - 1), self.MAX_PENALTY) - now, "your network"))
        if account and not trusted:
            count, last = self.by_account.get(account, now)
            if count >= 3:
                waits.append((last + min(delay * 2 ** (count - 3), self.MAX_PENALTY) - now, "the account"))
        if not trusted and conn.ip not in self.proven and self._network(conn) not in self.proven:
            self._refill(now)
            if self.allowance < 1.0:
                waits.append(((1.0 - self.allowance) * delay, "everywhere"))
        return max(waits)

    def take_turn(self, conn: Conn, go: Callable[[], None], now: float) -> None:
        """`conn`'s try waits for the server-wide allowance; go() when its turn
        comes. Turns go round the address blocks that have tries waiting (see
        FairQueue): a guesser, however many tries it sends and from however
        many networks, has the share of the blocks its addresses are in, and
        someone from elsewhere is not kept waiting behind it."""
        self.turns.push(conn.ip, (conn, go))
        if not self.turn_timer:
            self.turn_timer = True
            self._refill(now)
            self.io.call_later(max(0.0, 1.0 - self.allowance) * self.config.auth_delay, self._next_turns)

    def _next_turns(self) -> None:
        self.turn_timer = False
        now = self.clock()
        self._refill(now)
        while self.turns and self.allowance >= 1.0:
            conn, go = self.turns.pop()
            if conn in self.waiting:
                go()        # checked now (if wrong, it spends the allowance), or queued again
        if self.turns and not self.turn_timer:
            self.turn_timer = True
            self.io.call_later(max(0.01, 1.0 - self.allowance) * self.config.auth_delay, self._next_turns)

    def failed(self, conn: Conn, now: float, account: str = "", nick: str = "") -> int:
        """A wrong password from `conn` (for `account`, a key, if one; `nick`
        as they spelled it): a strike everywhere; returns its address's count."""
        self.by_network.add(self._network(conn), now)
        if account:
            self.by_account.add(account, now)
        self._refill(now)
        self.allowance -= 1.0
        strikes = self.by_address.add(conn.ip, now)
        log.warning("%s: wrong password%s (%s from this address)", conn.addr, f" for {shown(nick)}" if nick else "",
                    plural(strikes, "strike"))
        return strikes

    def succeeded(self, conn: Conn, now: float) -> None:
        """A right password: its address and network have proven themselves (the newest 10,000 are kept)."""
        for where in (conn.ip, self._network(conn)):
            self.proven[where] = now
            self.proven.move_to_end(where)
        while len(self.proven) > 10000:
            self.proven.popitem(last=False)

    def _refill(self, now: float) -> None:
        self.allowance = min(self.GLOBAL_BURST, self.allowance + (now - self.refilled) / self.config.auth_delay)
        self.refilled = now

    @staticmethod
    def _network(conn: Conn) -> str:
        return network_of(conn.ip, 24, 48)

    network = _network


# ---------------------------------------------------------------------------
# 4e. Intake: frames from each connection, as fast as the rules allow

class Intake:
    """Takes each connection's frames in order and hands them to Chat, but
    only as fast as the rules allow. A connection is paused (not read: its
    frames wait in its socket, and TCP slows the sender down; nothing is
    lost) while it is out of flood tokens, while more than its share is
    queued for it, or while an answer about it is pending; and when the
    turn's budget is spent, its frames wait for the next turn, behind the
    connections already waiting."""

    def __init__(self, config: ServerConfig, io: ServerIO, out: Output, chat: "Chat"):
        self.config, self.io, self.out, self.chat = config, io, out, chat
        self.clock = 0.0
        self.deferred: collections.deque = collections.deque()   # connections with frames left over

    def tick(self, now: float) -> None:
        """A turn begins: a go for those left over last turn, in order."""
        self.clock = now
        for _ in range(len(self.deferred)):
            conn = self.deferred.popleft()
            conn.deferred = False
            self.process(conn)

    def process(self, conn: Conn) -> None:
        """Hand Chat every complete frame from `conn` that the rules allow now."""
        codec = conn.codec
        while not conn.holds and conn.state in (HELLO, JOINED):
            if conn.queued > self.out.share:
                self.hold(conn, BACKLOG)
                return
            if self.out.spent:
                if not conn.deferred and (conn.held or codec.buffered):
                    conn.deferred = True
                    self.deferred.append(conn)
                return
            frame, conn.held = conn.held, None
            if frame is None:
                try:
                    frame = codec.next()
                except ProtocolError as error:
                    self.chat.drop(conn, f"sent a bad frame: {error.text}", error)
                    return
                if frame is None:
                    return
            conn.last_heard = self.clock
            if (conn.state is JOINED or frame.get("type") != "hello") and not self._take_token(conn):
                conn.held = frame
                self._hold_for_flood(conn)
                return
            self.chat.dispatch(conn, frame["type"], frame)

    def _take_token(self, conn: Conn) -> bool:
        """Every frame after hello costs a token; tokens come back at flood_rate, up to flood_burst."""
        config = self.config
        tokens = conn.tokens + (self.clock - conn.refilled) * config.flood_rate
        conn.refilled = self.clock
        if tokens > config.flood_burst:
            tokens = config.flood_burst
        if tokens < 1.0 - 1e-9:     # (a refill timed to the token can fall short by a rounding error)
            conn.tokens = tokens
            return False
        conn.tokens = tokens - 1.0
        return True

    def _hold_for_flood(self, conn: Conn) -> None:
        self.hold(conn, FLOOD)
        self.io.call_later((1.0 - conn.tokens) / self.config.flood_rate, self.release, conn, FLOOD)
        if self.clock - conn.flood_noticed > 10:
            conn.flood_noticed = self.clock
            log.info("%r is over the flood limit; slowing it down", conn)
            self.out.send(conn, {"type": "notice", "text": f"you are sending more than {self.config.flood_rate:g}"
                                 f" lines or requests a second; the server is slowing you down (nothing is lost)"})

    def drained(self, conn: Conn) -> None:
        """Bytes queued for `conn` were sent: a backlogged connection is read
        again once its queue is below its share. However cheap its requests,
        it cannot make the server hold more for it than that."""
        if conn.holds & BACKLOG and conn.queued <= self.out.share:
            self.release(conn, BACKLOG)

    # -- the one mechanism for not reading: holds, by reason ------------------

    def hold(self, conn: Conn, reason: int) -> None:
        """Stop reading `conn` for `reason` (FLOOD, BACKLOG, ANSWER); again is the same."""
        if not conn.holds & reason:
            paused = conn.holds != 0
            conn.holds |= reason
            if not paused:
                self.io.update_interest(conn)

    def release(self, conn: Conn, reason: int) -> None:
        """`reason` no longer holds `conn`: when nothing does, its frames are
        taken again, those already read first. Releasing what does not hold is nothing."""
        if conn.holds & reason:
            conn.holds &= ~reason
            if not conn.holds and conn.state in (HELLO, AUTH, JOINED):
                self.io.update_interest(conn)
                self.process(conn)


class Nicks:
    """Who has which nick: the joined users, the nicks being claimed (while
    the relay answers), and the nicks held for the session of a connection
    that was lost: its owner is likely reconnecting and must find the nick
    theirs, so for nick_hold seconds nobody else may take it. Holds are
    bounded like the connections that made them (max_connections in all),
    and past that the source holding the most gives up its oldest (see
    Shares): churn from one source never frees another's holds."""

    def __init__(self, chat: "Chat"):
        self.chat = chat
        self.users: Dict[str, Conn] = {}         # nick key -> joined connection
        self.claiming: Dict[str, Conn] = {}      # nick key -> connection waiting for the relay's answer
        # nick key -> Hold of its lost owner, by source:
        self.holds: Shares[Hold] = Shares(chat.config.max_connections, first_come=True)

    def taken(self, key: str) -> bool:
        return key in self.users or key in self.claiming or key in self.holds

    def check(self, nick: str, session: object, owner: bool = False) -> Optional[Conn]:
        """ProtocolError if `nick` is not to be had with `session` (or as
        its account's `owner`, who gave its password); else the connection
        it replaces, if any (a reconnecting user whose old connection
        lingers, half-open: the new one wins)."""
        key = name_key(nick)
        if key in self.claiming:
            raise nick_taken(nick)
        held = self.holds.get(key)
        if held is not None:
            if not owner and not _same_session(session, held.session):
                raise nick_taken(nick, f"{held.nick} lost their connection and it waits for them to come back")
            self.holds.pop(key)
        holder = self.users.get(key)
        if holder is not None and not _same_session(session, holder.session) and \
                not (owner and holder.account == key):
            raise nick_taken(nick)
        return holder

    def returning(self, nick: object, session: object) -> bool:
        """Whether a hello with `session` is the owner of `nick` coming back."""
        key = name_key(nick) if type(nick) is str else ""
        held, holder = self.holds.get(key), self.users.get(key)
        return _same_session(session, held.session if held is not None else
                             holder.session if holder is not None else None)

    def away(self, key: str) -> Optional[str]:
        """The nick held for its lost owner, if `key` is one."""
        held = self.holds.get(key)
        return held.nick if held is not None else None

    def hold(self, conn: Conn) -> None:
        relay = self.chat.relay
        for key, _ in self.holds.put(conn.key, conn.source, Hold(conn.nick, conn.session)):
            relay.release(key)
        relay.vanished(conn.key)
        self.chat.io.call_later(self.chat.config.nick_hold, self._hold_over, conn.key, conn.session)

    def _hold_over(self, key: str, session: str) -> None:
        held = self.holds.get(key)
        if held is not None and held.session == session:
            self.holds.pop(key)
            self.chat.relay.release(key)

    def back_elsewhere(self, key: str) -> Optional[Conn]:
        """The owner of `key` connected again on another server: no hold
        stays; the connection here, if any, is to go."""
        self.holds.pop(key)
        return self.users.get(key)


# ---------------------------------------------------------------------------
# 4f. People: accounts that own their nick, operators, bans, mutes, topics,
# away, kept messages and where each account left off

SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}    # 16 MiB and about 40 ms a hash on a 2-core box
SCRYPT_N_MAX = 1 << 20                     # a stored record asking more is not believed
INBOX_MAX, INBOX_PER_SENDER = 100, 10      # messages kept for an account, and from any one sender
INBOX_BYTES = 64 << 10                      # characters of text kept for an account
PLACE_ROOMS = 20                           # rooms an account comes back to


def hash_password(password: str) -> dict:
    """A password as it is kept: scrypt with a salt of its own, and its parameters."""
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, maxmem=64 << 20, **SCRYPT)
    return {"scrypt": dict(SCRYPT), "salt": base64.b64encode(salt).decode(), "key": base64.b64encode(key).decode()}


def password_matches(kept: dict, password: object) -> bool:
    """Whether `password` is the one `kept` was made from (in constant time)."""
    try:
        params = {name: int(kept["scrypt"][name]) for name in ("n", "r", "p")}
        salt, key = base64.b64decode(kept["salt"]), base64.b64decode(kept["key"])
    except (KeyError, TypeError, ValueError):
        return False
    if type(password) is not str or not 1 < params["n"] <= SCRYPT_N_MAX or not 0 < params["r"] * params["p"] <= 64:
        return False
    given = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=len(key), maxmem=256 << 20, **params)
    return hmac.compare_digest(given, key)


_DURATION = re.compile(r"(\d{1,6})([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> Optional[float]:
    """'30m', '2h', '1d' as seconds; None if `text` is not one."""
    match = _DURATION.match(text.lower())
    return float(int(match[1]) * _SECONDS[match[2]]) if match and int(match[1]) else None


def spoken_duration(seconds: float) -> str:
    """Seconds as people say them, in at most two units: '30m', '2h',
    '1d', '1m 30s', '59m 54s', '1d 2h' (what is left over is rounded up)."""
    units, seconds = "wdhms", math.ceil(seconds)
    for _ in range(2):      # rounding up may make it the next unit: 23h 59m 30s is 1d
        big = next((unit for unit in units[:-1] if seconds >= _SECONDS[unit]), "s")
        small = units[min(units.index(big) + 1, len(units) - 1)]
        seconds = -(-seconds // _SECONDS[small]) * _SECONDS[small]
    count, rest = divmod(seconds, _SECONDS[big])
    return f"{count}{big}" + (f" {rest // _SECONDS[small]}{small}" if rest else "")


class Records:
    """The records a store keeps (kinds below), cached here: read from the
    cache, written through to the store. In a cluster the store is Redis,
    shared by every server, and changes made by the others come in through
    changed(), which tells `on_change` (People) so it can act on them."""

    KINDS = ("account", "ban", "mute", "topic", "roomop", "place", "inbox")

    def __init__(self, store: "Store", saved: Dict[str, Dict[str, dict]]):
        self.store = store
        self.tables: Dict[str, Dict[str, dict]] = {kind: dict(saved.get(kind, {})) for kind in self.KINDS}
        self.on_change: Callable[[str, str, Optional[dict]], None] = lambda kind, key, value: None

    def get(self, kind: str, key: str) -> Optional[dict]:
        return self.tables[kind].get(key)

    def items(self, kind: str) -> List[Tuple[str, dict]]:
        return list(self.tables[kind].items())

    def count(self, kind: str) -> int:
        return len(self.tables[kind])

    def put(self, kind: str, key: str, value: Optional[dict]) -> None:
        """Keep (or with None, forget) a record, here and in the store."""
        self._set(kind, key, value)
        self.store.put(kind, key, value)

    def changed(self, kind: str, key: str, value: Optional[dict]) -> None:
        """Another server changed a record (the shared store has it already)."""
        if kind in self.tables:
            self._set(kind, key, value)
            self.on_change(kind, key, value)

    def replace(self, kind: str, table: Dict[str, dict]) -> None:
        """All the records of `kind`, as the shared store has them now."""
        if kind in self.tables:
            self.tables[kind] = dict(table)

    def _set(self, kind: str, key: str, value: Optional[dict]) -> None:
        if value is None:
            self.tables[kind].pop(key, None)
        else:
            self.tables[kind][key] = value


_CLOAK_SECRET = secrets.token_bytes(16)


def cloak(ip: str) -> str:
    """What others see of an address (IRC's host): the same for the same
    address while the server runs, and telling nothing of it."""
    return hmac.new(_CLOAK_SECRET, ip.encode(), hashlib.sha256).hexdigest()[:12] + ".ip"


def _device_hash(token: str) -> str:
    """What an account keeps of a device token (a leak of the records gives no tokens)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _on_this_machine(ip: str) -> bool:
    """A connection from the server's own machine (loopback; on a dual-stack
    listener, ::ffff:127.0.0.1 too)."""
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    return (address.ipv4_mapped or address).is_loopback if address.version == 6 else address.is_loopback


def scoped(room: Union["Room", str, None], key: str) -> str:
    """A record key for `key` in `room` (bans, mutes and room operators;
    a Room, or a room's key for one not open now), or server-wide (None)."""
    return f"{room if isinstance(room, str) else room.key if room is not None else ''}/{key}"


def spoken_until(until: Optional[float], now: float) -> str:
    """How long something that ends at `until` (None: never) lasts, in words."""
    if until is None:
        return "until it is lifted"
    return f"for {spoken_duration(max(1, until - now))} more, until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))}"


class Ban(NamedTuple):
    """A ban or a mute, as kept (see People)."""
    nick: str
    until: Optional[float]      # wall clock; None: until lifted
    reason: str
    by: str
    room: Optional[str]
    source: Optional[str]       # the network they were on: guests from it are shut out too (never an account)
    source_until: Optional[float]   # ... until then (a day at most: addresses are shared and change hands)
    shared: bool = False        # it applies as someone else's, on the same network

    @classmethod
    def of(cls, record: Optional[dict], now: float) -> Optional["Ban"]:
        """The ban `record` holds, if it is still on at `now`."""
        if not isinstance(record, dict):
            return None
        until = record.get("until")
        if _is_number(until) and until <= now:
            return None
        until = until if type(until) in (int, float) else None
        source_until = record.get("source_until", until)
        return cls(str(record.get("nick", "")), until, str(record.get("reason", "")), str(record.get("by", "")),
                   record.get("room"), record.get("source"),
                   source_until if type(source_until) in (int, float) else until)

    def on_source(self, now: float) -> bool:
        """Whether guests from its network are still shut out."""
        return self.source is not None and (self.source_until is None or self.source_until > now)

    def until_text(self, now: float) -> str:
        return spoken_until(self.until, now)


class People:
    """Who people are and what they may do. Its state is kept in Records
    (so it lasts, and in a cluster is one for every server); its requests
    come through Chat's handler table (see handlers()).

    - Accounts own their nick: a registered nick (or a look-alike: its key)
      needs its password at hello, online or not. `register` makes one,
      `password` changes it; hashes are scrypt, computed off the loop.
    - Server operators (--op NAME, the console's /op) may do everything, in
      every room; a server operator may make an account the operator of one
      room, who may then kick, ban, mute and set the topic there.
    - A ban covers the person: their account, or for a guest their nick
      (look-alikes too); and guests from the network they were on (their
      IPv4 address, their IPv6 /64) for a day at most, as addresses are
      shared and change hands. An account is never shut out by a network.
      Bans and mutes end on time. People keeps them and says whom they
      shut out; the acts that make them are Moderation's.
    - Away texts, /whois, topics, messages kept for an account that is not
      online, and where each account left off (its rooms, and the last line
      it had in each), so it comes back there."""

    def __init__(self, chat: "Chat", records: Records):
        self.chat, self.records, self.config = chat, records, chat.config
        self.ops = {name_key(name) for name in chat.config.ops}
        self.registered = Strikes(86400.0)      # source -> accounts it registered today
        records.on_change = self.changed
        for name in chat.config.ops:
            if self.account(name_key(name)) is None:
                log.warning("--op %s: %s has no account yet, so nobody is that operator; make it at the console"
                            " (/register %s), or register it from a client on this machine", name, name, name)

    # -- who is who ----------------------------------------------------------

    def account(self, key: str) -> Optional[dict]:
        return self.records.get("account", key)

    def account_name(self, conn: "Conn") -> Optional[str]:
        """The name of the account `conn` is logged in to, as it was registered (None: a guest)."""
        return (self.account(conn.account) or {}).get("name", conn.account) if conn.account else None

    def is_op(self, conn: "Conn") -> bool:
        """A server operator: logged in to an account --op or /op made one."""
        if not conn.account:
            return False
        record = self.account(conn.account)
        return conn.account in self.ops or bool(record and record.get("op"))

    def is_room_op(self, conn: "Conn", room: "Room") -> bool:
        """An operator of `room`: a server operator, an account made one, or one of the room's own (+o)."""
        return conn.key in room.modes.ops or self.is_op(conn) or \
            bool(conn.account and self.records.get("roomop", scoped(room, conn.account)))

    SOURCE_BAN_MAX = 86400.0    # seconds a ban shuts out guests from the banned one's network

    def banned(self, conn: "Conn", key: str, room: Union["Room", str, None] = None) -> Optional[Ban]:
        """The ban that keeps `conn` (about to be `key`) out of the server (or `room`: see scoped()), if any."""
        return self._in_force("ban", conn, key, room)

    def muted(self, conn: "Conn", room: Optional["Room"]) -> Optional[Ban]:
        """The mute that keeps `conn` quiet on the whole server (or in `room`), if any."""
        return self._in_force("mute", conn, conn.key, None) or \
            (self._in_force("mute", conn, conn.key, room) if room is not None else None)

    def unmuted(self, conn: "Conn", room: Optional["Room"], unchanged: str = "nothing was sent") -> None:
        """ProtocolError('muted') if `conn` may not speak (in `room`); `unchanged` says what that left undone."""
        mute = self.muted(conn, room)
        if mute is not None:
            where = f" in #{mute.room}" if mute.room else ""
            whose = "guests from your address are" if mute.shared else "you are"
            raise ProtocolError("muted", f"{whose} muted{where} {mute.until_text(self.chat.out.ts)}"
                                         + (f": {mute.reason}" if mute.reason else "") + f"; {unchanged}")

    def _in_force(self, kind: str, conn: "Conn", key: str, room: Union["Room", str, None]) -> Optional[Ban]:
        """A ban or mute on the person `conn` is (about to be `key`), in
        `room` (None: server-wide): on their nick or their account, whatever
        nick they use now; for a guest that came after it, also one on
        someone else from its network (then `shared`): the banned one coming
        back as someone new, while the neighbours already here are left be."""
        now = self.chat.out.ts
        for who in {key, conn.account} - {""}:
            ban = Ban.of(self.records.get(kind, scoped(room, who)), now)
            if ban is not None:
                return ban
        if conn.account or self.account(key) is not None:
            return None     # an account is judged by its account alone
        for record_key, record in self.records.items(kind):      # (on those who came after it only)
            if record.get("source") and record["source"] == conn.source and record_key.startswith(scoped(room, "")) \
                    and not 0 < conn.since <= record.get("at", 0):
                ban = Ban.of(record, now)
                if ban is not None and ban.on_source(now):
                    return ban._replace(shared=True)
        return None

    def subject(self, nick: str) -> str:
        """The key a ban or mute on `nick` is kept under: the account of
        whoever is `nick` now (so a new nick does not shed it), or the nick's."""
        target = self.chat.users.get(name_key(nick))
        if target is not None and target.account:
            return target.account
        remote = self.chat.relay.profile(name_key(nick)) or {}
        return name_key(remote["account"]) if type(remote.get("account")) is str else name_key(nick)

    def refusal(self, ban: Ban, where: str) -> ProtocolError:
        """What someone that `ban` keeps out of `where` is told."""
        now, reason = self.chat.out.ts, f": {ban.reason}" if ban.reason else ""
        if not ban.shared:
            return ProtocolError("banned", f"you are banned from {where} {ban.until_text(now)}{reason}",
                                 until=ban.until)
        return ProtocolError("banned", f"guests from your address are shut out of {where} "
                                       f"{spoken_until(ban.source_until, now)}, as {ban.nick} was banned from it"
                                       f"{reason}; log in to an account, or ask an operator", until=ban.source_until)

    # -- the requests ----------------------------------------------------------

    def handlers(self) -> Dict[str, Callable[["Conn", dict], None]]:
        return {"register": self.on_register, "password": self.on_password, "away": self.on_away,
                "whois": self.on_whois, "oper": self.on_oper}

    def on_register(self, conn: "Conn", frame: dict) -> None:
        """Register your nick (you are logged in to it from then on), or, as
        a server operator, someone else's (`nick`: on a --registered-only server)."""
        password = _new_password(frame.get("password"))
        nick = frame.get("nick")
        if nick is None or nick == conn.nick:
            nick, key = conn.nick, conn.key
            if conn.account:
                raise ProtocolError("bad-field", f"you are logged in to {conn.account} already;"
                                                 " /password changes its password")
        else:
            _require(self.is_op(conn), "only a server operator registers other people's nicks")
            nick = check_name(nick)
            key = name_key(nick)
        if self.account(key) is not None:
            raise ProtocolError("bad-nick", f"{nick} is registered already")
        if not self.is_op(conn):
            self._may_register(conn)
        if key in self.ops and not _on_this_machine(conn.ip):     # or anyone could become the operator
            raise ProtocolError("not-allowed", f"{nick} is a server operator's name (--op): its account is made"
                                               f" at the server's console (/register {nick}) or from a client"
                                               " on the server's own machine")

        def hashed(kept: object) -> None:
            if not isinstance(kept, dict) or self.account(key) is not None:
                self.chat.out.send(conn, ProtocolError("internal", f"{nick} could not be registered").frame())
                return
            self.records.put("account", key, {"name": nick, "password": kept, "created": self.chat.out.ts})
            self.registered.add(conn.source, self.chat.clock)
            if key == conn.key:
                self.logged_in(conn, key)
            log.info("%r registered %s", conn, nick)
            self.chat.out.send(conn, {"type": "registered", "nick": nick, "mine": key == conn.key,
                                      **({"device": conn.device} if key == conn.key else {})})
        self.chat.off_loop(conn, hash_password, password, done=hashed)

    ACCOUNTS_PER_SOURCE = 5     # accounts one address may register in a day (the console and operators: any)
    ACCOUNTS_MAX = 100_000      # accounts in all

    def _may_register(self, conn: "Conn") -> None:
        """Accounts cost the server for ever, and each takes a nick from
        everyone else: a source registers a few a day, and there is a ceiling."""
        if conn.source and self.registered.get(conn.source, self.chat.clock)[0] >= self.ACCOUNTS_PER_SOURCE:
            raise ProtocolError("not-allowed", f"{self.ACCOUNTS_PER_SOURCE} accounts were registered from your"
                                               " address today, the most one address may; try again tomorrow")
        if self.records.count("account") >= self.ACCOUNTS_MAX:
            raise ProtocolError("not-allowed", "this server has as many accounts as it keeps; an operator may"
                                               " make one for you")

    def on_password(self, conn: "Conn", frame: dict) -> None:
        """Change your account's password (the old one first)."""
        _require(bool(conn.account), "you are not logged in to an account; /register makes one")
        chat, account, new = self.chat, self.account(conn.account), _new_password(frame.get("new"))
        old = frame.get("old")
        # (a session left open is no proof of who types in it: its device does not count here)
        wait, why = chat.gate.wait(conn, chat.clock, self.trusted(conn, conn.account, None), conn.account)
        if wait > 0:        # a wrong old password is a guess like any other
            seconds = math.ceil(wait)
            raise ProtocolError("rate-limited", _BUSY[why].format(seconds=plural(seconds, "second")),
                                retry_after=seconds)

        def changed(kept: object) -> None:
            if isinstance(kept, dict):
                self.records.put("account", conn.account, dict(self.account(conn.account) or {}, password=kept))
                chat.out.send(conn, {"type": "registered", "nick": conn.nick, "mine": True, "changed": True})

        def checked(right: object) -> None:
            if right is not True:
                chat.gate.failed(conn, chat.clock, conn.account, conn.nick)
                chat.out.send(conn, ProtocolError("login-failed", "that is not your password").frame())
                return
            try:
                chat.off_loop(conn, hash_password, new, done=changed)
            except ProtocolError as error:
                chat.out.send(conn, error.frame())
        chat.off_loop(conn, password_matches, (account or {}).get("password", {}), old, done=checked)

    def on_authenticate(self, conn: "Conn", frame: dict) -> None:
        """Before hello: an account's password (`name`, `password`), so the
        hello that follows is that account's (IRC's SASL PLAIN); answered by
        `authenticated`, priced as a login."""
        name, given = check_name(frame.get("name")), frame.get("password")
        key, chat = name_key(name), self.chat
        record = self.account(key)
        if record is None or type(given) is not str:
            raise ProtocolError("login-failed", f"{name} has no account")
        if not chat.password_turn(conn, key, frame, "authenticate"):
            return

        def checked(right: object) -> None:
            if right is not True:
                chat.gate.failed(conn, chat.clock, key, name)
                chat.out.send(conn, ProtocolError("login-failed", f"wrong password for {name}").frame())
                return
            chat.gate.succeeded(conn, chat.clock)
            conn.verified = key
            chat.out.send(conn, {"type": "authenticated", "account": record.get("name", name)})
        chat.off_loop(conn, password_matches, record.get("password", {}), given, done=checked)

    def on_oper(self, conn: "Conn", frame: dict) -> None:
        """Log in to a server operator's account under the nick you have
        (IRC's OPER NAME PASSWORD): its password, priced as any other."""
        name, given = check_name(frame.get("name")), frame.get("password")
        key, chat = name_key(name), self.chat
        record = self.account(key)
        if record is None or not self.is_op_key(key) or type(given) is not str:
            raise ProtocolError("not-allowed", f"{name} is no server operator's account")
        if not chat.password_turn(conn, key, frame, "oper"):
            return

        def checked(right: object) -> None:
            if right is not True:
                chat.gate.failed(conn, chat.clock, key, name)
                chat.out.send(conn, ProtocolError("login-failed", f"wrong password for {name}").frame())
                return
            chat.gate.succeeded(conn, chat.clock)
            self.logged_in(conn, key, frame.get("device"))
            log.info("%r logged in to the operator account %s", conn, name)     # (logged_in said `op`)
        chat.off_loop(conn, password_matches, record.get("password", {}), given, done=checked)

    # -- the acts (for an operator's client, or the console: `actor` None) ---

    # -- the console's own acts ----------------------------------------------

    def set_server_op(self, name: str, on: bool) -> str:
        """The console's /op NAME and /deop NAME: kept in the account."""
        key = name_key(check_name(name))
        record = self.account(key)
        if record is None:
            raise ProtocolError("no-such-account", f"{name} has no account (/register {name} makes one)")
        self.records.put("account", key, dict(record, op=on))
        target = self.chat.users.get(key)
        if target is not None and target.account == key:
            self.chat.out.send(target, {"type": "op", "on": self.is_op(target)})
        if not on and key in self.ops:
            return f"{name} is no longer an operator here, but still one by --op: restart without it"
        return f"{name} is {'now' if on else 'no longer'} a server operator"

    def set_password(self, name: str, done: Callable[[str], None], create: bool = False) -> None:
        """The console's /register NAME (create) and /password NAME: a new
        password, made up here, hashed off the loop; done(what to show)."""
        nick = check_name(name)
        key = name_key(nick)
        record = self.account(key)
        if create == (record is not None):
            raise ProtocolError("bad-nick", f"{nick} is registered already" if create else f"{nick} has no account")
        password = secrets.token_urlsafe(12)

        def hashed(kept: object) -> None:
            if isinstance(kept, dict):
                self.records.put("account", key, dict(record or {"name": nick, "created": self.chat.out.ts},
                                                      password=kept))
                done(f"{'registered' if create else 'new password for'} {nick}: {password}"
                     " (tell them; /password changes it)")
        self.chat.io.work(hash_password, password, done=hashed)

    def topics(self, rooms: List["Room"]) -> Dict[str, str]:
        """The topics of those of `rooms` that have one."""
        return {room.name: self.topic(room)["text"] for room in rooms if self.records.get("topic", room.key)}

    def topic(self, room: "Room") -> dict:
        record = self.records.get("topic", room.key) or {}
        return {"room": room.name, "text": record.get("text", ""), "by": record.get("by"), "at": record.get("at")}

    def on_away(self, conn: "Conn", frame: dict) -> None:
        text = frame.get("text")
        if text:
            self.unmuted(conn, None, "you are not marked away")     # (whoever writes to you would read it)
        conn.away = check_text(text, REASON_MAX).replace("\n", " ") if text else None
        conn.told_away = set()
        self.chat.relay.presence(conn)
        self.chat.out.send(conn, {"type": "notice", "text": f"you are away: {conn.away}" if conn.away
                                  else "you are back"})

    def on_whois(self, conn: "Conn", frame: dict) -> None:
        nick = check_name(frame.get("nick"))
        key = name_key(nick)
        target = self.chat.users.get(key)
        if target is not None:
            info = self.profile(target)
            rooms = [room for room in target.rooms       # (a secret room only to its members)
                     if "s" not in room.modes.flags or room in conn.rooms]
            info["rooms"] = [room.name for room in rooms]
            info["room_op"] = [room.name for room in rooms if self.is_room_op(target, room)]
        else:       # (what other servers keep of their users has more in it: never their address)
            info = {field: value for field, value in (self.chat.relay.profile(key) or {}).items()
                    if field in self.PUBLIC}
            if not info and self.account(key) is None:
                raise ProtocolError("no-such-user", f"nobody here is called {shown(nick)}")
            info = dict(info or {"nick": (self.account(key) or {}).get("name", nick), "online": False},
                        account=info.get("account") or (self.account(key) or {}).get("name"))
        self.chat.reply(conn, self.chat.out.encode_for(conn, dict(info, type="whois")))

    PUBLIC = ("nick", "online", "account", "rooms", "away", "since", "idle", "server", "op", "username", "host",
              "realname")   # of a profile

    def profile(self, conn: "Conn") -> dict:
        """What /whois says of a user on this server (and what other servers are told): PUBLIC."""
        return {"nick": conn.nick, "online": True, "account": self.account_name(conn), "username": conn.username,
                "host": cloak(conn.ip), "realname": conn.realname, "rooms": [room.name for room in conn.rooms],
                "away": conn.away, "since": conn.since, "idle": round(self.chat.out.ts - conn.said),
                "server": self.config.server_name, "op": self.is_op(conn)}

    # -- acts ----------------------------------------------------------------

    def changed(self, kind: str, key: str, value: Optional[dict]) -> None:
        """A record another server changed (nothing to do here yet: acts come as acts)."""

    # -- where accounts come back to ----------------------------------------

    def left(self, conn: "Conn") -> None:
        """An account's connection is gone (or changed rooms): keep where it was."""
        if conn.account and conn.nick and conn.key == conn.account:
            self.records.put("place", conn.account, {"rooms": [room.name for room in conn.rooms][:PLACE_ROOMS],
                                                     "seen": {room.name: room.seq for room in conn.rooms},
                                                     "instance": self.chat.relay.instance})

    DEVICES_MAX = 10        # device tokens an account keeps (its newest logins)

    def trusted(self, conn: "Conn", key: str, device: object) -> int:
        """How far a try at the account `key`'s password is trusted (see
        Gate.wait): with the device token a login of the account was given
        (OWASP's "device cookies"), it waits for nobody's strikes, so
        strangers' guesses cannot lock the owner out; from a network the
        account logged in from, for neither the account's nor the server's."""
        record = self.account(key) or {}
        if type(device) is str and _device_hash(device) in record.get("devices", ()):
            return TRUST_DEVICE
        return TRUST_HOME if self.chat.gate.network(conn) in record.get("from", ()) else TRUST_NONE

    def logged_in(self, conn: "Conn", key: str, device: object = None) -> None:
        """`conn` gave the right password for the account `key`: it is logged
        in; its network is one the account's tries are trusted from, and its
        device token (`device`, if it is one of the account's, else a new
        one, in conn.device) too. (A connection already in is told if that
        makes it a server operator.)"""
        conn.account = key
        record = self.account(key) or {}
        network = self.chat.gate.network(conn)
        homes = [net for net in record.get("from", []) if net != network][-4:] + [network]
        devices = list(record.get("devices", []))
        if type(device) is str and _device_hash(device) in devices:
            conn.device = device
        else:
            conn.device = secrets.token_urlsafe(18)
            devices = (devices + [_device_hash(conn.device)])[-self.DEVICES_MAX:]
        self.records.put("account", key, dict(record, **{"from": homes, "devices": devices}))
        if conn.state is JOINED and self.is_op(conn):
            self.chat.out.send(conn, {"type": "op", "on": True})

    def place(self, conn: "Conn") -> Optional[dict]:
        """Where `conn`'s account left off, if it has an account and a place."""
        record = self.records.get("place", conn.account) if conn.account else None
        if not isinstance(record, dict) or type(record.get("rooms")) is not list:
            return None
        return record

    def keep_message(self, to_key: str, line: dict, sender: "Conn") -> int:
        """A private message for an account that is not online: kept (within
        INBOX_MAX messages and INBOX_BYTES of text, and INBOX_PER_SENDER from
        one sender: an account, or a guest's address, whatever its nick);
        how many are kept for it."""
        record = self.records.get("inbox", to_key) or {}
        kept, senders = list(record.get("lines", [])), list(record.get("senders", []))
        who = sender.account or "@" + (sender.source or sender.ip)
        if senders.count(who) >= INBOX_PER_SENDER:
            raise ProtocolError("no-such-user", f"{line['to']} is not here, and {INBOX_PER_SENDER} of your messages"
                                                " already wait for them")
        if len(kept) >= INBOX_MAX or sum(len(str(old.get("text"))) for old in kept) + len(line["text"]) > INBOX_BYTES:
            raise ProtocolError("no-such-user", f"{line['to']} is not here, and their kept messages are full")
        self.records.put("inbox", to_key, {"lines": kept + [line], "senders": senders + [who]})
        return len(kept) + 1

    def take_messages(self, conn: "Conn") -> List[dict]:
        """What was kept for `conn`'s account; it is delivered, and kept no more."""
        record = self.records.get("inbox", conn.account) if conn.account else None
        if not record:
            return []
        self.records.put("inbox", conn.account, None)
        return [line for line in record.get("lines", []) if isinstance(line, dict)]

    # -- helpers -------------------------------------------------------------

    def is_op_key(self, key: str) -> bool:
        record = self.account(key)
        return key in self.ops or bool(record and record.get("op"))

    def room(self, name: str) -> "Room":
        """A room by its name (for the console)."""
        room = self.chat.rooms.get(check_room(name))
        if room is None:
            raise ProtocolError("no-such-room", f"there is no room #{check_room(name)}")
        return room

class Moderation:
    """What operators do (from their own client, or the console: `actor` None): kick,
    ban and mute (and lift them), topics, purges, room operators; each act announced in the rooms
    it concerns, logged, and put into effect wherever its target is (through the relay)."""

    def __init__(self, chat: "Chat", people: People) -> None:
        self.chat, self.people = chat, people

    def handlers(self) -> Dict[str, Callable[["Conn", dict], None]]:
        return {"op": self.on_op, "deop": self.on_deop, "kick": self.on_kick, "ban": self.on_ban,
                "unban": self.on_unban, "bans": self.on_bans, "mute": self.on_mute, "unmute": self.on_unmute,
                "topic": self.on_topic, "purge": self.on_purge}

    def on_op(self, conn: "Conn", frame: dict, on: bool = True) -> None:
        """Make an account the operator of a room (a server operator may)."""
        room = self._room(frame)
        if room is None:
            raise ProtocolError("not-allowed", "only the server's console makes server operators (/op NAME there)")
        _require(self.people.is_op(conn), "only a server operator makes room operators")
        self.make_room_op(conn, check_name(frame.get("nick")), room, on)

    def on_deop(self, conn: "Conn", frame: dict) -> None:
        self.on_op(conn, frame, on=False)

    def on_kick(self, conn: "Conn", frame: dict) -> None:
        """A server operator disconnects someone; a room operator puts them out of the room."""
        room, nick = self._room(frame), check_name(frame.get("nick"))
        if self.people.is_op(conn):
            room = None if frame.get("room") is None else room
        else:
            _require(room is not None and self.people.is_room_op(conn, room), "only an operator kicks people" if
                          room is None else f"only an operator of #{room.name} kicks people from it")
            self._not_above(conn, nick)
        key = name_key(nick)
        if key not in self.chat.users and not self.chat.relay.profile(key):
            raise ProtocolError("no-such-user", f"nobody here is called {shown(nick)}", nick=nick)
        self.enforce("kick", key, conn.nick, _reason(frame.get("reason")), room)

    def on_ban(self, conn: "Conn", frame: dict, kind: str = "ban") -> None:
        """Ban (or mute) someone for a while or until lifted: from the room as
        its operator (`room`), from the server as a server operator."""
        room, nick = self._room(frame), check_name(frame.get("nick"))
        self._may_act(conn, room, f"{kind} people")
        self._not_above(conn, nick)
        self.ban(conn, kind, nick, room, _duration(frame.get("duration")), _reason(frame.get("reason")))

    def on_mute(self, conn: "Conn", frame: dict) -> None:
        self.on_ban(conn, frame, "mute")

    def on_unban(self, conn: "Conn", frame: dict, kind: str = "ban") -> None:
        room, nick = self._room(frame), check_name(frame.get("nick"))
        self._may_act(conn, room, f"{kind} people")
        self.lift(conn, kind, nick, room)

    def on_unmute(self, conn: "Conn", frame: dict) -> None:
        self.on_unban(conn, frame, "mute")

    def on_bans(self, conn: "Conn", frame: dict) -> None:
        """The bans and mutes in force (in a room, for its operators; all, for server operators)."""
        room = self._room(frame)
        self._may_act(conn, room, "see the bans and mutes")
        self.chat.reply(conn, self.chat.out.encode_for(conn, {"type": "bans", "bans": self.bans(room)}, "bans"))

    def on_topic(self, conn: "Conn", frame: dict) -> None:
        """The room's topic; with `text`, set it (its operators may)."""
        room = self.chat.room_of(conn, frame.get("room"))
        text = frame.get("text")
        if text is None:
            self.chat.reply(conn, self.chat.out.encode_for(conn, dict(self.people.topic(room), type="topic")))
            return
        if "t" in room.modes.flags:
            _require(self.people.is_room_op(conn, room), f"only an operator of #{room.name} sets its topic")
        self.set_topic(conn, room, check_text(text, TOPIC_MAX).replace("\n", " ") if text != "" else "")

    def on_purge(self, conn: "Conn", frame: dict) -> None:
        """Remove someone's lines from the kept history (a room's, for its operator)."""
        room, nick = self._room(frame), check_name(frame.get("nick"))
        self._may_act(conn, room, "take people's lines out of the history")
        self.purge(conn, nick, room)

    def make_room_op(self, actor: Optional["Conn"], nick: str, room: "Room", on: bool) -> None:
        """`nick`'s account (whoever is `nick` now: an account under another
        nick too) operates `room` from now on, or no longer."""
        key = self.people.subject(nick)
        if self.people.account(key) is None:
            raise ProtocolError("no-such-account", f"{nick} has no account: only an account can operate a room")
        self.people.records.put("roomop", scoped(room, key),
                         {"nick": nick, "room": room.name, "by": _by(actor)} if on else None)
        target = self.chat.users.get(name_key(nick))
        change = {"type": "mode", "by": _by(actor), "modes": "+o" if on else "-o", "args": [nick]}
        self.announce(actor, room, f"{_by(actor)} made {nick} an operator of #{room.name}" if on else
                      f"{_by(actor)} took operator rights in #{room.name} from {nick}",
                      event=change if target is not None and room in target.rooms else None)  # (NAMES change)
        if target is not None:
            self.chat.out.send(target, {"type": "op", "room": room.name, "on": on})

    def ban(self, actor: Optional["Conn"], kind: str, nick: str, room: Optional["Room"],
            duration: Optional[float], reason: str) -> None:
        """A ban or mute on `nick`: kept, announced, and (a ban) put into effect wherever they are."""
        key, subject = name_key(nick), self.people.subject(nick)
        if room is None and (self.people.is_op_key(key) or self.people.is_op_key(subject)):
            raise ProtocolError("not-allowed", f"{nick} is a server operator: /deop them at the console first")
        target, now = self.chat.users.get(key), self.chat.out.ts
        source = (target.source if target is not None else (self.chat.relay.profile(key) or {}).get("source")) or None
        until = now + duration if duration else None
        self.people.records.put(kind, scoped(room, subject), {
            "nick": nick, "until": until, "reason": reason, "by": _by(actor), "room": room.name if room else None,
            "source": source, "source_until": min(until or math.inf, now + People.SOURCE_BAN_MAX), "at": now})
        what = "banned" if kind == "ban" else "muted"
        self.announce(actor, room, f"{_by(actor)} {what} {nick}"
                      + (f" from #{room.name}" if room and kind == "ban" else f" in #{room.name}" if room else "")
                      + (f" for {spoken_duration(duration)}" if duration else "") + (f": {reason}" if reason else ""),
                      about=key)
        if kind == "ban":
            self.enforce("ban", key, _by(actor), reason, room)

    def lift(self, actor: Optional["Conn"], kind: str, nick: str, room: Optional["Room"]) -> None:
        filed = self._filed(kind, nick, room)
        if filed is None:
            raise ProtocolError("no-such-user", f"{nick} is not {'banned' if kind == 'ban' else 'muted'}"
                                                + (f" in #{room.name}" if room else ""))
        self.people.records.put(kind, filed, None)
        self.announce(actor, room, f"{_by(actor)} lifted the {kind} on {nick}", about=name_key(nick))

    def _filed(self, kind: str, nick: str, room: Optional["Room"]) -> Optional[str]:
        """The record key of the ban or mute an operator calls `nick` (their
        account's, their nick's, or one the nick was banned as), if any."""
        for key in (scoped(room, self.people.subject(nick)), scoped(room, name_key(nick))):
            if self.people.records.get(kind, key) is not None:
                return key
        return next((key for key, record in self.people.records.items(kind) if key.startswith(scoped(room, ""))
                     and name_key(str(record.get("nick"))) == name_key(nick)), None)

    def bans(self, room: Optional["Room"]) -> List[dict]:
        """The bans and mutes in force (of `room`; None: all), and the rooms'
        ban masks (IRC's +b: they last while the room has members)."""
        now, listed = self.chat.out.ts, []
        for kind in ("ban", "mute"):
            for key, record in self.people.records.items(kind):
                ban = Ban.of(record, now)
                if ban is not None and (room is None or key.startswith(scoped(room, ""))):
                    listed.append({"kind": kind, "nick": ban.nick, "until": ban.until, "reason": ban.reason,
                                   "by": ban.by, "room": ban.room})
        for where in [room] if room is not None else self.chat.rooms:
            listed += [{"kind": "mask", "nick": mask, "until": None, "by": by, "at": at, "room": where.name}
                       for mask, (by, at) in where.modes.masks.items()]
        return listed

    def set_topic(self, actor: Optional["Conn"], room: "Room", text: str) -> None:
        self.people.records.put("topic", room.key, {"room": room.name, "text": text, "by": _by(actor),
                                             "at": self.chat.out.ts} if text else None)
        log.info("%s set the topic of #%s: %s", _by(actor), room.name, shown(text, 100))
        event = {"type": "topic", "room": room.name, "text": text, "by": _by(actor)}
        self.chat.out.to_room(room, event)
        self.chat.relay.event([room.name], event)

    def purge(self, actor: Optional["Conn"], nick: str, room: Optional["Room"]) -> None:
        store = self.chat.store
        removed = self.chat.rooms.purge(name_key(nick), room, store.lines_before)
        store.purge(name_key(nick), room.name if room else None)
        log.info("%s removed %s's lines from the history (%s of the lines in memory)", _by(actor), nick,
                 plural(removed, "line"))
        self.announce(actor, room, f"{_by(actor)} removed {nick}'s lines from the history")

    def enforce(self, act: str, key: str, by: str, reason: str, room: Optional["Room"]) -> None:
        """Put a kick or ban on `key` into effect wherever they are: here, or
        (through the relay) on the server that has them."""
        target = self.chat.users.get(key)
        if target is not None:
            self.apply(act, target, by, reason, room)
        else:
            self.chat.relay.act(act, key, by, reason, room.name if room else None)

    def apply(self, act: str, conn: "Conn", by: str, reason: str, room: Optional["Room"]) -> None:
        """A kick or ban on `conn`, here: out of the server (told why, and till when), or out of `room`."""
        why = f"{'kicked' if act == 'kick' else 'banned'} by {by}" + (f": {reason}" if reason else "")
        if room is not None:
            if room in conn.rooms:
                self.chat.leave_room(conn, room, why, "kick", by=by, message=reason)
            return
        fields = {}
        if act == "ban":
            ban = self.people.banned(conn, conn.key)
            fields = {"until": ban.until} if ban is not None and ban.until else {}
            why += f" ({ban.until_text(self.chat.out.ts)})" if ban is not None else ""
        log.info("%r %s", conn, why)
        self.chat.drop(conn, why, ProtocolError("kicked" if act == "kick" else "banned", why, **fields))

    def announce(self, actor: Optional["Conn"], room: Optional["Room"], text: str, about: str = "",
                 event: Optional[dict] = None) -> None:
        """An act told in the room it concerns (or the rooms of the one it is
        about), on every server, as a notice or as `event` (a mode change a
        client applies); and to whoever did it, in any case."""
        rooms = [room] if room is not None else self.chat.rooms_of(about) if about else []
        for where in rooms:
            told = dict(event or {"type": "notice", "text": text}, room=where.name)
            self.chat.out.to_room(where, told)
            self.chat.relay.event([where.name], told)
        if actor is not None and not any(actor in where.members for where in rooms):
            self.chat.out.send(actor, {"type": "notice", "text": text})
        log.info("%s", text)

    def _room(self, frame: dict) -> Optional["Room"]:
        """The room a request acts in, or None (server-wide)."""
        name = frame.get("room")
        if name is None:
            return None
        room = self.chat.rooms.get(check_room(name))
        if room is None:
            raise ProtocolError("no-such-room", f"there is no room #{check_room(name)}")
        return room

    def _may_act(self, conn: "Conn", room: Optional["Room"], what: str) -> None:
        if room is None:
            _require(self.people.is_op(conn), f"only a server operator may {what} on the whole server")
        else:
            _require(self.people.is_room_op(conn, room), f"only an operator of #{room.name} may {what} there")

    def _not_above(self, conn: "Conn", nick: str) -> None:
        """A room's operator acts on the room's people, never on a server operator."""
        if not self.people.is_op(conn) and self.people.is_op_key(self.people.subject(nick)):
            raise ProtocolError("not-allowed", f"{nick} is a server operator: only another may act on them")

def _require(allowed: bool, why: str) -> None:
    if not allowed:
        raise ProtocolError("not-allowed", why)


def _by(actor: Optional["Conn"]) -> str:
    """Who did an act: a nick, or the server's console."""
    return actor.nick if actor is not None else "the operator"


TOPIC_MAX = 300         # characters in a room's topic
CLEAR_TOPIC = "-delete"     # what /topic takes to clear one (as irssi has it)
PASSWORD_MAX = 200      # characters in an account's password


def _new_password(password: object) -> str:
    if type(password) is not str or not 4 <= len(password) <= PASSWORD_MAX:
        raise ProtocolError("bad-field", f"a password is 4-{PASSWORD_MAX} characters")
    return password


def _reason(reason: object) -> str:
    return clean_text(reason)[:REASON_MAX].replace("\n", " ").strip() if type(reason) is str else ""


def _duration(value: object) -> Optional[float]:
    """A ban's length from a request: seconds, or '30m', '2h', '1d'; None: until lifted."""
    if value is None:
        return None
    seconds = parse_duration(value) if type(value) is str else \
        float(value) if _is_number(value) and abs(value) < 1e12 else None     # (10**400 is no float)
    if seconds is None or not 0 < seconds <= 10 * 365 * 86400:
        raise ProtocolError("bad-field", "a duration is like 30m, 2h or 1d (at most ten years)")
    return seconds


# ---------------------------------------------------------------------------
# 4g. Chat: the protocol's rules

class Hold(NamedTuple):
    """A nick kept for the session of a connection that was lost."""
    nick: str
    session: str


def nick_taken(nick: str, why: str = "") -> ProtocolError:
    return ProtocolError("nick-taken", f"the nick {nick} is taken" + (f": {why}" if why else ""))


def leave_frame(nick: str, reason: str, room: Room, how: str = "quit", **more: str) -> dict:
    """Someone left `room`, `how`: "quit" (the server: `reason` says why),
    "part" or "kick" (this room; `by`, and `message`, their own words)."""
    return {"type": "leave", "nick": nick, "reason": reason, "users": room.count(), "room": room.name,
            "how": how, **{field: value for field, value in more.items() if value}}


REALNAME_MAX = 100      # characters of a hello's realname
LABEL_MAX = 512         # characters of a request's label (IRC's are its command and targets: a line's at most)
WHOWAS_MAX = 1000       # who left, kept for `whowas`


def _username(given: object, nick: str) -> str:
    """A hello's username (IRC's USER) if it is a plain one (ASCII letters,
    digits, `_ - .`, at most 16), else one made from the nick."""
    name = given if type(given) is str else nick
    plain = "".join(ch for ch in unicodedata.normalize("NFKD", name) if ch.isascii() and (ch.isalnum() or ch in "_-."))
    return plain[:16] or "user"


def _same_session(given: object, session: Optional[str]) -> bool:
    if type(given) is not str or not session:
        return False
    return hmac.compare_digest(given.encode(), session.encode())


class Login:
    """One connection's way in, from its hello to its welcome: the steps in
    `steps`, in turn (the names, the server's password, the account's,
    bans, the nick, its claim). A step may finish later (a password try
    waiting for its turn, a hash computed off the loop, a nick claim Redis
    decides); meanwhile the connection is in AUTH and not read (held for
    ANSWER), and the step runs again when it may go on. A step refuses by
    raising ProtocolError: the connection is told why and closed, but a
    hello with `retry` (an IRC client's, whose user may pick another nick)
    refused for its nick goes back to HELLO and may say hello again."""

    RETRIES = ("nick-taken", "bad-nick", "account-required", "login-failed")     # (with `retry`: see go())

    def __init__(self, chat: "Chat", conn: Conn, hello: dict):
        self.chat, self.conn, self.hello = chat, conn, hello
        self.nick = self.key = ""
        self.steps: List[Callable[[], bool]] = [self._names, self._password, self._account, self._ban, self._nick,
                                                self._claim]
        self.since: Optional[float] = None     # when a password try began to wait for its turn
        self.hashing = False        # the account's password is being checked (off the loop)
        self.verified: Optional[bool] = None   # and whether it was right
        self.asked = False          # the relay was asked for the nick
        self.answer: Optional[bool] = None     # its answer
        self.running = False

    def start(self) -> None:
        self.chat.move(self.conn, AUTH)
        self.chat.intake.hold(self.conn, ANSWER)
        self.go()

    def _names(self) -> bool:
        """The nick (the rules of names), and the names besides it (IRC's USER): kept, or made up, never refused."""
        self.nick = self.chat.renames.check_nick(self.hello.get("nick"))
        self.key = name_key(self.nick)
        self.conn.username = _username(self.hello.get("username"), self.nick)
        realname = self.hello.get("realname")
        self.conn.realname = clean_text(realname)[:REALNAME_MAX].replace("\n", " ").strip() \
            if type(realname) is str else ""
        return True

    def go(self) -> None:
        """Run the steps from the first not done, up to one that finishes later."""
        chat, conn = self.chat, self.conn
        self.running = True
        try:
            while conn.state is AUTH:
                if not self.steps:
                    chat.arrivals.welcome(conn, self.hello)
                    return
                if not self.steps[0]():
                    return
                self.steps.pop(0)
                self.since = None
        except ProtocolError as error:
            if self.hello.get("retry") is True and error.code in self.RETRIES and conn.state is AUTH:
                chat.out.send(conn, dict(error.frame(), of="hello"))    # it may say hello again
                chat.move(conn, HELLO)
                chat.intake.release(conn, ANSWER)
            else:
                chat.drop(conn, f"refused: {error.text}", error)
        finally:
            self.running = False

    def _turn(self, account: str = "", trust: int = TRUST_NONE) -> bool:
        """Whether a password may be checked now. If its source (or the
        account) is still paying for wrong ones, it waits for its turn on its
        connection and this step runs again then; past Gate.HOLD_MAX it is
        refused with `retry_after`."""
        chat, conn = self.chat, self.conn
        if chat.nicks.returning(self.nick, self.hello.get("session")):
            trust = max(trust, TRUST_HOME)
        seconds, why = chat.gate.wait(conn, chat.clock, trust, account)
        chat.gate.waiting.pop(conn, None)
        if seconds <= 0:
            return True
        self.since = chat.clock if self.since is None else self.since
        if chat.clock - self.since + seconds > Gate.HOLD_MAX:
            wait = math.ceil(seconds)
            raise ProtocolError("rate-limited", _BUSY[why].format(seconds=plural(wait, "second")), retry_after=wait)
        chat.gate.waiting[conn] = chat.clock + seconds
        if why == "everywhere":         # its turn comes, or at HOLD_MAX, it is told when to try again
            chat.gate.take_turn(conn, self.go, chat.clock)
            chat.io.call_later(Gate.HOLD_MAX - (chat.clock - self.since) + 0.001, self._still_waiting)
        else:
            chat.io.call_later(seconds, self.go)
        return False

    def _still_waiting(self) -> None:
        if self.conn in self.chat.gate.waiting and not self.running:
            self.go()       # (its _turn says rate-limited now, unless its turn has come)

    def _password(self) -> bool:
        """The server's password, if it has one."""
        chat, conn, given = self.chat, self.conn, self.hello.get("password")
        if chat.config.password is None:
            return True
        if given is None:       # a client asking whether a password is needed: no strike
            raise ProtocolError("auth-failed", "this server needs a password")
        if not self._turn():
            return False
        if type(given) is str and hmac.compare_digest(given.encode("utf-8"), chat.config.password.encode()):
            chat.gate.succeeded(conn, chat.clock)
            return True
        chat.gate.failed(conn, chat.clock)
        raise ProtocolError("auth-failed", "wrong password")

    def _account(self) -> bool:
        """A registered nick is its account's: its password, checked off the loop."""
        chat, conn = self.chat, self.conn
        record = chat.people.account(self.key)
        if record is None and conn.verified:
            chat.people.logged_in(conn, conn.verified, self.hello.get("device"))    # (its SASL account)
            return True
        if record is None:
            if chat.config.registered_only:
                raise ProtocolError("registered-only", "only registered nicks may join this server; an operator"
                                                       " makes accounts")
            return True
        if self.verified is None and conn.verified == self.key:
            self.verified = True        # its password was given before (see People.on_authenticate)
        if self.verified is None:
            if not self.hashing:
                given = self.hello.get("account_password")
                if given is None:
                    raise ProtocolError("account-required", f"{self.nick} is a registered nick: log in with its"
                                                            " password")
                if not self._turn(self.key, chat.people.trusted(conn, self.key, self.hello.get("device"))):
                    return False
                chat.hashing.run(conn, password_matches, record.get("password", {}), given, done=self._verified)
                self.hashing = True
            if self.verified is None:
                return False
        if not self.verified:
            chat.gate.failed(conn, chat.clock, self.key, self.nick)
            raise ProtocolError("login-failed", f"wrong password for {self.nick}")
        chat.gate.succeeded(conn, chat.clock)
        chat.people.logged_in(conn, self.key, self.hello.get("device"))
        return True

    def _verified(self, result: object) -> None:
        if self.conn.state is AUTH:
            self.verified = result is True
            if not self.running:
                self.go()

    def _ban(self) -> bool:
        ban = self.chat.people.banned(self.conn, self.key)
        if ban is not None:
            raise self.chat.people.refusal(ban, "this server")
        return True

    def _nick(self) -> bool:
        """The nick is free, or this is its owner coming back (whose old connection goes)."""
        chat, conn, hello = self.chat, self.conn, self.hello
        replaced = chat.nicks.check(self.nick, hello.get("session"), owner=conn.account == self.key)
        if replaced is not None:
            chat.drop(replaced, "reconnected", ProtocolError("replaced", "you connected again elsewhere"))
        conn.nick, conn.key, conn.session = self.nick, self.key, secrets.token_urlsafe(16)
        conn.claimed = chat.out.ts
        return True

    def _claim(self) -> bool:
        """The nick claimed wherever there are users (Redis decides, in a cluster)."""
        chat, conn = self.chat, self.conn
        if not self.asked:
            self.asked = True
            chat.nicks.claiming[conn.key] = conn
            session = self.hello.get("session")
            chat.relay.claim(conn, conn.key, session if type(session) is str else "", self._claimed)
        if self.answer is None:
            return False
        if not self.answer:
            raise nick_taken(conn.nick, "on another server")
        return True

    def _claimed(self, ok: bool) -> None:
        chat, conn = self.chat, self.conn
        del chat.nicks.claiming[conn.key]
        if conn.state is not AUTH:      # gone while Redis answered
            if ok:
                chat.relay.release(conn.key)
            return
        self.answer = ok
        if not self.running:
            self.go()


# What a password try that must wait too long is told, by whose strikes it waits for.
_BUSY = {
    "your address": "wrong passwords were tried from your address; try again in {seconds}",
    "the account": "wrong passwords were tried for this account; try again in {seconds}",
    "your network": "many wrong passwords were tried from addresses near yours; try again in {seconds}",
    "everywhere": "the server is being sent many wrong passwords; try again in {seconds}",
}


class Chat:
    """Users, rooms and the rules of the protocol: the frames a connection
    sends become frames queued for connections (see Output), and the calls
    the loop makes are listed at the top of this section. Each frame type
    has a handler in `handlers`; a handler refuses by raising ProtocolError,
    which becomes an `error` frame, and the connection stays."""

    def __init__(self, config: ServerConfig, io: ServerIO,
                 relay: Optional[Callable[["Chat"], Relay]] = None, store: Optional[Store] = None):
        self.config = config
        self.io = io
        self.clock = 0.0                         # the loop's monotonic time this turn (see tick)
        self.out = Output(config.max_buffer)
        self.rooms = Rooms(config)
        self.gate = Gate(config, io, lambda: self.clock)
        self.conns: set = set()                  # every connection not yet closing
        self.nicks = Nicks(self)
        self.users = self.nicks.users            # nick key -> joined connection
        self.intake = Intake(config, io, self.out, self)
        self.store: Store = store or open_store(config)
        self.relay: Relay = (relay or LocalRelay)(self)
        self.people = People(self, Records(self.store, self.relay.records))
        self.moderation = Moderation(self, self.people)
        self.directory = Directory(self)
        self.room_modes = RoomModeRules(self)
        self.renames = Renames(self)
        self.arrivals = Arrivals(self)
        self.talk = Talk(self)
        self.hashing = Hashing(io)               # password hashes, off the loop
        self.before_hello: Dict[str, Callable[[Conn, dict], None]] = {
            "hello": self.on_hello, "quit": self.on_quit, "ping": self.on_ping,
            "authenticate": self.people.on_authenticate}
        self.irc_audiences: Dict[frozenset, IrcAudience] = {}   # by the capabilities that change how lines read
        self.handlers: Dict[str, Callable[[Conn, dict], None]] = {
            "hello": self.on_second_hello, "msg": self.talk.on_msg, "me": self.talk.on_msg, "pm": self.talk.on_pm,
            "nick": self.renames.on_nick, "ping": self.on_ping, "pong": self.on_pong, "quit": self.on_quit,
            "join": self.arrivals.on_join, "part": self.on_part, "mode": self.room_modes.on_mode,
            "invite": self.room_modes.on_invite, "who": self.directory.on_who, "rooms": self.directory.on_rooms,
            "whowas": self.directory.on_whowas, "lusers": self.directory.on_lusers,
            **self.people.handlers(), **self.moderation.handlers(),
        }

    # -- the loop's calls ----------------------------------------------------

    def tick(self, now: float, wall: float) -> None:
        """A turn begins: the time (monotonic, and wall clock for frames), a
        fresh budget, and a go for those left over last turn."""
        self.clock = now
        self.out.new_turn(wall)
        self.intake.tick(now)

    def has_work(self) -> bool:
        """Frames are left over for the next turn: the loop must not wait."""
        return bool(self.intake.deferred)

    def may_read(self, conn: Conn) -> bool:
        """Whether the loop should read from `conn` now (not while frames of it wait for their turn)."""
        return not conn.deferred

    def open(self, conn: Conn, irc: bool = False) -> bool:
        """A new connection (`irc`: it came to --irc-port). False if it may
        not have a slot (see Gate; it then gets `server-full` and is closed;
        nobody else notices)."""
        if irc:
            self.speaks_irc(conn)
        refusal, victim = self.gate.admit(conn, len(self.conns), self.clock)
        if refusal is not None:
            log.warning("%s refused: %s", conn.addr, refusal.text)
            self.out.first(conn, refusal.frame())
            self.out.queue(conn, conn.codec.farewell(refusal.text))
            self.move(conn, CLOSING)
            self.io.close_soon(conn)
            return False
        if victim is not None:
            self.drop(victim, "made room for a newcomer on a full server", self.gate.preempted(victim, self.clock))
        self.conns.add(conn)
        self.io.call_later(self.config.hello_timeout, self._hello_deadline, conn)
        return True

    def received(self, conn: Conn, data) -> None:
        if conn.state not in (HELLO, JOINED):
            return          # refused or closing: whatever it sends is ignored
        if conn.state is HELLO and not conn.codec.buffered and data[:1] == b"\x16":
            self.drop(conn, "sent a TLS handshake, but this server has no --tls-cert")
            return
        if not conn.heard:
            first = bytes(data[:1])
            if isinstance(conn.codec, FrameCodec) and first.isalpha():
                self.speaks_irc(conn)       # a frame begins with 00; an IRC line with a command word
            elif isinstance(conn.codec, IrcCodec) and first == b"\x00":
                self.drop(conn, "sent a frame to the IRC port (frames go to the main port, -p)")
                return
        conn.heard = True
        conn.codec.feed(data)
        self.intake.process(conn)

    def speaks_irc(self, conn: Conn) -> None:
        """`conn` speaks IRC (its first bytes said so, or it came to --irc-port)."""
        conn.codec = IrcCodec(self.config, conn.ip, self.irc_audience)

    def irc_audience(self, caps: frozenset) -> IrcAudience:
        """The audience of IRC clients reading lines with `caps` (one for each set)."""
        if caps not in self.irc_audiences:
            self.irc_audiences[caps] = IrcAudience(caps, self.config.server_name, self.directory.ident)
        return self.irc_audiences[caps]

    def end_turn(self) -> List[Conn]:
        """The turn's events are handled: fan out, keep history within its
        budget, let the relay write. Returns the connections to write to:
        each is to be answered with wrote()."""
        self.out.flush()
        self.rooms.end_turn()
        self.relay.end_turn()
        return self.out.end()

    def wrote(self, conn: Conn, sent: int) -> None:
        """The loop tried to write `conn.out` and the kernel took `sent` bytes
        of it. Here, in one place, is decided who is too slow: a connection
        still over its buffer limit after a write."""
        self.out.sent(conn, sent)
        if sent:
            self.intake.drained(conn)
        if conn.queued > self.config.max_buffer and conn.state is JOINED:
            self.drop(conn, f"too slow: over {self.config.max_buffer} bytes unread",
                      ProtocolError("too-slow", "you stopped reading; disconnected"))

    def closed(self, conn: Conn, reason: str) -> None:
        """The socket is gone (closed by the peer, broken, or closed by the loop)."""
        if conn.state not in (CLOSING, CLOSED):
            if conn.codec.buffered:
                reason += f" (in the middle of a frame, {conn.codec.buffered} bytes unread)"
            self._leave(conn, reason, hold=True)
        self.move(conn, CLOSED)
        self.out.discard(conn)

    def move(self, conn: Conn, state: State) -> None:
        """The one place a connection's state changes, along MOVES only."""
        if state is not conn.state:
            if state not in MOVES[conn.state]:
                raise RuntimeError(f"{conn!r}: no move from {conn.state.value} to {state.value}")
            conn.state = state

    def shutdown(self, reason: str) -> None:
        """Say `bye` to everyone and close every connection (no leave events:
        everybody is leaving)."""
        self.out.send_each([conn for conn in self.conns if conn.state in (HELLO, JOINED, AUTH)],
                           {"type": "bye", "reason": reason})
        for conn in list(self.conns):
            self.move(conn, CLOSING)
            self.io.close_soon(conn)
        self.conns.clear()
        self.users.clear()
        self.relay.close()

    # -- handling a frame ----------------------------------------------------

    def dispatch(self, conn: Conn, kind: str, frame: dict) -> None:
        """Handle one request; its direct answers (and refusal) carry its
        `label`, if it has one (a short string)."""
        label = frame.get("label")
        conn.label = label if type(label) is str and len(label) <= LABEL_MAX else None
        try:
            self._dispatch(conn, kind, frame)
        finally:
            conn.label = None

    def _dispatch(self, conn: Conn, kind: str, frame: dict) -> None:
        if conn.state is HELLO:
            handler = self.before_hello.get(kind)
            if handler is None:
                self.drop(conn, f'sent "{shown(kind)}" before hello',
                          ProtocolError("not-joined", "send hello first"))
                return
        else:
            handler = self.handlers.get(kind)
        try:
            try:
                if handler is None:
                    raise ProtocolError("unknown-type", f'unknown frame type "{shown(kind)}"')
                handler(conn, frame)
            except ProtocolError as error:     # refused, but the connection stays
                log.info("%r: %s: %s", conn, error.code, error.text)
                self.out.send(conn, dict(error.frame(), of=kind) if handler is not None else error.frame())
        except Exception:   # a bug of ours, even in answering: it costs this connection, not the server
            log.exception("%r: internal error handling %s", conn, shown(kind))
            self.drop(conn, "internal error", ProtocolError("internal", "the server failed on that frame"))

    def off_loop(self, conn: Conn, function: Callable, *args, done: Callable[[object], None]) -> None:
        """Run function(*args) (a password hash) on the worker thread for
        `conn`'s request, in its turn (see Hashing); its next frames wait
        (not read) till done(result) has answered it."""
        label = conn.label

        def back(result: object) -> None:
            if conn.state in (HELLO, JOINED):
                conn.label = label      # the answer, given later, still names its request
                try:
                    done(result)
                finally:
                    conn.label = None
            self.answered(conn)
        self.awaiting(conn)
        try:
            self.hashing.run(conn, function, *args, done=back)
        except ProtocolError:
            self.answered(conn)
            raise

    def awaiting(self, conn: Conn) -> None:
        """`conn`'s request is answered later: the frames it sent after it wait (not read) till answered()."""
        conn.awaiting += 1
        self.intake.hold(conn, ANSWER)

    def answered(self, conn: Conn) -> None:
        """One request awaiting() is answered; when none is left, the frames after them are taken, in order."""
        conn.awaiting -= 1
        if not conn.awaiting:
            self.intake.release(conn, ANSWER)

    def reply(self, conn: Conn, data: bytes) -> None:
        """Queue an answer to `conn`'s own request. It costs `conn` flood
        tokens by its size (so no cheap request buys a big answer for free)
        and counts against this turn's budget."""
        self.out.send_data(conn, data)
        conn.tokens -= len(data) / REPLY_BYTES_PER_TOKEN
        self.out.charge(len(data))

    def drop(self, conn: Conn, reason: str, error: Optional[ProtocolError] = None) -> None:
        """Disconnect `conn` on the server's initiative, telling it why."""
        if conn.state in (CLOSING, CLOSED):
            return
        if error is not None:
            self.out.send(conn, error.frame())
        farewell = conn.codec.farewell(reason)
        if farewell:
            self.out.send_data(conn, farewell)
        # Dropped for being slow or silent, a client reconnects: its nick waits for it.
        self._leave(conn, reason, hold=error is not None and error.code in ("too-slow", "timeout"))
        self.move(conn, CLOSING)
        self.io.close_soon(conn)

    # -- timers --------------------------------------------------------------

    def _hello_deadline(self, conn: Conn) -> None:
        if conn.state is AUTH:      # its hello is being answered: if that ends in a refusal it may retry, in time
            self.io.call_later(1.0, self._hello_deadline, conn)
        if conn.state is HELLO:
            self.drop(conn, f"no hello within {self.config.hello_timeout:g}s",
                      ProtocolError("timeout", "no hello in time"))

    def keepalive(self, conn: Conn) -> None:
        """Ping a client silent for ping_interval; drop it when silent for
        idle_timeout (a vanished peer never answers, half-open or not)."""
        if conn.state is not JOINED:
            return
        config = self.config
        silent = self.clock - conn.last_heard
        if silent >= config.idle_timeout:
            self.drop(conn, f"ping timeout ({silent:.0f}s silent)", ProtocolError("timeout", "no answer to ping"))
            return
        if silent >= config.ping_interval:
            self.out.send(conn, {"type": "ping"})
            delay = config.idle_timeout - silent
        else:
            delay = config.ping_interval - silent
        self.io.call_later(delay, self.keepalive, conn)

    # -- joining -------------------------------------------------------------

    def on_hello(self, conn: Conn, frame: dict) -> None:
        Login(self, conn, frame).start()

    def on_second_hello(self, conn: Conn, frame: dict) -> None:
        raise ProtocolError("already-joined", f"you are already here as {conn.nick}")

    # -- leaving -------------------------------------------------------------

    def _leave(self, conn: Conn, reason: str, hold: bool = False) -> None:
        """Forget `conn` and tell the rooms it was in; `hold` its nick for it."""
        self.conns.discard(conn)
        self.gate.left(conn)
        if conn.state is not JOINED:
            log.info("%s closed before joining: %s", conn.addr, shown(reason, 160))
            return
        del self.users[conn.key]
        self.people.left(conn)
        self.directory.left(conn)
        if hold and self.config.nick_hold > 0:
            self.nicks.hold(conn)
        else:       # first, so that other servers count the rooms without them
            self.relay.release(conn.key)
        for room in conn.rooms:
            room.remove(conn)
            self.out.to_room(room, leave_frame(conn.nick, reason, room))
            self.rooms.vacated(room)
        if conn.rooms:
            self.relay.event([room.name for room in conn.rooms], {"type": "leave", "nick": conn.nick,
                                                                   "reason": reason, "how": "quit"})
        self._gone(conn.nick, conn.rooms, reason)
        log.info("%r left: %s (%s)", conn, shown(reason, 160), plural(len(self.users), "user"))

    def _gone(self, nick: str, rooms: List[Room], reason: str) -> None:
        """Someone left the server from `rooms`: told once (not once a room)
        to those who read it so (IRC's QUIT), after the rooms' leaves."""
        readers = {member for room in rooms for audience, members in room.audiences.items()
                   if audience.once for member in members}
        if readers:
            self.out.send_each(readers, {"type": "quit", "nick": nick, "reason": reason})

    def on_quit(self, conn: Conn, frame: dict) -> None:
        reason = frame.get("reason")
        reason = clean_text(reason)[:REASON_MAX].replace("\n", " ").strip() if type(reason) is str else ""
        if reason and self.people.muted(conn, None) is not None:
            reason = ""     # (or it would be said to every room after all)
        self.drop(conn, f"quit: {reason}" if reason else "quit")

    # -- chat lines ----------------------------------------------------------

    def deliver_line(self, room: Room, sender: Optional[Conn], data: bytes, id: int, seq: Optional[int],
                     keep: bool = True, fan_out: bool = True, line: Optional[dict] = None) -> None:
        """A numbered line (`data`, as encoded; `line` itself if at hand) goes
        into the room's history (if it has a seq) and out to its members
        (unless they have had it)."""
        if keep and seq is not None:
            self.rooms.keep(room, HistoryLine(id, room.name, seq, data))
        if fan_out:
            self.out.to_room_data(room, data, sender, line)

    def deliver_pm(self, target: Optional[Conn], sender: Optional[Conn], data: bytes) -> None:
        """A numbered private message (as a JSON frame) to its target here,
        and back to its sender here if it asked for its own (protocol 3)."""
        for conn in (target, sender if sender is not None and sender.echo and sender is not target else None):
            if conn is not None:
                self.out.send_data(conn, data if conn.codec.audience is FRAMES else
                                   conn.codec.encode(json.loads(data[4:])))

    def rooms_of(self, key: Optional[str]) -> List[Room]:
        """The rooms the user `key` is in, here or on another server."""
        conn = self.users.get(key or "")
        if conn is not None:
            return list(conn.rooms)
        return [room for room in self.rooms if key in room.remote]

    def room_of(self, conn: Conn, name: object) -> Room:
        """The room a line is for: the one named, or the lobby for clients
        that know nothing of rooms."""
        if name is None:
            if self.rooms.lobby in conn.rooms:
                return self.rooms.lobby
            raise ProtocolError("not-in-room", "you are not in #lobby; say which room")
        room = self.rooms.get(check_room(name))
        if room is None or not room.count():
            raise ProtocolError("no-such-room", f"there is no room #{check_room(name)}")
        if room not in conn.rooms:
            raise ProtocolError("not-in-room", f"you are not in #{room.name}")
        return room

    # -- everything else -----------------------------------------------------

    def password_turn(self, conn: Conn, account: str, frame: dict, kind: str) -> bool:
        """Whether the password in `conn`'s request (`kind`, for `account`)
        may be checked now. If its source or the account is still paying for
        wrong ones, the request waits on its connection for its turn, up to
        Gate.HOLD_MAX (and what came after it waits too), and is handled
        again then; longer is `rate-limited`, with `retry_after`."""
        trust = self.people.trusted(conn, account, frame.get("device"))
        wait, why = self.gate.wait(conn, self.clock, trust, account)
        if wait > Gate.HOLD_MAX:
            seconds = math.ceil(wait)
            raise ProtocolError("rate-limited", _BUSY[why].format(seconds=plural(seconds, "second")),
                                retry_after=seconds)
        if wait > 0:
            self.awaiting(conn)
            self.io.call_later(wait, self._again, conn, conn.state, kind, frame)
        return wait <= 0

    def _again(self, conn: Conn, state: State, kind: str, frame: dict) -> None:
        if conn.state is state:     # (not gone meanwhile)
            self.dispatch(conn, kind, frame)    # (which may wait again: then the frames after it wait on)
            self.answered(conn)

    def on_ping(self, conn: Conn, frame: dict) -> None:
        data = self.out.encode_for(conn, dict(frame, type="pong"))
        if len(data) - 4 > MAX_SERVER_PAYLOAD:   # cannot happen with sane limits; never send it
            raise ProtocolError("bad-field", "ping too large to echo")
        self.reply(conn, data)

    def on_pong(self, conn: Conn, frame: dict) -> None:
        pass    # its arrival already counted as a sign of life

    def on_part(self, conn: Conn, frame: dict) -> None:
        room, message = self.room_of(conn, frame.get("room")), frame.get("reason")
        message = clean_text(message)[:REASON_MAX].replace("\n", " ").strip() if type(message) is str else ""
        if message and self.people.muted(conn, None) is not None:
            message = ""        # (or it would be said to the room after all)
        self.leave_room(conn, room, f"parted: {message}" if message else "parted", "part", message=message)

    def leave_room(self, conn: Conn, room: Room, reason: str, how: str = "part", by: str = "",
                   message: str = "") -> None:
        """`conn` leaves `room`: it parted, or was kicked or banned from it
        (`how`, `by` whom; `reason` says it all, `message` is their words)."""
        room.remove(conn)
        conn.rooms.remove(room)
        self.relay.presence(conn)
        self.people.left(conn)
        self.room_event(room, leave_frame(conn.nick, reason, room, how, by=by, message=message))
        self.rooms.vacated(room)
        parted = {"type": "parted", "room": room.name, "how": how}
        if reason != "parted":
            parted.update(reason=reason, **({"by": by} if by else {}), **({"message": message} if message else {}))
        self.out.send(conn, parted)

    def room_event(self, room: Room, frame: dict, sender: Optional[Conn] = None) -> None:
        """A join or leave: this server's members of `room` now, the others' through the relay."""
        self.out.to_room(room, frame, sender)
        self.relay.event([room.name], frame)

    # -- operator ------------------------------------------------------------

    def announce(self, text: str) -> None:
        """A notice from the operator to everyone (on every server)."""
        notice = {"type": "notice", "text": clean_text(text), "by": "operator"}
        self.out.send_each(self.users.values(), notice)
        self.relay.event(None, notice)

    def replaced(self, key: str) -> None:
        """The owner of the nick `key` connected again on another server."""
        conn = self.nicks.back_elsewhere(key)
        if conn is not None:
            self.drop(conn, "reconnected elsewhere", ProtocolError("replaced", "you connected again elsewhere"))

    # -- what a relay may do to the core (RelayHost) --------------------------

    def notice_here(self, text: str) -> None:
        """A notice from this server to its own users (about its link to the others)."""
        self.out.send_each(self.users.values(), {"type": "notice", "text": text})

    def notice_to(self, key: str, text: str) -> None:
        """A notice from this server to its user `key`, if it is here."""
        conn = self.users.get(key)
        if conn is not None:
            self.out.send(conn, {"type": "notice", "text": text})

    def notice_room(self, room: Room, text: str) -> None:
        """A notice to this server's members of `room`."""
        self.out.to_room(room, {"type": "notice", "room": room.name, "text": text})

    def remote_left(self, rooms: List[Room], nick: str, reason: str) -> None:
        """A user of another server left `rooms` (its server went away): told to the members here."""
        for room in rooms:
            self.out.to_room(room, leave_frame(nick, reason, room))
        self._gone(nick, rooms, reason)

    def deliver_event(self, rooms: Optional[List[str]], frame: dict) -> None:
        """An event from another server: to everyone here (None), or to the
        members of `rooms` here (a join or leave once per room, with this
        server's count; a nick change once to each neighbour)."""
        frame.pop("ts", None)   # it is delivered now
        if rooms is None:
            self.out.send_each(self.users.values(), frame)
        elif frame["type"] in ("join", "leave"):
            here = list(filter(None, map(self.rooms.get, rooms)))
            for room in here:
                self.out.to_room(room, dict(frame, room=room.name, users=room.count()))
            if frame["type"] == "leave" and frame.get("how") == "quit":
                self._gone(str(frame.get("nick")), here, str(frame.get("reason")))
        elif frame["type"] in ("notice", "topic"):
            for room in filter(None, map(self.rooms.get, rooms)):
                self.out.to_room(room, frame)
        else:
            members = set().union(*(room.members for room in filter(None, map(self.rooms.get, rooms))))
            self.out.send_each(members, frame)

    def act(self, act: str, key: str, by: str, reason: str, room: Optional[str]) -> None:
        """Another server's operator kicks or bans a user of this server."""
        conn = self.users.get(key)
        if conn is not None:
            self.moderation.apply(act, conn, by, reason, self.rooms.get(room) if room else None)

    def record_changed(self, kind: str, key: str, value: Optional[dict]) -> None:
        """Another server changed a record (an account, a ban, a topic...)."""
        self.people.records.changed(kind, key, value)

    def records_loaded(self, kind: str, table: Dict[str, dict]) -> None:
        """The shared store's records of `kind`, all of them (when the link to it is back)."""
        self.people.records.replace(kind, table)

    def lost_nick(self, conn: Conn) -> None:
        """After an outage, another server's user had claimed `conn`'s nick first."""
        self.drop(conn, "nick taken on another server while apart", nick_taken(
            conn.nick, "while the servers were apart, another server gave it out too, and earlier;"
                       " connect again to choose another nick"))

    def close(self) -> None:
        """The loop is done: the relay writes what is left."""
        self.relay.close()

    def kick(self, nick: str, reason: str) -> bool:
        """The operator's console kicks `nick` off the server, wherever it is; False if nobody has it."""
        key = name_key(nick)
        if key not in self.users and self.relay.profile(key) is None:
            return False
        self.moderation.enforce("kick", key, "the operator", reason, None)
        return True

class Talk:
    """What someone says: a line to a room they may speak in, a private message to
    someone here, elsewhere or offline (kept for their account), and the away text told back once."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def on_msg(self, conn: Conn, frame: dict) -> None:
        """A `msg`, or a `me` (an action: "* nick waves"); `notice`: one not
        to be answered automatically (IRC's NOTICE). A room without +n takes
        lines from outside it; one with +m, from its ops and voiced only."""
        room = self._room_to_speak_in(conn, frame.get("room"))
        line: dict = {"type": "msg", "from": conn.nick, "text": check_text(frame.get("text")), "room": room.name}
        if frame["type"] == "me":
            line["action"] = True
        if frame.get("notice") is True:
            line["notice"] = True
        self.chat.people.unmuted(conn, room)
        if "m" in room.modes.flags and conn.key not in room.modes.voiced and not self.chat.people.is_room_op(conn, room):
            raise ProtocolError("moderated", f"#{room.name} is moderated: only its operators and those they"
                                             " give a voice speak")
        conn.said = self.chat.out.ts
        self.chat.relay.post(room, conn, line)   # numbered, it comes back through deliver_line()

    def on_pm(self, conn: Conn, frame: dict) -> None:
        """A private message: to its target, wherever it is; kept for an
        account that is not online; the sender hears once that someone is away."""
        to, text = frame.get("to"), check_text(frame.get("text"))
        key = name_key(to) if type(to) is str else ""
        if not self.chat.people.is_op_key(key):      # the muted may still write to an operator, to appeal
            self.chat.people.unmuted(conn, None)
        target = self.chat.users.get(key)
        line = {"type": "msg", "from": conn.nick, "to": target.nick if target else to, "text": text}
        for flag in ("action", "notice"):       # (an action, as `me` is; one not to be answered)
            if frame.get(flag) is True:
                line[flag] = True
        conn.said = self.chat.out.ts
        if self.chat.relay.pm(conn, key, line):      # numbered and delivered by the relay (through Redis)
            self._tell_away(conn, key, (self.chat.relay.profile(key) or {}).get("away"))
            return
        if target is None:
            account = self.chat.people.account(key)
            if account is not None:
                line.update(to=account.get("name", to), id=self.chat.relay.new_id())
                kept = self.chat.people.keep_message(key, self.chat.out.stamp(line), conn)
                self.chat.deliver_pm(None, conn, self.chat.out.encode(line))
                self.chat.out.send(conn, {"type": "notice", "text": f"{line['to']} is not online: your message is kept"
                                     f" for them ({plural(kept, 'message')} waiting)"})
                return
            if self.chat.nicks.away(key):
                raise ProtocolError("no-such-user", f"{self.chat.nicks.away(key)} lost their connection and may be"
                                                    " back in a moment; nothing was sent")
            raise ProtocolError("no-such-user", f"nobody here is called {shown(to)}")
        line["id"] = self.chat.relay.new_id()
        self.chat.deliver_pm(target, conn, self.chat.out.encode(line))
        self._tell_away(conn, key, target.away)

    def _tell_away(self, conn: Conn, key: str, away: object) -> None:
        """Who sends a private message to someone away is told so, once (until they are back and away again)."""
        target = self.chat.users.get(key)
        told = target.told_away if target is not None else set()
        if type(away) is str and conn.key not in told:
            told.add(conn.key)
            nick = target.nick if target is not None else (self.chat.relay.profile(key) or {}).get("nick", key)
            self.chat.out.send(conn, {"type": "notice", "text": f"{nick} is away: {away}",
                                 "away": {"nick": nick, "text": away}})

    def _room_to_speak_in(self, conn: Conn, name: object) -> Room:
        try:
            return self.chat.room_of(conn, name)
        except ProtocolError as error:
            room = self.chat.rooms.get(name) if error.code == "not-in-room" and type(name) is str else None
            if room is None or "n" in room.modes.flags:
                raise
            return room

class Arrivals:
    """A user's way into rooms: the welcome (their rooms, what was said there since
    they left, what they missed) once Login lets them in, and joining a room later."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def welcome(self, conn: Conn, hello: dict) -> None:
        """`conn` is in (see Login): in its rooms, told so, and read again."""
        self._welcome(conn, hello)
        self.chat.intake.release(conn, ANSWER)      # frames that came after its hello come next

    def _welcome(self, conn: Conn, hello: dict) -> None:
        self.chat.move(conn, JOINED)
        self.chat.gate.joined(conn)
        self.chat.users[conn.key] = conn
        self.chat.directory.arrived()
        conn.since = conn.said = self.chat.out.ts
        conn.echo = type(hello.get("protocol")) is int and hello["protocol"] >= 3 and hello.get("echo") is not False
        since = hello.get("since") if hello.get("instance") == self.chat.relay.instance else None
        nowhere = hello.get("rooms") == []      # it starts in no room (an IRC client: it joins its own)
        place = self.chat.people.place(conn) if not hello.get("session") and not nowhere else None
        if place is not None:       # an account comes back where it left off
            hello = dict(hello, rooms=place["rooms"])
            since = place.get("seen") if place.get("instance") in (None, self.chat.relay.instance) else None
        rooms = self.chat.rooms.rejoin(hello.get("rooms"), self.chat.config.rooms_per_user, conn.source) or [self.chat.rooms.lobby]
        rooms, refused = self._may_rejoin(conn, rooms)
        rooms = [] if nowhere else rooms or [self.chat.rooms.lobby]
        for room in rooms:
            self._with_its_history(room)
        history, missed = self.chat.rooms.replay(rooms, since)
        if missed:
            history, missed = self._catch_up(rooms, history, missed)
        start = _newest_within(history, REPLAY_MAX)
        if missed is not None:      # lines a resume cannot carry are missed too
            for line in history[:start]:
                missed[line.room] = missed.get(line.room, 0) + 1
        if start:
            history = history[start:]
        for room in rooms:
            self.enter(conn, room)
        welcome = {"type": "welcome", "nick": conn.nick, "users": rooms[0].nicks() if rooms else [],
                   "server": self.chat.config.name, "protocol": PROTOCOL, "max_payload": self.chat.config.max_payload,
                   "max_text": TEXT_MAX, "rooms": [room.name for room in rooms], "room": rooms[0].name if rooms else None,
                   "instance": self.chat.relay.instance, "session": conn.session,
                   "ping_interval": self.chat.config.ping_interval, "idle_timeout": self.chat.config.idle_timeout,
                   "seq": {room.name: room.seq for room in rooms},   # resume points for rooms with no lines
                   "account": self.chat.people.account_name(conn), "op": self.chat.people.is_op(conn),
                   "device": conn.device or None,
                   "topics": self.chat.people.topics(rooms)}
        if self.chat.config.motd:
            welcome["motd"] = self.chat.config.motd
        if missed is not None:
            welcome["missed"] = missed
            if place is not None:
                welcome["back"] = True      # these are lines said since this account left
        if start:
            welcome["truncated"] = True
        self.chat.relay.presence(conn)
        self.chat.out.queue(conn, self.chat.out.with_history(conn, welcome, history))
        log.info("%r joined (%s)", conn, plural(len(self.chat.users), "user"))
        if not self.chat.relay.up:
            self.chat.out.first(conn, {
                "type": "notice", "text": "the link to the other servers is down; for now you are"
                                          " talking with the people on this server only"})
        for message in self.chat.people.take_messages(conn):     # private messages kept while it was away
            self.chat.out.first(conn, dict(message, kept=True))
        for error in refused:       # the rooms it named and may not be in now
            self.chat.out.first(conn, error.frame())
        for room in rooms:
            self._announce_join(conn, room, resumed=missed is not None)
        self.chat.people.left(conn)      # (where it is now, should it vanish)
        self.chat.io.call_later(self.chat.config.ping_interval, self.chat.keepalive, conn)

    def _catch_up(self, rooms: List[Room], history: List[HistoryLine],
                  missed: Dict[str, int]) -> Tuple[List[HistoryLine], Dict[str, int]]:
        """Lines a resume (or an account coming back) missed that memory no
        longer has, from the store if it keeps them (--db); what cannot be
        had stays counted in `missed`."""
        budget = REPLAY_MAX - sum(len(line.data) for line in history)     # what a welcome can carry
        for room in rooms:
            count = missed.get(room.name, 0)
            if not count or budget <= 0:
                continue
            first = next((line.seq for line in history if line.room == room.name), room.seq + 1)
            older = []
            for payload in self.chat.store.lines_after(room.name, first - count - 1, first, budget):
                line = json.loads(payload)
                older.append(HistoryLine(line["id"], room.name, line["seq"], _LENGTH.pack(len(payload)) + payload))
                budget -= len(payload) + 1
            history = older + history
            missed[room.name] = count - len(older)
            if not missed[room.name]:
                del missed[room.name]
        return sorted(history), missed

    def _with_its_history(self, room: Room) -> None:
        """A room opened again with no history in memory (it was freed, or
        pushed out by other rooms) gets its newest lines back from the store,
        if the store keeps them (--db)."""
        if not room.history and room.seq:
            self.chat.rooms.refill(room, self.chat.store.lines_before(room.name, room.seq + 1, self.chat.config.history))

    def enter(self, conn: Conn, room: Room) -> None:
        room.add(conn)
        conn.rooms.append(room)
        self.chat.out.arrive(conn, room)

    def _announce_join(self, conn: Conn, room: Room, resumed: bool = False) -> None:
        if room.count() == 1 and not resumed:   # a newcomer has nothing pending: no flush needed
            kept = (f"the last {plural(self.chat.config.history, 'line')} said here are shown to whoever joins"
                    " later" if self.chat.config.history else "nothing said here is kept for whoever joins later")
            self.chat.out.first(conn, {"type": "notice", "room": room.name, "text": f"you are alone in #{room.name}; {kept}",
                                  "alone": True})
        # Announced even when this server sees nobody else: in a cluster its
        # view of the other servers' members may be a moment behind.
        self.chat.room_event(room, {"type": "join", "nick": conn.nick, "users": room.count(), "room": room.name},
                    sender=conn)

    def on_join(self, conn: Conn, frame: dict) -> None:
        name = check_room(frame.get("room"))
        existing = self.chat.rooms.get(name)
        if existing not in conn.rooms and len(conn.rooms) >= self.chat.config.rooms_per_user:
            raise ProtocolError("too-many-rooms", f"you are in {len(conn.rooms)} rooms already")
        ban = self.chat.people.banned(conn, conn.key, existing or name_key(name))    # (a room not open now too)
        if ban is not None:
            raise self.chat.people.refusal(ban, f"#{name}")
        if existing is not None and existing not in conn.rooms and existing.count() and not self.chat.people.is_op(conn):
            self.chat.room_modes.may_enter(conn, existing, frame.get("key"))
        room = self.chat.rooms.open(name, conn.source)
        self._with_its_history(room)
        self.chat.out.flush()
        fresh = room not in conn.rooms
        if fresh:
            self.enter(conn, room)
            if room.count() == 1:
                room.modes.created = self.chat.out.ts        # (IRC tells when a channel began: 329)
                if room is not self.chat.rooms.lobby:
                    room.modes.ops.add(conn.key)        # who opens a room is its operator while there
            self.chat.relay.presence(conn)
            self.chat.people.left(conn)
        history = list(room.history)
        joined = {"type": "joined", "room": room.name, "users": room.nicks(), "seq": room.seq,
                  "op": self.chat.people.is_room_op(conn, room), "ops": self.chat.directory.ops_of(room),
                  "voiced": [member.nick for member in room.members if member.key in room.modes.voiced]}
        topic = self.chat.people.topic(room)
        if topic["text"]:
            joined.update(topic=topic["text"], topic_by=topic["by"], topic_at=topic["at"])
        if "s" in room.modes.flags:
            joined["secret"] = True
        if _newest_within(history, REPLAY_MAX):
            joined["truncated"] = True
        self.chat.reply(conn, self.chat.out.with_history(conn, joined, history))
        if fresh:
            self._announce_join(conn, room)

    def _may_rejoin(self, conn: Conn, rooms: List[Room]) -> Tuple[List[Room], List[ProtocolError]]:
        """Of the rooms a hello names, those `conn` may enter as a join would
        let it, and why each other one is refused (said after the welcome)."""
        allowed, refused = [], []
        for room in rooms:
            try:
                if room is not self.chat.rooms.lobby:
                    ban = self.chat.people.banned(conn, conn.key, room)
                    if ban is not None:
                        raise self.chat.people.refusal(ban, f"#{room.name}")
                    if room.count() and not self.chat.people.is_op(conn):
                        self.chat.room_modes.may_enter(conn, room, None)
                allowed.append(room)
            except ProtocolError as error:
                error.fields["room"] = room.name
                refused.append(error)
        return allowed, refused

class Renames:
    """Nicks asked for: the rules a new nick must pass, and renaming (its claim through the relay;
    a registered nick's password, taking its turn; the event to everyone who shares a room)."""

    # Names nobody may take, so nobody can pass for the server or its services.
    RESERVED = frozenset(map(name_key, ("server", "nickserv", "chanserv", "memoserv", "operserv", "saslserv",
                                        "hostserv", "botserv", "services")))

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def check_nick(self, value: object) -> str:
        """A nick someone asks for: the rules of names, and none that passes for the server (or its services)."""
        nick = check_name(value)
        if name_key(nick) in self.RESERVED or name_key(nick) == name_key(self.chat.config.server_name[:NAME_MAX]):
            raise ProtocolError("bad-nick", f"{nick} is the server's own name: choose another")
        return nick

    def on_nick(self, conn: Conn, frame: dict) -> None:
        new = self.check_nick(frame.get("nick"))
        key = name_key(new)
        self.chat.people.unmuted(conn, None, "your nick stays as it is")     # (a new nick is announced everywhere)
        if key != conn.key and self.chat.nicks.taken(key):
            raise nick_taken(new)
        if new == conn.nick:
            return
        if key == conn.key:     # the same nick, written differently: nothing to claim
            self._rename(conn, new)
            return
        ban = self.chat.people.banned(conn, key)
        if ban is not None and not ban.shared:      # (its network's bans let this one in)
            raise ProtocolError("not-allowed", f"{new} is banned {ban.until_text(self.chat.out.ts)}")
        record = self.chat.people.account(key)
        if record is None and self.chat.config.registered_only:
            raise ProtocolError("not-allowed", "on this server every nick is an account's: you may take only"
                                               " your own (/nick NAME PASSWORD)")
        if record is None or key == conn.account:
            self._claim_nick(conn, new, key)
            return
        given = frame.get("password")       # a registered nick: its password too
        if given is None:
            raise ProtocolError("account-required", f"{new} is a registered nick: /nick {new} PASSWORD")
        if not self.chat.password_turn(conn, key, frame, "nick"):
            return

        def verified(right: object) -> None:
            if right is not True:
                self.chat.gate.failed(conn, self.chat.clock, key, new)
                self.chat.out.send(conn, ProtocolError("login-failed", f"wrong password for {new}").frame())
            elif not self.chat.nicks.taken(key):
                self.chat.people.logged_in(conn, key, frame.get("device"))
                self._claim_nick(conn, new, key)
            else:
                self.chat.out.send(conn, nick_taken(new).frame())
        self.chat.off_loop(conn, password_matches, record.get("password", {}), given, done=verified)

    def _claim_nick(self, conn: Conn, new: str, key: str) -> None:
        """Rename `conn` to `new` once the relay says the nick is ours (at once, on a server alone)."""
        self.chat.nicks.claiming[key] = conn
        later: List[bool] = []

        def claimed(ok: bool) -> None:
            del self.chat.nicks.claiming[key]
            if conn.state is not JOINED:
                if ok:
                    self.chat.relay.release(key)
                return
            if ok:
                self._rename(conn, new)
            else:
                self.chat.out.send(conn, nick_taken(new).frame())
            if later:
                self.chat.answered(conn)     # what it sent after the nick comes after the nick
        self.chat.relay.claim(conn, key, "", claimed)
        if key in self.chat.nicks.claiming:      # the relay answers later: read nothing until then
            later.append(True)
            self.chat.awaiting(conn)

    def _neighbours(self, conn: Conn) -> set:
        """Everyone who shares a room with `conn`, and `conn` itself."""
        return {conn}.union(*(room.members for room in conn.rooms))

    def _rename(self, conn: Conn, new: str) -> None:
        old, old_key, key = conn.nick, conn.key, name_key(new)
        del self.chat.users[conn.key]
        conn.nick, conn.key, conn.claimed = new, key, self.chat.out.ts
        self.chat.users[key] = conn
        for room in conn.rooms:
            room.renamed(conn, old)
        log.info("%s is now known as %s", old, new)
        event = {"type": "nick", "old": old, "new": new}
        self.chat.out.send_each(self._neighbours(conn), event)
        if old_key != key:
            self.chat.relay.release(old_key)
        self.chat.relay.presence(conn)
        self.chat.relay.event([room.name for room in conn.rooms], event)

class RoomModeRules:
    """Room modes as IRC has them (see RoomModes): the requests that read and change them
    and invite people, and whether a room's modes let someone in."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def may_enter(self, conn: Conn, room: Room, key: object) -> None:
        """ProtocolError unless `room`'s modes let `conn` in: its ban masks,
        +i (unless invited), +k (with the key), +l (while there is room)."""
        modes = room.modes
        if modes.banned(self.mask_of(conn)):
            raise ProtocolError("banned", f"you are banned from #{room.name}")
        if "i" in modes.flags and conn.session not in modes.invited:
            raise ProtocolError("invite-only", f"#{room.name} is for those invited only: ask one of its operators")
        if "k" in modes.flags and not (type(key) is str and hmac.compare_digest(key.encode(), modes.key.encode())):
            raise ProtocolError("bad-key", f"#{room.name} needs its key to join")
        if "l" in modes.flags and room.count() >= modes.limit:
            raise ProtocolError("room-full", f"#{room.name} is full ({plural(modes.limit, 'member')})")
        modes.invited.discard(conn.session)

    def mask_of(self, conn: Conn) -> str:
        """nick!user@host, casefolded, as ban masks are matched."""
        return f"{conn.nick}!{conn.username}@{cloak(conn.ip)}".casefold()

    def on_mode(self, conn: Conn, frame: dict) -> None:
        """A room's modes (see RoomModes). Without `modes`: what they are.
        With `modes` ("+k-l", their arguments in `args`): changed by the
        room's operators, and what changed told to the room (`mode`); "+b"
        alone lists its ban masks. What cannot be changed is refused after
        the rest is done."""
        room, changes, args = self._open_room(frame.get("room")), frame.get("modes"), frame.get("args", [])
        if changes is None:
            modes, shown = room.modes.shown(room in conn.rooms)
            self.chat.reply(conn, self.chat.out.encode_for(conn, {"type": "modes", "room": room.name, "modes": modes,
                                                        "args": shown, "created": room.modes.created}))
            return
        if type(changes) is not str or len(changes) > 40 or type(args) is not list or len(args) > 12 \
                or not all(type(arg) is str and len(arg) <= 512 for arg in args):
            raise ProtocolError("bad-field", "modes are like \"+k\" with \"args\": [\"key\"] (at most 12)")
        if changes.strip("+") == "b" and not args:
            masks = [{"mask": mask, "by": by, "at": at} for mask, (by, at) in room.modes.masks.items()]
            self.chat.reply(conn, self.chat.out.encode_for(conn, {"type": "banlist", "room": room.name, "masks": masks}))
            return
        if not self.chat.people.is_room_op(conn, room):
            raise ProtocolError("not-allowed", f"only an operator of #{room.name} changes its modes")
        applied, applied_args, refused = self._change_modes(conn, room, changes, list(args))
        if applied:
            self.chat.out.to_room(room, {"type": "mode", "room": room.name, "by": conn.nick, "modes": applied,
                                    "args": applied_args})
        if refused is not None:
            raise refused

    def _change_modes(self, conn: Conn, room: Room, changes: str,
                      args: List[str]) -> Tuple[str, List[str], Optional[ProtocolError]]:
        """Apply `changes`; what changed ("+o-k", its arguments), and the first refusal, if any."""
        modes, sign, written, applied, applied_args = room.modes, "+", "", "", []
        refused: Optional[ProtocolError] = None
        for mode in changes:
            if mode in "+-":
                sign = mode
                continue
            try:
                arg = modes.change(sign == "+", mode, args, functools.partial(self._member, room),
                                   conn.nick, self.chat.out.ts)
            except ProtocolError as error:
                refused = refused or error
                continue
            if arg is not None:
                applied += ("" if sign == written else sign) + mode
                written = sign
                applied_args += [arg] if arg else []
        return applied, applied_args, refused

    def _member(self, room: Room, nick: Optional[str]) -> Tuple[str, str]:
        """The key and nick of `room`'s member `nick` (for +o, +v); else ProtocolError."""
        target = self.chat.users.get(name_key(nick)) if type(nick) is str else None
        if target is None:
            raise ProtocolError("no-such-user", f"nobody here is called {shown(nick or '')}", nick=nick)
        if room not in target.rooms:
            raise ProtocolError("no-such-user", f"{target.nick} is not in #{room.name}", nick=target.nick,
                                elsewhere=True)
        return target.key, target.nick

    def on_invite(self, conn: Conn, frame: dict) -> None:
        """Invite someone here into a room you are in (one with +i: as its operator); they may join past +i."""
        nick, room = check_name(frame.get("nick")), self._open_room(frame.get("room"))
        if room not in conn.rooms:
            raise ProtocolError("not-in-room", f"you are not in #{room.name}")
        if "i" in room.modes.flags and not self.chat.people.is_room_op(conn, room):
            raise ProtocolError("not-allowed", f"only an operator of #{room.name} invites people into it")
        target = self.chat.users.get(name_key(nick))
        if target is None:
            raise ProtocolError("no-such-user", f"nobody on this server is called {nick}", nick=nick)
        if room in target.rooms:
            raise ProtocolError("already-in-room", f"{target.nick} is in #{room.name} already")
        room.modes.invite(target.session)
        self.chat.out.send(target, {"type": "invited", "room": room.name, "by": conn.nick})
        self.chat.reply(conn, self.chat.out.encode_for(conn, {"type": "inviting", "nick": target.nick, "room": room.name}))

    def _open_room(self, name: object) -> Room:
        """The room `name` names, if anyone is in it; else ProtocolError('no-such-room')."""
        room = self.chat.rooms.get(check_room(name))
        if room is None or not room.count():
            raise ProtocolError("no-such-room", f"there is no room #{check_room(name)}")
        return room

class Directory:
    """Who is here and who was: the answers to who, whowas, lusers and rooms, and how a user is named
    to IRC (nick!user@host). It asks the users, rooms and relay; it owns only the memory of who left."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat
        self.departed: collections.deque = collections.deque(maxlen=WHOWAS_MAX)   # who left, newest first
        self.peak_here = self.peak_users = 0    # the most users seen at once, here and on every server

    def arrived(self) -> None:
        """A user joined the server (counted for LUSERS' "max")."""
        self.peak_here = max(self.peak_here, len(self.chat.users))

    def left(self, conn: Conn) -> None:
        """A user left the server: as WHOWAS tells it."""
        self.departed.appendleft({"nick": conn.nick, "username": conn.username, "host": cloak(conn.ip),
                                  "realname": conn.realname, "server": self.chat.config.server_name,
                                  "at": self.chat.out.ts})

    def ident(self, nick: str) -> str:
        """nick!user@host of a user here, on another server, or gone lately
        (as IRC prefixes lines); the server's name for the console's acts."""
        if not nick or " " in nick:     # ("the operator": no nick can have a space)
            return self.chat.config.server_name
        conn = self.chat.users.get(name_key(nick))
        if conn is not None:
            return f"{conn.nick}!{conn.username}@{cloak(conn.ip)}"
        profile = self.chat.relay.profile(name_key(nick))
        if profile:
            return f"{nick}!{profile.get('username') or 'user'}@{profile.get('host') or 'hidden'}"
        for entry in itertools.islice(self.departed, 50):
            if entry["nick"] == nick:
                return f"{nick}!{entry['username']}@{entry['host']}"
        return f"{nick}!user@{self.chat.config.server_name}"

    def on_who(self, conn: Conn, frame: dict) -> None:
        name = frame.get("room")
        if name is None:
            reply: dict = {"type": "who", "users": sorted(self._everyone(conn, frame), key=str.casefold)}
        else:
            room = self.chat.rooms.get(check_room(name))
            if room is None:
                raise ProtocolError("no-such-room", f"there is no room #{check_room(name)}")
            reply = {"type": "who", "room": room.name, "users": room.nicks(), "ops": self.ops_of(room),
                     "voiced": [member.nick for member in room.members if member.key in room.modes.voiced],
                     "secret": "s" in room.modes.flags}
        away = {nick: text for nick, text in ((n, self.away_of(n)) for n in reply["users"]) if text}
        if away:
            reply["away"] = away
        if frame.get("full") is True:       # who each one is (IRC's WHO)
            reply["people"] = [self.person(nick) for nick in reply["users"]]
            self.chat.reply(conn, self.chat.out.encode_for(conn, reply, "people"))
            return
        self.chat.reply(conn, self.chat.out.encode_for(conn, reply, "users"))

    WHO_SCANNED_PER_TOKEN = 100     # users a `who` with a mask looks at for one flood token

    def _everyone(self, conn: Conn, frame: dict) -> List[str]:
        """The nicks a server-wide `who` asks for: `nicks` (at most 32: found
        one by one), or those matching `mask` (an IRC mask; each one looked
        at costs), or everyone."""
        nicks, mask = frame.get("nicks"), frame.get("mask")
        if type(nicks) is list:
            keys = {name_key(nick) for nick in nicks[:32] if type(nick) is str and len(nick) <= NAME_MAX * 4}
            found = [self.chat.users[key].nick if key in self.chat.users else (self.chat.relay.profile(key) or {}).get("nick")
                     for key in keys]
            return [nick for nick in found if type(nick) is str]
        everyone = [c.nick for c in self.chat.users.values()] + self.chat.relay.others()
        if type(mask) is str:
            conn.tokens -= len(everyone) / self.WHO_SCANNED_PER_TOKEN
            pattern = name_key(mask[:100])
            everyone = [nick for nick in everyone if mask_matches(name_key(nick), pattern)]
        return everyone

    def ops_of(self, room: Room) -> List[str]:
        """The operators of `room` among its members here."""
        return [member.nick for member in room.members if self.chat.people.is_room_op(member, room)]

    def person(self, nick: str) -> dict:
        """Who a user here or on another server is, as `who` with `full` tells it."""
        conn = self.chat.users.get(name_key(nick))
        profile = self.chat.people.profile(conn) if conn is not None else (self.chat.relay.profile(name_key(nick)) or {})
        return dict({field: profile.get(field) for field in ("username", "host", "realname", "away", "account",
                                                             "server", "op")}, nick=nick)

    def away_of(self, nick: str) -> Optional[str]:
        """The away text of a user here or on another server."""
        conn = self.chat.users.get(name_key(nick))
        if conn is not None:
            return conn.away
        return (self.chat.relay.profile(name_key(nick)) or {}).get("away")

    def on_whowas(self, conn: Conn, frame: dict) -> None:
        """Who had a nick before (the newest `count`, or 10), as they left."""
        nick, count = check_name(frame.get("nick")), frame.get("count")
        count = count if type(count) is int and 0 < count <= 10 else 10
        key = name_key(nick)
        entries = [dict(entry) for entry in self.departed if name_key(entry["nick"]) == key][:count]
        self.chat.reply(conn, self.chat.out.encode_for(conn, {"type": "whowas", "nick": nick, "entries": entries}))

    def on_lusers(self, conn: Conn, frame: dict) -> None:
        """How many are here: users (on every server), on this server, not joined yet; servers; rooms."""
        users = len(self.chat.users) + len(self.chat.relay.others())
        self.peak_users = max(self.peak_users, users, self.peak_here)    # (others are counted when asked)
        self.chat.reply(conn, self.chat.out.encode_for(conn, {
            "type": "lusers", "users": users, "here": len(self.chat.users),
            "max_users": self.peak_users, "max_here": self.peak_here,
            "unjoined": len(self.chat.conns) - len(self.chat.users), "servers": 1 + len(self.chat.relay.servers()),
            "rooms": sum(1 for room in self.chat.rooms if room.count())}))

    def on_rooms(self, conn: Conn, frame: dict) -> None:
        listing = []
        for entry in self.chat.rooms.listing():
            room = self.chat.rooms.get(entry["name"])
            assert room is not None     # (listing() names rooms in the table)
            if "s" in room.modes.flags and room not in conn.rooms:
                continue                # a secret room only to its members
            topic = self.chat.people.topic(room)["text"]
            if topic:                   # (the rooms' topics, where they have one)
                entry["topic"] = topic
            listing.append(entry)
        self.chat.reply(conn, self.chat.out.encode_for(conn, {"type": "rooms", "rooms": listing}, "rooms"))


# ---------------------------------------------------------------------------
# 4h. IRC: the same chat in a second dialect, on the same port
# ---------------------------------------------------------------------------
#
# A connection whose first byte is a letter speaks IRC (a frame starts with
# its length's 00 byte): it gets an IrcCodec. Its lines become the core's
# requests, each labelled "COMMAND target" so that the answers (which carry
# the label: see Chat.dispatch) are drawn as that command's replies; the
# core's frames become IRC lines. Rooms are channels, lines are PRIVMSGs,
# actions CTCP ACTION, a pm a PRIVMSG to a nick, server notices NOTICEs.
# What only IRC has (CAP, SASL, MOTD, VERSION...) the codec answers itself,
# through a `ping` (label "RAW") whose `pong` carries its lines: so every
# answer comes in order with the rest, and is priced as a request.

IRC_LINE_MAX = 512          # bytes of a line, CRLF included, tags aside (RFC 1459)
IRC_TAGS_MAX = 4094         # bytes of a client's message tags, '@' and ' ' aside (IRCv3: the client-only share)
IRC_EARLY_MAX = 64          # lines a client may send before it is registered
IRC_TARGETS = 4             # targets of one PRIVMSG, NOTICE, JOIN, PART, NAMES (TARGMAX)
IRC_CAPS = ("echo-message", "message-tags", "multi-prefix", "sasl", "server-time", "userhost-in-names")
IRC_READING_CAPS = frozenset({"echo-message", "message-tags", "server-time"})   # how room lines read
IRC_COMMANDS_BEFORE = {"CAP", "NICK", "USER", "PASS", "AUTHENTICATE", "PING", "PONG", "QUIT"}
_IRC_FORMATTING = re.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
                             r"|[\x02\x0f\x11\x16\x1d\x1e\x1f]")


def irc_split(line: str) -> Tuple[str, List[str]]:
    """An IRC line (no tags, no CRLF) as its command (upper case) and parameters."""
    if line.startswith(":"):        # a prefix from a client means nothing
        line = line.partition(" ")[2]
    head, _, trailing = line.partition(" :")
    params = [param for param in head.split(" ") if param]      # (on spaces only: a tab is part of a word)
    if not params:
        return "", []
    if _:
        params.append(trailing)
    return params[0].upper(), params[1:]


def irc_text(text: str) -> str:
    """What an IRC client's text is in the chat: its colours and formatting codes gone."""
    return _IRC_FORMATTING.sub("", text)


def irc_pieces(text: str, budget: int) -> List[str]:
    """`text` as IRC lines of at most `budget` bytes each: one per line of
    it, long ones cut between words where they can be (never inside a
    character); nothing is lost but the spaces a cut falls on."""
    pieces = []
    for line in text.split("\n"):
        data = line.encode("utf-8")
        while len(data) > budget:
            cut = data.rfind(b" ", 0, budget + 1)
            if cut <= budget // 2:       # no space in the second half: cut inside the word
                cut = budget
                while cut and (data[cut] & 0xC0) == 0x80:      # not inside a character's bytes
                    cut -= 1
            pieces.append(data[:cut].decode("utf-8"))
            data = data[cut:].lstrip(b" ") if data[cut:cut + 1] == b" " else data[cut:]
        pieces.append(data.decode("utf-8") or " ")
    return pieces


def irc_line(*words: str, trailing: Optional[str] = None, tags: str = "") -> bytes:
    """One IRC line: `words`, then `trailing` (which may hold spaces), CRLF."""
    line = " ".join(words)
    if trailing is not None:
        line += " :" + trailing
    return (f"@{tags} " if tags else "").encode() + line.encode("utf-8") + b"\r\n"


class IrcAudience(Audience):
    """IRC clients with the same reading capabilities: a room's frames read
    as the same lines for all of them (see Output)."""

    once = True         # someone leaving the server is one QUIT, not one per channel

    def __init__(self, caps: frozenset, server: str, ident: Callable[[str], str]):
        self.caps, self.server, self.ident = caps, server, ident
        self.echo = "echo-message" in caps

    def room_bytes(self, frame: Optional[dict], data: bytes) -> bytes:
        return self.render(frame if frame is not None else json.loads(data[4:]))

    def shared(self, frame: dict) -> Optional[bytes]:
        if frame.get("type") in ("nick", "quit", "mode", "topic", "join", "leave") or \
                (frame.get("type") == "notice" and "away" not in frame):
            return self.render(frame)
        return None     # (addressed to each one: encoded for each)

    def tags(self, frame: dict) -> str:
        """The message tags `frame` gets: its time, its id."""
        tags = []
        if "server-time" in self.caps and type(frame.get("ts")) in (int, float):
            tags.append("time=" + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(frame["ts"]))
                        + f".{int(frame['ts'] * 1000) % 1000:03d}Z")
        if "message-tags" in self.caps and type(frame.get("id")) is int:
            tags.append(f"msgid={frame['id']}")
        return ";".join(tags)

    def render(self, frame: dict, me: str = "") -> bytes:
        """A frame for a room, or for everyone (or for `me`), as IRC lines."""
        kind, tags = frame.get("type"), self.tags(frame)
        room = f"#{frame.get('room')}"
        if kind == "msg":
            return self.said(frame, room if "room" in frame else me, tags)
        who = self.ident(str(frame.get("nick", "")))
        if kind == "join":
            return irc_line(f":{who}", "JOIN", room, tags=tags)
        if kind == "leave":
            if frame.get("how") == "kick":
                kicker = str(frame.get("by", ""))
                return irc_line(f":{self.ident(kicker)}", "KICK", room, str(frame["nick"]),
                                trailing=frame.get("message") or kicker, tags=tags)
            if frame.get("how") == "part":
                return irc_line(f":{who}", "PART", room, trailing=frame.get("message") or None, tags=tags)
            return b""      # one QUIT follows (see Chat._gone)
        if kind == "quit":
            return irc_line(f":{who}", "QUIT", trailing=str(frame.get("reason", "")), tags=tags)
        if kind == "nick":
            old, new = str(frame.get("old")), str(frame.get("new"))
            return irc_line(f":{old}!{self.ident(new).partition('!')[2]}", "NICK", trailing=new, tags=tags)
        if kind == "topic":
            return irc_line(f":{self.ident(str(frame.get('by')))}", "TOPIC", room, trailing=str(frame.get("text")),
                            tags=tags)
        if kind == "mode":
            return irc_line(f":{self.ident(str(frame.get('by')))}", "MODE", room, str(frame.get("modes")),
                            *map(str, frame.get("args", [])), tags=tags)
        if kind == "notice":
            target = room if "room" in frame else me or "*"
            text = str(frame.get("text", ""))
            return b"".join(irc_line(f":{self.server}", "NOTICE", target, trailing=piece, tags=tags)
                            for piece in irc_pieces(text, 400))
        return b""

    def said(self, frame: dict, target: str, tags: str) -> bytes:
        """A chat line as PRIVMSGs (or NOTICEs): several if long, or of several lines."""
        prefix = f":{self.ident(str(frame.get('from')))}"
        command = "NOTICE" if frame.get("notice") else "PRIVMSG"
        action = frame.get("action") is True
        room = frame.get("room")
        target = f"#{room}" if room is not None else target
        budget = IRC_LINE_MAX - 2 - len(f"{prefix} {command} {target} :".encode()) - (9 if action else 0)
        return b"".join(irc_line(prefix, command, target, trailing=f"\x01ACTION {piece}\x01" if action else piece,
                                 tags=tags)
                        for piece in irc_pieces(str(frame.get("text", "")), budget))


class IrcCodec:
    """A connection speaking IRC (RFC 1459 and 2812, with IRCv3's CAP,
    SASL PLAIN, server-time, echo-message, message-tags, multi-prefix and
    userhost-in-names): lines in, requests out (see next()); frames in,
    lines out (see encode(), and IrcReplies for each frame). Registration (NICK, USER, PASS, CAP, SASL)
    is the codec's until it says hello for the user."""

    def __init__(self, config: "ServerConfig", ip: str, audience_for: Callable[[frozenset], IrcAudience]):
        self.config, self.server = config, config.server_name
        self.host, self.audience_for = cloak(ip), audience_for
        self.audience = audience_for(frozenset())
        self.buffer = bytearray()
        self.nick = ""                  # as the server knows it ("" until welcome)
        self.asked_nick = ""            # the NICK it sent
        self.username = self.realname = ""
        self.password: Optional[str] = None     # PASS
        self.caps: set = set()
        self.negotiating = False        # between CAP LS/REQ and CAP END
        self.sasl: Optional[str] = None     # "PLAIN" while its credentials are awaited
        self.sasl_data = ""
        self.registered = False
        self.hello_sent = False
        self.early = 0                  # lines before registration
        self.motd: Optional[str] = None
        self.pending: collections.deque = collections.deque()     # requests a line made beyond its first
        self.away: List[bool] = []      # AWAY requests in flight: whether each set a text (for 306 or 305)
        self.replies = IrcReplies(self)

    # -- lines in ------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> Optional[dict]:
        """The next request its lines make (None until more come; ProtocolError
        if it sends what cannot be IRC: a line past every limit)."""
        while True:
            if self.pending:
                return self.pending.popleft()
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > IRC_TAGS_MAX + IRC_LINE_MAX:
                    raise ProtocolError("frame-too-large", f"a line over {IRC_TAGS_MAX + IRC_LINE_MAX} bytes")
                return None
            raw = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[:end + 1]
            request = self.line(raw)
            if request is not None:
                return request

    def line(self, raw: bytes) -> Optional[dict]:
        """One line from the client: the request it makes, if any."""
        if raw.startswith(b"@"):        # its tags: only their size matters (and TAGMSG is not relayed)
            tags, _, raw = raw.partition(b" ")
            if len(tags) > IRC_TAGS_MAX + 1:
                return self.raw(self.numeric("417", trailing="Input line was too long"))
        if not raw.strip():
            return None
        if len(raw) > IRC_LINE_MAX - 2:
            return self.raw(self.numeric("417", trailing="Input line was too long"))
        if b"\x00" in raw:
            return self.raw(self.notice("a line with a NUL byte was not taken"))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self.raw(irc_line(f":{self.server}", "FAIL", "*", "INVALID_UTF8",
                                     trailing="a line that is not UTF-8 was not taken (this server is UTF8ONLY)"))
        command, params = irc_split(text)
        if not command:
            return None
        if not self.registered:
            self.early += 1
            if self.early > IRC_EARLY_MAX:
                raise ProtocolError("bad-frame", "too many lines before registering")
            if command not in IRC_COMMANDS_BEFORE:
                return self.raw(self.numeric("451", trailing="You have not registered"))
        handler = getattr(self, f"irc_{command.lower()}", None)
        if handler is None:
            return self.raw(self.numeric("421", command, trailing="Unknown command"))
        return handler(params)

    def raw(self, *lines: bytes) -> dict:
        """A request that answers with `lines` (see the section's comment)."""
        return {"type": "ping", "label": "RAW", "irc": b"".join(lines).decode("utf-8")}

    def needs(self, command: str, params: List[str], count: int) -> Optional[dict]:
        """None if `params` has `count`, else the 461 answer."""
        if len(params) >= count and all(params[:count]):
            return None
        return self.raw(self.numeric("461", command, trailing="Not enough parameters"))

    # -- registration --------------------------------------------------------

    def irc_cap(self, params: List[str]) -> Optional[dict]:
        sub = params[0].upper() if params else ""
        if sub == "LS":
            self.negotiating = not self.registered
            values = len(params) > 1 and params[1].isdigit() and int(params[1]) >= 302     # (3.2 has cap values)
            return self.raw(self.cap("LS", " ".join("sasl=PLAIN" if cap == "sasl" and values else cap
                                                     for cap in IRC_CAPS)))
        if sub == "LIST":
            return self.raw(self.cap("LIST", " ".join(sorted(self.caps))))
        if sub == "REQ":
            self.negotiating = not self.registered
            asked = params[1].split() if len(params) > 1 else []
            wanted = {cap.lstrip("-") for cap in asked}
            if not wanted <= set(IRC_CAPS) or (self.registered and wanted & IRC_READING_CAPS):
                return self.raw(self.cap("NAK", " ".join(asked)))
            for cap in asked:
                (self.caps.discard if cap.startswith("-") else self.caps.add)(cap.lstrip("-"))
            return self.raw(self.cap("ACK", " ".join(asked)))
        if sub == "END":
            self.negotiating = False
            return self.hello()
        return self.raw(self.numeric("410", sub or "*", trailing="Invalid CAP command"))

    def cap(self, sub: str, caps: str) -> bytes:
        return irc_line(f":{self.server}", "CAP", self.nick or "*", sub, trailing=caps)

    def irc_pass(self, params: List[str]) -> Optional[dict]:
        if self.registered:
            return self.raw(self.numeric("462", trailing="You may not reregister"))
        self.password = params[0] if params else ""
        return None

    def irc_user(self, params: List[str]) -> Optional[dict]:
        if self.registered:
            return self.raw(self.numeric("462", trailing="You may not reregister"))
        missing = self.needs("USER", params, 4)
        if missing is not None:
            return missing
        self.username, self.realname = params[0], irc_text(params[3])
        return self.hello()

    def irc_nick(self, params: List[str]) -> Optional[dict]:
        if not params or not params[0]:
            return self.raw(self.numeric("431", trailing="No nickname given"))
        if not self.registered:
            self.asked_nick = params[0]
            return self.hello()
        return {"type": "nick", "nick": params[0], "label": f"NICK {params[0]}"}

    def irc_authenticate(self, params: List[str]) -> Optional[dict]:
        """SASL PLAIN: the account's password, checked before registration ends."""
        arg = params[0] if params else ""
        if self.registered:
            return self.raw(self.numeric("907", trailing="You have already authenticated"))
        if arg == "*":
            self.sasl = None
            return self.raw(self.numeric("906", trailing="SASL authentication aborted"))
        if self.sasl is None:
            if arg.upper() != "PLAIN":
                return self.raw(self.numeric("908", "PLAIN", trailing="are available SASL mechanisms"),
                                self.numeric("904", trailing="SASL authentication failed"))
            self.sasl, self.sasl_data = "PLAIN", ""
            return self.raw(irc_line("AUTHENTICATE", "+"))
        self.sasl_data += "" if arg == "+" else arg
        if len(arg) == 400 and len(self.sasl_data) < 1600:
            return None     # more to come
        self.sasl = None
        try:
            _, name, password = base64.b64decode(self.sasl_data, validate=True).decode("utf-8").split("\x00")
        except (ValueError, UnicodeDecodeError):
            return self.raw(self.numeric("904", trailing="SASL authentication failed"))
        return {"type": "authenticate", "name": name, "password": password, "label": "AUTHENTICATE"}

    def hello(self) -> Optional[dict]:
        """The hello for the user, once NICK and USER came and CAP is done."""
        if self.registered or self.hello_sent or self.negotiating or not (self.asked_nick and self.username):
            return None
        self.hello_sent = True
        self.audience = self.audience_for(frozenset(self.caps & IRC_READING_CAPS))
        hello = {"type": "hello", "nick": self.asked_nick, "username": self.username, "realname": self.realname,
                 "rooms": [], "protocol": PROTOCOL, "retry": True, "echo": "echo-message" in self.caps,
                 "label": "HELLO"}
        if self.password is not None:   # the server's password; on a server with none, the nick's account's
            hello["password" if self.config.password is not None else "account_password"] = self.password
        return hello

    # -- everyday commands ---------------------------------------------------

    def irc_ping(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("PING", params, 1)
        if missing is not None:
            return missing
        token = params[0]
        if not self.registered:         # (before hello the core answers nothing but hello)
            return self.raw(irc_line(f":{self.server}", "PONG", self.server, trailing=token))
        return {"type": "ping", "label": "PING", "token": token}

    def irc_pong(self, params: List[str]) -> Optional[dict]:
        return {"type": "pong"} if self.registered else None

    def irc_quit(self, params: List[str]) -> Optional[dict]:
        return {"type": "quit", **({"reason": irc_text(params[0])} if params and params[0] else {})}

    def irc_privmsg(self, params: List[str], notice: bool = False) -> Optional[dict]:
        command = "NOTICE" if notice else "PRIVMSG"
        if not params:
            return None if notice else self.raw(self.numeric("411", trailing=f"No recipient given ({command})"))
        if len(params) < 2 or not params[1]:
            return None if notice else self.raw(self.numeric("412", trailing="No text to send"))
        text, action = irc_text(params[1]), False
        if text.startswith("\x01"):             # CTCP: ACTION is /me, the rest is not relayed
            body = text.strip("\x01")
            if not body.upper().startswith("ACTION "):
                return None
            text, action = body[7:], True
        if not text.strip():
            return None if notice else self.raw(self.numeric("412", trailing="No text to send"))
        requests = []
        for target in params[0].split(",")[:IRC_TARGETS]:
            label = f"{command} {target}"
            if target.startswith("#"):
                request: dict = {"type": "me" if action else "msg", "room": target[1:], "text": text, "label": label}
            else:
                request = {"type": "pm", "to": target, "text": text, "label": label,
                           **({"action": True} if action else {})}
            if notice:
                request["notice"] = True
            requests.append(request)
        return self.batch(requests)

    def irc_notice(self, params: List[str]) -> Optional[dict]:
        return self.irc_privmsg(params, notice=True)

    def batch(self, requests: List[dict]) -> Optional[dict]:
        """Several requests from one line: the first now, the others queued as lines of their own."""
        if not requests:
            return None
        for request in requests[1:]:
            self.pending.append(request)
        return requests[0]

    def irc_join(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("JOIN", params, 1)
        if missing is not None:
            return missing
        keys = params[1].split(",") if len(params) > 1 else []
        requests = []
        for i, target in enumerate(params[0].split(",")[:IRC_TARGETS]):
            if not target.startswith("#"):
                requests.append(self.raw(self.numeric("403", target, trailing="No such channel")))
                continue
            request = {"type": "join", "room": target[1:], "label": f"JOIN {target}"}
            if i < len(keys) and keys[i]:
                request["key"] = keys[i]
            requests.append(request)
        return self.batch(requests)

    def irc_part(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("PART", params, 1)
        if missing is not None:
            return missing
        reason = {"reason": irc_text(params[1])} if len(params) > 1 and params[1] else {}
        return self.batch([{"type": "part", "room": target.lstrip("#"), "label": f"PART {target}", **reason}
                           for target in params[0].split(",")[:IRC_TARGETS]])

    def irc_topic(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("TOPIC", params, 1)
        if missing is not None:
            return missing
        request = {"type": "topic", "room": params[0].lstrip("#"), "label": f"TOPIC {params[0]}"}
        if len(params) > 1:
            request["text"] = irc_text(params[1])
        return request

    def irc_names(self, params: List[str]) -> Optional[dict]:
        if not params or not params[0].startswith("#"):
            return self.raw(self.numeric("366", params[0] if params else "*", trailing="End of /NAMES list"))
        return {"type": "who", "room": params[0][1:], "label": f"NAMES {params[0]}"}

    def irc_who(self, params: List[str]) -> Optional[dict]:
        mask = params[0] if params else "*"
        request = {"type": "who", "full": True, "label": f"WHO {mask[:50]}"}
        if mask.startswith("#"):
            request["room"] = mask[1:]
        elif mask not in ("*", "0"):
            request["mask"] = mask
        return request

    def irc_whois(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("WHOIS", params, 1)
        if missing is not None:
            return missing
        nick = params[-1].split(",")[0]
        return {"type": "whois", "nick": nick, "label": f"WHOIS {nick}"}

    def irc_whowas(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("WHOWAS", params, 1)
        if missing is not None:
            return missing
        count = int(params[1]) if len(params) > 1 and params[1].lstrip("-").isdigit() else 0
        return {"type": "whowas", "nick": params[0], "count": count if count > 0 else 10,
                "label": f"WHOWAS {params[0]}"}

    def irc_ison(self, params: List[str]) -> Optional[dict]:
        return {"type": "who", "nicks": " ".join(params).split()[:32], "label": "ISON"}

    def irc_userhost(self, params: List[str]) -> Optional[dict]:
        return {"type": "who", "full": True, "nicks": params[:5], "label": "USERHOST"}

    def irc_list(self, params: List[str]) -> Optional[dict]:
        return {"type": "rooms", "label": "LIST " + (params[0] if params else "")}

    def irc_lusers(self, params: List[str]) -> Optional[dict]:
        return {"type": "lusers", "label": "LUSERS"}

    def irc_away(self, params: List[str]) -> Optional[dict]:
        text = irc_text(params[0]) if params and params[0] else ""
        self.away.append(bool(text))
        return {"type": "away", "label": "AWAY", **({"text": text} if text else {})}

    def irc_mode(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("MODE", params, 1)
        if missing is not None:
            return missing
        target = params[0]
        if not target.startswith("#"):      # a user's modes: none that mean anything here
            if name_key(target) != name_key(self.nick):
                return self.raw(self.numeric("502", trailing="Cannot change mode for other users"))
            unknown = set(params[1] if len(params) > 1 else "") - set("+-iow")
            return self.raw(self.numeric("501", trailing="Unknown MODE flag") if unknown else
                            self.numeric("221", "+i"))      # (a change of i, o or w: what they stay)
        if len(params) > 1 and params[1] in ("q", "+q", "-q"):
            return self.quiet(target, params[1], params[2:])
        if len(params) == 2 and params[1].lstrip("+") in self.EMPTY_LISTS:     # (none kept: the end of the list)
            code, what = self.EMPTY_LISTS[params[1].lstrip("+")]
            return self.raw(self.numeric(code, target, trailing=f"End of channel {what} list"))
        request: dict = {"type": "mode", "room": target[1:], "label": f"MODE {target}"}
        if len(params) > 1:
            request.update(modes=params[1], args=params[2:])
        return request

    EMPTY_LISTS = {"e": ("349", "exception"), "I": ("347", "invite")}     # list modes asked for, by numeric

    def quiet(self, target: str, mode: str, nicks: List[str]) -> Optional[dict]:
        """+q NICK mutes someone in the room (as Solanum's quiets do), -q lifts
        it; q alone lists the room's mutes. (A mask's nick is what counts.)"""
        room = target[1:]
        if not nicks:
            return {"type": "bans", "room": room, "label": f"MODE {target} q"}
        kind = "unmute" if mode == "-q" else "mute"
        return self.batch([{"type": kind, "room": room, "nick": nick.partition("!")[0], "label": f"MODE {target}"}
                           for nick in nicks[:IRC_TARGETS]])

    def irc_kick(self, params: List[str]) -> Optional[dict]:
        """KICK #a NICK, KICK #a N1,N2, KICK #a,#b N1,N2 (each channel its nick)."""
        missing = self.needs("KICK", params, 2)
        if missing is not None:
            return missing
        reason = {"reason": irc_text(params[2])} if len(params) > 2 and params[2] else {}
        rooms, nicks = params[0].split(",")[:IRC_TARGETS], params[1].split(",")[:IRC_TARGETS]
        pairs = zip(rooms, nicks) if len(rooms) == len(nicks) else ((rooms[0], nick) for nick in nicks)
        return self.batch([{"type": "kick", "room": room.lstrip("#"), "nick": nick,
                            "label": f"KICK {room} {nick}", **reason} for room, nick in pairs])

    def irc_kill(self, params: List[str]) -> Optional[dict]:
        """KILL NICK [REASON]: a server operator puts someone out of the server (a kick with no room)."""
        missing = self.needs("KILL", params, 1)
        if missing is not None:
            return missing
        reason = {"reason": irc_text(params[1])} if len(params) > 1 and params[1] else {}
        return {"type": "kick", "nick": params[0], "label": f"KILL {params[0]}", **reason}

    def irc_invite(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("INVITE", params, 2)
        if missing is not None:
            return missing
        return {"type": "invite", "nick": params[0], "room": params[1].lstrip("#"),
                "label": f"INVITE {params[0]} {params[1]}"}

    def irc_oper(self, params: List[str]) -> Optional[dict]:
        missing = self.needs("OPER", params, 2)
        if missing is not None:
            return missing
        return {"type": "oper", "name": params[0], "password": params[1], "label": "OPER"}

    def irc_motd(self, params: List[str]) -> Optional[dict]:
        return self.raw(*self.replies.motd_lines())

    def irc_version(self, params: List[str]) -> Optional[dict]:
        return self.raw(self.numeric("351", f"chat.py-{VERSION}", self.server, trailing="https-free: see README.md"))

    def irc_time(self, params: List[str]) -> Optional[dict]:
        return self.raw(self.numeric("391", self.server, trailing=time.strftime("%A %B %d %Y -- %H:%M:%S %z")))

    def irc_info(self, params: List[str]) -> Optional[dict]:
        return self.raw(self.numeric("371", trailing=f"chat.py {VERSION}: one file, the standard library only"),
                        self.numeric("374", trailing="End of /INFO list"))

    def irc_links(self, params: List[str]) -> Optional[dict]:
        return self.raw(self.numeric("364", self.server, self.server, trailing="0 chat.py"),
                        self.numeric("365", "*", trailing="End of /LINKS list"))

    def irc_admin(self, params: List[str]) -> Optional[dict]:
        return self.raw(self.numeric("256", self.server, trailing="Administrative info"),
                        self.numeric("257", trailing="chat.py"), self.numeric("258", trailing="its operator"),
                        self.numeric("259", trailing="ask at the server's console"))

    def irc_tagmsg(self, params: List[str]) -> Optional[dict]:
        return None         # (typing notifications and the like: not relayed)

    # -- frames out ----------------------------------------------------------

    def numeric(self, code: str, *params: str, trailing: Optional[str] = None) -> bytes:
        return irc_line(f":{self.server}", code, self.nick or "*", *params, trailing=trailing)

    def notice(self, text: str) -> bytes:
        return b"".join(irc_line(f":{self.server}", "NOTICE", self.nick or "*", trailing=piece)
                        for piece in irc_pieces(text, 400))

    def me(self) -> str:
        return f"{self.nick}!{_username(self.username, self.nick)}@{self.host}"

    def welcomed(self, frame: dict) -> None:
        self.registered, self.nick = True, str(frame.get("nick"))
        self.motd = frame.get("motd") if type(frame.get("motd")) is str else None

    def hello_refused(self) -> None:
        self.hello_sent = False

    def away_answered(self) -> bool:
        """Whether the AWAY now answered set a text (they are answered in order)."""
        return self.away.pop(0)

    def encode(self, frame: dict, fit: str = "") -> bytes:
        """A frame for this connection, as IRC lines (b"": nothing to say)."""
        renderer = getattr(self.replies, f"on_{frame.get('type')}", None)
        return renderer(frame) if renderer is not None else self.audience.render(frame, self.nick)

    def with_history(self, frame: dict, lines: List["HistoryLine"]) -> bytes:
        """A welcome or joined, then (to a client that reads times) the room's recent lines."""
        head = self.encode(frame)
        if "server-time" not in self.audience.caps or not lines:
            return head
        return head + b"".join(self.audience.render(json.loads(line.data[4:])) for line in lines)

    def farewell(self, reason: str) -> bytes:
        return irc_line("ERROR", trailing=f"Closing link: {self.host} ({reason})")

class IrcReplies:
    """What an IRC connection is told: each frame the core sends it, as the lines and
    numerics IRC clients expect (see IrcCodec.encode). A refusal reads as the numeric its
    command expects, found from the request's label."""

    def __init__(self, codec: IrcCodec) -> None:
        self.codec, self.config, self.server = codec, codec.config, codec.server
        self.numeric, self.notice, self.me = codec.numeric, codec.notice, codec.me    # (as the codec writes them)

    def on_pong(self, frame: dict) -> bytes:
        if frame.get("label") == "RAW":
            return str(frame.get("irc", "")).encode("utf-8")
        if frame.get("label") == "PING":
            return irc_line(f":{self.server}", "PONG", self.server, trailing=str(frame.get("token", "")))
        return b""

    def on_ping(self, frame: dict) -> bytes:
        return irc_line("PING", trailing=self.server)

    def on_welcome(self, frame: dict) -> bytes:
        self.codec.welcomed(frame)
        c = self.config
        support = ["AWAYLEN=%d" % REASON_MAX, "CASEMAPPING=rfc8265", "CHANLIMIT=#:%d" % c.rooms_per_user,
                   "CHANMODES=bq,k,l,imnst", "CHANNELLEN=%d" % (NAME_MAX + 1), "CHANTYPES=#",
                   "CLIENTTAGDENY=*", "ELIST=",
                   "KICKLEN=%d" % REASON_MAX, "MODES=12", "NETWORK=chat.py", "NICKLEN=%d" % NAME_MAX,
                   "PREFIX=(ov)@+", "TARGMAX=JOIN:%d,KICK:%d,NAMES:1,NOTICE:%d,PART:%d,PRIVMSG:%d,WHOIS:1"
                   % ((IRC_TARGETS,) * 5), "TOPICLEN=%d" % TOPIC_MAX, "UTF8ONLY"]
        lines = [self.numeric("001", trailing=f"Welcome to chat.py, {self.me()}"),
                 self.numeric("002", trailing=f"Your host is {self.server}, running chat.py {VERSION}"),
                 self.numeric("003", trailing="This server is up"),
                 self.numeric("004", self.server, f"chat.py-{VERSION}", "iow", "biklmnoqstv", "bklovq"),
                 *(self.numeric("005", *support[i:i + 12], trailing="are supported by this server")
                   for i in range(0, len(support), 12))]     # (at most 13 tokens a line)
        return b"".join(lines + self.motd_lines())

    def motd_lines(self) -> List[bytes]:
        if not self.codec.motd:
            return [self.numeric("422", trailing="MOTD File is missing")]
        return [self.numeric("375", trailing=f"- {self.server} Message of the day -")] + \
            [self.numeric("372", trailing=f"- {piece}") for piece in irc_pieces(self.codec.motd, 400)] + \
            [self.numeric("376", trailing="End of /MOTD command.")]

    def on_authenticated(self, frame: dict) -> bytes:
        codec, account = self.codec, str(frame.get("account"))
        nick = codec.nick or codec.asked_nick or "*"     # (before welcome too)
        return irc_line(f":{self.server}", "900", nick, f"{nick}!{codec.username or '*'}@{codec.host}", account,
                        trailing=f"You are now logged in as {account}") + \
            irc_line(f":{self.server}", "903", nick, trailing="SASL authentication successful")

    def on_joined(self, frame: dict) -> bytes:
        room = f"#{frame['room']}"
        lines = [irc_line(f":{self.me()}", "JOIN", room)]
        if frame.get("topic"):
            lines += self.topic_lines(room, frame["topic"], frame.get("topic_by"), frame.get("topic_at"))
        lines += self.names(room, frame, frame.get("secret") is True)
        return b"".join(lines)

    def names(self, room: str, frame: dict, secret: bool = False) -> List[bytes]:
        """353 and 366 for a room's members (`frame`: a joined or who)."""
        ops, voiced = set(frame.get("ops") or []), set(frame.get("voiced") or [])
        names = [self.prefixes(nick in ops, nick in voiced) + nick for nick in frame.get("users") or []]
        lines: List[bytes] = []
        row: List[str] = []
        for name in names:
            if len(" ".join(row + [name])) > 400:
                lines.append(self.numeric("353", "@" if secret else "=", room, trailing=" ".join(row)))
                row = []
            row.append(name)
        if row:
            lines.append(self.numeric("353", "@" if secret else "=", room, trailing=" ".join(row)))
        return lines + [self.numeric("366", room, trailing="End of /NAMES list")]

    def prefixes(self, op: bool, voiced: bool) -> str:
        """@ and + as the client reads them: both with multi-prefix, else the highest."""
        prefix = ("@" if op else "") + ("+" if voiced else "")
        return prefix if "multi-prefix" in self.codec.caps else prefix[:1]

    def on_parted(self, frame: dict) -> bytes:
        room = f"#{frame.get('room')}"
        if frame.get("how") == "kick":
            kicker = str(frame.get("by", ""))
            return irc_line(f":{self.codec.audience.ident(kicker)}", "KICK", room, self.codec.nick,
                            trailing=frame.get("message") or kicker)
        return irc_line(f":{self.me()}", "PART", room, trailing=frame.get("message") or None)

    def on_who(self, frame: dict) -> bytes:
        command, _, target = str(frame.get("label", "")).partition(" ")
        users = [str(nick) for nick in frame.get("users") or []]
        if command == "NAMES":
            return b"".join(self.names(target, frame, frame.get("secret") is True))
        if command == "ISON":       # (the server found the nicks asked for: those online)
            return self.numeric("303", trailing=" ".join(users))
        matching = [p for p in frame.get("people") or [] if isinstance(p, dict)]    # (the server matched them)
        if command == "USERHOST":
            replies = [f"{p['nick']}{'*' if p.get('op') else ''}={'-' if p.get('away') else '+'}{p.get('username')}"
                       f"@{p.get('host')}" for p in matching]
            return self.numeric("302", trailing=" ".join(replies))
        room = f"#{frame['room']}" if "room" in frame else "*"
        ops, voiced = set(frame.get("ops") or []), set(frame.get("voiced") or [])
        lines = [self.numeric("352", room, str(p.get("username") or "user"), str(p.get("host") or "hidden"),
                              str(p.get("server") or self.server), str(p["nick"]),
                              ("G" if p.get("away") else "H") + ("*" if p.get("op") else "")
                              + self.prefixes(p["nick"] in ops, p["nick"] in voiced),
                              trailing=f"0 {p.get('realname') or p['nick']}") for p in matching]
        return b"".join(lines + [self.numeric("315", target or "*", trailing="End of /WHO list")])

    def on_whois(self, frame: dict) -> bytes:
        nick = str(frame.get("nick"))
        if not frame.get("online"):
            return self.numeric("401", nick, trailing="No such nick/channel") + \
                self.numeric("318", nick, trailing="End of /WHOIS list")
        lines = [self.numeric("311", nick, str(frame.get("username") or "user"), str(frame.get("host") or "hidden"),
                              "*", trailing=str(frame.get("realname") or nick))]
        ops = set(frame.get("room_op") or [])
        rooms = [("@" if room in ops else "") + f"#{room}" for room in frame.get("rooms") or []]
        if rooms:
            lines.append(self.numeric("319", nick, trailing=" ".join(rooms)))
        lines.append(self.numeric("312", nick, str(frame.get("server") or self.server), trailing="chat.py"))
        if frame.get("away"):
            lines.append(self.numeric("301", nick, trailing=str(frame["away"])))
        if frame.get("op"):
            lines.append(self.numeric("313", nick, trailing="is a server operator"))
        if frame.get("account"):
            lines.append(self.numeric("330", nick, str(frame["account"]), trailing="is logged in as"))
        if type(frame.get("idle")) is int and type(frame.get("since")) in (int, float):
            lines.append(self.numeric("317", nick, str(frame["idle"]), str(int(frame["since"])),
                                      trailing="seconds idle, signon time"))
        return b"".join(lines + [self.numeric("318", nick, trailing="End of /WHOIS list")])

    def on_whowas(self, frame: dict) -> bytes:
        nick = str(frame.get("nick"))
        lines = []
        for entry in frame.get("entries") or []:
            lines.append(self.numeric("314", str(entry.get("nick")), str(entry.get("username")),
                                      str(entry.get("host")), "*", trailing=str(entry.get("realname") or nick)))
            lines.append(self.numeric("312", str(entry.get("nick")), str(entry.get("server")),
                                      trailing=time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(entry.get("at", 0)))))
        if not lines:
            lines.append(self.numeric("406", nick, trailing="There was no such nickname"))
        return b"".join(lines + [self.numeric("369", nick, trailing="End of WHOWAS")])

    def on_rooms(self, frame: dict) -> bytes:
        wanted = {name.lstrip("#").casefold() for name in str(frame.get("label", "")).partition(" ")[2].split(",")
                  if name}
        lines = [self.numeric("321", "Channel", trailing="Users  Name")]
        for room in frame.get("rooms") or []:      # (an empty #lobby is no channel to IRC)
            if room.get("users") and (not wanted or str(room.get("name")).casefold() in wanted):
                lines.append(self.numeric("322", f"#{room.get('name')}", str(room.get("users")),
                                          trailing=str(room.get("topic", ""))))
        return b"".join(lines + [self.numeric("323", trailing="End of /LIST")])

    def on_lusers(self, frame: dict) -> bytes:
        users, here, servers = frame.get("users", 0), frame.get("here", 0), frame.get("servers", 1)
        max_users, max_here = frame.get("max_users", users), frame.get("max_here", here)
        return b"".join([
            self.numeric("251", trailing=f"There are {users} users and 0 invisible on {servers} servers"),
            self.numeric("253", str(frame.get("unjoined", 0)), trailing="unknown connection(s)"),
            self.numeric("254", str(frame.get("rooms", 0)), trailing="channels formed"),
            self.numeric("255", trailing=f"I have {here} clients and {servers - 1} servers"),
            self.numeric("265", str(here), str(max_here), trailing=f"Current local users {here}, max {max_here}"),
            self.numeric("266", str(users), str(max_users),
                         trailing=f"Current global users {users}, max {max_users}")])

    def on_topic(self, frame: dict) -> bytes:
        if not str(frame.get("label", "")).startswith("TOPIC"):
            return self.codec.audience.render(frame)      # (a topic set: as the room reads it)
        room = f"#{frame.get('room')}"
        if not frame.get("text"):
            return self.numeric("331", room, trailing="No topic is set")
        return b"".join(self.topic_lines(room, frame["text"], frame.get("by"), frame.get("at")))

    def topic_lines(self, room: str, text: object, by: object, at: object) -> List[bytes]:
        """332, and 333 naming who set it as nick!user@host (as clients show it) and when."""
        lines = [self.numeric("332", room, trailing=str(text))]
        if by:
            when = int(at) if _is_number(at) else 0
            lines.append(self.numeric("333", room, self.codec.audience.ident(str(by)), str(when)))
        return lines

    def on_modes(self, frame: dict) -> bytes:
        room = f"#{frame.get('room')}"
        return self.numeric("324", room, str(frame.get("modes")), *map(str, frame.get("args", []))) + \
            (self.numeric("329", room, str(int(frame["created"]))) if frame.get("created") else b"")

    def on_banlist(self, frame: dict) -> bytes:
        room = f"#{frame.get('room')}"
        return b"".join([self.numeric("367", room, str(m.get("mask")), str(m.get("by")), str(int(m.get("at") or 0)))
                         for m in frame.get("masks") or []] + [self.numeric("368", room, trailing="End of ban list")])

    def on_invited(self, frame: dict) -> bytes:
        by = self.codec.audience.ident(str(frame.get("by")))
        return irc_line(f":{by}", "INVITE", self.codec.nick, f"#{frame.get('room')}")

    def on_inviting(self, frame: dict) -> bytes:
        return self.numeric("341", str(frame.get("nick")), f"#{frame.get('room')}")

    def on_op(self, frame: dict) -> bytes:
        if frame.get("room") is not None:
            return b""      # (a member is told by the room's MODE; to others a channel's MODE means nothing)
        if not frame.get("on"):
            return irc_line(f":{self.codec.nick}", "MODE", self.codec.nick, trailing="-o")
        return self.numeric("381", trailing="You are now an IRC operator") + \
            irc_line(f":{self.codec.nick}", "MODE", self.codec.nick, trailing="+o")

    def on_notice(self, frame: dict) -> bytes:
        if frame.get("alone"):
            return b""      # (an IRC client shows the names: it needs no "you are alone")
        away = frame.get("away")
        if isinstance(away, dict):
            return self.numeric("301", str(away.get("nick")), trailing=str(away.get("text")))
        if frame.get("label") == "AWAY" and self.codec.away:
            return self.numeric("306", trailing="You have been marked as being away") if self.codec.away_answered() \
                else self.numeric("305", trailing="You are no longer marked as being away")
        return self.codec.audience.render(frame, self.codec.nick)

    def on_msg(self, frame: dict) -> bytes:
        to = frame.get("to")        # a pm: to me, or my own echoed back (echo-message) to whom I sent it
        audience = self.codec.audience
        return audience.said(frame, to if type(to) is str else self.codec.nick, audience.tags(frame))

    def on_registered(self, frame: dict) -> bytes:
        return self.notice("your password is changed" if frame.get("changed") else
                           f"{frame.get('nick')} is registered")

    def on_bans(self, frame: dict) -> bytes:
        label = str(frame.get("label", ""))
        if label.startswith("MODE "):       # MODE #room q: the room's quiet list
            room = label.split()[1]
            return b"".join([self.numeric("728", room, "q", f"{ban.get('nick')}!*@*", str(ban.get("by")),
                                          str(int(ban.get("at") or 0)))
                             for ban in frame.get("bans") or [] if ban.get("kind") == "mute"] +
                            [self.numeric("729", room, "q", trailing="End of channel quiet list")])
        return self.notice("in force: " + ("; ".join(_ban_text(ban) for ban in frame.get("bans") or [])
                                           or "none"))

    def on_bye(self, frame: dict) -> bytes:
        return irc_line("ERROR", trailing=f"Closing link: {self.codec.host} ({frame.get('reason')})")

    def on_error(self, frame: dict) -> bytes:
        """A refusal as the numeric the command that asked expects."""
        code, text = str(frame.get("code")), str(frame.get("text"))
        command, _, target = str(frame.get("label", "")).partition(" ")
        if command == "NOTICE":
            return b""      # never an automatic answer to a NOTICE
        if command == "HELLO":
            self.codec.hello_refused()      # (its user may give another NICK)
            nick = self.codec.asked_nick
            numeric = {"nick-taken": "433", "bad-nick": "432", "account-required": "433",
                       "login-failed": "904", "auth-failed": "464", "banned": "465"}.get(code)
            return self.numeric(numeric, nick, trailing=text) if numeric else self.notice(text)
        if command == "AUTHENTICATE":
            return self.numeric("904", trailing=f"SASL authentication failed: {text}")
        numeric = _IRC_ERRORS.get((command, code)) or _IRC_ERRORS.get(("", code))
        if code == "no-such-user" and type(frame.get("nick")) is str:     # (who it was about, said)
            nick = frame["nick"]
            if frame.get("elsewhere"):      # they are here, but not in that room
                return self.numeric("441", nick, target.split()[0] if target else "*", trailing=text)
            return self.numeric("401", nick, trailing=text)
        if command == "MODE" and type(frame.get("mode")) is str:
            mode = frame["mode"]
            if code == "bad-mode":
                return self.numeric("472", mode, trailing="is an unknown mode char to me")
            return self.numeric("696", target, mode, "*", trailing=text)
        if numeric == "366":
            return self.numeric("366", target, trailing="End of /NAMES list")
        if numeric == "315":
            return self.numeric("315", target, trailing="End of /WHO list")
        if numeric in ("401", "406"):
            nick = target.split()[-1] if target else "*"
            end = {"WHOIS": "318", "WHOWAS": "369"}.get(command)
            return self.numeric(numeric, nick, trailing=text) + \
                (self.numeric(end, nick, trailing="End") if end else b"")
        if numeric is not None:
            return self.numeric(numeric, *self._error_params(numeric, target.split()[:2]), trailing=text)
        return self.notice(f"{text} ({code})")

    @staticmethod
    def _error_params(numeric: str, words: List[str]) -> List[str]:
        """A numeric's parameters from its request's label: a refusal about a
        channel names the channel alone (482 to "INVITE bob #a" is "#a"), and
        443 names who is on it and where."""
        channels = [word for word in words if word.startswith("#")]
        if numeric == "443" or not channels:
            return words
        return channels[:1]

# How a refusal reads in IRC, by (command, code); ("", code) for any command.
_IRC_ERRORS = {
    ("", "no-such-user"): "401", ("WHOWAS", "no-such-user"): "406", ("MODE", "no-such-user"): "401",
    ("KICK", "no-such-user"): "441", ("", "no-such-room"): "403", ("NAMES", "no-such-room"): "366",
    ("WHO", "no-such-room"): "315", ("PRIVMSG", "not-in-room"): "404", ("", "not-in-room"): "442",
    ("PRIVMSG", "moderated"): "404", ("PRIVMSG", "muted"): "404", ("", "not-allowed"): "482",
    ("OPER", "not-allowed"): "491", ("KILL", "not-allowed"): "481", ("NICK", "not-allowed"): "432", ("OPER", "login-failed"): "464",
    ("NICK", "login-failed"): "464", ("NICK", "nick-taken"): "433", ("NICK", "bad-nick"): "432",
    ("NICK", "account-required"): "433", ("", "bad-key"): "475", ("", "room-full"): "471",
    ("", "invite-only"): "473", ("JOIN", "banned"): "474", ("", "already-in-room"): "443",
    ("", "too-many-rooms"): "405", ("", "bad-room"): "479", ("MODE", "bad-field"): "472",
}


# ---------------------------------------------------------------------------
# 5. Server loop: sockets, TLS, timers, signals. It only moves bytes.
# ---------------------------------------------------------------------------

RECV_SIZE = 256 * 1024      # one read per readable socket per turn: big reads, many frames each
LINGER = 2.0                # seconds a closing connection gets to receive its last frames
SHUTDOWN_GRACE = 0.8        # seconds to deliver `bye` before the server exits
ACCEPTS_PER_TURN = 64       # a connect storm cannot starve the clients already here
WRITE_CHUNK = 256 * 1024     # what one send() takes at most where there is no sendmsg (TLS, Windows)
IOV_MAX = 1024              # chunks one sendmsg() may gather (the POSIX minimum for IOV_MAX)
_HAVE_SENDMSG = hasattr(socket.socket, "sendmsg")
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _head(chunks: List[Chunk], skip: int, limit: int) -> Chunk:
    """About `limit` bytes from the front of `chunks`, after the first `skip`."""
    for index, chunk in enumerate(chunks):
        if skip < len(chunk):
            break
        skip -= len(chunk)
    else:
        return b""
    taken, total = [chunks[index][skip:]], len(chunks[index]) - skip
    for chunk in chunks[index + 1:]:
        if total >= limit:
            break
        taken.append(chunk)
        total += len(chunk)
    return taken[0] if len(taken) == 1 else b"".join(taken)


def server_tls_context(cert: str, key: Optional[str]) -> ssl.SSLContext:    # key None: it is in `cert`
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def fingerprint(der: bytes) -> str:
    """SHA-256 fingerprint of a certificate, written as SSH writes host keys."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def certificate_fingerprint(cert_file: str) -> str:
    with open(cert_file, encoding="ascii") as f:
        return fingerprint(ssl.PEM_cert_to_DER_cert(f.read()))


class ServerLoop:
    """The server's only thread. Each turn: wait for sockets or the nearest
    timer, read what is readable (the chat handles the frames), run due
    timers, fan out, and write to every connection with something queued.
    A socket is watched for writing only while its kernel buffer is full.

    It is the core's ServerIO, and every socket enters it the same way:
    watch(sock, events, callback) (a connection's callback is the Conn
    itself, dispatched without a call). Every callback and timer runs
    guarded: an error costs the connection concerned, never the loop."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.selector = selectors.DefaultSelector()
        self.timers: List[tuple] = []       # heap of (when, seq, function, args)
        self._timer_seq = itertools.count()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()   # from signal handlers and threads
        self._worker: Optional[queue.SimpleQueue] = None       # jobs for the worker thread (see work())
        self.now = time.monotonic()         # read once per turn; timers and the chat run on it
        self.tls = server_tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.open: set = set()              # connections whose socket is open
        self.stopping = False
        self._deadline = 0.0
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.watch(self._wake_r, selectors.EVENT_READ, self._on_wake)
        # Each listening socket, and whether what comes to it speaks IRC from its first byte (--irc-port).
        self.listeners: Dict[socket.socket, bool] = {}
        self._listen(config.host, config.port, irc=False)
        if config.irc_port is not None:
            self._listen(config.host, config.irc_port, irc=True)
        self.accepting = True
        main, irc = self._ordered()
        self.address = main.getsockname()[:2]
        self.irc_address = irc.getsockname()[:2] if irc is not None else None
        self.chat = Chat(config, self, self._relay)
        self.chat.tick(self.now, time.time())
        if config.supervisor is not None:
            self.call_later(1.0, self._check_supervisor)

    def _listen(self, host: str, port: int, irc: bool) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        dualstack = family == socket.AF_INET6 and host in ("::", "") and socket.has_dualstack_ipv6()
        try:
            listener = socket.create_server(address, family=family, backlog=1024, dualstack_ipv6=dualstack,
                                            reuse_port=self.config.reuse_port)
        except OSError as error:
            for opened in self.listeners:
                opened.close()
            raise CannotListen(error.errno, error.strerror, "--irc-port" if irc else "-p") from None
        listener.setblocking(False)
        self.watch(listener, selectors.EVENT_READ, functools.partial(self._on_accept, listener))
        self.listeners[listener] = irc

    def _ordered(self) -> Tuple[socket.socket, Optional[socket.socket]]:
        """The main listener and the --irc-port one (None without it)."""
        main = next(listener for listener, irc in self.listeners.items() if not irc)
        return main, next((listener for listener, irc in self.listeners.items() if irc), None)

    def _relay(self, chat: Chat) -> Relay:
        """The relay the config asks for: a Redis cluster, or this server on its own."""
        config = self.config
        if config.redis:
            return Cluster(chat, self, RedisUrl.parse(config.redis), config.cluster_ttl, config.history).start()
        return LocalRelay(chat)

    # -- the one way into the loop -------------------------------------------

    def watch(self, sock, events: int, callback) -> None:
        """Call callback(mask) (or handle a Conn) when `sock` is ready for
        `events`; called again, it changes what is watched."""
        try:
            self.selector.modify(sock, events, callback)
        except KeyError:
            self.selector.register(sock, events, callback)

    def unwatch(self, sock) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass    # never watched, or already closed

    # -- what the core asks of the loop (ServerIO) ---------------------------

    def call_later(self, delay: float, function: Callable, *args) -> None:
        heapq.heappush(self.timers, (self.now + delay, next(self._timer_seq), function, args))

    def work(self, function: Callable, *args, done: Callable[[object], None]) -> None:
        if self._worker is None:
            self._worker = queue.SimpleQueue()
            threading.Thread(target=self._work_forever, name="work", daemon=True).start()
        self._worker.put((function, args, done))

    def _work_forever(self) -> None:
        """The loop's one worker thread: what it is given, in order, each result back to the loop."""
        worker = self._worker
        assert worker is not None   # work() makes it before it starts this thread
        while True:
            function, args, done = worker.get()
            try:
                result = function(*args)
            except Exception as error:      # handed to `done`, which decides
                result = error
            self.call_soon_threadsafe(done, result)

    def call_soon_threadsafe(self, function: Callable, *args) -> None:
        """Run `function` in the loop's thread; safe from threads and signal handlers."""
        self._calls.put((function, args))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass    # the wake-up socket is full: the loop will wake anyway

    def update_interest(self, conn: Conn) -> None:
        """Watch `conn` for what it needs now: reading unless paused, writing
        only while bytes wait (or the TLS handshake wants to write)."""
        if conn.state is CLOSED:
            return
        want = 0
        if conn.handshake == "tls-write" or (conn.out and conn.handshake is None):
            want = selectors.EVENT_WRITE
        if not conn.holds or conn.state is CLOSING:     # a closing one is read (and what it sends dropped)
            want |= selectors.EVENT_READ
        if want != conn.events:
            if want:
                self.watch(conn.fd, want, conn)
            else:
                self.unwatch(conn.fd)
            conn.events = want

    def close_soon(self, conn: Conn) -> None:
        """Deliver what is queued for `conn`, then close it; give up after LINGER."""
        if conn.handshake is not None:
            self._close(conn, "closed")     # nothing can be said over an unfinished TLS handshake
            return
        self.call_later(LINGER, self._linger_over, conn)
        if conn.handshake is None and not conn.out:
            self._shut(conn)
        else:
            self.update_interest(conn)

    def stop(self, why: str = "") -> None:
        self.call_soon_threadsafe(self._begin_shutdown, why)

    # -- the loop ------------------------------------------------------------

    def catch_signals(self) -> None:
        """SIGINT and SIGTERM stop the server politely. Called from the main
        thread before the server says where it listens: whoever reads that
        line may stop it at once."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda number, _: self.stop("Ctrl-C" if number == signal.SIGINT else "SIGTERM"))
        # A signal that lands just before select() blocks would run its Python
        # handler only when something else woke the loop (an idle server: never).
        # The wake-up fd makes the signal itself wake select().
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def serve_forever(self) -> None:
        """Run until stop()."""
        try:
            while not self.stopping or (self.open and self.now < self._deadline):
                self._turn()
        finally:
            for conn in list(self.open):
                self._close(conn, "server stopped")
            self.selector.close()
            for listener in self.listeners:
                listener.close()
            if threading.current_thread() is threading.main_thread():
                signal.set_wakeup_fd(-1)    # before the socket it names is closed (see catch_signals)
            self._wake_r.close()
            self._wake_w.close()
            self.chat.close()
            log.info("server stopped")

    def _turn(self) -> None:
        timeout = None
        if self.chat.has_work():
            timeout = 0.0
        elif self.timers:
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        if self.stopping:
            timeout = min(timeout if timeout is not None else SHUTDOWN_GRACE, 0.05)
        events = self.selector.select(timeout)
        chat = self.chat
        self.now = time.monotonic()
        chat.tick(self.now, time.time())
        for key, mask in events:
            target = key.data
            try:
                if target.__class__ is Conn:
                    self._on_conn_event(target, mask)
                else:
                    target(mask)
            except Exception:
                self._failed(target)
        timers = self.timers
        while timers and timers[0][0] <= self.now:
            _, _, function, args = heapq.heappop(timers)
            try:
                function(*args)
            except Exception:
                self._failed(function, *args)
        self._deliver()

    def _failed(self, target, *args) -> None:
        """A bug of ours surfaced in a callback: it costs the connection it
        concerns (if any), never the server."""
        log.exception("internal error in %s", getattr(target, "__qualname__", target))
        for conn in (target, *args):
            if conn.__class__ is Conn and conn.state is not CLOSED:
                try:
                    self._close(conn, "internal error")
                except Exception:
                    log.exception("internal error closing %r", conn)

    def _deliver(self) -> None:
        """Fan out, and write to every connection the core names (telling it
        what was sent). Writing may find dead peers or drop slow ones, whose
        leave events fan out in turn."""
        while True:
            conns = self.chat.end_turn()
            if not conns:
                return
            for conn in conns:
                self._write(conn)

    def _on_wake(self, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while not self._calls.empty():
            function, args = self._calls.get()
            try:
                function(*args)
            except Exception:   # e.g. an operator command that failed: the server goes on
                log.exception("error in %s", getattr(function, "__name__", function))

    def _check_supervisor(self) -> None:
        """A --workers worker stops when the process that started it is gone."""
        if os.getppid() != self.config.supervisor:
            self._begin_shutdown("the supervisor process is gone")
        else:
            self.call_later(1.0, self._check_supervisor)

    def _begin_shutdown(self, why: str) -> None:
        if self.stopping:
            return
        log.info("shutting down" + (f" ({why})" if why else ""))
        self.stopping = True
        self._deadline = self.now + SHUTDOWN_GRACE
        self._stop_accepting()
        self.chat.shutdown("server shutting down")

    # -- accepting -----------------------------------------------------------

    def _on_accept(self, listener: socket.socket, mask: int) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = listener.accept()
            except _WOULD_BLOCK:
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of file descriptors: the listener stays readable, so
                    # accepting again at once would spin. Pause for a moment.
                    log.error("cannot accept: %s; pausing new connections for 1s", error.strerror)
                    self._stop_accepting()
                    self.call_later(1.0, self._resume_accepting)
                    return
                continue    # e.g. ECONNABORTED: that client gave up; others may wait
            self._adopt(sock, address, self.listeners[listener])

    def _stop_accepting(self) -> None:
        if self.accepting:
            for listener in self.listeners:
                self.unwatch(listener)
            self.accepting = False

    def _resume_accepting(self) -> None:
        if not self.stopping and not self.accepting:
            for listener in self.listeners:
                self.watch(listener, selectors.EVENT_READ, functools.partial(self._on_accept, listener))
            self.accepting = True

    def _adopt(self, sock: socket.socket, address: tuple, irc: bool) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # we batch writes ourselves
        except OSError:
            pass
        host = address[0]
        addr = f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
        conn = Conn(sock, addr, host, self.config.max_payload, self.now, self.config.flood_burst)
        if self.tls:
            conn.handshake = "peek"
        self.open.add(conn)
        if self.chat.open(conn, irc):
            self.update_interest(conn)

    # -- reading and writing -------------------------------------------------

    def _on_conn_event(self, conn: Conn, mask: int) -> None:
        if conn.handshake is not None:
            self._handshake(conn)
            return
        if mask & selectors.EVENT_READ:
            self._read(conn)
        if mask & selectors.EVENT_WRITE and conn.state is not CLOSED:
            self._write(conn)

    def _read(self, conn: Conn) -> None:
        if not self.chat.may_read(conn):
            return      # frames are waiting already; the socket stays readable for their turn
        sock = conn.sock
        while True:
            try:
                n = sock.recv_into(self._rbuf)
            except _WOULD_BLOCK:
                return
            except OSError as error:
                self._close(conn, f"connection error: {error.strerror or error}")
                return
            if n == 0:
                self._close(conn, "connection closed")
                return
            self.chat.received(conn, self._rview[:n])
            # TLS may hold decrypted bytes the selector cannot see; plain TCP needs one read.
            if not (conn.tls and conn.state is not CLOSED and sock.pending()):
                return

    def _write(self, conn: Conn) -> None:
        """One system call hands the kernel everything queued for `conn`
        (sendmsg gathers the chunks without joining them), however many
        lines were fanned out to it this turn."""
        out = conn.out
        if not out or conn.handshake is not None or conn.state is CLOSED or conn.shut:
            return
        try:
            if conn.tls or not _HAVE_SENDMSG:
                sent = 0
                while True:     # TLS writes one record (16 KiB) per call
                    n = conn.sock.send(_head(out, sent, WRITE_CHUNK))
                    sent += n
                    if not conn.tls or sent == conn.queued or n == 0:
                        break
            else:
                sent = conn.sock.sendmsg(out if len(out) <= IOV_MAX else out[:IOV_MAX])
        except _WOULD_BLOCK:
            sent = 0
        except OSError as error:
            self._close(conn, f"connection error: {error.strerror or error}")
            return
        self.chat.wrote(conn, sent)
        if conn.state is CLOSED:
            return
        if not out and conn.state is CLOSING:
            self._shut(conn)
        else:
            self.update_interest(conn)

    def _shut(self, conn: Conn) -> None:
        """Everything is sent: close our side and read (discarding) until the
        peer closes too. Closing at once while unread bytes remain would make
        the kernel send RST, which can destroy our last frame in flight."""
        if conn.shut or conn.state is CLOSED:
            return
        conn.shut = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn, "closed")
            return
        self.update_interest(conn)

    def _linger_over(self, conn: Conn) -> None:
        if conn.state is not CLOSED:
            self._close(conn, "closed")

    def _close(self, conn: Conn, reason: str) -> None:
        if conn.state is CLOSED and conn not in self.open:
            return
        self.chat.closed(conn, reason)
        self.open.discard(conn)
        if conn.events:
            self.unwatch(conn.fd)
            conn.events = 0
        conn.sock.close()

    # -- TLS -----------------------------------------------------------------

    def _handshake(self, conn: Conn) -> None:
        """One non-blocking step of a TLS handshake. The first byte tells a
        TLS client (0x16, a handshake record) from a plaintext one, which gets
        a readable `tls-required` error instead of garbage."""
        if conn.handshake == "peek":
            try:
                first = conn.sock.recv(1, socket.MSG_PEEK)
            except _WOULD_BLOCK:
                return
            except OSError as error:
                self._close(conn, f"connection error: {error.strerror or error}")
                return
            if not first:
                self._close(conn, "closed before the TLS handshake")
                return
            if first != b"\x16":
                conn.handshake = None
                if first.isalpha() and isinstance(conn.codec, FrameCodec):
                    self.chat.speaks_irc(conn)      # (so it is told in IRC)
                self.chat.drop(conn, "plaintext client on a TLS server",
                               ProtocolError("tls-required", "this server requires TLS: connect with --tls"))
                self._write(conn)
                return
            assert self.tls is not None     # (a connection peeks only on a TLS server: see _on_accept)
            conn.sock = self.tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.handshake = "tls-read"
        except ssl.SSLWantWriteError:
            conn.handshake = "tls-write"
        except (ssl.SSLError, OSError) as error:
            log.info("%s: TLS handshake failed: %s", conn.addr, getattr(error, "reason", None) or error)
            self._close(conn, "TLS handshake failed")
            return
        else:
            conn.handshake, conn.tls = None, True
            if conn.state is CLOSING and not conn.out:    # refused or timed out meanwhile
                self._shut(conn)
                return
            self._write(conn)
            if conn.state is not CLOSED:
                self._read(conn)
        self.update_interest(conn)


# ---------------------------------------------------------------------------
# 6. Cluster: several servers as one chat, through Redis (server --redis)
# ---------------------------------------------------------------------------
#
#   clients --> server A --+                      +-- server B <-- clients
#                          |  PUBLISH/SUBSCRIBE   |
#                          +---->  Redis  <-------+
#                                  chatpy:bus                 every line and event
#                                  chatpy:id, chatpy:seq      ids (global), seq (per room)
#                                  chatpy:hist:<room>         the newest lines of each room
#                                  chatpy:active              rooms by their last line's time
#                                  chatpy:owner/presence/session/since   who is where, by nick
#                                  chatpy:servers             heartbeats (Redis TIME)
#
# Lines are numbered, stored and published by one Lua script, atomically
# (one call per room per loop turn, for all the lines said there), so every
# server (the one they were said on included) delivers them in the order
# Redis gave them. Events (join, leave, nick) are delivered on their
# own server at once and published for the others. A server missing from
# the heartbeats for `cluster_ttl` seconds is gone: its users leave.

REDIS_PREFIX = "chatpy:"


class RespError(Exception):
    """An error reply from Redis."""


def resp_command(*args) -> bytes:
    """A command in RESP2: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The reply being parsed has not fully arrived yet."""


_MESSAGE = b"*3\r\n$7\r\nmessage\r\n$"     # how a published message begins


class RespParser:
    """Turns Redis's byte stream into replies: str for +OK, int, bytes (or
    None) for bulk strings, lists for arrays, RespError for errors."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def replies(self) -> list:
        found, pos = [], 0
        while True:
            try:
                value, pos2 = self._message(pos) if self._buf.startswith(_MESSAGE, pos) else self._parse(pos)
            except _Incomplete:     # wait for more bytes
                break
            found.append(value)
            pos = pos2
        del self._buf[:pos]
        return found

    def _message(self, pos: int):
        """A published message, the bulk of a subscribed link's traffic, read
        without the general parser: ["message", channel, payload]."""
        buf = self._buf
        channel, end = self._bulk(pos + len(_MESSAGE) - 1)
        if buf[end:end + 1] != b"$":
            raise _Incomplete
        payload, end = self._bulk(end)
        return [b"message", channel, payload], end

    def _bulk(self, pos: int) -> Tuple[bytes, int]:
        """The bulk string at `pos` ($N\\r\\nDATA\\r\\n) and where it ends."""
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        stop = end + 2 + int(buf[pos + 1:end])
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[end + 2:stop]), stop + 2

    def _parse(self, pos: int):
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        kind, body = buf[pos], buf[pos + 1:end]
        if kind == 43:      # +
            return body.decode(), end + 2
        if kind == 45:      # -
            return RespError(body.decode()), end + 2
        if kind == 58:      # :
            return int(body), end + 2
        if kind == 36:      # $
            size = int(body)
            if size < 0:
                return None, end + 2
            if len(buf) < end + 2 + size + 2:
                raise _Incomplete
            return bytes(buf[end + 2:end + 2 + size]), end + 2 + size + 2
        if kind == 42:      # *
            count, items, pos = int(body), [], end + 2
            for _ in range(max(count, 0)):
                item, pos = self._parse(pos)
                items.append(item)
            return (items if count >= 0 else None), pos
        raise RespError(f"unexpected reply from Redis: {bytes(buf[pos:end])[:40]!r}")


class RedisUrl(NamedTuple):
    host: str
    port: int
    db: int
    username: Optional[str]
    password: Optional[str]

    @classmethod
    def parse(cls, url: str) -> "RedisUrl":
        from urllib.parse import urlsplit, unquote
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"not a redis://HOST[:PORT][/DB] URL: {url}")
        db = parts.path.strip("/") or "0"
        if not db.isdigit():
            raise ValueError(f"the database in {url} must be a number")
        return cls(parts.hostname, parts.port or 6379, int(db), unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class RedisLink:
    """One non-blocking connection to Redis, inside the server's loop.

    Commands are pipelined: written together at the end of the turn, each
    reply handed to the callback given with its command, in order. On a
    subscribed link, published messages go to `on_message`. If Redis owes a
    reply for longer than `reply_timeout`, or the connection breaks,
    `on_down` is called and the link reconnects with exponential backoff;
    nothing here ever blocks the loop."""

    CONNECT_TIMEOUT = 3.0
    MAX_BACKLOG = 64 << 20      # unsent command bytes before Redis counts as gone

    def __init__(self, loop: "ServerLoop", url: RedisUrl, name: str, on_up: Callable, on_down: Callable,
                 on_message: Optional[Callable] = None, reply_timeout: float = 5.0):
        self.loop, self.url, self.name = loop, url, name
        self.on_up, self.on_down, self.on_message = on_up, on_down, on_message
        self.reply_timeout = reply_timeout
        self.sock: Optional[socket.socket] = None
        self.up = False
        self.out = bytearray()
        self.callbacks: collections.deque = collections.deque()   # (reply callback, when it was asked)
        self.parser = RespParser()
        self.backoff = 0.5
        self.address: Optional[tuple] = None    # Redis's, as getaddrinfo gives it

    def start(self) -> None:
        try:
            family, _, _, _, self.address = socket.getaddrinfo(
                self.url.host, self.url.port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as error:
            log.error("redis: cannot resolve %s: %s; retrying", self.url.host, error.strerror)
            self.loop.call_later(self.backoff, self.start)
            return
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = self.sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.fail(f"cannot connect: {os.strerror(code)}")
            return
        self.loop.watch(self.sock, selectors.EVENT_WRITE, self._on_event)
        self.loop.call_later(self.CONNECT_TIMEOUT, self._connect_deadline, self.sock)

    def command(self, *args, reply: Optional[Callable] = None) -> None:
        """Queue a command; `reply(value)` gets its answer (RespError on error)."""
        if not self.up:
            return
        self.out += resp_command(*args)
        self.callbacks.append((reply, self.loop.now))
        if len(self.out) > self.MAX_BACKLOG:
            self.fail("Redis is not keeping up")

    def flush(self) -> None:
        """Write what is queued (once per loop turn)."""
        if not self.up or not self.out:
            return
        assert self.sock is not None    # (up: connected)
        try:
            sent = self.sock.send(self.out)
            del self.out[:sent]
        except _WOULD_BLOCK:
            pass
        except OSError as error:
            self.fail(f"connection lost ({error.strerror or error})")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        self.loop.watch(self.sock, events, self._on_event)

    def check(self, now: float) -> None:
        """Called by the heartbeat: a Redis that has owed a reply for longer
        than reply_timeout is treated as gone (frozen, or its host gone). What
        counts is how long the oldest command waits, not how long the link
        has been quiet: an idle link is not a dead one."""
        if self.up and self.callbacks and now - self.callbacks[0][1] > self.reply_timeout:
            self.fail(f"no answer for {now - self.callbacks[0][1]:.1f}s")

    def _connect_deadline(self, sock: socket.socket) -> None:
        if sock is self.sock and not self.up:
            self.fail("connection timed out")

    def _on_event(self, mask: int) -> None:
        if self.sock is None:
            return      # closed earlier in this same turn
        try:
            self._handle(mask)
        except Exception:   # a bug of ours: reset the link (and resync) rather than stop the server
            log.exception("redis (%s): internal error", self.name)
            self.fail("internal error")

    def _handle(self, mask: int) -> None:
        assert self.sock is not None    # (_on_event checked)
        if not self.up:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.fail(f"cannot connect: {os.strerror(error)}")
                return
            self.up, self.backoff = True, 0.5
            self.loop.watch(self.sock, selectors.EVENT_READ, self._on_event)
            if self.url.password is not None:
                auth = (self.url.username, self.url.password) if self.url.username else (self.url.password,)
                self.command("AUTH", *auth, reply=self._expect_ok)
            if self.url.db:
                self.command("SELECT", self.url.db, reply=self._expect_ok)
            self.on_up()
            self.flush()
            return
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(RECV_SIZE)
            except _WOULD_BLOCK:
                data = None
            except OSError as error:
                self.fail(f"connection lost ({error.strerror or error})")
                return
            if data == b"":
                self.fail("Redis closed the connection")
                return
            if data:
                self.parser.feed(data)
                try:
                    replies = self.parser.replies()
                except (RespError, ValueError) as error:
                    self.fail(f"bad reply: {error}")
                    return
                for value in replies:
                    self._dispatch(value)
                    if not self.up:
                        return
        if self.up and mask & selectors.EVENT_WRITE:
            self.flush()

    def _dispatch(self, value) -> None:
        if self.on_message is not None and isinstance(value, list) and value and value[0] == b"message":
            self.on_message(value[2])
            return
        reply = self.callbacks.popleft()[0] if self.callbacks else None
        if reply is not None:
            reply(value)
        elif isinstance(value, RespError):
            log.warning("redis (%s): %s", self.name, value)

    def _expect_ok(self, value) -> None:
        if isinstance(value, RespError):
            self.fail(f"refused: {value}")

    def fail(self, reason: str) -> None:
        """Drop the connection (telling on_down if it was up) and try again after a backoff."""
        was_up = self.up
        self._close_socket()
        self.out.clear()
        self.callbacks.clear()
        self.parser = RespParser()
        log.warning("redis (%s) %s: %s; retrying in %.1fs", self.name, self.url, reason, self.backoff)
        self.loop.call_later(self.backoff, self.start)
        self.backoff = min(self.backoff * 2, 10.0) * random.uniform(0.8, 1.2)
        if was_up:
            self.on_down()

    def close(self) -> None:
        """At shutdown: send what is queued (best effort) and close."""
        self.flush()
        self._close_socket()

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.loop.unwatch(self.sock)
            self.sock.close()
        self.sock, self.up = None, False


# The Lua scripts run atomically in Redis, so no other server sees a half-done step.
#
# Lines of one room (or private messages, for room ''). KEYS: id, seq, hist:ROOM,
# bus, active, floor, sizes, total, servers; ARGV: room, lines kept per room,
# rooms kept, the key prefix, the byte budget, the ttl, then per line the bus
# message's head, open after '"id":', and the line's JSON, open where id and seq go
# (see _unnumbered). The bus message is HEAD ID,"seq":SEQ,"line":LINE} (no seq for
# a pm): a server reads the numbers in the head and relays LINE as it is.
#
# What Redis keeps stays bounded: each room's newest lines (by count), the rooms
# said something in most recently (`active`, by time), and all the history's bytes
# (`total`, each room's in `sizes`) within the budget: past it, the longest silent
# rooms go first, then the oldest lines of the biggest. A room that has members on
# a live server (in one of the `in:SID` sets) is never forgotten; a room that is
# forgotten begins again above every seq forgotten (`floor`): no seq goes back.
_LINES_SCRIPT = """
local room, prefix = ARGV[1], ARGV[4]
local function occupied(name)
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], tonumber(redis.call('TIME')[1]) - tonumber(ARGV[6]), '+inf')) do
    if redis.call('SISMEMBER', prefix .. 'in:' .. sid, name) == 1 then return true end
  end
  return false
end
local function forget(name)
  local seq = tonumber(redis.call('HGET', KEYS[2], name) or '0')
  if seq > tonumber(redis.call('GET', KEYS[6]) or '0') then redis.call('SET', KEYS[6], seq) end
  redis.call('DECRBY', KEYS[8], tonumber(redis.call('ZSCORE', KEYS[7], name) or '0'))
  redis.call('DEL', prefix .. 'hist:' .. name)
  redis.call('HDEL', KEYS[2], name)
  redis.call('ZREM', KEYS[7], name)
  redis.call('ZREM', KEYS[5], name)
end
local function trim(name, count)
  local lines = redis.call('LPOP', prefix .. 'hist:' .. name, count) or {}
  local size = 0
  for _, old in ipairs(lines) do size = size + #old end
  redis.call('ZINCRBY', KEYS[7], -size, name)
  redis.call('DECRBY', KEYS[8], size)
  return #lines
end
if room ~= '' and redis.call('HEXISTS', KEYS[2], room) == 0 then
  redis.call('HSET', KEYS[2], room, tonumber(redis.call('GET', KEYS[6]) or '0'))
end
local added = 0
for i = 7, #ARGV, 2 do
  local id = redis.call('INCR', KEYS[1])
  local numbers, line = id, nil
  if room == '' then
    line = ARGV[i + 1] .. ',"id":' .. id .. '}'
  else
    local seq = redis.call('HINCRBY', KEYS[2], room, 1)
    line = ARGV[i + 1] .. ',"id":' .. id .. ',"seq":' .. seq .. '}'
    numbers = id .. ',"seq":' .. seq
    redis.call('RPUSH', KEYS[3], line)
    added = added + #line
  end
  redis.call('PUBLISH', KEYS[4], ARGV[i] .. numbers .. ',"line":' .. line .. '}')
end
if room == '' then return 1 end
redis.call('ZINCRBY', KEYS[7], added, room)
redis.call('INCRBY', KEYS[8], added)
local extra = redis.call('LLEN', KEYS[3]) - tonumber(ARGV[2])
if extra > 0 then trim(room, extra) end
local time = redis.call('TIME')
redis.call('ZADD', KEYS[5], tonumber(time[1]) + tonumber(time[2]) / 1e6, room)
local excess = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[3])
local budget = tonumber(ARGV[5])
for _, old in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if excess <= 0 and tonumber(redis.call('GET', KEYS[8]) or '0') <= budget then break end
  if old ~= room and not occupied(old) then
    forget(old)
    excess = excess - 1
  end
end
local work = 0
while tonumber(redis.call('GET', KEYS[8]) or '0') > budget * 7 / 8 and work < 1000 do
  local biggest = redis.call('ZREVRANGE', KEYS[7], 0, 0)[1]
  if not biggest or trim(biggest, 1) == 0 then break end
  work = work + 1
end
return 1
"""
# After (re)connecting: KEYS instance, id, seq, floor; ARGV our instance, our last id,
# our floor, then room/seq pairs. Counters only go up.
_SEED_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.call('GET', KEYS[1]) end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2]) end
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[3]) then redis.call('SET', KEYS[4], ARGV[3]) end
for i = 4, #ARGV, 2 do
  if tonumber(redis.call('HGET', KEYS[3], ARGV[i]) or '0') < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
return ARGV[1]
"""
# KEYS instance, hist:ROOM, active, sizes, total; ARGV our instance, room, the lines we keep.
_RESTORE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local size = 0
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]); size = size + #ARGV[i] end
redis.call('ZADD', KEYS[3], 'NX', tonumber(redis.call('TIME')[1]), ARGV[2])
redis.call('ZINCRBY', KEYS[4], size, ARGV[2])
redis.call('INCRBY', KEYS[5], size)
return 1
"""
# Who has a nick is four hashes keyed by the nick's key: owner (the server id),
# session, presence (a JSON record) and since (when it was claimed).
#
# A claim: KEYS owner, servers, session, presence, since; ARGV key, our server id,
# ttl, the new session, the presence record, when it was claimed, the mode, and the
# session the client presented. A live owner elsewhere keeps the nick, except:
# in mode 'new' (a hello or a rename) to the same user (the session presented);
# in mode 'again' (after an outage) to the earlier claim (then the lower server id).
# 0: theirs; 1: ours; 2: ours, taken from them.
_CLAIM_SCRIPT = """
local owner = redis.call('HGET', KEYS[1], ARGV[1])
local result = 1
if owner and owner ~= ARGV[2] then
  local beat = redis.call('ZSCORE', KEYS[2], owner)
  local now = tonumber(redis.call('TIME')[1])
  if beat and tonumber(beat) >= now - tonumber(ARGV[3]) then
    if ARGV[7] == 'new' then
      if ARGV[8] == '' or redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[8] then return 0 end
    else
      local theirs, mine = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0'), tonumber(ARGV[6])
      if theirs < mine or (theirs == mine and owner < ARGV[2]) then return 0 end
    end
    result = 2
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[6])
return result
"""
# KEYS owner, presence, session, since; ARGV key, our server id.
_RELEASE_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  for i = 1, 4 do redis.call('HDEL', KEYS[i], ARGV[1]) end
end
return 1
"""
# KEYS servers, owner, presence, session, since; ARGV our server id, ttl, 'beat' or
# 'leave', the key prefix. Forgets servers silent for ttl (their users and the rooms
# they had people in: `in:SID`); returns the live servers.
_HEARTBEAT_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
if ARGV[3] == 'beat' then redis.call('ZADD', KEYS[1], now, ARGV[1]) else redis.call('ZREM', KEYS[1], ARGV[1]) end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
if #dead > 0 or ARGV[3] ~= 'beat' then
  local gone = {}
  for _, sid in ipairs(dead) do gone[sid] = true; redis.call('ZREM', KEYS[1], sid) end
  if ARGV[3] ~= 'beat' then gone[ARGV[1]] = true end
  for sid in pairs(gone) do redis.call('DEL', ARGV[4] .. 'in:' .. sid) end
  local owners = redis.call('HGETALL', KEYS[2])
  for i = 1, #owners, 2 do
    if gone[owners[i + 1]] then
      for k = 2, 5 do redis.call('HDEL', KEYS[k], owners[i]) end
    end
  end
end
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
"""
# KEYS hist:ROOM, sizes, total; ARGV room, then lines to take out of its history (a purge).
_UNKEEP_SCRIPT = """
local size = 0
for i = 2, #ARGV do size = size + #ARGV[i] * redis.call('LREM', KEYS[1], 0, ARGV[i]) end
redis.call('ZINCRBY', KEYS[2], -size, ARGV[1])
redis.call('DECRBY', KEYS[3], size)
return size
"""


def _unnumbered(line: dict) -> str:
    """A line's JSON without its id and seq and without its closing brace:
    Redis's Lua script appends them (it alone numbers lines), so a line is
    encoded once, here, and never parsed again on its way."""
    return _dumps(line)[:-1]


_KIND = b'{"kind":"'        # how every bus message begins
_LINE_FIELD = b',"line":'   # and where a line or pm message's line begins: all before it is its head


class RemoteUser(NamedTuple):
    nick: str
    sid: str
    rooms: Tuple[str, ...]
    profile: dict           # what its server says of it (away, account, since...: see People.profile)


def open_rooms(rooms: "Rooms", names: Iterable[str]) -> List["Room"]:
    """The rooms named by another server (created here if new); a name this
    server does not accept (or one room too many) is skipped."""
    opened = []
    for name in names:
        try:
            opened.append(rooms.open(check_room(name)))
        except ProtocolError as error:
            log.warning("cluster: ignoring room %.40r: %s", name, error.text)
    return opened


class Elsewhere:
    """This server's replica of the users on the other servers, fed by the
    bus: for `who`, pms, nick checks and each Room's `remote` members. A nick
    that is a user of this server is never its replica's too (a presence
    record left by an old server of ours, say, is not someone else)."""

    def __init__(self, chat: "Chat"):
        self.chat = chat
        self.users: Dict[str, RemoteUser] = {}      # nick key -> who, on which server, in which rooms

    def add(self, key: str, user: RemoteUser) -> None:
        if key in self.chat.users:
            return
        rooms = self.chat.rooms
        old = self.users.get(key)
        self.users[key] = user
        for room in open_rooms(rooms, user.rooms):
            room.remote[key] = user.nick
        if old is not None:
            for room in filter(None, map(rooms.get, set(old.rooms) - set(user.rooms))):
                room.remote.pop(key, None)
                rooms.vacated(room)

    def remove(self, key: str, announce: Optional[str]) -> None:
        """Forget a user elsewhere; `announce` a leave to the rooms it was in."""
        user = self.users.pop(key, None)
        if user is None:
            return
        rooms = list(filter(None, map(self.chat.rooms.get, user.rooms)))
        for room in rooms:
            room.remote.pop(key, None)
        if announce and key not in self.chat.users:
            self.chat.remote_left(rooms, user.nick, announce)
        for room in rooms:
            self.chat.rooms.vacated(room)

    def remove_servers(self, gone: Callable[[str], bool], announce: str) -> None:
        """The users of the servers `gone(sid)` says are gone leave, announced."""
        for key, user in list(self.users.items()):
            if gone(user.sid):
                self.remove(key, announce)

    def forget(self) -> None:
        """Everyone elsewhere, silently (the link is down: we no longer know)."""
        for room in self.chat.rooms:
            room.remote.clear()
            self.chat.rooms.vacated(room)
        self.users.clear()


class Flight(NamedTuple):
    """A line of ours sent to Redis to be numbered, not yet back on the bus."""
    room: str
    sender: str         # its sender's nick key
    line: dict
    sent: float         # when (the loop's clock)
    shown: bool         # already delivered here, provisionally (Redis was slow)


def _said(room: object, line: dict) -> tuple:    # (room: as a server sent it, for _plain_said to check)
    """What tells a line apart when its id is not known yet."""
    return room, line.get("from"), line.get("ts"), line.get("text")


class RedisStore(MemoryStore):
    """The store of a cluster: records in Redis hashes (chatpy:rec:KIND), one
    set for every server. A record put is written to Redis and told to the
    other servers on the bus; while the link is down it waits, and is
    written when the link is back (then everything is loaded again: see
    ClusterSync). History and numbering are the line script's (Cluster)."""

    where = "Redis"

    def __init__(self) -> None:
        super().__init__()
        self.cluster: Optional["Cluster"] = None
        self.waiting: List[Tuple[str, str, Optional[dict]]] = []     # records put while the link was down

    def put(self, kind: str, key: str, value: Optional[dict]) -> None:
        super().put(kind, key, value)
        cluster = self.cluster
        if cluster is None or not cluster.up:
            self.waiting.append((kind, key, value))
            return
        cluster.write_record(kind, key, value)

    def flush_waiting(self) -> None:
        waiting, self.waiting = self.waiting, []
        for kind, key, value in waiting:
            self.put(kind, key, value)

    def purge(self, sender: str, room: Optional[str]) -> None:
        if self.cluster is not None:
            self.cluster.purge(sender, room)


class Cluster:
    """This server's link to the others (see the diagram above): the Relay
    for a server with --redis. It is three parts: this one, what Chat asks
    of a relay (post, pm, claim, presence, event, act...); ClusterSync, the
    links' life (linking, loading the shared state, outages); and Bus, what
    comes from the other servers. What it does to the core is only what
    RelayHost lists (deliver_line, deliver_pm, deliver_event, notices...).

    Lines: every line is numbered by Redis and delivered, here too, when it
    comes back on the bus, so every server shows the same lines in the same
    order. If Redis is slow (no answer in LOCAL_WAIT), a line is shown here at
    once, provisionally (`local`, a negative id, no seq), and its published
    copy, when it comes, is not shown again. If Redis owes an answer for
    longer than a third of the ttl, the link is down and the server is an
    island: lines are numbered here (negative ids, which never collide with
    Redis's or another server's) and reach this server's users only. When the
    link is back, lines Redis published meanwhile are shown to the users
    here (those already shown provisionally are recognised and not shown
    twice), each sender hears once how many of their lines did not reach the
    other servers, and nicks both sides gave out go to the earlier claim."""

    LOCAL_WAIT = 1.0        # seconds a line waits for Redis before it is shown here anyway

    def __init__(self, chat: "Chat", loop: "ServerLoop", url: RedisUrl, ttl: float, history: int):
        self.chat, self.loop, self.ttl, self.history = chat, loop, ttl, history
        self.rooms_kept = 2 * chat.config.max_rooms     # in Redis: as many as a server may hold, in use or dormant
        self.sid = secrets.token_hex(6)
        self.instance = secrets.token_hex(8)        # Redis's, once linked (see ClusterSync.load)
        self.next_id = 1                            # above every Redis id seen (to seed a Redis that lost it)
        self.island_ids = itertools.count(-(int(self.sid[:6], 16) << 24) - 1, -1)   # this server's own range
        self.up = False                             # linked, and the shared state loaded
        self.records: Dict[str, Dict[str, dict]] = {}     # the store's records at start: none until linked
        self.elsewhere = Elsewhere(chat)
        self.in_flight: Dict[str, Flight] = {}      # nonce -> line said here, not yet back (oldest first)
        self.waiting = False                        # a timer watches the oldest flight
        self.unconfirmed: Dict[tuple, List[Flight]] = {}    # lines in flight when the link went down, by _said()
        self.unsent: Dict[str, int] = collections.Counter()   # sender key -> island lines said
        self.claims: Dict[str, Callable[[bool], None]] = {}    # nick key -> done(), while Redis decides
        self.nonces = itertools.count()
        self.outgoing: Dict[str, list] = {}         # room -> this turn's lines, as script arguments
        self.occupied: set = set()                  # the rooms with people here, as Redis has it (in:SID)
        self.presence_changed = False
        self.sync = ClusterSync(self)
        self.bus_in = Bus(self)
        timeout = ttl / 3
        self.commands = RedisLink(loop, url, "commands", self.sync.link_up, self.sync.link_down,
                                  reply_timeout=timeout)
        self.bus = RedisLink(loop, url, "bus", self.sync.link_up, self.sync.link_down, on_message=self.bus_in.received,
                             reply_timeout=timeout)
        store = chat.store
        if isinstance(store, RedisStore):
            store.cluster = self

    @staticmethod
    def key(*parts: str) -> str:
        return REDIS_PREFIX + ":".join(parts)

    def start(self) -> "Cluster":
        self.commands.start()
        self.bus.start()
        self.loop.call_later(self.ttl / 3, self.sync.heartbeat)
        return self

    def end_turn(self) -> None:
        k = self.key
        if self.presence_changed and self.up:       # first: the line script trims by what is occupied now
            self._tell_occupied()
        for room, lines in self.outgoing.items():
            self.commands.command("EVAL", _LINES_SCRIPT, 9, k("id"), k("seq"), k("hist", room), k("bus"), k("active"),
                                  k("floor"), k("sizes"), k("total"), k("servers"), room, self.history,
                                  self.rooms_kept, REDIS_PREFIX, self.chat.config.history_bytes, self.ttl, *lines,
                                  reply=self._stored)
        self.outgoing.clear()
        self.commands.flush()
        self.bus.flush()

    def _stored(self, value) -> None:
        """Redis's answer to a turn's lines. A refusal (e.g. out of memory) is
        a link that cannot do its job: down, so what was in flight is shown
        here and counted for its senders, as when Redis is gone."""
        if isinstance(value, RespError):
            self.commands.fail(f"it refused lines ({value})")

    def _tell_occupied(self, again: bool = False) -> None:
        """Redis learns which rooms have people on this server (in:SID), so it never forgets them."""
        self.presence_changed = False
        now = {room.name for room in self.chat.rooms if room.members}
        key = self.key("in", self.sid)
        if again:
            self.commands.command("DEL", key)
            self.occupied = set()
        if now - self.occupied:
            self.commands.command("SADD", key, *(now - self.occupied))
        if self.occupied - now:
            self.commands.command("SREM", key, *(self.occupied - now))
        self.occupied = now

    # -- lines ---------------------------------------------------------------

    def post(self, room: "Room", sender: "Conn", line: dict) -> None:
        """Number, store and publish a room line; it comes back on the bus."""
        if not self.up:
            self.unsent[sender.key] += 1
            self.island(room, sender, line)
            return
        nonce = f"{self.sid}.{next(self.nonces)}"
        self.in_flight[nonce] = Flight(room.name, sender.key, self.chat.out.stamp(line), self.loop.now, False)
        head = (f'{{"kind":"line","sid":"{self.sid}","from":{_dumps(sender.key)},"nonce":"{nonce}",'
                f'"room":{_dumps(room.name)},"id":')
        self.outgoing.setdefault(room.name, []).extend((head, _unnumbered(line)))
        if not self.waiting:
            self.waiting = True
            self.loop.call_later(self.LOCAL_WAIT, self._overdue)

    def _overdue(self) -> None:
        """Lines Redis has not numbered in LOCAL_WAIT are shown here anyway."""
        self.waiting = False
        for nonce, flight in list(self.in_flight.items()):
            if self.loop.now - flight.sent < self.LOCAL_WAIT:
                self.waiting = True
                self.loop.call_later(self.LOCAL_WAIT - (self.loop.now - flight.sent), self._overdue)
                return
            self.show_here(nonce)

    def show_here(self, nonce: str) -> None:
        flight = self.in_flight[nonce]
        if not flight.shown:
            room = self.chat.rooms.get(flight.room)
            if room is not None:
                self.island(room, self.chat.users.get(flight.sender), flight.line)
            self.in_flight[nonce] = flight._replace(shown=True)

    def island(self, room: "Room", sender: Optional["Conn"], line: dict) -> None:
        """A line shown here only, numbered here: `local`, an id of this server's
        own (negative: never one Redis gives), no seq (it is not in the shared history)."""
        line = dict(line, id=next(self.island_ids), local=True)
        line.pop("seq", None)
        self.chat.deliver_line(room, sender, self.chat.out.encode(line), line["id"], None, line=line)

    def new_id(self) -> int:
        """An id for a private message delivered while Redis is away."""
        return next(self.island_ids)

    def pm(self, sender: "Conn", to_key: str, line: dict) -> bool:
        """A private message to `to_key`, here or on another server, numbered by
        Redis; False if Redis is away (or nobody has that nick)."""
        elsewhere = self.elsewhere.users
        if not self.up or (to_key not in elsewhere and to_key not in self.chat.users):
            return False
        if to_key in elsewhere:
            line["to"] = elsewhere[to_key].nick
        head = f'{{"kind":"pm","sid":"{self.sid}","to":{_dumps(to_key)},"from":{_dumps(sender.key)},"id":'
        self.outgoing.setdefault("", []).extend((head, _unnumbered(self.chat.out.stamp(line))))
        return True

    def event(self, rooms: Optional[List[str]], frame: dict) -> None:
        """An event for the members of `rooms` (None: everyone) elsewhere."""
        self.publish({"kind": "event", "sid": self.sid, "rooms": rooms, "frame": frame})

    def act(self, act: str, key: str, by: str, reason: str, room: Optional[str]) -> None:
        """A kick or ban for someone on another server: that server does it."""
        self.publish({"kind": "act", "sid": self.sid, "act": act, "key": key, "by": by, "reason": reason,
                      "room": room})

    def write_record(self, kind: str, key: str, value: Optional[dict]) -> None:
        """A record, into Redis and to the other servers (see RedisStore)."""
        table = self.key("rec", kind)
        if value is None:
            self.commands.command("HDEL", table, key)
        else:
            self.commands.command("HSET", table, key, _dumps(value))
        self.publish({"kind": "record", "sid": self.sid, "table": kind, "key": key, "value": value})

    def purge(self, sender: str, room: Optional[str]) -> None:
        """Take a sender's lines (a nick key) out of what Redis keeps of each room (or one)."""
        if not self.up:
            return
        for name in [room] if room else [room.name for room in self.chat.rooms]:
            self.commands.command("LRANGE", self.key("hist", name), 0, -1,
                                  reply=lambda lines, name=name: self._unkeep(name, sender, lines))

    def _unkeep(self, room: str, sender: str, lines: list) -> None:
        if isinstance(lines, list):
            theirs = [line for line in lines if name_key(str(json.loads(line).get("from"))) == sender]
            if theirs:
                k = self.key
                self.commands.command("EVAL", _UNKEEP_SCRIPT, 3, k("hist", room), k("sizes"), k("total"), room, *theirs)

    # -- nicks and presence --------------------------------------------------

    def presence(self, conn: "Conn") -> None:
        """`conn` joined, changed rooms or nick, or went away: tell the others (and Redis)."""
        record = self.record(conn)
        self.elsewhere.remove(conn.key, None)       # (its record from a server of ours that died, say)
        if self.up:
            self.commands.command("HSET", self.key("presence"), conn.key, _dumps(record))
        self.publish({"kind": "user", "sid": self.sid, "key": conn.key, "user": record})
        self.presence_changed = True

    def claim(self, conn: "Conn", key: str, session: str, done: Callable[[bool], None]) -> None:
        """Claim the nick `key` cluster-wide for `conn`; `done(ok)` when Redis answers.
        While Redis is away, only this server's users count (and done is called at once)."""
        if not self.up:
            done(True)
            return

        def answer(value) -> None:
            if key not in self.claims:      # settled already: the link went down meanwhile
                return
            if isinstance(value, RespError):
                self.commands.fail(f"it refused a nick claim ({value})")     # which settles it
                return
            del self.claims[key]
            if value == 2:      # the same user, still connected elsewhere: that connection goes
                self.publish({"kind": "replaced", "sid": self.sid, "key": key})
            done(value > 0)
        self.claims[key] = done
        self.claim_nick(conn, key, "new", session or "", answer)

    def claim_nick(self, conn: "Conn", key: str, mode: str, presented: str, reply: Callable) -> None:
        k = self.key
        self.commands.command("EVAL", _CLAIM_SCRIPT, 5, k("owner"), k("servers"), k("session"), k("presence"),
                              k("since"), key, self.sid, self.ttl, conn.session or "", _dumps(self.record(conn)),
                              conn.claimed, mode, presented, reply=reply)

    def settle_claims(self) -> None:
        """The link went down with claims unanswered: an island, this server's users were checked already."""
        claims, self.claims = self.claims, {}
        for done in claims.values():
            done(True)

    def vanished(self, key: str) -> None:
        """`key` lost its connection: gone from the lists, its nick still claimed (held for it)."""
        self.publish({"kind": "user", "sid": self.sid, "key": key, "user": None})
        self.presence_changed = True

    def release(self, key: str) -> None:
        """`key` is no longer used here (left, or renamed)."""
        if self.up:
            k = self.key
            self.commands.command("EVAL", _RELEASE_SCRIPT, 4, k("owner"), k("presence"), k("session"),
                                  k("since"), key, self.sid)
        self.publish({"kind": "user", "sid": self.sid, "key": key, "user": None})
        self.presence_changed = True

    def others(self) -> List[str]:
        return [user.nick for user in self.elsewhere.users.values()]

    def servers(self) -> List[str]:
        return sorted({user.sid for user in self.elsewhere.users.values()})

    def fetch_presence(self, key: str) -> None:
        """Learn from Redis who has the nick `key` elsewhere (if anyone)."""
        def learned(record) -> None:
            if isinstance(record, bytes):
                user = json.loads(record)
                if user.get("sid") != self.sid:
                    self.elsewhere.add(key, RemoteUser(user["nick"], user["sid"], tuple(user["rooms"]), user))
        if self.up:
            self.commands.command("HGET", self.key("presence"), key, reply=learned)

    def profile(self, key: str) -> Optional[dict]:
        """What another server says of its user `key` (see People.profile), idle time as of now."""
        user = self.elsewhere.users.get(key)
        if user is None:
            return None
        profile = dict(user.profile, nick=user.nick, rooms=list(user.rooms), online=True)
        if type(profile.get("said")) in (int, float):
            profile["idle"] = round(max(0.0, self.chat.out.ts - profile["said"]))
        return profile

    def close(self) -> None:
        """Leaving for good: our users leave the others' lists now, not after a timeout."""
        if self.up:
            self.sync.beat("leave")
            self.publish({"kind": "gone", "sid": self.sid})
            self.end_turn()
        self.commands.close()
        self.bus.close()

    def publish(self, message: dict) -> None:
        if self.up:
            self.commands.command("PUBLISH", self.key("bus"), _dumps(message))

    def record(self, conn: "Conn") -> dict:
        """Who `conn` is, as the other servers keep it (chatpy:presence)."""
        return dict(self.chat.people.profile(conn), sid=self.sid, said=conn.said, source=conn.source)


class ClusterSync:
    """The life of the cluster's links: linking, loading the shared state
    (bus messages held meanwhile), the heartbeat, and what an outage leaves
    to say when the link is back."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.chat = cluster, cluster.chat
        self.syncing: Optional[List[bytes]] = None  # bus messages held while the state loads
        self.before: Dict[str, int] = {}            # room key -> newest seq shown here, when the link came back
        self.loaded: set = set()                    # ids of the lines the load brought (while syncing)

    def link_up(self) -> None:
        cluster = self.cluster
        if not (cluster.commands.up and cluster.bus.up):
            return
        self.syncing = []
        cluster.bus.command("SUBSCRIBE", cluster.key("bus"), reply=lambda _: self.load())

    def hold(self, message: bytes) -> bool:
        """A bus message that comes while the state loads waits for it (True)."""
        if self.syncing is None:
            return False
        self.syncing.append(message)
        return True

    def load(self) -> None:
        """Subscribed: now load the shared state (bus messages wait meanwhile).
        If Redis lost its data (a restart without persistence), what this
        server remembers seeds it again, so ids keep increasing and clients
        can still resume: counters only go up, history only fills an empty list."""
        cluster, chat = self.cluster, self.chat
        run, k = cluster.commands.command, cluster.key
        self.before = {room.key: room.seq for room in chat.rooms}
        seqs = [part for room in chat.rooms for part in (room.name, room.seq)]
        run("EVAL", _SEED_SCRIPT, 4, k("instance"), k("id"), k("seq"), k("floor"), cluster.instance,
            cluster.next_id - 1, chat.rooms.floor, *seqs, reply=self.set_instance)
        for room in chat.rooms:
            if room.history:
                run("EVAL", _RESTORE_SCRIPT, 5, k("instance"), k("hist", room.name), k("active"), k("sizes"),
                    k("total"), cluster.instance, room.name, *(line.data[4:] for line in room.history))
        store = chat.store
        if isinstance(store, RedisStore):
            store.flush_waiting()
        for kind in Records.KINDS:
            run("HGETALL", k("rec", kind), reply=lambda flat, kind=kind: self.load_records(kind, flat))
        self.beat("beat", then=self.load_people)

    def set_instance(self, value) -> None:
        if isinstance(value, RespError):
            self.cluster.commands.fail(f"it refused to be seeded ({value})")
            return
        self.cluster.instance = value.decode()

    def load_records(self, kind: str, flat: list) -> None:
        if isinstance(flat, list):
            self.chat.records_loaded(kind, {key.decode(): json.loads(value) for key, value in zip(flat[::2], flat[1::2])})

    def load_people(self, live: list) -> None:
        run = self.cluster.commands.command
        run("HGETALL", self.cluster.key("presence"), reply=lambda v: self.load_presence(v, live))
        run("ZRANGE", self.cluster.key("active"), 0, -1, reply=self.load_rooms)

    def load_presence(self, flat: list, live: list) -> None:
        live_sids = {sid.decode() for sid in live}
        elsewhere = self.cluster.elsewhere
        elsewhere.forget()
        for key, record in zip(flat[::2], flat[1::2]):
            user = json.loads(record)
            if user["sid"] != self.cluster.sid and user["sid"] in live_sids:
                elsewhere.add(key.decode(), RemoteUser(user["nick"], user["sid"], tuple(user["rooms"]), user))

    def load_rooms(self, names: list) -> None:
        cluster = self.cluster
        for name in (name.decode() for name in names):
            cluster.commands.command("LRANGE", cluster.key("hist", name), -cluster.history, -1,
                                     reply=lambda lines, name=name: self.load_history(name, lines))
        cluster.commands.command("HGETALL", cluster.key("seq"), reply=self.load_seq)

    def load_history(self, name: str, lines: list) -> None:
        """A room's history from Redis. What of it was said while the link was
        down and not shown here yet is shown now, once; what is no longer
        kept is counted for the people here."""
        for room in open_rooms(self.chat.rooms, [name]):
            self.chat.rooms.restore(room, lines)
            self.loaded.update(line.id for line in room.history)
            shown_up_to = self.before.pop(room.key, None)
            if shown_up_to is None or not room.history:
                continue
            self.gone(room, room.history[0].seq - shown_up_to - 1)
            for line in room.history:
                if line.seq > shown_up_to and not self.was_shown(line):
                    self.chat.deliver_line(room, None, line.data, line.id, line.seq, keep=False)

    def gone(self, room: "Room", count: int) -> None:
        if count > 0 and room.members:
            self.chat.notice_room(room, f"{plural(count, 'line')} said in #{room.name} on the other servers while"
                                        " the link was down can no longer be shown")

    def was_shown(self, line: HistoryLine) -> bool:
        """Whether a published line is one this server showed already, provisionally
        (recognised by room, sender, time and text: the same line, numbered late)."""
        unconfirmed = self.cluster.unconfirmed
        said = _said(line.room, json.loads(line.data[4:]))
        flights = unconfirmed.get(said)
        if not flights:
            return False
        flights.pop()       # it reached the others after all
        if not flights:
            del unconfirmed[said]
        return True

    def load_seq(self, flat: list) -> None:
        """The last reply of the load: each room's newest seq, then the link is up."""
        for name, seq in zip(flat[::2], flat[1::2]):
            for room in open_rooms(self.chat.rooms, [name.decode()]):
                if room.key in self.before:     # no history left: whatever was said is gone
                    self.gone(room, int(seq) - self.before.pop(room.key))
                self.chat.rooms.numbered(room, int(seq))
                self.chat.rooms.vacated(room)   # (unless someone is in it)
        self.synced()

    def synced(self) -> None:
        cluster, chat = self.cluster, self.chat
        held, self.syncing = self.syncing or [], None
        cluster.up = True
        cluster._tell_occupied(again=True)
        for conn in list(chat.users.values()):      # our users, back in the shared presence (if still theirs)
            self.reclaim(conn)
        log.info("cluster: linked through Redis as server %s (%d users elsewhere)", cluster.sid,
                 len(cluster.elsewhere.users))
        if chat.users:     # they were told it was down
            chat.notice_here("the link to the other servers is back up")
        self.report_unsent()
        for message in held:
            cluster.bus_in.received(message)
        self.loaded.clear()

    def report_unsent(self) -> None:
        """Each sender hears once how many of their lines never reached the other servers."""
        cluster = self.cluster
        for flights in cluster.unconfirmed.values():
            for flight in flights:
                cluster.unsent[flight.sender] += 1
        cluster.unconfirmed = {}
        for key, count in cluster.unsent.items():
            self.chat.notice_to(key, f"{plural(count, 'line')} you said while the link was down reached only the"
                                     " people on this server")
        cluster.unsent.clear()

    def reclaim(self, conn: "Conn") -> None:
        """Our user's nick, claimed again after an outage: if another server
        gave it out too, the earlier claim keeps it, and the other is told."""
        cluster = self.cluster

        def answer(value) -> None:
            if value == 0:
                self.chat.lost_nick(conn)
                cluster.fetch_presence(conn.key)    # (ours was in the way of knowing the earlier one)
                return
            if value == 2:
                cluster.publish({"kind": "yield", "sid": cluster.sid, "key": conn.key})
            if conn.state is JOINED:
                cluster.presence(conn)
        cluster.claim_nick(conn, conn.key, "again", "", answer)

    def link_down(self) -> None:
        """Redis is gone: show here what we said that did not come back, and
        be an island until it returns."""
        cluster = self.cluster
        if self.syncing is None and not cluster.up:
            return
        cluster.up, self.syncing = False, None
        self.loaded.clear()
        cluster.elsewhere.forget()
        self.chat.notice_here("the link to the other servers is down; until it is back you are"
                              " talking with the people on this server only")
        for nonce in list(cluster.in_flight):
            cluster.show_here(nonce)
        for flight in cluster.in_flight.values():
            cluster.unconfirmed.setdefault(_said(flight.room, flight.line), []).append(flight)
        cluster.in_flight.clear()
        cluster.settle_claims()

    def heartbeat(self) -> None:
        cluster = self.cluster
        if cluster.commands.up:
            self.beat("beat", then=self.prune)
        cluster.commands.check(cluster.loop.now)
        cluster.bus.check(cluster.loop.now)
        cluster.loop.call_later(cluster.ttl / 3, self.heartbeat)

    def beat(self, mode: str, then: Optional[Callable] = None) -> None:
        cluster, k = self.cluster, self.cluster.key
        cluster.commands.command("EVAL", _HEARTBEAT_SCRIPT, 5, k("servers"), k("owner"), k("presence"),
                                 k("session"), k("since"), cluster.sid, cluster.ttl, mode, REDIS_PREFIX, reply=then)

    def prune(self, live: list) -> None:
        """Users of servers that stopped beating leave."""
        if isinstance(live, RespError):
            return
        live_sids = {sid.decode() for sid in live}
        self.cluster.elsewhere.remove_servers(lambda sid: sid not in live_sids, "their server went away")


class Bus:
    """What the other servers say, from the bus: lines (told by their first
    bytes, not parsed whole), private messages, events, users coming and
    going, records changed, acts for a user here."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.chat = cluster, cluster.chat
        self.handlers = {"event": self.on_event, "user": self.on_user, "replaced": self.on_replaced,
                         "yield": self.on_yield, "gone": self.on_gone, "act": self.on_act, "record": self.on_record}

    def received(self, message: bytes) -> None:
        cluster = self.cluster
        if cluster.sync.hold(message) or not cluster.up:
            return
        kind = message[len(_KIND):message.index(b'"', len(_KIND))] if message.startswith(_KIND) else b""
        if kind in (b"line", b"pm"):
            self.on_line(kind, message)
            return
        try:
            obj = json.loads(message)
        except ValueError:
            log.warning("cluster: a bus message that is not JSON: %.60r", message)
            return
        if obj.get("sid") == cluster.sid:
            return
        handler = self.handlers.get(obj.get("kind"))
        if handler is not None:
            handler(obj)

    def on_line(self, kind: bytes, message: bytes) -> None:
        # HEAD,"line":LINE}: the head says what the line is; LINE is what clients get, as is.
        cluster, chat = self.cluster, self.chat
        split = message.index(_LINE_FIELD)
        head, raw = json.loads(message[:split] + b"}"), message[split + len(_LINE_FIELD):-1]
        cluster.next_id = max(cluster.next_id, head["id"] + 1)
        data = _LENGTH.pack(len(raw)) + raw
        ours = head["sid"] == cluster.sid
        if kind == b"pm":
            chat.deliver_pm(chat.users.get(head["to"]), chat.users.get(head.get("from", "")) if ours else None, data)
            return
        flight = cluster.in_flight.pop(head["nonce"], None) if ours else None
        rooms = open_rooms(chat.rooms, [head["room"]])
        if not rooms or head["id"] in cluster.sync.loaded:      # held while syncing, and loaded already
            return
        room = rooms[0]
        chat.rooms.numbered(room, head["seq"])
        sender = chat.users.get(head["from"]) if ours else None
        chat.deliver_line(room, sender, data, head["id"], head["seq"], fan_out=not (flight and flight.shown))
        if not room.count():    # a room of the other servers' only: dormant here, not in use
            chat.rooms.vacated(room)

    def on_event(self, obj: dict) -> None:
        frame, about = obj["frame"], obj["frame"].get("old" if obj["frame"]["type"] == "nick" else "nick")
        if type(about) is str and name_key(about) in self.chat.users:
            return      # the other holder of a nick both sides gave out while apart: it is ours
        self.chat.deliver_event(obj.get("rooms"), frame)

    def on_user(self, obj: dict) -> None:
        key, user = obj["key"], obj.get("user")
        if user is None:
            self.cluster.elsewhere.remove(key, None)
        else:
            self.cluster.elsewhere.add(key, RemoteUser(user["nick"], obj["sid"], tuple(user["rooms"]), user))

    def on_replaced(self, obj: dict) -> None:
        self.chat.replaced(obj["key"])

    def on_yield(self, obj: dict) -> None:
        """Another server holds an earlier claim on a nick a user of ours has too."""
        conn = self.chat.users.get(obj["key"])
        if conn is not None:
            self.chat.lost_nick(conn)
            self.cluster.fetch_presence(obj["key"])

    def on_gone(self, obj: dict) -> None:
        self.cluster.elsewhere.remove_servers(lambda sid: sid == obj["sid"], "their server shut down")

    def on_act(self, obj: dict) -> None:
        self.chat.act(obj["act"], obj["key"], obj["by"], obj["reason"], obj.get("room"))

    def on_record(self, obj: dict) -> None:
        self.chat.record_changed(obj["table"], obj["key"], obj.get("value"))


# ---------------------------------------------------------------------------
# 7. The terminal, shared by the client and the server's operator console
# ---------------------------------------------------------------------------

# Keys as terminals send them. Windows' console sends other codes; the
# reader there translates them to these (see Console._windows_keys).
_KEYS = {
    "\x1b[A": "up", "\x1bOA": "up", "\x1b[B": "down", "\x1bOB": "down", "\x1b[C": "right", "\x1bOC": "right",
    "\x1b[D": "left", "\x1bOD": "left", "\x1b[H": "home", "\x1bOH": "home", "\x1b[1~": "home", "\x1b[7~": "home",
    "\x1b[F": "end", "\x1bOF": "end", "\x1b[4~": "end", "\x1b[8~": "end", "\x1b[3~": "delete",
    "\x1b[1;5C": "word-right", "\x1b[1;5D": "word-left", "\x1bf": "word-right", "\x1bb": "word-left",
    "\x1b[200~": "paste-start", "\x1b[201~": "paste-end",
    "\x01": "home", "\x05": "end", "\x02": "left", "\x06": "right", "\x10": "up", "\x0e": "down",
    "\x08": "backspace", "\x7f": "backspace", "\x04": "delete-or-eof", "\x0b": "kill-end",
    "\x15": "kill-start", "\x17": "kill-word", "\x19": "yank", "\x0c": "clear", "\t": "tab",
    "\r": "enter", "\n": "enter",
}
_SEQUENCE = re.compile(r"\x1b(\[[0-9;]*[@-~]|O.|[^\[O])")      # an escape sequence, whole
_SEQUENCE_START = re.compile(r"\x1b(\[[0-9;]*|O)?")              # the start of one, not yet whole
_TYPED = re.compile("[^\x00-\x1f\x7f]+")     # a run of keys that are text: inserted in one go
_PASTE_END = "\x1b[201~"


class LineEditor:
    """The line being typed, and how it is drawn below what is printed.

    A small editor with the keys people use (arrows, Home/End, Ctrl-A/E/K/U/
    W/Y, Backspace, Delete, history on Up/Down, Tab completion, Ctrl-L,
    bracketed paste), the same on every terminal and on Windows. It always
    knows where its cursor is and how many rows its line takes, so a line
    printed above it (print()) can erase the input exactly, print, and draw
    it again with the cursor where it was. It is pure: keys go in (feed()),
    lines come out, and every method returns the text to write to the
    terminal; Console does the writing."""

    def __init__(self, prompt: str = "", columns: Callable[[], int] = lambda: 80,
                 complete: Optional[Callable[[str, int], Tuple[List[str], int]]] = None):
        self.prompt = prompt        # as printed (it may hold colour codes)
        self.columns = columns
        self.complete = complete    # (line, point) -> (candidates, where the word being completed starts)
        self.buffer, self.point = "", 0
        self.history: List[str] = []
        self.browsing: Optional[int] = None     # where in the history Up/Down are
        self.draft = ""             # what was typed before browsing the history
        self.killed = ""            # what Ctrl-K/U/W took, for Ctrl-Y
        self.pending = ""           # an escape sequence not yet complete
        self.pasting = False
        self.pasted = ""            # what a paste brought so far
        self.tabbed = False         # the last key was Tab: another lists the candidates
        self.cursor_row = 0         # the row of the cursor within the drawn input, counted from its first
        self.drawn = False
        self.drawn_at = 0           # the width it was drawn at
        self.secret = False         # what is typed is not drawn, nor kept in the history (a password)

    # -- keys ----------------------------------------------------------------

    def feed(self, text: str) -> Tuple[List[Optional[str]], str]:
        """Typed keys in: (the lines entered, None for end of input (Ctrl-D
        on an empty line); what to write to the terminal)."""
        lines: List[Optional[str]] = []
        out: List[str] = []
        text, self.pending = self.pending + text, ""
        i = 0
        while i < len(text):
            if self.pasting:
                i = self._paste(text, i, out)
                continue
            # A run of text is inserted at once, and drawn once: a long paste
            # costs its length, not its length squared.
            run = _TYPED.match(text, i)
            if run:
                self.tabbed = False
                out.append(self._insert(run.group()))
                i = run.end()
                continue
            key, size = self._next_key(text, i)
            if key is None:         # an escape sequence cut short: wait for the rest
                self.pending = text[i:]
                break
            i += size
            out.append(self._key(key, lines))
        return lines, "".join(out)

    def _paste(self, text: str, i: int, out: List[str]) -> int:
        """Keys inside a bracketed paste, from text[i]: kept until the paste
        ends, then inserted once, cleaned as the server would clean it (escape
        sequences and controls out, tabs and newlines kept), so what the line
        shows is what Enter sends. Returns where the keys not pasted begin."""
        end = text.find(_PASTE_END, i)
        if end < 0:
            tail = next((n for n in range(len(_PASTE_END) - 1, 0, -1) if text.endswith(_PASTE_END[:n])), 0)
            self.pasted += text[i:len(text) - tail]
            self.pending = text[len(text) - tail:]      # perhaps the end of the paste, cut in two
            return len(text)
        self.pasted += text[i:end]
        self.pasting, pasted, self.pasted = False, clean_text(self.pasted), ""
        out.append(self._insert(pasted))
        return end + len(_PASTE_END)

    @staticmethod
    def _next_key(text: str, i: int) -> Tuple[Optional[str], int]:
        """The key at text[i] and its length; (None, 0) for an escape sequence cut short."""
        if text[i] != "\x1b":
            return text[i], 1
        rest = text[i:]
        for length in (6, 5, 4, 3, 2):      # the longest known sequence first
            if rest[:length] in _KEYS:
                return rest[:length], length
        match = _SEQUENCE.match(rest)
        if match:
            return match.group(), match.end()   # an unknown key: ignored whole
        if _SEQUENCE_START.fullmatch(rest):
            return None, 0
        return "\x1b", 1

    def _key(self, key: str, lines: List[Optional[str]]) -> str:
        action = _KEYS.get(key)
        tabbed, self.tabbed = self.tabbed, False
        if action is None:
            return self._insert(key) if len(key) == 1 and key >= " " else ""
        if action == "enter":
            lines.append(self.buffer)
            if self.buffer.strip() and not self.secret and (not self.history or self.history[-1] != self.buffer):
                self.history.append(self.buffer)
            self.buffer, self.point, self.browsing = "", 0, None
            return self.erase() + self.draw()
        if action == "delete-or-eof":
            if not self.buffer:
                lines.append(None)
                return ""
            action = "delete"
        if action == "tab":
            return self._complete(listing=tabbed)
        if action == "clear":
            self.drawn = False
            return "\x1b[H\x1b[2J" + self.draw()
        if action in ("paste-start", "paste-end"):
            self.pasting = action == "paste-start"
            return ""
        return self._edit(action)

    def _edit(self, action: str) -> str:
        buffer, point = self.buffer, self.point
        if action == "left":
            point = max(0, point - 1)
        elif action == "right":
            point = min(len(buffer), point + 1)
        elif action == "home":
            point = 0
        elif action == "end":
            point = len(buffer)
        elif action == "word-left":
            point = len(buffer[:point].rstrip().rpartition(" ")[0] + " ") if " " in buffer[:point].rstrip() else 0
        elif action == "word-right":
            rest = buffer[point:]
            point += len(rest) - len(rest.lstrip()) + len(rest.lstrip().partition(" ")[0])
        elif action == "backspace" and point:
            buffer, point = buffer[:point - 1] + buffer[point:], point - 1
        elif action == "delete":
            buffer = buffer[:point] + buffer[point + 1:]
        elif action == "kill-end":
            buffer, self.killed = buffer[:point], buffer[point:]
        elif action == "kill-start":
            buffer, point, self.killed = buffer[point:], 0, buffer[:point]
        elif action == "kill-word":
            start = len(buffer[:point].rstrip().rpartition(" ")[0] + " ") if " " in buffer[:point].rstrip() else 0
            buffer, point, self.killed = buffer[:start] + buffer[point:], start, buffer[start:point]
        elif action == "yank":
            buffer, point = buffer[:point] + self.killed + buffer[point:], point + len(self.killed)
        elif action in ("up", "down"):
            return self._browse(-1 if action == "up" else 1)
        return self._set(buffer, point)

    def _insert(self, text: str) -> str:
        return self._set(self.buffer[:self.point] + text + self.buffer[self.point:], self.point + len(text))

    def _browse(self, step: int) -> str:
        if not self.history:
            return ""
        if self.browsing is None:
            if step > 0:
                return ""
            self.browsing, self.draft = len(self.history), self.buffer
        self.browsing = max(0, min(len(self.history), self.browsing + step))
        line = self.history[self.browsing] if self.browsing < len(self.history) else self.draft
        return self._set(line, len(line))

    def _complete(self, listing: bool) -> str:
        if self.complete is None:
            return ""
        candidates, start = self.complete(self.buffer, self.point)
        if len(candidates) == 1:
            word = candidates[0]
            return self._set(self.buffer[:start] + word + self.buffer[self.point:], start + len(word))
        if not candidates:
            return "\x07"
        common = os.path.commonprefix(candidates)
        if len(common) > self.point - start:
            return self._set(self.buffer[:start] + common + self.buffer[self.point:], start + len(common))
        self.tabbed = True
        if listing:     # a second Tab shows what there is to choose from
            return self.print("  ".join(candidate.strip() for candidate in candidates))
        return "\x07"

    def _set(self, buffer: str, point: int) -> str:
        if (buffer, point) == (self.buffer, self.point):
            return ""
        self.buffer, self.point = buffer, point
        return self.erase() + self.draw()

    # -- drawing -------------------------------------------------------------

    def set_prompt(self, prompt: str) -> str:
        if prompt == self.prompt:
            return ""
        self.prompt = prompt
        return self.erase() + self.draw() if self.drawn else ""

    def resized(self) -> str:
        """The terminal changed width and reflowed the line: where the cursor is now, then draw it again."""
        if self.drawn:
            self.cursor_row = _position(_plain(self.prompt) + _editable(self.buffer[:self.point]),
                                        max(self.columns(), 2))[0]
        return self.erase() + self.draw()

    def print(self, text: str) -> str:
        """What writes `text` (one or more lines) above the input line, which
        stays as it was (at the terminal's width now: a resize whose signal
        comes after this line is not missed)."""
        if self.drawn and self.columns() != self.drawn_at:
            return self.resized() + self.erase() + text + "\n" + self.draw()
        return self.erase() + text + "\n" + self.draw()

    def erase(self) -> str:
        """What moves the cursor to the start of the drawn input and clears from there on."""
        if not self.drawn:
            return ""
        self.drawn = False
        return (f"\x1b[{self.cursor_row}A" if self.cursor_row else "") + "\r\x1b[J"

    def draw(self) -> str:
        """What draws the prompt and the line, leaving the cursor at the point."""
        columns = max(self.columns(), 2)
        shown = "" if self.secret else _editable(self.buffer)
        before = _plain(self.prompt) + ("" if self.secret else _editable(self.buffer[:self.point]))
        end_row, end_column = _position(_plain(self.prompt) + shown, columns)
        row, column = _position(before, columns)
        out = self.prompt + shown
        if end_column == 0 and end_row:     # the terminal waits at the last column: go to the next row
            out += "\r\n"
        if end_row > row:
            out += f"\x1b[{end_row - row}A"
        out += "\r" + (f"\x1b[{column}C" if column else "")
        self.cursor_row, self.drawn, self.drawn_at = row, True, columns
        return out


def _editable(text: str) -> str:
    """The line being typed as it is drawn: a pasted newline as ⏎, other controls escaped."""
    return printable(text.replace("\n", "\u23ce"))


def _position(text: str, columns: int) -> Tuple[int, int]:
    """(row, column) where the cursor is after `text` is written from column
    0 of a terminal `columns` wide: a wide character that does not fit goes to
    the next row whole."""
    row = column = 0
    for ch in text:
        width = display_width(ch)
        if column + width > columns:
            row, column = row + 1, 0
        column += width
        if column == columns:
            row, column = row + 1, 0
    return row, column


def _plain(text: str) -> str:
    """`text` without colour codes."""
    return re.sub("\x1b\\[[0-9;]*m", "", text)


class Console:
    """Lines in from the keyboard (or a pipe), lines out to the screen.

    A thread reads stdin and wakes the owner's select() through a socket
    pair: select() cannot watch a Windows console, and this way one loop
    serves sockets and keyboard everywhere. On a terminal that can move its
    cursor, the keys go to a LineEditor in the owner's thread, which alone
    draws: show() prints above the line being typed and draws it again,
    unchanged, cursor and all. On a pipe, or a terminal that cannot move its
    cursor (TERM=dumb), lines are read whole and printed plainly."""

    QUEUE_LINES = 1000      # a pipe faster than the network waits here (backpressure)

    def __init__(self, interactive: bool, prompt: str = "", editing: bool = True):
        self.interactive = interactive
        self.editing = interactive and editing
        self.editor = LineEditor(prompt, self.columns)
        self.lines: queue.Queue = queue.Queue(self.QUEUE_LINES)     # lines, or keys when editing
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._saved_tty: Optional[list] = None     # the terminal's mode before raw mode (termios)
        self._entered: collections.deque = collections.deque()    # lines the editor gave, not yet taken
        self.started = False
        self.at_prompt = False      # (TERM=dumb) the cursor is after the prompt, where the user types

    @property
    def prompt(self) -> str:
        return self.editor.prompt

    @prompt.setter
    def prompt(self, prompt: str) -> None:
        with self._lock:
            if self.editing:
                self._write(self.editor.set_prompt(prompt))
            elif self.interactive:      # a terminal that cannot move its cursor: the prompt, plainly
                self.editor.prompt = prompt
                if self.started and not self.at_prompt:
                    self._write(prompt)
                    self.at_prompt = True

    def start(self) -> None:
        """Begin reading: raw keys on a terminal that can edit, else whole lines."""
        self.started = True
        if self.editing:
            self._raw_mode()
            self._write("\x1b[?2004h" + self.editor.draw())     # bracketed paste on, then the prompt
            if hasattr(signal, "SIGWINCH") and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGWINCH, lambda *_: self._wake(b"w"))
        elif self.interactive and self.editor.prompt:     # TERM=dumb: the prompt, plainly
            self._write(self.editor.prompt)
            self.at_prompt = True
        reader = self._keys if self.editing else self._piped_lines
        threading.Thread(target=self._read_forever, args=(reader(),), name="stdin", daemon=True).start()

    def _read_forever(self, source) -> None:
        for item in source:
            self.lines.put(item)
            if not self._wake(b"\0") or item is None:
                return

    def _wake(self, byte: bytes) -> bool:
        try:
            self.wake_w.send(byte)
        except BlockingIOError:
            pass            # full of wake-ups already
        except OSError:
            return False    # the console was closed
        return True

    def wake_on_signals(self) -> None:
        """A signal (Ctrl-C, a resize) also wakes whoever waits on wake_r: one
        landing just before select() blocks would otherwise wait for the next
        event to be seen. (Main thread only, as for any signal setting.)"""
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)

    def _raw_mode(self) -> None:
        """Keys one by one, not echoed; Ctrl-C still interrupts."""
        try:
            import termios
            fd = sys.stdin.fileno()
            self._saved_tty = termios.tcgetattr(fd)
            mode = termios.tcgetattr(fd)
            mode[0] &= ~(termios.IXON | termios.ICRNL)       # Ctrl-S/Q are keys; Enter arrives as \r
            mode[3] &= ~(termios.ICANON | termios.ECHO | termios.IEXTEN)
            mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
            termios.tcsetattr(fd, termios.TCSADRAIN, mode)
        except (ImportError, OSError):
            self._enable_windows_ansi()

    @staticmethod
    def _enable_windows_ansi() -> None:
        """Windows 10 and later draw ANSI escapes once the console is asked to."""
        if os.name == "nt":
            os.system("")

    @staticmethod
    def _keys():
        """Typed keys, as text, as they come (on Windows, as terminals send them)."""
        if os.name == "nt":
            yield from Console._windows_keys(__import__("msvcrt"))
            return
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                chunk = os.read(sys.stdin.fileno(), 4096)
            except OSError:
                chunk = b""
            if not chunk:
                yield None
                return
            yield decoder.decode(chunk)

    @staticmethod
    def _windows_keys(msvcrt):
        """msvcrt's keys, translated: arrows and the like come as a \\x00 or
        \\xe0 prefix and a code; Ctrl-Z then Enter is the end of input."""
        codes = {"H": "\x1b[A", "P": "\x1b[B", "M": "\x1b[C", "K": "\x1b[D", "G": "\x1b[H", "O": "\x1b[F",
                 "S": "\x1b[3~", "t": "\x1b[1;5C", "s": "\x1b[1;5D"}
        while True:
            key = msvcrt.getwch()
            if key in ("\x00", "\xe0"):
                yield codes.get(msvcrt.getwch(), "")
            elif key == "\x1a":     # Ctrl-Z
                yield None
                return
            elif key != "\x03":    # Ctrl-C reaches the main thread as KeyboardInterrupt by itself
                yield key

    @staticmethod
    def _piped_lines():
        # os.read, not sys.stdin: a daemon thread blocked inside sys.stdin's
        # buffered reader holds its lock, and Python aborts at exit over it.
        pending = b""
        while True:
            try:
                chunk = os.read(sys.stdin.fileno(), 65536)
            except OSError:
                chunk = b""
            if not chunk:
                if pending:
                    yield pending.decode("utf-8", "replace").rstrip("\r")
                yield None
                return
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                yield raw.decode("utf-8", "replace").rstrip("\r")

    def take_line(self) -> Tuple[bool, Optional[str]]:
        """(True, line) for the next line entered, (True, None) at end of
        input, (False, None) when nothing is waiting. Keys typed meanwhile
        are edited and drawn here, in the caller's thread."""
        try:
            woken = self.wake_r.recv(4096)
        except OSError:
            woken = b""
        if b"w" in woken and self.editor.drawn:     # the terminal was resized
            with self._lock:
                self._write(self.editor.resized())
        while not self._entered:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return False, None
            if not self.editing or item is None:
                self.at_prompt = False      # (Enter moved the cursor to a line of its own)
                return True, item
            with self._lock:
                lines, out = self.editor.feed(item)
                self._write(out)
            self._entered.extend(lines)
        return True, self._entered.popleft()

    def columns(self) -> int:
        """Where lines wrap: the terminal's width now (asked of the terminal, not
        $COLUMNS, which a resize does not change), or 0 (no wrapping) for a pipe."""
        if not self.interactive:
            return 0
        try:
            return os.get_terminal_size(sys.stdout.fileno()).columns or 80
        except (OSError, ValueError):
            return shutil.get_terminal_size().columns or 80

    def ask(self, question: str) -> None:
        """The next line is an answer not to be shown: the prompt asks, what is typed is drawn as nothing."""
        with self._lock:
            self.editor.secret = True
            self._write(self.editor.set_prompt(question))

    def asked(self) -> None:
        self.editor.secret = False

    def show(self, text: str) -> None:
        """Print `text` on its own lines, keeping the prompt and half-typed input
        intact (on a terminal that cannot move its cursor: below what is being
        typed, never glued to it, and the prompt again after it)."""
        with self._lock:
            if self.editing and self.editor.drawn:
                self._write(self.editor.print(text))
            elif self.interactive and not self.editing and self.started:
                self._write(("\n" if self.at_prompt else "") + text + "\n" + self.editor.prompt)
                self.at_prompt = True
            else:
                self._write(text + "\n")

    def bell(self) -> None:
        """Ring the terminal's bell (a backgrounded terminal or tmux window flags it)."""
        with self._lock:
            self._write("\x07")

    def _write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def restore(self) -> None:
        """Leave the terminal as we found it: no prompt or half-typed line left behind."""
        if self.editor.drawn:
            with self._lock:
                self._write(self.editor.erase() + "\x1b[?2004l")
        if self._saved_tty is not None:
            import termios
            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved_tty)
            except OSError:
                pass
            self._saved_tty = None


class LogLimiter(logging.Filter):
    """Log lines of one kind (one format string) pass in a burst of `burst`,
    then `rate` a second; the next line that passes says how many were held
    back. So a flood of refusals or bad frames cannot flood the log."""

    def __init__(self, burst: int = 20, rate: float = 1.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.rate, self.clock = burst, rate, clock
        self.kinds: Dict[str, list] = {}      # format string -> [tokens, when refilled, lines held back]

    def filter(self, record: logging.LogRecord) -> bool:
        now, kind = self.clock(), str(record.msg)
        bucket = self.kinds.get(kind)
        if bucket is None:
            if len(self.kinds) > 1000:      # format strings are few; this only bounds the table
                self.kinds.clear()
            bucket = self.kinds[kind] = [float(self.burst), now, 0]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            bucket[2] += 1
            return False
        bucket[0] = tokens - 1.0
        if bucket[2]:
            record.msg = f"{kind} ({plural(bucket[2], 'more line')} like this not logged)"
            bucket[2] = 0
        return True


class ConsoleLogHandler(logging.Handler):
    """Log lines go through the console, so they do not break a typed command."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.show(fit(self.format(record), self.console.columns(), len("2026-12-04 12:00:00 ")))
        except Exception:
            self.handleError(record)


def operator_commands(loop: ServerLoop, show: Callable[[str], None],
                      columns: Callable[[], int] = lambda: 0) -> CommandTable:
    """What the server's operator can type at its terminal: the operator's
    acts as a server operator's client has them (as "the operator"), and
    those only the console may: making server operators and accounts."""
    chat = loop.chat
    people, moderation = chat.people, chat.moderation

    def guarded(act: Callable) -> Callable:
        """An act whose refusal (no such account, room...) is shown, not raised."""
        def run(*words: str) -> None:
            try:
                act(*words)
            except ProtocolError as error:
                show(error.text)
        return run

    def who() -> None:
        for room in sorted(chat.rooms, key=lambda r: r.name.casefold()):
            if room.count():
                here = f"{len(room.members)} here, {len(room.remote)} elsewhere" if room.remote else str(room.count())
                show(f"#{room.name} ({here}): {', '.join(room.nicks())}")
        elsewhere = len(chat.relay.others())
        show(f"{plural(len(chat.users), 'user')} here" + (f", {elsewhere} on the other servers" if elsewhere else "")
             + f", {plural(len(chat.conns), 'connection')}")

    def say(text: str) -> None:
        chat.announce(text)
        show(f"said to {plural(len(chat.users), 'user')} here" + (" and everyone on the other servers"
                                                                  if chat.relay.others() else "") + f": {text}")

    def kick(nick: str, reason: str = "") -> None:
        show(f"kicked {nick}" if chat.kick(nick, reason) else f"nobody here is called {nick}")

    def ban(kind: str, nick: str, rest: str = "") -> None:
        duration, _, reason = rest.partition(" ")
        if parse_duration(duration) is None:
            duration, reason = "", rest
        moderation.ban(None, kind, check_name(nick), None, _duration(duration or None), _reason(reason))

    def topic(room: str, text: str = "") -> None:
        if text:
            text = "" if text == CLEAR_TOPIC else check_text(text, TOPIC_MAX).replace("\n", " ")
            moderation.set_topic(None, people.room(room), text)
        else:
            show(f"#{check_room(room)}: {people.topic(people.room(room))['text'] or '(no topic)'}")

    def help_list() -> None:
        for line in table.help_lines(columns()):
            show(line)

    table = CommandTable([
        Command("say", "TEXT", "send a notice to everyone", say),
        Command("who", "", "list rooms and who is in them", who),
        Command("kick", "NICK [REASON]", "disconnect someone, on whatever server they are", guarded(kick)),
        Command("ban", "NICK [DURATION] [REASON]", "ban someone from the server (30m, 2h, 1d; none: until lifted)",
                guarded(lambda nick, *rest: ban("ban", nick, " ".join(rest)))),
        Command("unban", "NICK", "lift a ban", guarded(lambda nick: moderation.lift(None, "ban", check_name(nick), None))),
        Command("mute", "NICK [DURATION] [REASON]", "they may read, not speak",
                guarded(lambda nick, *rest: ban("mute", nick, " ".join(rest)))),
        Command("unmute", "NICK", "lift a mute", guarded(lambda nick: moderation.lift(None, "mute", check_name(nick), None))),
        Command("bans", "", "the bans and mutes in force",
                lambda: show("in force:" + ("".join("\n" + _ban_text(ban) for ban in moderation.bans(None)) or " none"))),
        Command("topic", "ROOM [TEXT]", f"show a room's topic, or set it ({CLEAR_TOPIC} clears it)", guarded(topic)),
        Command("purge", "NICK", "take someone's lines out of the kept history",
                guarded(lambda nick: moderation.purge(None, check_name(nick), None))),
        Command("op", "NAME", "make an account a server operator", guarded(lambda name: show(people.set_server_op(name, True)))),
        Command("deop", "NAME", "take that back", guarded(lambda name: show(people.set_server_op(name, False)))),
        Command("register", "NAME", "make an account (its password is made up and shown)",
                guarded(lambda name: people.set_password(name, show, create=True))),
        Command("password", "NAME", "give an account a new password (made up and shown)",
                guarded(lambda name: people.set_password(name, show))),
        Command("shutdown", "", "say bye to everyone and stop the server", lambda: loop.stop("/shutdown")),
        Command("help", "", "show this list", help_list),
    ])
    return table


def attach_operator_console(loop: ServerLoop) -> Console:
    """When the server runs in a terminal, typed lines are operator commands."""
    console = Console(interactive=True, prompt="server> ")
    table = operator_commands(loop, lambda text: console.show(fit(text, console.columns())), console.columns)

    def on_line(line: Optional[str]) -> None:
        if line is None:    # Ctrl-D: the console closes, the server goes on
            console.restore()
            console.show("the operator console is closed; the server goes on (Ctrl-C stops it)")
            return
        line = line.strip()
        if line:
            console.show(f"server> {printable(line)}")     # what was typed stays above what it did
            if not line.startswith("/") and line.split()[0].lower() in table.commands:
                line = "/" + line       # "who" for "/who"
            try:
                if not line.startswith("/"):
                    raise ValueError("commands start with /: /say TEXT tells everyone, /help lists the rest")
                table.run(line)
            except ValueError as error:
                console.show(str(error))

    def pump() -> None:
        ok, line = console.take_line()
        while ok:
            on_line(line)
            ok, line = console.take_line()

    loop.watch(console.wake_r, selectors.EVENT_READ, lambda mask: pump())
    console.show("type /help for operator commands")
    console.start()
    return console


# ---------------------------------------------------------------------------
# 8. Client
# ---------------------------------------------------------------------------

class View(NamedTuple):
    """How to render: who I am, and what the terminal can show."""
    me: str = ""
    color: bool = False
    timestamps: bool = False
    rooms: bool = False         # tag lines with their room (when in more than one)
    width: int = 0              # columns to wrap at (0: no wrapping, e.g. output to a pipe)


class Shown(NamedTuple):
    """A frame as the user sees it: `head` (who said it, or what kind of
    line: "<bob>", "--", "***") then `text`, each with its colour."""
    head: str
    text: str
    head_code: str = ""
    text_code: str = ""


_NICK_COLORS = (31, 33, 34, 35, 36, 91, 93, 94, 95, 96)    # green is kept for your own lines


def paint(text: str, code: str, view: View) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if view.color and code and text else text


def nick_color(nick: str) -> str:
    """A nick's colour, from its skeleton: look-alikes get the same one."""
    return str(_NICK_COLORS[sum(map(ord, name_key(nick))) % len(_NICK_COLORS)])


def render(frame: dict, view: View) -> Optional[str]:
    """A frame from the server as the user sees it, or None for frames not
    shown. Everything that came over the network goes through printable().
    Rows after the first (the text's own lines, and with view.width, the
    rows it wraps to) are indented under the text, so no text can pass for
    a line of its own."""
    renderer = _RENDERERS.get(frame.get("type", ""))
    shown = renderer(frame, view) if renderer is not None else None
    if shown is None:
        return None
    prefix = ""
    ts = frame.get("ts")
    if view.timestamps and type(ts) in (int, float):
        prefix = local_time(ts, "%H:%M ")
    room = frame.get("room")
    if view.rooms and type(room) is str and frame.get("type") in ("msg", "join", "leave", "notice"):
        prefix += f"#{printable(room)} "
    indent = display_width(prefix + shown.head) + 1
    if view.width:      # a terminal too narrow for the indent gets a small one
        indent = min(indent, max(2, view.width - 20))
    rows = [row for part in shown.text.split("\n")
            for row in (wrap(part, view.width - indent) if view.width else [part])]
    rows = [paint(row, shown.text_code, view) for row in rows]
    first = paint(prefix, "2", view) + paint(shown.head, shown.head_code, view) + " " + rows[0]
    return "\n".join([first] + [" " * indent + row for row in rows[1:]])


_TOKENS = re.compile(r" +|[^ ]+")


def fit(text: str, columns: int, indent: int = 2) -> str:
    """Plain `text` wrapped between words to `columns` (0: as it is), the
    rows after each line's first indented by `indent` (so a row never looks
    like a line of its own)."""
    if not columns:
        return text
    indent = min(indent, max(2, columns - 20))
    rows = []
    for line in text.split("\n"):
        first, *rest = wrap(line, columns)
        rows.append(first)
        if rest:
            rows += [" " * indent + row for row in wrap(line[len(first):].lstrip(" "), columns - indent)]
    return "\n".join(rows)


def wrap(text: str, width: int) -> List[str]:
    """`text` (one line) cut into rows of at most `width` terminal columns:
    between words where it can (the spaces there are dropped), inside a word
    wider than a row. Wide (CJK, emoji) characters count two columns."""
    width = max(width, 1)
    if display_width(text) <= width:
        return [text]
    rows: List[str] = []
    row, used = "", 0
    for token in _TOKENS.findall(text):
        size = display_width(token)
        if used + size <= width:
            row, used = row + token, used + size
            continue
        if token[0] == " ":     # a break: the spaces go
            rows.append(row)
            row, used = "", 0
            continue
        if row:
            rows.append(row.rstrip(" "))
        row, used = "", 0
        for ch in token:        # what does not fit goes on in the next row
            size = display_width(ch)
            if used + size > width:
                rows.append(row)
                row, used = "", 0
            row, used = row + ch, used + size
    rows.append(row.rstrip(" "))
    return [row for row in rows if row] or [""]


def _field(frame: dict, key: str) -> str:
    value = frame.get(key)
    return printable(value if type(value) is str else "" if value is None else str(value))


def _render_msg(frame: dict, view: View) -> Shown:
    sender, text = _field(frame, "from"), _field(frame, "text")
    mine = name_key(sender) == name_key(view.me)
    color = "1;32" if mine else nick_color(sender)
    named = not mine and mentions(text, view.me)
    if frame.get("notice") is True:     # (an IRC NOTICE: told apart as IRC clients show one)
        return Shown(f"-{sender}-" if frame.get("to") is None else f"[notice from {sender}]", text, color)
    if frame.get("action"):
        return Shown(f"* {sender}" if view.color or not named else f"!* {sender}", text, color, "1" if named else color)
    if frame.get("to") is not None:
        if mine:
            return Shown(f"[pm to {_field(frame, 'to')}]", text, color)
        kept = " while you were away" if frame.get("kept") else ""
        return Shown(f"[pm from {sender}{kept}]", text, "1;" + color)
    if named:     # highlighted: bold, or marked where there is no colour
        return Shown(f"<{sender}>" if view.color else f"!<{sender}>", text, color, "1")
    return Shown(f"[{sender}]" if mine and not view.color else f"<{sender}>", text, color)


def mentions(text: str, nick: str) -> bool:
    """Whether `text` names `nick`, as a word, in any case."""
    return bool(nick) and re.search(rf"(?<!\w){re.escape(nick)}(?!\w)", text, re.IGNORECASE) is not None


def calls_for_attention(frame: dict, me: str) -> bool:
    """A line from someone else that names you, or a private message to you: worth the bell."""
    sender, text = frame.get("from"), frame.get("text")
    if frame.get("type") != "msg" or type(sender) is not str or type(text) is not str \
            or name_key(sender) == name_key(me):
        return False
    return frame.get("to") is not None or mentions(text, me)


def _leave_text(frame: dict) -> str:
    """'alice left', 'alice quit: dinner', 'alice left (ping timeout)': the reason as people say it."""
    nick, reason = _field(frame, "nick"), _field(frame, "reason")
    if reason == "parted" or not reason:
        said = f"{nick} left"
    elif reason == "quit" or reason.startswith("quit: "):
        said = f"{nick} quit" + reason[4:]
    else:
        said = f"{nick} left ({reason})"
    return said + _count(frame)


def local_time(ts: object, form: str) -> str:
    """A Unix time from the server as the local clock says it (strftime
    `form`); '?' for what is no time (a hostile server's 1e300 or NaN)."""
    if not _is_number(ts) or not 0 <= ts < 1e11:     # (NaN fails both)
        return "?"
    return time.strftime(form, time.localtime(ts))


def _dicts(value: object) -> List[dict]:
    """The objects in a list from the server (anything else in it, or no list: none)."""
    return [item for item in value if isinstance(item, dict)] if type(value) is list else []


def _event(text: str) -> Shown:
    return Shown("--", text, "33", "33")


def _count(frame: dict) -> str:
    n = frame.get("users")
    return f" ({n} here)" if type(n) is int else ""


_RENDERERS: Dict[str, Callable[[dict, View], Optional[Shown]]] = {
    "msg": _render_msg,
    "join": lambda f, v: _event(f"{_field(f, 'nick')} joined{_count(f)}"),
    "leave": lambda f, v: _event(_leave_text(f)),
    "nick": lambda f, v: _event(f"{_field(f, 'old')} is now known as {_field(f, 'new')}"),
    "notice": lambda f, v: Shown("***", (f"{_field(f, 'by')}: " if f.get("by") else "") + _field(f, "text"),
                                 "1;33", "1;33"),
    "error": lambda f, v: Shown("!!!", f"{_field(f, 'text')} ({_field(f, 'code')})", "1;31", "1;31"),
    "who": lambda f, v: _event(
        (f"in #{_field(f, 'room')}" if f.get("room") else "online") + f": {_names(f.get('users'), f.get('away'))}"),
    "rooms": lambda f, v: _event("rooms:" + "".join(
        f"\n#{_field(r, 'name')} ({_field(r, 'users')})" + (f": {_field(r, 'topic')}" if r.get("topic") else "")
        for r in _dicts(f.get("rooms")))),
    "parted": lambda f, v: _event(f"you left #{_field(f, 'room')}"
                                  + (f" ({_field(f, 'reason')})" if f.get("reason") else "")),
    "bye": lambda f, v: Shown("***", f"the server is going away: {_field(f, 'reason')}", "1;33", "1;33"),
    "topic": lambda f, v: _event(f"{_field(f, 'by')} cleared the topic of #{_field(f, 'room')}"
                                 if f.get("by") and not f.get("text") else
                                 f"the topic of #{_field(f, 'room')}: " + (_field(f, "text") or "(none)")
                                 + (f" (set by {_field(f, 'by')})" if f.get("by") else "")),
    "registered": lambda f, v: _event("your password is changed" if f.get("changed") else
                                      f"{_field(f, 'nick')} is registered" + ("; you are logged in to it, and it is"
                                      " yours: next time log in with its password" if f.get("mine") else "")),
    "whois": lambda f, v: _event(_whois_text(f)),
    "bans": lambda f, v: _event("in force:" + ("".join("\n" + _ban_text(b) for b in _dicts(f.get("bans")))
                                                or " none")),
    "op": lambda f, v: _event(f"you are {'now' if f.get('on') else 'no longer'} an operator of "
                              + (f"#{_field(f, 'room')}" if f.get("room") else "this server")),
    "mode": lambda f, v: _event(_mode_text(f)),
    "invited": lambda f, v: _event(f"{_field(f, 'by')} invites you to #{_field(f, 'room')}"
                                   f" (/join #{_field(f, 'room')})"),
}


def _mode_text(frame: dict) -> str:
    """A room's mode change as words where it has some (an operator made or unmade), else as IRC writes it."""
    by, room, modes = _field(frame, "by"), _field(frame, "room"), _field(frame, "modes")
    args = [printable(arg) for arg in frame.get("args") or [] if type(arg) is str] \
        if type(frame.get("args")) is list else []
    if modes in ("+o", "-o") and len(args) == 1:
        return f"{by} made {args[0]} an operator of #{room}" if modes == "+o" else \
            f"{by} took operator rights in #{room} from {args[0]}"
    return f"{by} set {' '.join([modes] + args)} on #{room}"


def _whois_text(frame: dict) -> str:
    nick = _field(frame, "nick")
    if not frame.get("online"):
        return f"{nick} is not online" + (" (a registered nick)" if frame.get("account") else "")
    account = _field(frame, "account")
    said = [f"{nick}: " + ((f"logged in as {account}" if name_key(account) != name_key(nick) else "an account")
                           if account else "a guest") + (", a server operator" if frame.get("op") else "")]
    if type(frame.get("rooms")) is list:
        rooms = [f"#{printable(r)}" for r in frame["rooms"] if type(r) is str]
        said.append("in " + ", ".join(rooms) if rooms else "in no room")
    if type(frame.get("idle")) in (int, float):
        said.append(f"idle {spoken_duration(_number(frame['idle'], 1, 1e10, 1))}")
    if type(frame.get("since")) in (int, float):
        said.append("here since " + local_time(frame["since"], "%Y-%m-%d %H:%M"))
    if frame.get("away"):
        said.append(f"away: {_field(frame, 'away')}")
    if frame.get("server"):
        said.append(f"on {_field(frame, 'server')}")
    return "; ".join(said)


def _ban_text(ban: dict) -> str:
    until = ban.get("until")
    when = local_time(until, "until %Y-%m-%d %H:%M") if type(until) in (int, float) else "until lifted"
    where = f" in #{_field(ban, 'room')}" if ban.get("room") else ""
    why = f": {_field(ban, 'reason')}" if ban.get("reason") else ""
    if ban.get("kind") == "mask":       # (IRC's +b)
        when = "(a mask, until the room empties)"
    return f"{_field(ban, 'nick')} {'muted' if ban.get('kind') == 'mute' else 'banned'}{where} {when} by {_field(ban, 'by')}{why}"


def _names(users: object, away: object = None) -> str:
    away = away if isinstance(away, dict) else {}
    names = [printable(u) + (f" (away: {printable(str(away[u]))})" if u in away else "")
             for u in users if type(u) is str] if type(users) is list else []
    return f"{', '.join(names)} ({len(names)})"


def _company(users: object, me: str) -> str:
    """'with alice, bob' or 'on your own', for the lines that greet you."""
    others = [nick for nick in map(valid_nick, users) if nick and name_key(nick) != name_key(me)] \
        if type(users) is list else []
    if not others:
        return "on your own so far"
    shown = ", ".join(others[:10])
    return f"with {shown}" + (f" and {len(others) - 10} more" if len(others) > 10 else "")


class ClientExit(Exception):
    """Ends the client with an exit code and a last line for the user."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code, self.message = code, message


class ConnectionLost(Exception):
    pass


# Errors after which reconnecting would not help (the server meant it).
_FINAL_ERRORS = {"kicked", "bad-frame", "frame-too-large", "auth-failed", "bad-nick", "tls-required",
                 "server-full", "replaced", "banned", "registered-only", "login-failed", "account-required"}
EXIT_OK, EXIT_LOST, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


class Link:
    """One connection to the server: a non-blocking socket (maybe TLS), a
    frame decoder and the bytes waiting to be sent."""

    def __init__(self, sock: socket.socket, where: str):
        self.sock, self.where = sock, where
        self.decoder = FrameDecoder(MAX_SERVER_PAYLOAD)
        self.out = bytearray()
        sock.setblocking(False)

    def send(self, frame: dict) -> None:
        self.out += encode(frame)

    def flush(self) -> None:
        try:
            while self.out:
                sent = self.sock.send(self.out)
                del self.out[:sent]
        except _WOULD_BLOCK:
            pass
        except OSError as error:
            raise ConnectionLost(f"connection lost ({error.strerror or error})") from None

    def receive(self) -> List[dict]:
        """Frames that have arrived; ConnectionLost when the server is gone."""
        while self._fill() and self.tls_pending():
            pass
        return self.frames()

    def frames(self) -> List[dict]:
        """Frames already received and buffered (e.g. behind the welcome)."""
        frames: List[dict] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def wait_frame(self, timeout: float) -> dict:
        """Block until the next frame (for the login exchange)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._next()
            if frame is not None:
                return frame
            self.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost("the server did not answer")
            readable, _, _ = wait_io([self.sock], [self.sock] if self.out else [], left)
            if readable or self.tls_pending():
                self._fill()

    def _fill(self) -> bool:
        """Feed what has arrived to the decoder; False if nothing had."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except _WOULD_BLOCK:
            return False
        except OSError as error:
            raise ConnectionLost(f"connection lost ({error.strerror or error})") from None
        if not data:
            raise ConnectionLost("connection lost (the server closed it)")
        self.decoder.feed(data)
        return True

    def _next(self) -> Optional[dict]:
        try:
            return self.decoder.next_frame()
        except ProtocolError as error:
            raise ConnectionLost(f"connection lost (the server sent a bad frame: {error.text})") from None

    def tls_pending(self) -> bool:
        """TLS may hold decrypted bytes that select() cannot see."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def wait_io(readers: list, writers: list, timeout: Optional[float]) -> tuple:
    """select() that takes a timeout of None (forever) or below zero (none)."""
    return select.select(readers, writers, [], None if timeout is None else max(0.0, timeout))


def connect(host: str, port: int, tls: Optional["TlsOptions"] = None, timeout: float = 10.0) -> Link:
    """A connected Link, or ClientExit with one line saying what went wrong."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise ClientExit(EXIT_LOST, f"cannot connect to {where}: connection refused"
                                    " - is the server running?") from None
    except socket.gaierror as error:
        raise ClientExit(EXIT_LOST, f"cannot connect to {where}: {error.strerror}") from None
    except socket.timeout:
        raise ClientExit(EXIT_LOST, f"cannot connect to {where}: timed out") from None
    except OSError as error:
        raise ClientExit(EXIT_LOST, f"cannot connect to {where}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    if tls is not None:
        sock = tls.wrap(sock, host, port, where)
    return Link(sock, where)


class TlsOptions(NamedTuple):
    """How the client trusts a server: a CA file, a pinned fingerprint, or
    trust on first use remembered in a known-hosts file (like SSH)."""
    cafile: Optional[str] = None
    fingerprint: Optional[str] = None
    known_hosts: str = ""
    ask: Optional[Callable[[str], bool]] = None     # asks the user to trust a new server

    def wrap(self, sock: socket.socket, host: str, port: int, where: str) -> ssl.SSLSocket:
        if self.cafile:
            context = ssl.create_default_context(cafile=self.cafile)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE    # we check the fingerprint ourselves below
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls_sock = context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as error:
            sock.close()
            raise ClientExit(EXIT_LOST, f"cannot connect to {where}: the certificate is not trusted"
                                        f" ({error.verify_message})") from None
        except (ssl.SSLError, OSError) as error:
            sock.close()
            raise ClientExit(EXIT_LOST, f"cannot connect to {where}: TLS handshake failed"
                                        f" ({getattr(error, 'reason', None) or error})"
                                        " - is the server using TLS (--tls-cert)?") from None
        if not self.cafile:
            der = tls_sock.getpeercert(binary_form=True)
            assert der is not None      # (None only before the handshake, which is done)
            try:
                self.check(fingerprint(der), f"{host}:{port}")
            except ClientExit:
                tls_sock.close()
                raise
        return tls_sock

    def check(self, seen: str, where: str) -> None:
        if self.fingerprint:
            if not hmac.compare_digest(seen, self.fingerprint):
                raise ClientExit(EXIT_LOST, f"REFUSING {where}: its certificate is {seen},"
                                            f" not the {self.fingerprint} you pinned")
            return
        known = read_known_hosts(self.known_hosts).get(where)
        if known == seen:
            return
        if known is not None:
            raise ClientExit(EXIT_LOST,
                             f"REFUSING {where}: ITS CERTIFICATE HAS CHANGED (now {seen}, was {known})."
                             f" Someone may be intercepting you. If the server really has a new"
                             f" certificate, delete its line from {self.known_hosts}")
        if self.ask is None:
            raise ClientExit(EXIT_LOST, f"not connecting to {where}: its certificate {seen} is not trusted"
                                        " (pin it with --fingerprint, or connect once from a terminal)")
        if not self.ask(f"The server at {where} presents a certificate never seen"
                        f" before:\n  {seen}\nTrust it and remember it? [y/N] "):
            raise ClientExit(EXIT_LOST, f"not connecting to {where}: you did not trust its certificate {seen}")
        remember_host(self.known_hosts, where, seen)


def default_known_hosts() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.environ.get("APPDATA") \
        or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "chat.py", "known_hosts")


def read_known_hosts(path: str) -> Dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            return dict(line.split()[:2] for line in f if len(line.split()) >= 2)
    except OSError:
        return {}


def remember_host(path: str, where: str, seen: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{where} {seen}\n")


class Note(NamedTuple):
    """A line from the client itself, for the user (not from the server)."""
    text: str
    code: str = "33"        # its colour


class Send(NamedTuple):
    """A frame for the server."""
    frame: dict


class Echo(NamedTuple):
    """Your own line, shown as you typed it (on a terminal: a pipe does not echo)."""
    frame: dict


class Past(NamedTuple):
    """A line said before you came (history), or a note around such lines:
    shown on a terminal, and in a pipe only if asked for."""
    event: Union[dict, Note]


class Retry(NamedTuple):
    """Logging in: connect and say hello again, after `after` seconds."""
    after: float
    note: str = ""


class Ask(NamedTuple):
    """Logging in: ask the user for the password (hidden: the server's, or
    with `account` the nick's account's), then say hello again."""
    prompt: str
    note: str = ""
    account: bool = False


class GiveUp(NamedTuple):
    """Logging in: the server will not have us; exit with `code`."""
    code: int
    message: str


class Session:
    """The client's side of the protocol, with no socket and no terminal
    (ChatClient keeps those): who we are, the rooms we are in and who is in
    them, where typed lines go, and where a resume starts.

    receive(frame) handles a frame from the server through the table
    `handlers`; the command methods turn what the user types into frames.
    Each returns what follows, in order: frames to show (dicts, rendered by
    render()), Past lines, Echoes, Notes and Sends. A `bye` sets `ended`.

    Commands take effect in the order typed: after /join the next lines go
    to the new room at once (the server handles a connection's frames in
    order, so they arrive after the join), and a refused join puts them back
    where they were; /part moves them to another room at once."""

    PROVISIONAL_KEPT = 1000     # provisional lines remembered, to know their numbered copies

    LOGIN_TRIES = 20            # hellos one login may take (taken nicks, waits)
    PASSWORD_ASKS = 3           # times the user is asked for a password

    def __init__(self, nick: str, password: Optional[str] = None, account_password: Optional[str] = None):
        self.nick, self.password, self.account_password = nick, password, account_password
        self.protocol = 0           # the server's (welcome says it)
        self.op = False             # a server operator
        self.account = False        # logged in to an account (the welcome and `registered` say)
        self.ignored: Dict[str, str] = {}   # nick key -> nick: nothing from them is shown
        self.devices: Dict[str, str] = {}   # account key -> the device token the server gave our login to it
        self.rooms_asked = False    # the rooms list was asked for, quietly (for Tab after /join)
        self.pending_password: Optional[str] = None     # an account password sent, taken when the server says so
        self.base_nick = nick       # what a taken nick's suffixes are added to
        self.tries = self.asks = 0  # in this login
        self.rooms: List[str] = []
        self.room: Optional[str] = LOBBY    # where typed lines go; None: in no room
        self.members: Dict[str, Dict[str, str]] = {}    # room key -> {nick key: nick}, for completion
        self.known_rooms: List[str] = []    # from the last `rooms` list
        self.joining: List[Tuple[str, Optional[str]]] = []     # (room asked for, room before), in order
        self.seen: Dict[str, int] = {}      # room -> seq of the newest line seen there: where a resume starts
        self.sent: Dict[str, int] = {}      # room -> own lines sent since `seen` last moved on
        self.provisional: Dict[tuple, None] = {}    # lines shown before they were numbered (`local`), by _said()
        self.instance: Optional[str] = None     # the server's, and our session there, from the welcome
        self.session: Optional[str] = None
        self.max_text = TEXT_MAX
        self.ping_interval, self.idle_timeout = ServerConfig.ping_interval, ServerConfig.idle_timeout
        self.last_error = ""
        self.last_pm_from: Optional[str] = None     # for /reply
        self.ended = False                  # the server said bye
        self.handlers: Dict[str, Callable[[dict], list]] = {
            "msg": self.on_msg, "joined": self.on_joined, "parted": self.on_parted, "nick": self.on_nick,
            "join": self.on_join, "leave": self.on_leave, "who": self.on_who, "rooms": self.on_rooms,
            "error": self.on_error, "bye": self.on_bye, "ping": self.on_ping, "pong": lambda frame: [],
            "op": self.on_op, "registered": self.on_registered,
        }

    # -- logging in ----------------------------------------------------------

    def hello(self) -> dict:
        frame = {"type": "hello", "nick": self.nick, "protocol": PROTOCOL}
        if self.password is not None:
            frame["password"] = self.password
        if self.account_password is not None:
            frame["account_password"] = self.account_password
        if name_key(self.nick) in self.devices:     # our past logins' device: strangers' guesses do not lock us out
            frame["device"] = self.devices[name_key(self.nick)]
        if self.session:    # resuming: same nick, same rooms, what was missed
            frame.update(session=self.session, instance=self.instance, rooms=self.rooms, since=self.seen)
        return frame

    def welcome(self, frame: dict, reconnected: bool) -> Tuple[bool, list, Dict[str, int]]:
        """Take a welcome: (whether it resumed our session, the history to
        show, how many lines said in each room while we were away are gone:
        the server's count, less the lines we said ourselves). Every field
        is checked: a name that is not one, a number out of range or of the
        wrong type is not taken (a hostile server gets no further)."""
        instance = _token(frame.get("instance"))
        resumed = reconnected and instance is not None and instance == self.instance
        self.nick = valid_nick(frame.get("nick")) or self.nick
        rooms = frame.get("rooms")
        self.rooms = list(dict.fromkeys(filter(None, map(valid_room, rooms[:ServerConfig.rooms_per_user]))))\
            if type(rooms) is list else []
        self.rooms = self.rooms or [LOBBY]
        if self.room not in self.rooms:
            self.room = valid_room(frame.get("room")) or (self.rooms[0] if self.rooms else None)
        self.instance, self.session = instance, _token(frame.get("session"))
        self.protocol = _number(frame.get("protocol"), 1, 1000, 1, int)
        self.op = frame.get("op") is True
        self.account = type(frame.get("account")) is str
        self._took_device(frame)
        self.joining.clear()
        self.members = {}
        self._add_members(frame.get("room"), frame.get("users"))
        history, back = _lines(frame.get("history")), frame.get("back") is True    # back: where our account left
        missed = frame["missed"] if (resumed or back) and isinstance(frame.get("missed"), dict) else {}
        missed = {valid_room(room): count for room, count in missed.items() if valid_room(room) and _count_of(count)}
        if resumed:     # your own lines were shown as you typed them, and the ones not kept were seen
            for room in list(missed):
                mine_kept = sum(1 for line in history if line.get("room") == room and self._mine(line.get("from")))
                missed[room] -= max(0, self.sent.get(room, 0) - mine_kept)
            history = [line for line in history if not self._mine(line.get("from")) and not self._shown_early(line)]
            missed = {room: count for room, count in missed.items() if count > 0}
        else:
            self.seen, self.provisional = {}, {}
        self.sent = {}
        seqs = frame.get("seq")
        for room, seq in seqs.items() if isinstance(seqs, dict) else ():
            self._saw(valid_room(room), seq)
        self.max_text = _number(frame.get("max_text"), 1, TEXT_MAX, TEXT_MAX, int)
        self.ping_interval = _number(frame.get("ping_interval"), 1.0, 3600.0, ServerConfig.ping_interval)
        self.idle_timeout = _number(frame.get("idle_timeout"), self.ping_interval + 1.0, 4 * 3600.0,
                                    max(ServerConfig.idle_timeout, 2.5 * self.ping_interval))
        return resumed, self._history(history, resumed or back), missed

    def refused(self, frame: dict, where: str, can_ask: bool) -> Union[Retry, Ask, GiveUp]:
        """A login's answer that is not a welcome: Retry, Ask or GiveUp. A
        taken nick tries NICK_2, NICK_3...; a password the server wants is
        asked for (where `can_ask`: a terminal, not while reconnecting), a
        wrong one asked for again; a try told to wait (`rate-limited`) waits
        `retry_after` and goes again."""
        self.tries += 1
        code = printable(frame["code"][:40]) if type(frame.get("code")) is str else ""
        text = printable(str(frame.get("text", frame.get("reason", "")))[:300])
        if frame.get("type") == "bye":
            return GiveUp(EXIT_LOST, f"{where}: the server is going away: {text}")
        if self.tries >= self.LOGIN_TRIES:
            return GiveUp(EXIT_REFUSED, f"{where} refused: {text} ({code}); gave up after {self.tries} tries")
        if code == "nick-taken":
            taken, self.nick = self.nick, f"{self.base_nick[:NAME_MAX - 3]}_{self.tries + 1}"
            return Retry(0.0, f"the nick {taken} is taken; trying {self.nick}")
        if code == "auth-failed" and can_ask and self.asks < self.PASSWORD_ASKS:
            self.asks += 1
            return Ask(f"password for {where}: ", "wrong password" if self.password is not None else "")
        if code in ("account-required", "login-failed") and can_ask and self.asks < self.PASSWORD_ASKS:
            self.asks += 1
            return Ask(f"password of the account {self.nick}: ", text if code == "login-failed" else "",
                       account=True)
        if code == "rate-limited":
            wait = _number(frame.get("retry_after"), 1, 600, 5)
            return Retry(wait, f"{text}; trying again in {plural(math.ceil(wait), 'second')}")
        return GiveUp(EXIT_REFUSED, f"{where} refused: {text} ({code})")

    def logged_in(self) -> None:
        """A welcome came: the next login starts afresh (from the nick we have now)."""
        self.base_nick, self.tries, self.asks = self.nick, 0, 0

    # -- frames from the server ----------------------------------------------

    def receive(self, frame: dict) -> list:
        if frame["type"] != "error":
            self.last_error = ""        # only an error the connection ends on is the reason it ended
        handler = self.handlers.get(frame["type"])
        return handler(frame) if handler is not None else [frame]

    def on_msg(self, frame: dict) -> list:
        self._saw(valid_room(frame.get("room")), frame.get("seq"))
        if type(frame.get("from")) is str and name_key(frame["from"]) in self.ignored:
            return []
        said = _plain_said(frame)
        if frame.get("local") is True and said is not None:
            self.provisional[said] = None
            if len(self.provisional) > self.PROVISIONAL_KEPT:
                del self.provisional[next(iter(self.provisional))]
        elif self._shown_early(frame):
            return []
        if frame.get("to") is not None and not self._mine(frame.get("from")):
            self.last_pm_from = valid_nick(frame.get("from")) or self.last_pm_from
        return [frame]

    def on_joined(self, frame: dict) -> list:
        room = valid_room(frame.get("room"))
        if room is None:
            return []
        self._joined(room)
        if room not in self.rooms:
            self.rooms.append(room)
        self.members[name_key(room)] = {}
        self._add_members(room, frame.get("users"))
        self._saw(room, frame.get("seq"))
        here = "; your lines go here now" if self.room == room else ""
        company = _company(frame.get("users"), self.nick)
        company = "" if company == "on your own so far" else f" {company}"     # (the server says you are alone)
        topic = [{"type": "topic", "room": room, "text": frame["topic"]}] if frame.get("topic") else []
        return self._history(_lines(frame.get("history")), False) + [
            Note(f"you are in #{room}{company}{here}")] + topic

    def on_parted(self, frame: dict) -> list:
        room = valid_room(frame.get("room"))
        if room is None:
            return []
        if room in self.rooms:
            self.rooms.remove(room)
        self.members.pop(name_key(room), None)
        if self.room == room:       # (a part this client did not ask for)
            self.room = self.rooms[0] if self.rooms else None
        where = f"now talking in #{self.room}" if self.room else "you are in no room now; /join one"
        reason = frame.get("reason")
        why = f" ({printable(reason[:REASON_MAX + NAME_MAX + 20])})" if type(reason) is str and reason else ""
        return [Note(f"you left #{room}{why}; {where}")]

    def on_nick(self, frame: dict) -> list:
        old, new = valid_nick(frame.get("old")), valid_nick(frame.get("new"))
        if old is not None and new is not None:
            if old == self.nick:
                self.nick = new
            for members in self.members.values():
                if members.pop(name_key(old), None) is not None:
                    members[name_key(new)] = new
            if name_key(old) in self.ignored:       # a new nick is no way round an ignore
                self.ignored[name_key(new)] = new
                return [Note(f"{old} is now {new}: ignoring {new} too")]
        return [frame]

    def on_join(self, frame: dict) -> list:
        self._add_members(frame.get("room", LOBBY), [frame.get("nick")])
        return [frame]

    def on_leave(self, frame: dict) -> list:
        members, nick = self.members.get(name_key(str(frame.get("room", LOBBY)))), frame.get("nick")
        if members is not None and type(nick) is str:
            members.pop(name_key(nick), None)
        return [frame]

    def on_who(self, frame: dict) -> list:
        room = valid_room(frame.get("room"))
        if room is not None:
            self.members[name_key(room)] = {}
            self._add_members(room, frame.get("users"))
        return [frame]

    def on_rooms(self, frame: dict) -> list:
        rooms = frame.get("rooms")
        self.known_rooms = [name for name in (valid_room(r.get("name")) for r in rooms if isinstance(r, dict)) if name]\
            if type(rooms) is list else []
        if self.rooms_asked:        # asked for at welcome, for Tab: not shown
            self.rooms_asked = False
            return []
        return [frame]

    def register(self, password: str) -> list:
        self.pending_password = password
        return [Send({"type": "register", "password": password})]

    def change_password(self, old: str, new: str) -> list:
        self.pending_password = new
        return [Send({"type": "password", "old": old, "new": new})]

    def on_registered(self, frame: dict) -> list:
        if frame.get("mine") is True:
            self.account = True
            self._took_device(frame)
            if self.pending_password is not None:       # what to log in with from now on
                self.account_password, self.pending_password = self.pending_password, None
        return [frame]

    def on_op(self, frame: dict) -> list:
        room = valid_room(frame.get("room"))
        if room is not None:
            return [] if room in self.rooms else [frame]    # (a room we are in shows its mode change)
        if frame.get("room") is None:     # the whole server's
            self.op = frame.get("on") is True
        return [frame]

    def on_error(self, frame: dict) -> list:
        code = frame.get("code")
        self.last_error = code if type(code) is str else ""
        if self.last_error in ("login-failed", "bad-field"):
            self.pending_password = None
        failed_join = frame.get("of") == "join" or self.last_error in ("bad-room", "too-many-rooms")   # (older servers)
        if failed_join and self.joining:    # our oldest /join failed
            room, before = self.joining.pop(0)
            if self.room == room:
                self.room = before
            return [frame, Note(f"you did not join #{room}; your lines go to "
                                + (f"#{self.room}" if self.room else "no room") + " again")]
        return [frame]

    def on_bye(self, frame: dict) -> list:
        self.ended = True
        return [frame]

    def on_ping(self, frame: dict) -> list:
        return [Send({"type": "pong"})]

    # -- what the user types -------------------------------------------------

    def say(self, text: str, kind: str = "msg") -> list:
        """Typed text for the current room; long text is split to fit the server's limit."""
        if self.room is None:
            return [Note("you are in no room, so nothing was sent; /join one", "31")]
        out: list = []
        for start in range(0, len(text), self.max_text):
            part = text[start:start + self.max_text]
            self.sent[self.room] = self.sent.get(self.room, 0) + 1
            out.append(Send({"type": kind, "text": part, "room": self.room}))
            out.append(Echo({"type": "msg", "from": self.nick, "action": kind == "me", "text": part,
                             "room": self.room}))
        return out

    def message(self, nick: str, text: str) -> list:
        """A private message. A server of protocol 3 sends it back once it took
        it, and that copy is the one shown (so a refused one never looks sent);
        an older server's is shown as typed."""
        sent = Send({"type": "pm", "to": nick, "text": text})
        if self._mine(nick) or self.protocol >= 3:
            return [sent]
        return [sent, Echo({"type": "msg", "from": self.nick, "to": nick, "text": text})]

    # -- accounts, moderation, presence --------------------------------------

    def moderate(self, kind: str, nick: str, rest: str = "") -> list:
        """/kick /ban /mute /unban /unmute /purge: on the whole server for a
        server operator, in the current room for a room's operator."""
        frame: dict = {"type": kind, "nick": nick}
        if kind in ("ban", "mute"):
            duration, _, reason = rest.partition(" ")
            if parse_duration(duration) is None:
                duration, reason = "", rest
            if duration:
                frame["duration"] = duration
            rest = reason
        if rest.strip() and kind in ("kick", "ban", "mute"):
            frame["reason"] = rest.strip()
        if not self.op:
            if self.room is None:
                return [Note("you are in no room; /join one first", "31")]
            frame["room"] = self.room
        return [Send(frame)]

    def topic(self, text: str = "") -> list:
        if self.room is None:
            return [Note("you are in no room; /join one first", "31")]
        if text == CLEAR_TOPIC:     # (the server clears it for an empty text)
            return [Send({"type": "topic", "room": self.room, "text": ""})]
        return [Send({"type": "topic", "room": self.room, **({"text": text} if text else {})})]

    def ignore(self, nick: str) -> list:
        name = valid_nick(nick)
        if name is None:
            return [Note(f"{printable(nick)} is not a nick", "31")]
        self.ignored[name_key(name)] = name
        return [Note(f"ignoring {name}: nothing from them is shown (/unignore {name} to stop)")]

    def unignore(self, nick: str) -> list:
        if self.ignored.pop(name_key(nick), None) is None:
            return [Note(f"you are not ignoring {printable(nick)}", "31")]
        return [Note(f"no longer ignoring {printable(nick)}")]

    def reply(self, text: str) -> list:
        if self.last_pm_from is None:
            return [Note("nobody has sent you a private message yet", "31")]
        return self.message(self.last_pm_from, text)

    def rename(self, new: str) -> list:
        if new == self.nick:
            return [Note(f"you are {self.nick} already")]
        return [Send({"type": "nick", "nick": new})]

    def join(self, room: str) -> list:
        room = room.lstrip("#")
        if self._ours(room):
            return self.switch(room)
        self.joining.append((room, self.room))
        self.room = room
        return [Send({"type": "join", "room": room})]

    def part(self, room: str = "") -> list:
        room = room.lstrip("#") or self.room or ""
        match = self._ours(room)
        if not match:
            return [Note(f"you are not in #{room}", "31")]
        if self.room == match:      # your next lines go to another room at once
            others = [r for r in self._ours_all() if r != match]
            self.room = others[0] if others else None
        return [Send({"type": "part", "room": match})]

    def switch(self, room: str) -> list:
        room = room.lstrip("#")
        match = self._ours(room)
        if not match:
            return [Note(f"you are not in #{room}; /join #{room} first", "31")]
        self.room = match
        return [Note(f"now talking in #{self.room}")]

    def _ours_all(self) -> List[str]:
        """The rooms we are in, or have asked to join (the server will have us there first)."""
        return self.rooms + [room for room, _ in self.joining if self._ours_in(room, self.rooms) is None]

    def _ours(self, room: str) -> Optional[str]:
        return self._ours_in(room, self._ours_all())

    @staticmethod
    def _ours_in(room: str, rooms: List[str]) -> Optional[str]:
        return next((r for r in rooms if name_key(r) == name_key(room)), None)

    def who(self) -> list:
        return [Send({"type": "who", "room": self.room} if self.room else {"type": "who"})]

    def completions(self, line: str, point: int, commands: Iterable[str]) -> Tuple[List[str], int]:
        """What Tab may complete at `point`: (candidates, where the word starts).
        Commands first on the line, rooms after /join, /part and /switch, nicks
        of the current room elsewhere (`nick: ` at the start of a line)."""
        start = len(line[:point]) - len(line[:point].split(" ")[-1])
        word, before = line[start:point].casefold(), line[:start].split()
        if not before and word.startswith("/"):
            options = [f"/{name} " for name in commands]
        elif before and before[0] in ("/join", "/part", "/switch") and len(before) == 1:
            word = word.lstrip("#")
            options = [f"#{room} " for room in dict.fromkeys(self.rooms + self.known_rooms)]
            return sorted(o for o in options if o[1:].casefold().startswith(word)), start
        else:
            nicks = self.members.get(name_key(self.room), {}).values() if self.room else ()
            end = ": " if not before and not line[point:].strip() else " "
            options = [f"{nick}{end}" for nick in nicks if not self._mine(nick)]
        return sorted(o for o in options if o.casefold().startswith(word)), start

    # -- keeping track -------------------------------------------------------

    def _saw(self, room: Optional[str], seq: object) -> None:
        """Remember the newest line seen in `room` (a valid name): where a resume starts."""
        if room is not None and type(seq) is int and 0 <= seq < 1 << 53 and seq >= self.seen.get(room, seq):
            if seq > self.seen.get(room, -1):
                self.sent.pop(room, None)   # what we said before this line was before it too
            self.seen[room] = seq

    def _joined(self, room: str) -> None:
        """A `joined` answers our oldest pending /join (or one the server made for us)."""
        for index, (asked, _) in enumerate(self.joining):
            if name_key(asked) == name_key(room):
                del self.joining[index]
                if self.room == asked:
                    self.room = room    # as the server spells it
                break

    def _add_members(self, room: object, nicks: object) -> None:
        """Names that pass the nick rules only: nothing else can be completed (or drawn) from the list."""
        room = valid_room(room)
        members = self.members.setdefault(name_key(room), {}) if room is not None else None
        if members is not None and type(nicks) is list:
            members.update((name_key(nick), nick) for nick in filter(None, map(valid_nick, nicks[:100000])))

    def _took_device(self, frame: dict) -> None:
        device = _token(frame.get("device"))
        if self.account and device is not None:
            self.devices[name_key(self.nick)] = device

    def _mine(self, nick: object) -> bool:
        return type(nick) is str and name_key(nick) == name_key(self.nick)

    def _shown_early(self, line: dict) -> bool:
        """A numbered line that was shown before, provisionally (see `local`
        in the protocol): the same room, sender, time and text."""
        said = _plain_said(line) if self.provisional and "seq" in line else None
        if said not in self.provisional:
            return False
        del self.provisional[said]
        return True

    def _history(self, lines: List[dict], missed: bool) -> list:
        for line in lines:
            self._saw(valid_room(line.get("room")), line.get("seq"))
        if not lines:
            return []
        if missed:      # what was said while we were away is news
            label = plural(len(lines), "line you missed", "lines you missed")
            return [Note(f"--- {label} ---", "2"), *lines, Note("--- now ---", "2")]
        return [Past(Note(f"--- {plural(len(lines), 'earlier line')} ---", "2")), *map(Past, lines),
                Past(Note("--- now ---", "2"))]


def valid_nick(value: object) -> Optional[str]:
    """A nick from the server, if it passes the nick rules (so it is safe to
    draw, compare and complete); None if it does not."""
    try:
        return check_name(value) if type(value) is str else None
    except ProtocolError:
        return None


def valid_room(value: object) -> Optional[str]:
    """A room name from the server (or typed), if it passes the rules; else None."""
    try:
        return check_room(value) if type(value) is str else None
    except ProtocolError:
        return None


def _token(value: object) -> Optional[str]:
    """An opaque string the server hands out (instance, session), if it is a sane one."""
    return value if type(value) is str and 0 < len(value) <= 200 and value.isprintable() else None


def _number(value: object, low: float, high: float, default: float, kind: type = float):
    """A number from the server within [low, high] (clamped); `default` if it is not a finite number."""
    if not _is_number(value) or value != value or value in (float("inf"), float("-inf")):
        return kind(default)
    return kind(min(max(value, low), high))


def _count_of(value: object) -> bool:
    return type(value) is int and 0 < value < 1 << 53


def _plain_said(line: dict) -> Optional[tuple]:
    """_said() of a line from the server, if its fields are plain values."""
    said = _said(line.get("room"), line)
    return said if all(type(value) in (str, int, float) for value in said) else None


def _lines(history: object) -> List[dict]:
    return [line for line in history if isinstance(line, dict)] if type(history) is list else []


class ChatClient:
    """The client program: logs in, then one select() loop over the server
    and the keyboard; reconnects when the connection is lost. What the
    protocol means is the Session's business; this keeps the socket, the
    terminal and the outbox."""

    OUTBOX_LINES = 100      # lines kept while disconnected
    RECONNECT_CAP = 30.0    # seconds between attempts, at most
    BELL_QUIET = 2.0        # seconds after a bell before the next may ring

    def __init__(self, args: argparse.Namespace, console: Console, view: View):
        self.args, self.console, self.view = args, console, view
        self.json = args.json
        self.bell = console.interactive and not args.no_bell
        self.rang = -1e9        # when the bell last rang
        self.session = Session(args.nick or default_nick(), args.password, args.account_password)
        self.link: Optional[Link] = None
        self.welcomed = False
        self.last_heard = self.pinged = 0.0
        self.outbox: List[dict] = []       # frames waiting for a connection
        self.quitting = False
        session = self.session
        self.commands = CommandTable([
            Command("help", "", "show this list", self.cmd_help),
            Command("who", "", "who is in the current room", lambda: self.perform(session.who())),
            Command("me", "TEXT", "an action: /me waves shows '* you waves'",
                    lambda text: self.perform(session.say(text, "me"))),
            Command("msg", "NICK TEXT", "a private message to one person",
                    lambda nick, text: self.perform(session.message(nick, text))),
            Command("reply", "TEXT", "answer the last private message", lambda text: self.perform(session.reply(text))),
            Command("r", "TEXT", "short for /reply", lambda text: self.perform(session.reply(text))),
            Command("nick", "NEW", "change your nick", lambda new: self.perform(session.rename(new))),
            Command("join", "ROOM", "join a room (creating it) and talk there",
                    lambda room: self.perform(session.join(room))),
            Command("part", "[ROOM]", "leave a room (this one if none is named)",
                    lambda room="": self.perform(session.part(room))),
            Command("switch", "ROOM", "talk in another room you are in",
                    lambda room: self.perform(session.switch(room))),
            Command("rooms", "", "list the rooms", lambda: self.send({"type": "rooms"})),
            Command("topic", "[TEXT]", f"show the room's topic, or set it (its operators; {CLEAR_TOPIC} clears it)",
                    lambda text="": self.perform(session.topic(text))),
            Command("away", "[TEXT]", "say you are away (no text: you are back)",
                    lambda text="": self.send({"type": "away", **({"text": text} if text else {})})),
            Command("whois", "NICK", "who someone is: account, rooms, idle, away",
                    lambda nick: self.send({"type": "whois", "nick": nick})),
            Command("ignore", "NICK", "show nothing from someone, under any new nick (kept on this machine, for this server)", self.cmd_ignore),
            Command("unignore", "NICK", "show them again", lambda nick: self.cmd_ignore(nick, False)),
            Command("ignores", "", "who you ignore", self.cmd_ignores),
            Command("register", "[PASSWORD]", "register your nick (asked twice, hidden, if not given)",
                    self.cmd_register),
            Command("password", "[OLD NEW]", "change your account's password (asked, hidden, if not given)",
                    self.cmd_password),
            Command("kick", "NICK [REASON]", "operators: put someone out (of the room, for a room's operator)",
                    lambda nick, reason="": self.perform(session.moderate("kick", nick, reason))),
            Command("ban", "NICK [DURATION] [REASON]", "operators: ban someone (30m, 2h, 1d; none: until lifted)",
                    lambda nick, *rest: self.perform(session.moderate("ban", nick, " ".join(rest)))),
            Command("unban", "NICK", "operators: lift a ban", lambda nick: self.perform(session.moderate("unban", nick))),
            Command("mute", "NICK [DURATION] [REASON]", "operators: they may read, not speak",
                    lambda nick, *rest: self.perform(session.moderate("mute", nick, " ".join(rest)))),
            Command("unmute", "NICK", "operators: lift a mute",
                    lambda nick: self.perform(session.moderate("unmute", nick))),
            Command("bans", "", "operators: the bans and mutes in force",
                    lambda: self.send({"type": "bans"} if session.op else {"type": "bans", "room": session.room})),
            Command("op", "NICK", "server operators: make an account an operator of this room",
                    lambda nick: self.send({"type": "op", "nick": nick, "room": session.room})),
            Command("deop", "NICK", "server operators: take it back",
                    lambda nick: self.send({"type": "deop", "nick": nick, "room": session.room})),
            Command("purge", "NICK", "operators: take someone's lines out of the kept history",
                    lambda nick: self.perform(session.moderate("purge", nick))),
            Command("quit", "[REASON]", "leave the chat", self.cmd_quit),
        ])
        self.asking: List[Callable[[str], None]] = []   # what the next lines typed answer (hidden prompts)
        folder, server = os.path.dirname(args.known_hosts or default_known_hosts()), f"{args.host}:{args.port}".lower()
        self.ignores = ServerFile(os.path.join(folder, "ignores"), server)     # an ignore list is one server's
        self.devices = ServerFile(os.path.join(folder, "devices"), server, private=True)
        session.ignored, session.devices = read_ignores(self.ignores), read_devices(self.devices)
        self.kept_devices = dict(session.devices)
        console.editor.complete = lambda line, point: session.completions(line, point, self.commands.commands)

    # -- output --------------------------------------------------------------

    def perform(self, events: list) -> None:
        """Do what the session says follows: show, note, send."""
        for event in events:
            if isinstance(event, Send):
                self.send(event.frame)
            elif isinstance(event, Note):
                self.note(event.text, event.code)
            elif isinstance(event, Echo):
                if self.console.interactive:
                    self.show_frame(event.frame, waiting=not (self.link is not None and self.welcomed))
            elif isinstance(event, Past):
                if self.console.interactive or self.args.replay:
                    self.perform([event.event])
            else:
                self.show_frame(event)
        self.set_prompt()

    def show(self, text: str) -> None:
        self.console.show(text)

    def note(self, text: str, code: str = "33") -> None:
        """A line from the client itself (to stderr when output is a pipe or JSON)."""
        if self.json:
            return
        if self.console.interactive:
            self.show(paint(fit(text, self.console.columns()), code, self.view))
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def show_frame(self, frame: dict, waiting: bool = False) -> None:
        """A frame as a line on the screen (or stdout). A line that names you, or
        a private message to you, rings the bell; a line of yours typed while
        the connection is down says it waits to be sent."""
        frame.setdefault("ts", time.time())
        session = self.session
        view = self.view._replace(me=session.nick, rooms=len(session.rooms) > 1 or bool(session.joining),
                                  width=self.console.columns())
        line = render(frame, view)
        if line is None:
            return
        if waiting:
            line += paint(" (waiting to be sent)", "2", view)
        if not self.console.interactive and frame.get("type") not in ("msg", "join", "leave", "nick"):
            sys.stderr.write(line + "\n")      # a pipe's stdout has only what people say and do
            sys.stderr.flush()
            return
        self.show(line)
        if self.bell and calls_for_attention(frame, session.nick):
            self.ring()

    def ring(self) -> None:
        """The bell, at most once every BELL_QUIET seconds: a burst of mentions is one ring."""
        now = time.monotonic()
        if now - self.rang >= self.BELL_QUIET:
            self.rang = now
            self.console.bell()

    def set_prompt(self) -> None:
        if self.console.interactive and not self.asking:     # (a hidden question keeps its own prompt)
            room = f"#{self.session.room}" if self.session.room else "(no room)"
            self.console.prompt = paint(f"{room}>", "1;32", self.view) + " "

    # -- sending -------------------------------------------------------------

    def send(self, frame: dict) -> None:
        if self.link is not None and self.welcomed:
            self.link.send(frame)
        elif len(self.outbox) < self.OUTBOX_LINES:
            self.outbox.append(frame)
        else:
            self.note(f"not sent: {self.OUTBOX_LINES} lines are already waiting for the connection", "31")

    def handle_input(self, line: str) -> None:
        if self.json:
            self.send_json_line(line)
            return
        for part in line.split("\n"):     # a paste of several lines: one message each
            if not part.strip():
                continue
            if part.startswith("//"):
                self.perform(self.session.say(part[1:]))
            elif part.startswith("/"):
                try:
                    self.commands.run(part)
                except ValueError as error:
                    self.note(str(error), "31")
            else:
                self.perform(self.session.say(part))

    def send_json_line(self, line: str) -> None:
        """Bot mode: a JSON object is sent as a frame, anything else as a msg."""
        try:
            frame = json.loads(line)
        except ValueError:
            frame = None
        if not (isinstance(frame, dict) and type(frame.get("type")) is str):
            if not line.strip():
                return
            frame = {"type": "msg", "text": line}
        if frame["type"] == "quit":
            self.quitting = True
        self.send(frame)

    # -- commands ------------------------------------------------------------

    def cmd_help(self) -> None:
        for line in self.commands.help_lines(self.console.columns()) + ["//text sends a line that starts with /",
                                                                        "Tab completes nicks, commands and rooms"]:
            self.note(line, "0")

    def ask_hidden(self, question: str, then: Callable[[str], None]) -> None:
        """Ask on the terminal, the answer not shown (nor kept in the history); then(answer)."""
        self.asking.append(then)
        self.console.ask(paint(question, "1;33", self.view))

    def cmd_register(self, password: str = "") -> None:
        if self.session.account:
            self.note("you are logged in to your account already: /password changes its password", "31")
        elif password:
            self.perform(self.session.register(password))
        elif not self.console.editing:
            self.note("usage: /register PASSWORD (on a terminal you are asked for it, hidden)", "31")
        else:
            self.ask_new_password("a password for your nick: ", lambda new: self.perform(self.session.register(new)))

    def cmd_password(self, old: str = "", new: str = "") -> None:
        if old and new:
            self.perform(self.session.change_password(old, new))
        elif not self.console.editing:
            self.note("usage: /password OLD NEW (on a terminal you are asked, hidden)", "31")
        else:
            self.ask_hidden("your password now: ", lambda old: self.ask_new_password(
                "the new one: ", lambda new: self.perform(self.session.change_password(old, new))))

    def ask_new_password(self, prompt: str, then: Callable[[str], None]) -> None:
        """Ask for a new password twice, hidden; `then` it if both agree."""
        def again(first: str) -> None:
            self.ask_hidden("the same password again: ", lambda second: then(first) if second == first
                            else self.note("the two passwords differ: nothing was changed", "31"))
        self.ask_hidden(prompt, again)

    def keep_devices(self) -> None:
        """The device tokens the server gave us, in the devices file, when they changed."""
        if self.session.devices != self.kept_devices:
            self.kept_devices = dict(self.session.devices)
            self.devices.write(f"{key} {token}" for key, token in sorted(self.kept_devices.items()))

    def cmd_ignore(self, nick: str, on: bool = True) -> None:
        self.perform(self.session.ignore(nick) if on else self.session.unignore(nick))
        write_ignores(self.ignores, self.session.ignored)

    def cmd_ignores(self) -> None:
        ignored = sorted(self.session.ignored.values(), key=str.casefold)
        self.note("ignoring: " + (", ".join(ignored) if ignored else "nobody"), "0")

    def cmd_quit(self, reason: str = "") -> None:
        if self.link is not None and self.welcomed:
            self.link.send({"type": "quit", "reason": reason} if reason else {"type": "quit"})
        self.quitting = True

    # -- frames from the server ----------------------------------------------

    def handle_frame(self, frame: dict) -> None:
        ignoring = len(self.session.ignored)
        events = self.session.receive(frame)
        if len(self.session.ignored) != ignoring:      # someone ignored took a new nick: kept too
            write_ignores(self.ignores, self.session.ignored)
        self.keep_devices()
        if self.json:       # a bot sees every frame as it came; the session only answers pings
            self.show(_dumps(frame))
            events = [event for event in events if isinstance(event, Send)]
        self.perform(events)
        if self.session.ended:
            raise ClientExit(EXIT_OK)

    def on_welcome(self, frame: dict, reconnected: bool) -> None:
        assert self.link is not None    # (login() took the welcome on it)
        session = self.session
        resumed, history, missed = session.welcome(frame, reconnected)
        self.keep_devices()
        self.welcomed = True
        self.set_prompt()
        if self.json:
            self.show(_dumps(frame))
            return
        if reconnected:
            self.note(f"=== RECONNECTED TO {self.link.where} ===", "1;32")
            if not resumed:
                self.note("the server restarted: lines said while you were away are gone", "33")
        else:
            self.note(f"=== CONNECTED TO SERVER AT {self.link.where} ===", "1;32")
            if type(frame.get("motd")) is str:
                self.note(printable(frame["motd"][:MOTD_MAX]), "0")
        self.perform(history)
        for room, count in missed.items():
            self.note(f"{plural(count, 'line')} said in #{room} while you were away can no longer be replayed", "33")
        if not reconnected:
            others = _company(frame.get("users"), session.nick)
            where = ", ".join(f"#{room}" for room in session.rooms) if frame.get("back") else f"#{session.room}"
            self.note(f"you are {session.nick} in {where}" + ("" if others == "on your own so far" else f" {others}")
                      + (" (logged in to your account)" if frame.get("account") else "") + "."
                      + (" Type /help for commands." if self.console.interactive else ""), "0")
            topics = frame["topics"] if isinstance(frame.get("topics"), dict) else {}
            for room in session.rooms:
                if type(topics.get(room)) is str:
                    self.show_frame({"type": "topic", "room": room, "text": topics[room]})
            if self.console.interactive:        # the rooms there are, for Tab after /join (not shown)
                session.rooms_asked = True
                self.link.send({"type": "rooms"})

    # -- connecting ----------------------------------------------------------

    def login(self, reconnecting: bool = False) -> None:
        """Connect and exchange hello/welcome; what to do when refused is the
        Session's rule (see Session.refused): try another nick, ask for the
        password, wait and try again, or give up."""
        session = self.session
        while True:
            link = connect(self.args.host, self.args.port, self.args.tls_options)
            link.send(session.hello())
            try:
                frame = link.wait_frame(10.0)
            except ConnectionLost as error:
                link.close()
                raise ClientExit(EXIT_LOST, f"{link.where}: {error}") from None
            if frame["type"] == "welcome":
                self.link, self.last_heard = link, time.monotonic()
                session.logged_in()
                self.on_welcome(frame, reconnecting)
                return
            link.close()
            step = session.refused(frame, link.where, self.console.interactive and not reconnecting)
            if isinstance(step, GiveUp):
                raise ClientExit(step.code, step.message)
            if step.note:
                self.note(step.note, "31" if isinstance(step, Ask) else "33")
            if isinstance(step, Ask) and step.account:
                session.account_password = ask_user(step.prompt, True, self.console.wake_r)
            elif isinstance(step, Ask):
                session.password = ask_user(step.prompt, True, self.console.wake_r)
            elif step.after:
                self.pause(step.after)

    def pause(self, seconds: float) -> None:
        """Wait before trying again (typed lines, once the console runs, are taken meanwhile)."""
        if self.console.started:
            self.wait_input(seconds)
        else:
            time.sleep(seconds)     # nothing else to do yet: the user waits to be let in

    def flush_outbox(self) -> None:
        assert self.link is not None    # (converse() runs connected)
        waiting, self.outbox = self.outbox, []
        for frame in waiting:
            self.link.send(frame)
        if waiting:
            self.note(f"(sent {plural(len(waiting), 'line')} kept while disconnected)")

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        try:
            self.login()
        except ClientExit as exit_:
            self.note(exit_.message, "31")
            return exit_.code
        self.console.start()
        while True:
            try:
                self.converse()
            except ClientExit as exit_:
                if exit_.message:
                    self.note(exit_.message, "31" if exit_.code else "0")
                return exit_.code
            except ConnectionLost as lost:
                assert self.link is not None    # (it is what was lost)
                self.link.close()
                self.link, self.welcomed = None, False
                final = self.session.last_error in _FINAL_ERRORS
                if final:
                    return EXIT_REFUSED     # (the server's error, already shown, says why)
                if self.args.reconnect <= 0:
                    self.note(str(lost), "31")
                    return EXIT_LOST
                if not self.reconnect(str(lost)):
                    return EXIT_LOST if not self.quitting else EXIT_OK

    def converse(self) -> None:
        """Relay between keyboard and server until the connection ends."""
        self.flush_outbox()
        link = self.link
        assert link is not None     # (login() or reconnect() connected)
        for frame in link.frames():     # what arrived together with the welcome
            self.handle_frame(frame)
        while True:
            link.flush()
            if self.quitting and not link.out:
                self.finish_quit()
            now = time.monotonic()
            silent = now - self.last_heard
            if silent >= self.session.idle_timeout:
                raise ConnectionLost(f"connection lost (nothing from the server for {silent:.0f}s)")
            if silent >= self.session.ping_interval and self.pinged < self.last_heard:
                link.send({"type": "ping"})
                self.pinged = now
                continue
            timeout = self.session.idle_timeout if self.pinged >= self.last_heard else self.session.ping_interval
            wait = timeout - silent
            # Take typed lines only while the server keeps up (a pipe waits in the Console queue).
            readers = [link.sock] + ([self.console.wake_r] if len(link.out) < RECV_SIZE else [])
            readable, _, _ = wait_io(readers, [link.sock] if link.out else [], wait)
            if self.console.wake_r in readable:
                self.take_input()
            if link.sock in readable or link.tls_pending():
                frames = link.receive()
                self.last_heard = time.monotonic()
                for frame in frames:
                    self.handle_frame(frame)

    def take_input(self) -> None:
        """Handle every line typed (or piped) so far."""
        while not self.quitting:
            ok, line = self.console.take_line()
            if not ok:
                return
            if line is None:    # Ctrl-D, or the end of piped input
                self.cmd_quit()
                return
            if self.asking:     # the answer to a hidden question
                self.console.asked()
                self.asking.pop(0)(line)
                self.set_prompt()
                continue
            self.handle_input(line)

    def finish_quit(self) -> None:
        """Everything is sent: wait briefly for the server to close (so errors
        about our last lines are shown), then leave."""
        link = self.link
        assert link is not None     # (converse() runs connected)
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                readable, _, _ = wait_io([link.sock], [], deadline - time.monotonic())
                if readable:
                    for frame in link.receive():
                        if frame["type"] != "bye":
                            self.handle_frame(frame)
        except ConnectionLost:
            pass
        raise ClientExit(EXIT_OK)

    def reconnect(self, why: str) -> bool:
        """Try again with exponential backoff and jitter, for up to
        --reconnect seconds. Typed lines are kept meanwhile."""
        give_up = time.monotonic() + self.args.reconnect
        delay = 1.0
        wait = random.uniform(0.5, 1.0)
        self.note(f"{why}; reconnecting (Ctrl-C or /quit to give up)", "31")
        while True:     # one line per attempt
            if not self.wait_input(wait):
                return False
            try:
                self.login(reconnecting=True)
                return True
            except ClientExit as exit_:
                if exit_.code == EXIT_REFUSED and self.session.last_error != "server-full":
                    self.note(exit_.message, "31")
                    return False
                delay *= 2
                wait = min(delay, self.RECONNECT_CAP, give_up - time.monotonic()) * random.uniform(0.5, 1.0)
                if wait <= 0:
                    self.note(f"{exit_.message}; gave up reconnecting after {self.args.reconnect:g}s", "31")
                    return False
                self.note(f"{exit_.message}; trying again in {max(1.0, wait):.0f}s", "31")

    def wait_input(self, seconds: float) -> bool:
        """Handle typed lines for `seconds`; False if the user quit meanwhile.
        (Piped input waits in its pipe once the outbox is full.)"""
        deadline = time.monotonic() + seconds
        while not self.quitting:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            taking = self.console.interactive or len(self.outbox) < self.OUTBOX_LINES
            readable, _, _ = wait_io([self.console.wake_r] if taking else [], [], left)
            if readable:
                self.take_input()
        return False


class ServerFile:
    """A small file of the client's, beside known_hosts, that keeps a list
    for each server: lines 'HOST:PORT VALUE'. Reading gives this server's
    values; writing replaces them and leaves the other servers' be."""

    def __init__(self, path: str, server: str, private: bool = False):
        self.path, self.server = path, server
        self.private = private      # only its owner may read it (it holds secrets)

    def _lines(self) -> List[Tuple[str, str]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return [(where, value) for where, _, value in (line.strip().partition(" ") for line in f) if value]
        except (OSError, UnicodeDecodeError):
            return []       # unreadable or missing: none

    def read(self) -> List[str]:
        return [value for where, value in self._lines() if where == self.server]

    def write(self, values: Iterable[str]) -> None:
        lines = [line for line in self._lines() if line[0] != self.server] + [(self.server, v) for v in values]
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if self.private else 0o644)
            with open(fd, "w", encoding="utf-8") as f:
                f.writelines(f"{where} {value}\n" for where, value in lines)
            os.replace(self.path + ".tmp", self.path)
        except OSError as error:
            sys.stderr.write(f"cannot write {self.path}: {_why(error)}\n")


def read_ignores(file: ServerFile) -> Dict[str, str]:
    """The nicks ignored on the file's server, by key."""
    nicks = [valid_nick(nick) for nick in file.read()]
    return {name_key(nick): nick for nick in nicks if nick}


def write_ignores(file: ServerFile, ignored: Dict[str, str]) -> None:
    file.write(sorted(ignored.values(), key=str.casefold))


def read_devices(file: ServerFile) -> Dict[str, str]:
    """The device tokens the file's server gave our logins: account key -> token."""
    pairs = (value.split(" ", 1) for value in file.read())
    return {key: token for key, token in (p for p in pairs if len(p) == 2) if _token(key) and _token(token)}


def default_nick() -> str:
    """The login name, made into a valid nick (or 'guest')."""
    try:
        name = getpass.getuser()
    except Exception:
        name = ""
    name = "".join(ch for ch in name if ch in "_-." or unicodedata.category(ch) in _NAME_CATEGORIES)
    return name[:NAME_MAX] or "guest"


def ask_user(question: str, secret: bool = False, wake: Optional[socket.socket] = None) -> str:
    """An answer typed at the terminal (not echoed if `secret`), before the
    console starts; Ctrl-C or Ctrl-D cancels (ClientExit).

    Read here with select(), not by input(): a Ctrl-C landing between
    input()'s prompt and its read() was lost, and the question waited
    forever. `wake` (the console's, which signals write to) ends the wait,
    and the signal's KeyboardInterrupt is raised then."""
    if os.name == "nt" or wake is None:     # (no select() on a Windows console)
        try:
            return getpass.getpass(question) if secret else input(question)
        except (KeyboardInterrupt, EOFError):
            sys.stdout.write("\n")
            raise ClientExit(EXIT_LOST, "cancelled") from None
    import termios
    fd, line = sys.stdin.fileno(), b""
    saved = termios.tcgetattr(fd)
    try:
        if secret:
            hidden = termios.tcgetattr(fd)
            hidden[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSAFLUSH, hidden)
        sys.stdout.write(question)
        sys.stdout.flush()
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([fd, wake], [], [])
            if wake in ready:
                wake.recv(4096)     # (a signal: its handler runs before the next line)
            if fd in ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise EOFError
                line += chunk
    except (KeyboardInterrupt, EOFError):
        raise ClientExit(EXIT_LOST, "cancelled") from None
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
        if secret or not line.endswith(b"\n"):
            sys.stdout.write("\n")     # (the Enter typed was not echoed)
            sys.stdout.flush()
    return line.decode("utf-8", "replace").rstrip("\r\n")


def run_client(args: argparse.Namespace) -> int:
    try:
        args.password = read_password(args.password_file)
        args.account_password = read_password(args.account_password_file, "CHAT_ACCOUNT_PASSWORD")
        if args.cafile:
            _readable(args.cafile, "the CA file")
    except StartupError as error:
        print(error, file=sys.stderr)
        return EXIT_LOST
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.json
    dumb = os.environ.get("TERM") == "dumb"     # cannot move its cursor: plain lines, no colour
    color = interactive and not os.environ.get("NO_COLOR") and not dumb
    console = Console(interactive, editing=not dumb)
    console.wake_on_signals()
    ask = (lambda question: ask_user(question, False, console.wake_r).strip().lower() in ("y", "yes")) \
        if interactive else None
    args.tls_options = TlsOptions(args.cafile, args.fingerprint, args.known_hosts or default_known_hosts(),
                                  ask) if args.tls else None
    client = ChatClient(args, console, View(color=color, timestamps=interactive))
    try:
        return client.run()
    except KeyboardInterrupt:       # Ctrl-C: leave politely
        if client.link is not None and client.welcomed:
            client.link.send({"type": "quit"})
            try:
                client.link.sock.setblocking(True)
                client.link.sock.settimeout(1.0)
                client.link.sock.sendall(client.link.out)
            except OSError:
                pass
        return EXIT_OK
    finally:
        if client.link is not None:
            client.link.close()
        console.restore()


# ---------------------------------------------------------------------------
# 9. Benchmark: `python3 chat.py bench`, a load test an operator can run
# ---------------------------------------------------------------------------

BENCH_MARKER = b"BENCH:"
BENCH_PROBES = 4            # clients that decode every frame to time it; the rest just count


class BenchClient:
    """One of the bench's clients: a Link, and what it counted."""
    __slots__ = ("link", "carry", "got", "sent", "probe")

    def __init__(self, link: Link, probe: bool):
        self.link, self.carry, self.got, self.sent, self.probe = link, b"", 0, 0, probe


def run_bench(args: argparse.Namespace) -> int:
    """Connect `clients`, let `senders` of them send `messages` lines each,
    count every line at every other client and time them at a few probes.
    Lines carry 'BENCH:<send time ns>:' like ../shared/bench/loadgen's, so
    either tool can drive the same server."""
    server = None
    if args.host is None and args.port is None:
        server, (host, port) = _start_bench_server(args.clients + 16)
    else:
        host, port = args.host or DEFAULT_HOST, args.port or DEFAULT_PORT
    try:
        return _bench(host, port, args)
    except ClientExit as exit_:
        print(f"bench: {exit_.message}", file=sys.stderr)
        return exit_.code
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait()


def _start_bench_server(max_connections: int):
    command = [sys.executable, os.path.abspath(__file__), "server", "-p", "0", "-m", str(max_connections)]
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None    # (stdout=PIPE)
    for line in server.stdout:
        match = re.search(r"listening on \[?([^\]\s]+?)\]?:(\d+)", line)
        if match:
            threading.Thread(target=server.stdout.read, daemon=True).start()   # keep draining it
            print(f"bench: started a server on {match[1]}:{match[2]}", file=sys.stderr)
            return server, (match[1], int(match[2]))
    raise SystemExit("bench: the server did not start")


def _bench(host: str, port: int, args: argparse.Namespace) -> int:
    clients = []
    tag = secrets.token_hex(3)
    for i in range(args.clients):
        link = connect(host, port)
        link.send({"type": "hello", "nick": f"bench{tag}-{i}"})
        link.flush()
        clients.append(BenchClient(link, probe=i >= args.clients - BENCH_PROBES))
        if len(clients) % 8 == 0 or i == args.clients - 1:    # in waves: a server lets one address
            for client in clients[(len(clients) - 1) // 8 * 8:]:   # have only a few waiting to join
                frame = client.link.wait_frame(10.0)
                if frame["type"] != "welcome":
                    raise ClientExit(EXIT_REFUSED, f"refused: {printable(str(frame.get('text')))}")
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.link.sock, selectors.EVENT_READ, client)
    _bench_pump(selector, clients, quiet_for=0.3, latencies=None)     # let join notices settle
    for client in clients:
        client.got = 0
    senders = clients[:min(args.senders, len(clients))]
    expected = len(senders) * args.messages * (len(clients) - 1)
    latencies: List[float] = []
    print(f"bench: {len(clients)} clients, {len(senders)} senders x {args.messages} lines of"
          f" {args.bytes} bytes{f' at {args.rate:g}/s' if args.rate else ''}", file=sys.stderr)
    started = time.monotonic()
    last_delivery = _bench_pump(selector, clients, quiet_for=args.timeout, latencies=latencies,
                                senders=senders, args=args, expected=expected, started=started)
    delivered = sum(client.got for client in clients)
    elapsed = max(last_delivery - started, 1e-9)
    latencies.sort()

    def pct(p: float) -> str:
        return f"{latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3:.1f}" if latencies else "-"
    print(f"deliveries={delivered} expected={expected} lost={expected - delivered}"
          f" elapsed_s={elapsed:.3f} deliveries_per_s={delivered / elapsed:.0f}"
          f" p50_ms={pct(0.5)} p99_ms={pct(0.99)} p999_ms={pct(0.999)}"
          f" max_ms={latencies[-1] * 1e3 if latencies else 0:.1f}")
    for client in clients:
        client.link.close()
    return EXIT_OK if delivered >= expected else EXIT_LOST


def _bench_pump(selector: selectors.BaseSelector, clients: List[BenchClient], quiet_for: float,
                latencies: Optional[List[float]], senders: Sequence[BenchClient] = (),
                args: Optional[argparse.Namespace] = None, expected: int = 0, started: float = 0.0) -> float:
    """Send and receive until everything expected arrived or nothing arrives
    for `quiet_for` seconds; returns when the last delivery came."""
    last = time.monotonic()
    next_report = last + 1.0
    writing: set = set()
    total = len(senders) * (args.messages if args else 0)
    queued = 0
    while True:
        now = time.monotonic()
        if senders:
            assert args is not None     # (senders come with the args that say what they send)
            due = total if not args.rate else min(total, int(args.rate * (now - started)) + 1)
            while queued < due:
                sender = senders[queued % len(senders)]
                if len(sender.link.out) > 65536 and not args.rate:
                    break
                text = f"BENCH:{time.monotonic_ns():019d}:{queued % len(senders)}:{sender.sent}:"
                sender.link.send({"type": "msg", "text": text.ljust(args.bytes, "x")})
                sender.sent += 1
                queued += 1
            for sender in senders:
                if sender.link.out and sender not in writing:
                    selector.modify(sender.link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sender)
                    writing.add(sender)
        delivered = sum(client.got for client in clients) if expected else 0
        if expected and delivered >= expected:
            return last
        if now - last > quiet_for:
            return last
        if now >= next_report and expected:
            print(f"  {now - started:5.1f}s {delivered:>10,} of {expected:,} delivered", file=sys.stderr)
            next_report = now + 1.0
        for key, mask in selector.select(0.05 if queued < total else 0.2):
            client = key.data
            if mask & selectors.EVENT_WRITE:
                client.link.flush()
                if not client.link.out:
                    selector.modify(client.link.sock, selectors.EVENT_READ, client)
                    writing.discard(client)
            if mask & selectors.EVENT_READ:
                last = time.monotonic()
                if client.probe and latencies is not None:
                    _bench_probe(client, latencies)
                else:   # counting markers in C is what lets one Python process keep up
                    data = client.link.sock.recv(RECV_SIZE)
                    if not data:
                        raise ClientExit(EXIT_LOST, "the server closed a connection")
                    seen = client.carry + data
                    client.got += seen.count(BENCH_MARKER)
                    client.carry = seen[-(len(BENCH_MARKER) - 1):]


def _bench_probe(client: BenchClient, latencies: List[float]) -> None:
    now = time.monotonic_ns()
    for frame in client.link.receive():
        text = frame.get("text")
        if frame["type"] == "msg" and type(text) is str and text.startswith("BENCH:"):
            client.got += 1
            latencies.append((now - int(text[6:25])) / 1e9)


# ---------------------------------------------------------------------------
# 10. Certificates and the command line
# ---------------------------------------------------------------------------

class StartupError(Exception):
    """A setting that cannot work, found before listening or connecting:
    one line for the user, naming the file or host and what went wrong."""


def gencert_command(cert: str, key: str, name: str, days: int) -> List[str]:
    return ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", cert, "-days", str(days), "-subj", f"/CN={name}",
            "-addext", f"subjectAltName=DNS:{name},DNS:localhost,IP:127.0.0.1,IP:::1"]


def run_gencert(args: argparse.Namespace) -> int:
    """Write a self-signed certificate and key with openssl."""
    command = gencert_command(args.cert, args.key, args.name, args.days)
    if shutil.which("openssl") is None:
        print("openssl is not installed here; on a machine that has it, run:\n  "
              + " ".join(command), file=sys.stderr)
        return 1
    for path in (args.cert, args.key):
        if os.path.exists(path) and not args.force:
            print(f"{path} exists; not overwriting it (use --force)", file=sys.stderr)
            return 1
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"openssl failed:\n{result.stderr}", file=sys.stderr)
        return 1
    os.chmod(args.key, 0o600)
    print(f"wrote {args.cert} and {args.key} (valid {args.days} days; keep {args.key} private)\n"
          f"fingerprint: {' or '.join(fingerprint_forms(certificate_fingerprint(args.cert)))}\n"
          f"start:  python3 chat.py server --tls-cert {args.cert} --tls-key {args.key}\n"
          f"join:   python3 chat.py client --tls")
    return 0


MOTD_MAX = 4096     # characters of --motd shown


def read_motd(path: Optional[str]) -> str:
    """The message of the day, cleaned like any text (an operator's file may hold anything)."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return clean_text(f.read(MOTD_MAX + 1))[:MOTD_MAX].strip("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise StartupError(f"cannot read the message of the day {path}: {_why(error)}") from None


def read_password(path: Optional[str], variable: str = "CHAT_PASSWORD") -> Optional[str]:
    """The first line of `path`, else the environment's `variable`, else None."""
    if not path:
        return os.environ.get(variable)
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise StartupError(f"cannot read the password file {path}: {_why(error)}") from None
    if not password:
        raise StartupError(f"the password file {path} is empty: its first line is the password")
    return password


def _why(error: Exception) -> str:
    """What went wrong, in words: an OSError's strerror, not its repr."""
    if isinstance(error, socket.gaierror):
        return "no such host (the name does not resolve)" if error.errno in (
            socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)) else str(error.strerror)
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8 text"
    return getattr(error, "strerror", None) or str(error)


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as error:
        raise StartupError(f"cannot read {what} {path}: {_why(error)}") from None


def check_server(config: ServerConfig) -> None:
    """Every file and the host, checked before listening and before writing
    anything; StartupError says what is wrong."""
    if config.tls_cert:
        _readable(config.tls_cert, "the TLS certificate")
        if config.tls_key:      # (None: the key is in the certificate file, as load_cert_chain takes it)
            _readable(config.tls_key, "the TLS key")
        try:
            server_tls_context(config.tls_cert, config.tls_key)
        except (ssl.SSLError, OSError) as error:
            hint = (" (the certificate file holds no private key: name it with --tls-key)"
                    if config.tls_key == config.tls_cert else "")
            raise StartupError(f"cannot use the TLS certificate {config.tls_cert} with the key"
                               f" {config.tls_key}: {_why(error)}{hint}") from None
    if config.history_file:
        HistoryFile(config.history_file, config.history_file_max).check()
    if config.db:
        Database(config.db, config.db_history, config.history).check()
    try:
        socket.getaddrinfo(config.host or None, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as error:
        raise StartupError(f"cannot listen on {config.host}: {_why(error)}") from None


def run_server(args: argparse.Namespace) -> int:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    worker = f"[worker {args.worker}] " if args.worker is not None else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {worker}%(message)s", datefmt=LOG_TIME)
    log.addFilter(LogLimiter())
    try:
        config = ServerConfig(**{field: getattr(args, field) for field in SERVER_OPTIONS},
                              ops=tuple(args.ops), motd=read_motd(args.motd),
                              password=read_password(args.password_file),
                              tls_key=args.tls_key or args.tls_cert,
                              supervisor=os.getppid() if args.worker is not None else None)
        check_server(config)
    except (StartupError, ValueError) as error:
        log.error("%s", error)
        return 1
    if args.workers > 1:
        return run_workers(args)
    _raise_file_limit(config.max_connections + 64)
    try:
        loop = ServerLoop(config)
    except OSError as error:
        option = error.option if isinstance(error, CannotListen) else "-p"
        port = config.irc_port if option == "--irc-port" and config.irc_port is not None else config.port
        log.error("%s", cannot_listen(config.host, port, error, option))
        return 1
    loop.catch_signals()
    host, port = loop.address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    started = (f"chat.py server listening on {where} (up to {config.max_connections} connections, "
               f"{'TLS' if config.tls_cert else 'plaintext'}{', password' if config.password is not None else ''}"
               f"{f', linked through {RedisUrl.parse(config.redis)}' if config.redis else ''})")
    _announce(started)
    if not (config.db or config.redis):
        log.info("accounts, bans, mutes, topics and kept messages live in memory until this server stops%s;"
                 " --db FILE keeps them", " (--history-file keeps the history)" if config.history_file else
                 " (and so does the history)")
    if loop.irc_address is not None:
        _announce(f"IRC only on port {loop.irc_address[1]}" + (" (TLS)" if config.tls_cert else ""))
    if config.tls_cert:
        _announce("TLS certificate fingerprint: " + " or ".join(fingerprint_forms(
            certificate_fingerprint(config.tls_cert))))
    if sys.stdin.isatty() and sys.stdout.isatty():
        console = attach_operator_console(loop)
        if sys.stderr.isatty():     # the log shares the terminal: print it above the typed line
            handler = ConsoleLogHandler(console)
            handler.setFormatter(logging.Formatter(f"%(asctime)s {worker}%(message)s", LOG_TIME))
            logging.getLogger().handlers = [handler]
        try:
            loop.serve_forever()
        finally:
            console.restore()
    else:
        loop.serve_forever()
    return 0


LOG_TIME = "%Y-%m-%d %H:%M:%S"


def _announce(line: str) -> None:
    """A line everyone starting a server needs (where it listens, its
    fingerprint): on stdout whatever the log level, and in the log too
    unless that shows on the same terminal."""
    print(line, flush=True)
    if not _same_terminal():
        log.info("%s", line)


def _same_terminal() -> bool:
    """stdout and stderr show on one terminal (so a line printed on one need not be logged on the other)."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty() and os.ttyname(1) == os.ttyname(2)
    except (OSError, AttributeError):     # no ttyname (Windows): both are terminals, most likely one
        return sys.stdout.isatty() and sys.stderr.isatty()


class CannotListen(OSError):
    """A port the server cannot bind, and the option that chose it."""

    def __init__(self, code: Optional[int], text: Optional[str], option: str) -> None:   # (as OSError has them)
        super().__init__(code, text)
        self.option = option


def cannot_listen(host: str, port: int, error: OSError, option: str = "-p") -> str:
    """One line for an operator whose server cannot bind, with what to do."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is in use (another server, or a connection that"
                f" closed within the last minute); choose another with {option}")
    if error.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: no network interface here has that address"
    return f"cannot listen on {where}: {_why(error)}"


def run_workers(args: argparse.Namespace) -> int:
    """Start N copies of this server on one port (SO_REUSEPORT: the kernel
    spreads connections over them), linked through Redis; start again one
    that dies (after a wait that doubles while they keep dying); stop them
    together."""
    if not sys.platform.startswith("linux"):
        log.error("--workers needs Linux (only there does SO_REUSEPORT spread connections)")
        return 1
    family, _, _, _, address = socket.getaddrinfo(args.host or None, args.port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    holder = socket.socket(family, socket.SOCK_STREAM)     # bound, never listening: reserves the port
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind(address)
    except OSError as error:
        log.error("%s", cannot_listen(args.host, args.port, error))
        return 1
    port = holder.getsockname()[1]
    command = [sys.executable, os.path.abspath(__file__)] + args.argv + ["-p", str(port), "--workers", "1",
                                                                      "--reuse-port"]
    print(f"chat.py server: {args.workers} workers on {args.host}:{port}, linked through"
          f" {RedisUrl.parse(args.redis)}", flush=True)
    code = Supervisor(command, args.workers).run()
    holder.close()
    return code


class Supervisor:
    """The --workers processes: each started, watched, and started again if it dies."""

    STEADY = 60.0       # seconds a worker must live for its restart wait to start again from 1 s

    def __init__(self, command: List[str], count: int):
        self.command, self.count = command, count
        self.workers: Dict[int, Tuple[int, subprocess.Popen, float]] = {}   # pid -> (number, process, started)
        self.backoff = [1.0] * count
        self.stopping = False

    def run(self) -> int:
        for number in range(self.count):
            self.start(number)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        code = 0
        while self.workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.workers:
                continue
            number, process, started = self.workers.pop(pid)
            process.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
                else -(status & 0x7f) if status & 0x7f else status >> 8
            code = max(code, process.returncode)
            if not self.stopping:
                self.restart(number, process.returncode, time.monotonic() - started)
        return 0 if self.stopping and code <= 0 else code

    def start(self, number: int) -> None:
        process = subprocess.Popen(self.command + ["--worker", str(number)], stdin=subprocess.DEVNULL)
        self.workers[process.pid] = (number, process, time.monotonic())

    def restart(self, number: int, code: int, lived: float) -> None:
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if lived > self.STEADY:
            self.backoff[number] = 1.0
        wait = self.backoff[number]
        self.backoff[number] = min(wait * 2, 60.0)
        log.error("worker %d stopped (%s); starting it again in %gs", number, why, wait)
        time.sleep(wait)        # the supervisor has nothing else to do meanwhile
        if not self.stopping:
            self.start(number)

    def stop(self, *_signal) -> None:     # (a signal handler's signum and frame)
        self.stopping = True
        for _, process, _ in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)


def _raise_file_limit(wanted: int) -> None:
    """Let the process hold as many sockets as -m allows (where the OS lets us)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if hard != resource.RLIM_INFINITY
                                                         else wanted, hard))
    except (ImportError, ValueError, OSError):
        pass


# -- option types: each states its range, and a bad value is one line -------

class Number:
    """An argparse type: a number within a range; the error states the range.
    Sizes take a K, M or G suffix (KiB, MiB, GiB)."""

    _SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def __init__(self, low: float, high: Optional[float] = None, kind: type = int, unit: str = "",
                 above: bool = False, size: bool = False):
        self.low, self.high, self.kind, self.unit, self.above, self.size = low, high, kind, unit, above, size

    def __call__(self, text: str):
        try:
            value = self._parse(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or value < self.low or (self.above and value == self.low) or \
                (self.high is not None and value > self.high) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}")
        return value

    def _parse(self, text: str):
        text = text.strip()
        if self.size and text[-1:].lower() in self._SUFFIXES:
            return int(float(text[:-1]) * self._SUFFIXES[text[-1].lower()])
        return self.kind(text)

    def describe(self) -> str:
        what = ("a size in bytes" if self.size else "a whole number" if self.kind is int else "a number")
        what += f" of {self.unit}" if self.unit else ""
        if self.above:
            bounds = f"above {self.show(self.low)}"
        elif self.high is None:
            bounds = f"of at least {self.show(self.low)}"
        else:
            bounds = f"from {self.show(self.low)} to {self.show(self.high)}"
        return f"{what} {bounds}" + (" (K, M or G may follow)" if self.size else "")

    def show(self, value: float) -> str:
        if self.size:
            for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
                if value >= scale and value % scale == 0:
                    return f"{value // scale}{suffix}"
        return f"{value:g}" if isinstance(value, float) else str(value)


def nick_option(text: str) -> str:
    try:
        return check_name(text)
    except ProtocolError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error.text}") from None


def redis_option(text: str) -> str:
    try:
        RedisUrl.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def fingerprint_option(text: str) -> str:
    """A SHA-256 certificate fingerprint in the forms people have, made
    canonical (SHA256:base64, as SSH and the server print it): base64 with
    or without SHA256: and = padding, or hex as `openssl x509 -fingerprint
    -sha256` prints it (AB:CD:..., any case, colons optional)."""
    value = re.sub(r"^(sha256 fingerprint=|sha256:)", "", text.strip(), flags=re.IGNORECASE)
    digest = None
    if re.fullmatch(r"[0-9a-fA-F]{64}", value.replace(":", "")):
        digest = bytes.fromhex(value.replace(":", ""))
    elif re.fullmatch(r"[A-Za-z0-9+/]{43}=?", value):
        digest = base64.b64decode(value.rstrip("=") + "=")
    if digest is None or len(digest) != 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 fingerprint (SHA256:BASE64 as the server"
                                         " prints it, or hex AB:CD:... as openssl prints it)")
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_forms(canonical: str) -> Tuple[str, str]:
    """A fingerprint as SSH writes it and as openssl does."""
    digest = base64.b64decode(canonical[len("SHA256:"):] + "=")
    return canonical, ":".join(f"{byte:02X}" for byte in digest)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to read more."""

    subcommands: Dict[str, argparse.ArgumentParser]     # the top parser's, by command (build_parser)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's real default, once: none for flags or where there is none."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=28, width=min(100, shutil.get_terminal_size().columns))

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default in (None, False, argparse.SUPPRESS) or not action.option_strings or "default" in text:
            return text
        shown = action.type.show(default) if isinstance(action.type, Number) else str(default)
        return f"{text} (default: {shown})"


# What ServerConfig takes from the command line as it is; its defaults are ServerConfig's.
SERVER_OPTIONS = ("host", "port", "max_connections", "tls_cert", "history", "history_bytes", "history_file",
                  "db", "db_history", "registered_only",
                  "max_buffer", "max_payload", "flood_rate", "flood_burst", "hello_timeout", "ping_interval",
                  "idle_timeout", "max_rooms", "connections_per_source", "rooms_per_source", "nick_hold", "redis",
                  "cluster_ttl", "reuse_port", "server_name", "irc_port")


def server_name_option(text: str) -> str:
    """A server's name for IRC: letters, digits, '.', '-', at most 63."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", text):
        raise argparse.ArgumentTypeError("a server name is letters, digits, '.' and '-' (a hostname, say)")
    return text


def build_parser() -> Parser:
    d, seconds = ServerConfig, "seconds"
    parser = Parser(prog="chat.py", formatter_class=HelpFormatter,
                    description="A terminal chat: one server relays lines between many clients.",
                    epilog="Run 'python3 chat.py COMMAND --help' for the options of each command.")
    parser.add_argument("--version", action="version", version=f"chat.py {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    server = commands.add_parser("server", help="run a chat server", formatter_class=HelpFormatter,
                                 description="Run a chat server. It prints where it listens on stdout and"
                                             " logs to stderr. Started in a terminal, it takes operator"
                                             " commands there (/help lists them).")
    server.add_argument("-p", "--port", type=Number(0, 65535), default=d.port, help="TCP port (0: any free port)")
    server.add_argument("-H", "--host", default=d.host,
                        help="address to listen on (0.0.0.0: all IPv4, '::': all IPv4 and IPv6)")
    server.add_argument("-m", "--max-connections", type=Number(1, 1_000_000), default=d.max_connections,
                        metavar="N", help="connections at once, counting those not yet joined")
    server.add_argument("--password-file", metavar="FILE",
                        help="require the password on the first line of FILE (or set $CHAT_PASSWORD)")
    server.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    server.add_argument("--tls-key", metavar="FILE",
                        help="the certificate's private key (PEM; if not given, the certificate file must hold it)")
    server.add_argument("--history", type=Number(0, 100_000), default=d.history, metavar="N",
                        help="lines kept per room")
    server.add_argument("--history-bytes", type=Number(0, size=True), default=d.history_bytes, metavar="BYTES",
                        help="what the history of all rooms together may hold")
    server.add_argument("--history-file", metavar="FILE", help="keep history in FILE across restarts"
                        " (with --db: import it into the new database once)")
    server.add_argument("--db", metavar="FILE", help="keep everything in this SQLite file: history, accounts, bans,"
                        " topics, kept messages (without it, only --history-file's history outlives the server)")
    server.add_argument("--db-history", type=Number(0, 10_000_000), default=d.db_history, metavar="N",
                        help="with --db: lines kept per room, to catch up on")
    server.add_argument("--op", action="append", default=[], type=nick_option, metavar="NAME", dest="ops",
                        help="this account is a server operator (repeatable)")
    server.add_argument("--registered-only", action="store_true",
                        help="only accounts may join (operators make them: /register NAME at the console)")
    server.add_argument("--motd", metavar="FILE", help="show this file's text to everyone who joins")
    server.add_argument("--max-buffer", type=Number(16 << 10, size=True), default=d.max_buffer, metavar="BYTES",
                        help="unsent bytes per client before it is dropped as too slow")
    server.add_argument("--max-payload", type=Number(256, MAX_CLIENT_PAYLOAD * 16, size=True),
                        default=d.max_payload, metavar="BYTES", help="largest frame a client may send")
    server.add_argument("--flood-rate", type=Number(0, kind=float, above=True), default=d.flood_rate,
                        metavar="N", help="requests a second a client may send, sustained")
    server.add_argument("--flood-burst", type=Number(1), default=d.flood_burst, metavar="N",
                        help="requests a client may send at once before --flood-rate applies")
    server.add_argument("--hello-timeout", type=Number(0, kind=float, unit=seconds, above=True),
                        default=d.hello_timeout, metavar="SECONDS", help="drop connections that have not said hello by then")
    server.add_argument("--ping-interval", type=Number(0, kind=float, unit=seconds, above=True),
                        default=d.ping_interval, metavar="SECONDS", help="ping clients silent this long")
    server.add_argument("--idle-timeout", type=Number(0, kind=float, unit=seconds, above=True),
                        default=d.idle_timeout, metavar="SECONDS",
                        help="drop clients silent this long (more than --ping-interval)")
    server.add_argument("--max-rooms", type=Number(1, 1_000_000), default=d.max_rooms, metavar="N",
                        help="rooms in use at once")
    server.add_argument("--irc-port", type=Number(0, 65535), metavar="PORT",
                        help="also listen on this port for IRC only (6667, say; -p serves IRC too)")
    server.add_argument("--server-name", type=server_name_option, default=d.server_name, metavar="NAME",
                        help="this server's name to IRC clients (a hostname, say)")
    server.add_argument("--connections-per-source", type=Number(0, 1_000_000), default=0, metavar="N",
                        help="connections one address (IPv6: /64) may hold; 0: a tenth of -m, at least 20"
                             " (connections from this machine count against none)")
    server.add_argument("--rooms-per-source", type=Number(0, 1_000_000), default=0, metavar="N",
                        help="rooms one address may have in use; 0: a 50th of --max-rooms, at least 20")
    server.add_argument("--nick-hold", type=Number(0, 86400, kind=float, unit=seconds), default=d.nick_hold,
                        metavar="SECONDS", help="how long a lost connection's nick waits for its owner (0: not at all)")
    server.add_argument("--redis", metavar="URL", type=redis_option,
                        help="be one chat with the other servers linked through this Redis:"
                             " redis://[:PASSWORD@]HOST[:PORT][/DB]")
    server.add_argument("--cluster-ttl", type=Number(1, 3600, kind=float, unit=seconds), default=d.cluster_ttl,
                        metavar="SECONDS", help="with --redis: a server silent this long is gone, and its users leave")
    server.add_argument("--workers", type=Number(1, 256), default=1, metavar="N",
                        help="run N server processes on the one port (Linux; needs --redis)")
    server.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    server.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    server.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    server.add_argument("-v", "--verbose", action="store_true", help="log more")

    client = commands.add_parser("client", help="join a chat server", formatter_class=HelpFormatter,
                                 description="Join a chat server. Type lines to talk; /help lists"
                                             " commands. With stdin not a terminal, each input line"
                                             " is sent and the client exits at its end.")
    client.add_argument("-p", "--port", type=Number(1, 65535), default=d.port, help="server port")
    client.add_argument("-H", "--host", default=d.host, help="server host")
    client.add_argument("-n", "--nick", type=nick_option, help="your nick (default: your login name)")
    client.add_argument("--tls", action="store_true", help="connect with TLS")
    client.add_argument("--cafile", metavar="FILE", help="verify the server against this CA (implies --tls)")
    client.add_argument("--fingerprint", type=fingerprint_option, metavar="SHA256:...",
                        help="accept only a server certificate with this SHA-256 fingerprint, as base64 or"
                             " hex AB:CD:... (implies --tls)")
    client.add_argument("--known-hosts", metavar="FILE",
                        help="with --tls: where trusted fingerprints are kept"
                             " (default: ~/.config/chat.py/known_hosts)")
    client.add_argument("--password-file", metavar="FILE",
                        help="send the password on the first line of FILE (or set $CHAT_PASSWORD;"
                             " on a terminal you are asked when the server wants one)")
    client.add_argument("--account-password-file", metavar="FILE",
                        help="log in to your nick's account with the password on the first line of FILE (or set"
                             " $CHAT_ACCOUNT_PASSWORD; on a terminal you are asked when the nick is registered)")
    client.add_argument("--json", action="store_true",
                        help="bot mode: print every frame as a JSON line; send JSON lines as frames"
                             " and other lines as messages")
    client.add_argument("--reconnect", type=Number(0, 86400, kind=float, unit=seconds), default=300.0,
                        metavar="SECONDS", help="when the connection is lost, keep trying this long (0: exit at once)")
    client.add_argument("--no-bell", action="store_true",
                        help="do not ring the terminal's bell for private messages and lines that name you")
    client.add_argument("--replay", action="store_true",
                        help="with stdin not a terminal: print the lines said before you came too")

    bench = commands.add_parser("bench", help="load-test a server", formatter_class=HelpFormatter,
                                description="Load-test a server (or one started for the test when"
                                            " neither -H nor -p is given).")
    bench.add_argument("-H", "--host", help="server host")
    bench.add_argument("-p", "--port", type=Number(1, 65535), help="server port")
    bench.add_argument("-c", "--clients", type=Number(2, 100_000), default=100, metavar="N", help="clients connected")
    bench.add_argument("-s", "--senders", type=Number(1, 100_000), default=10, metavar="N",
                       help="how many of them send")
    bench.add_argument("-n", "--messages", type=Number(1), default=1000, metavar="N", help="lines per sender")
    bench.add_argument("-b", "--bytes", type=Number(30, TEXT_MAX), default=64, metavar="N",
                       help="length of each line, in characters")
    bench.add_argument("-r", "--rate", type=Number(0, kind=float), default=0.0, metavar="N",
                       help="lines per second in all (0: flat out)")
    bench.add_argument("--timeout", type=Number(0, kind=float, unit=seconds, above=True), default=10.0,
                       metavar="SECONDS", help="give up after this long without a delivery")

    gencert = commands.add_parser("gencert", help="make a self-signed TLS certificate (needs openssl)",
                                  formatter_class=HelpFormatter,
                                  description="Make a self-signed TLS certificate and its private key with"
                                              " openssl, for `server --tls-cert`. Clients then trust it on"
                                              " first use, or by its fingerprint (printed here).")
    gencert.add_argument("--cert", default="chat-cert.pem", metavar="FILE", help="certificate file to write")
    gencert.add_argument("--key", default="chat-key.pem", metavar="FILE", help="private key file to write")
    gencert.add_argument("--name", default="localhost", help="the server's host name")
    gencert.add_argument("--days", type=Number(1, 36500, unit="days"), default=825, metavar="DAYS",
                         help="how long it is valid, in days")
    gencert.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.subcommands = {"server": server, "client": client, "bench": bench, "gencert": gencert}
    return parser


def check_args(parser: Parser, args: argparse.Namespace) -> None:
    """What no single option's type can say: options that need or exclude each other."""
    fail = parser.subcommands[args.command].error
    if args.command == "server":
        if args.idle_timeout <= args.ping_interval:
            fail(f"--idle-timeout ({args.idle_timeout:g}) must be more than --ping-interval ({args.ping_interval:g})")
        if args.tls_key and not args.tls_cert:
            fail("--tls-key needs --tls-cert")
        if args.redis and (args.history_file or args.db):
            fail(f"{'--db' if args.db else '--history-file'} and --redis do not go together: with Redis,"
                 " everything is kept there")
        if args.workers > 1 and not args.redis:
            fail("--workers needs --redis: each worker is a server of its own, linked through Redis")
    elif args.command == "client":
        args.tls = args.tls or bool(args.cafile or args.fingerprint)
    elif args.command == "bench" and args.senders > args.clients:
        fail(f"--senders ({args.senders}) cannot be more than --clients ({args.clients})")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.argv = argv
    runners = {"server": run_server, "client": run_client, "bench": run_bench, "gencert": run_gencert}
    return runners[args.command](args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:     # `chat.py gencert | head -2`: what reads our output stopped; so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
