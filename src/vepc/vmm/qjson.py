"""QEMU's JSON reader for command-line values (``-object '{...}'``, ``-device '{...}'``), with its messages.

``qobject_from_json(text)`` returns the QObject tree as Python values (dict, list, str, int, float,
bool, ``None`` for null) or raises ``JsonError`` whose message is the line QEMU prints.  It follows
qobject/json-lexer.c (the token grammar, QEMU's extensions: single-quoted strings and ``\\'``),
qobject/json-streamer.c (a token the lexer cannot take is "stray"; nesting deeper than 1024 is
refused), qobject/json-parser.c (every "JSON parse error, ..." text) and qobject/qjson.c
(``qobject_from_jsonv``: a second value is "Expecting at most one JSON value").

Integers follow ``parse_literal``: int64 if it fits, else uint64 for non-negative values, else a
double; anything with a fraction or exponent is a double.

>>> qobject_from_json('{"qom-type": "memory-backend-epc", "id": "m0", "size": 67108864, "prealloc": true}')
{'qom-type': 'memory-backend-epc', 'id': 'm0', 'size': 67108864, 'prealloc': True}
>>> qobject_from_json("{'id': 'm0',}")
Traceback (most recent call last):
...
vepc.vmm.qjson.JsonError: JSON parse error, expecting value
"""

from __future__ import annotations

from typing import Any

__all__ = ["JsonError", "qobject_from_json", "MAX_NESTING"]

#: json-streamer.c MAX_NESTING
MAX_NESTING = 1 << 10

_PUNCT = {"{": "LCURLY", "}": "RCURLY", "[": "LSQUARE", "]": "RSQUARE", ":": "COLON", ",": "COMMA"}
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_INT64 = 1 << 63
_UINT64 = 1 << 64


class JsonError(ValueError):
    """QEMU refused the JSON text; ``str()`` is QEMU's message."""


def _lex(text: str) -> list[tuple[str, str]]:
    """json-lexer.c: (type, text) tokens; a character no state accepts ends in a stray error."""
    toks: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c in _PUNCT:
            toks.append((_PUNCT[c], c))
            i += 1
        elif c in "\"'":
            j = i + 1
            while True:
                if j >= n:                            # unterminated string: the lexer is still inside it
                    raise JsonError("JSON parse error, premature EOI")
                ch = text[j]
                if ch == c:
                    break
                if ord(ch) < 0x20:                    # control characters are rejected by the lexer
                    raise JsonError(f"JSON parse error, stray '{text[i:j + 1]}'")
                if ch == "\\":
                    j += 1
                    if j >= n:
                        raise JsonError("JSON parse error, premature EOI")
                    if text[j] == "u":
                        hexd = text[j + 1:j + 5]
                        if len(hexd) < 4 or any(h not in "0123456789abcdefABCDEF" for h in hexd):
                            raise JsonError(f"JSON parse error, stray '{text[i:j + 1 + len(hexd)]}'")
                        j += 4
                    elif text[j] not in _ESCAPES:
                        raise JsonError(f"JSON parse error, stray '{text[i:j + 1]}'")
                j += 1
            toks.append(("STRING", text[i:j + 1]))
            i = j + 1
        elif c == "-" or c.isdigit():
            j = i + 1 if c == "-" else i
            if j < n and text[j] == "0":
                j += 1
            elif j < n and text[j].isdigit():
                while j < n and text[j].isdigit():
                    j += 1
            else:
                raise JsonError(f"JSON parse error, stray '{text[i:j + 1]}'")
            kind = "INTEGER"
            if j < n and text[j] == ".":
                k = j + 1
                if k >= n or not text[k].isdigit():
                    raise JsonError(f"JSON parse error, stray '{text[i:k + 1]}'")
                while k < n and text[k].isdigit():
                    k += 1
                j, kind = k, "FLOAT"
            if j < n and text[j] in "eE":
                k = j + 1
                if k < n and text[k] in "+-":
                    k += 1
                if k >= n or not text[k].isdigit():
                    raise JsonError(f"JSON parse error, stray '{text[i:k + 1]}'")
                while k < n and text[k].isdigit():
                    k += 1
                j, kind = k, "FLOAT"
            toks.append((kind, text[i:j]))
            i = j
        elif "a" <= c <= "z":
            j = i
            while j < n and "a" <= text[j] <= "z":
                j += 1
            toks.append(("KEYWORD", text[i:j]))
            i = j
        else:
            raise JsonError(f"JSON parse error, stray '{c}'")
        depth = sum(1 for t, _ in toks if t in ("LCURLY", "LSQUARE")) - sum(1 for t, _ in toks if t in ("RCURLY", "RSQUARE"))
        if depth > MAX_NESTING:
            raise JsonError("JSON nesting depth limit exceeded")
    return toks


def _unescape(tok: str) -> str:
    """json-parser.c ``parse_string``: the escapes the lexer let through, surrogate pairs joined."""
    out: list[str] = []
    body = tok[1:-1]
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = body[i + 1]
        if esc != "u":
            out.append(_ESCAPES[esc])
            i += 2
            continue
        cp = int(body[i + 2:i + 6], 16)
        end = i + 6
        if 0xD800 <= cp <= 0xDBFF and body[end:end + 2] == "\\u":
            trail = int(body[end + 2:end + 6], 16) if len(body) >= end + 6 else -1
            if 0xDC00 <= trail <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trail & 0x3FF)
                end += 6
            else:
                cp = -1
        if cp < 0 or 0xD800 <= cp <= 0xDFFF or cp == 0:
            raise JsonError(f"JSON parse error, {body[i:end]} is not a valid Unicode character")
        out.append(chr(cp))
        i = end
    return "".join(out)


class _Parser:
    def __init__(self, toks: list[tuple[str, str]]) -> None:
        self.toks = toks
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def pop(self) -> tuple[str, str] | None:
        t = self.peek()
        self.pos += 1
        return t

    def value(self) -> Any:
        t = self.peek()
        if t is None:
            raise JsonError("JSON parse error, premature EOI")
        kind, text = t
        if kind == "LCURLY":
            return self.obj()
        if kind == "LSQUARE":
            return self.array()
        self.pop()
        if kind == "STRING":
            return _unescape(text)
        if kind == "INTEGER":
            v = int(text)
            if -_INT64 <= v < _INT64 or (0 <= v < _UINT64):
                return v
            return float(text)
        if kind == "FLOAT":
            return float(text)
        if kind == "KEYWORD":
            if text in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[text]
            raise JsonError(f"JSON parse error, invalid keyword '{text}'")
        raise JsonError("JSON parse error, expecting value")

    def expect_more(self) -> tuple[str, str]:
        t = self.pop()
        if t is None:
            raise JsonError("JSON parse error, premature EOI")
        return t

    def pair(self, out: dict) -> None:
        if self.peek() is None:
            raise JsonError("JSON parse error, premature EOI")
        key = self.value()
        if not isinstance(key, str):
            raise JsonError("JSON parse error, key is not a string in object")
        if self.expect_more()[0] != "COLON":
            raise JsonError("JSON parse error, missing : in object pair")
        val = self.value()
        if key in out:
            raise JsonError("JSON parse error, duplicate key")
        out[key] = val

    def obj(self) -> dict:
        self.pop()
        out: dict = {}
        t = self.peek()
        if t is None:
            raise JsonError("JSON parse error, premature EOI")
        if t[0] == "RCURLY":
            self.pop()
            return out
        self.pair(out)
        t = self.expect_more()
        while t[0] != "RCURLY":
            if t[0] != "COMMA":
                raise JsonError("JSON parse error, expected separator in dict")
            self.pair(out)
            t = self.expect_more()
        return out

    def array(self) -> list:
        self.pop()
        out: list = []
        t = self.peek()
        if t is None:
            raise JsonError("JSON parse error, premature EOI")
        if t[0] == "RSQUARE":
            self.pop()
            return out
        out.append(self.value())
        t = self.expect_more()
        while t[0] != "RSQUARE":
            if t[0] != "COMMA":
                raise JsonError("JSON parse error, expected separator in list")
            out.append(self.value())
            t = self.expect_more()
        return out


def qobject_from_json(text: str) -> Any:
    """qobject/qjson.c ``qobject_from_json``: exactly one JSON value, or ``JsonError``.

    >>> qobject_from_json('{"host-nodes": [0, 1], "size": 18446744073709551615}')["size"]
    18446744073709551615
    >>> qobject_from_json('{"a": 1} {}')
    Traceback (most recent call last):
    ...
    vepc.vmm.qjson.JsonError: Expecting at most one JSON value
    """
    toks = _lex(text)
    if not toks:
        raise JsonError("Expecting a JSON value")
    p = _Parser(toks)
    value = p.value()
    if p.peek() is not None:
        raise JsonError("Expecting at most one JSON value")
    return value
