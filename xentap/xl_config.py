"""xl domain configuration files (xl.cfg(5)), read without eval, and the
``xentap_disks`` key that `xentap create` adds to them.

The language is libxlu's (``tools/libs/util/libxlu_cfg_[ly].[ly]`` in Xen):
a file is a sequence of settings ``KEY = VALUE`` or ``KEY += VALUE``, each
ended by a newline or ``;``; a value is a string (single or double quotes,
C-like backslash escapes), a number (decimal or ``0x`` hex), or a list
``[ v, v, ... ]`` of values that may span lines and end with a comma; ``#``
starts a comment.  :func:`parse` keeps each setting's place in the text so
that :func:`without_keys` can hand xl the file exactly as written, minus our
key.

A xentap disk spec follows xl's disk spec (xl-disk-configuration(5)):
comma-separated ``key=value`` items, ::

    xentap_disks = [ 'vdev=xvda, access=rw, target=/srv/guest.img' ]

``target`` (required) the raw image, LV or block device; as in xl it may
contain commas when it is the last item.  ``vdev`` (required) ``xvdX`` or a
device number.  ``access`` (or ``mode``) ``rw``/``w`` (default) or
``ro``/``r``.  ``format`` only ``raw``; ``devtype`` only ``disk``.
``protect`` (optional) mirrors the disk to an appliance: an appliance
domain's name or ``tcp://HOST:PORT`` / ``ipc:///PATH`` (as ``xentap attach
--protect``, see xentap.protect); ``protect-key`` that endpoint's public key
file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from xentap import xs_keys as K

#: The key of the xl config under which `xentap create` finds its disks.
XENTAP_DISKS_KEY = "xentap_disks"

Value = Union[str, int, list]


class ConfigError(ValueError):
    """The config is wrong; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Setting:
    """One ``KEY = VALUE`` (``append``: ``KEY += VALUE``) and where it is in the text."""

    key: str
    value: Value
    line: int
    start: int          # offset of the key in the text
    end: int            # offset just after the statement's terminator
    append: bool = False


@dataclass
class XlConfig:
    """A parsed xl config: the settings in order, and the text they came from."""

    text: str
    settings: list[Setting] = field(default_factory=list)
    source: str = "<config>"

    def get(self, key: str) -> Value | None:
        """The value of ``key`` as xl sees it: the last ``=``, with later ``+=``
        appended (lists extend, strings concatenate); None when absent."""
        value: Value | None = None
        for s in self.settings:
            if s.key != key:
                continue
            if s.append and value is not None:
                if isinstance(value, list) and isinstance(s.value, list):
                    value = value + s.value
                elif isinstance(value, str) and isinstance(s.value, str):
                    value = value + s.value
                else:
                    value = s.value
            else:
                value = s.value
        return value

    #: Lines after this one came from the command line (``overrides``).
    file_lines: int = 1 << 30
    overrides: tuple[str, ...] = ()

    def at(self, line: int) -> str:
        """Where line ``line`` is, for an error: ``file:line``, or the
        command-line override it came from."""
        if line > self.file_lines and line - self.file_lines <= len(self.overrides):
            return f"{self.overrides[line - self.file_lines - 1]!r} (command line)"
        return f"{self.source}:{line}"

    def line_of(self, key: str) -> int:
        """The line of the last setting of ``key`` (0 when absent)."""
        lines = [s.line for s in self.settings if s.key == key]
        return lines[-1] if lines else 0


# --- the lexer ----------------------------------------------------------------------

_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<nl>\n)
  | (?P<id>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<number>0x[0-9A-Fa-f]+|[0-9]+)(?![A-Za-z0-9_])
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<append>\+=)
  | (?P<op>[=\[\],;])
""", re.VERBOSE)

_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", "'": "'", '"': '"'}


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "x" and re.match(r"[0-9A-Fa-f]{2}", body[i + 2:i + 4]):
            out.append(chr(int(body[i + 2:i + 4], 16)))
            i += 4
        elif nxt in "01234567":
            m = re.match(r"[0-7]{1,3}", body[i + 1:])
            out.append(chr(int(m.group(0), 8)))
            i += 1 + len(m.group(0))
        else:
            raise ValueError(f"unknown escape \\{nxt}")
    return "".join(out)


@dataclass
class _Tok:
    kind: str
    text: str
    line: int
    start: int
    end: int


def _tokens(text: str, where: str) -> list[_Tok]:
    toks, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            ch = text[pos]
            if ch in "\"'":
                raise ConfigError([f"{where}:{line}: unterminated string"])
            raise ConfigError([f"{where}:{line}: unexpected character {ch!r}"])
        kind = m.lastgroup
        if kind not in ("ws", "comment"):
            toks.append(_Tok(kind, m.group(0), line, m.start(), m.end()))
        if kind == "nl":
            line += 1
        pos = m.end()
    toks.append(_Tok("eof", "", line, len(text), len(text)))
    return toks


# --- the parser ---------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str, where: str):
        self.where = where
        self.toks = _tokens(text, where)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def err(self, tok: _Tok, msg: str) -> ConfigError:
        return ConfigError([f"{self.where}:{tok.line}: {msg}"])

    def skip_nl(self) -> None:
        while self.peek().kind == "nl":
            self.take()

    def value(self) -> Value:
        t = self.take()
        if t.kind == "string":
            try:
                return _unescape(t.text[1:-1])
            except ValueError as e:
                raise self.err(t, str(e)) from None
        if t.kind == "number":
            return int(t.text, 0)
        if t.kind == "op" and t.text == "[":
            items: list[Value] = []
            self.skip_nl()
            while True:
                if self.peek().kind == "op" and self.peek().text == "]":
                    self.take()
                    return items
                items.append(self.value())
                self.skip_nl()
                t = self.take()
                if t.kind == "op" and t.text == "]":
                    return items
                if not (t.kind == "op" and t.text == ","):
                    raise self.err(t, f"expected ',' or ']' in a list, found {_show(t)}")
                self.skip_nl()
        if t.kind == "eof":
            raise self.err(t, "a value is missing at the end of the file")
        if t.kind == "id":
            raise self.err(t, f"unquoted word {t.text!r} (strings need quotes)")
        raise self.err(t, f"expected a value, found {_show(t)}")

    def parse(self, text: str) -> XlConfig:
        cfg = XlConfig(text=text, source=self.where)
        while True:
            t = self.take()
            if t.kind == "eof":
                return cfg
            if t.kind == "nl" or (t.kind == "op" and t.text == ";"):
                continue
            if t.kind != "id":
                raise self.err(t, f"expected a setting (KEY = VALUE), found {_show(t)}")
            op = self.take()
            if not (op.kind == "append" or (op.kind == "op" and op.text == "=")):
                raise self.err(op, f"expected '=' after {t.text!r}, found {_show(op)}")
            value = self.value()
            end = self.take()
            if not (end.kind in ("nl", "eof") or (end.kind == "op" and end.text == ";")):
                raise self.err(end, f"expected the end of the line after {t.text!r}, "
                                    f"found {_show(end)}")
            cfg.settings.append(Setting(t.text, value, t.line, t.start, end.end,
                                        append=op.kind == "append"))
            if end.kind == "eof":
                return cfg


def _show(t: _Tok) -> str:
    if t.kind == "nl":
        return "the end of the line"
    if t.kind == "eof":
        return "the end of the file"
    return repr(t.text)


def parse(text: str, where: str = "<config>") -> XlConfig:
    """Parses an xl config.  Raises ConfigError (``where:line: reason``)."""
    return _Parser(text, where).parse(text)


def parse_with_overrides(text: str, overrides: list[str] | tuple[str, ...],
                         where: str = "<config>") -> XlConfig:
    """Parses ``text`` followed by ``KEY=VALUE`` overrides, one setting each,
    as `xl create CFG KEY=VALUE...` appends them: a later setting wins."""
    parse(text, where)                         # errors name the file's lines
    for o in overrides:
        if "\n" in o or len(parse(o, f"{o!r} (command line)").settings) != 1:
            raise ConfigError([f"{o!r} (command line): give one KEY=VALUE per argument"])
    nl = "" if text.endswith("\n") or not text else "\n"
    full = text + nl + "".join(o + "\n" for o in overrides)
    cfg = parse(full, where)
    cfg.file_lines = (text + nl).count("\n")
    cfg.overrides = tuple(overrides)
    return cfg


def without_keys(cfg: XlConfig, keys: set[str]) -> str:
    """The config's text with every setting of ``keys`` cut out (lines kept
    empty, so xl's line numbers still match the user's file)."""
    out, pos = [], 0
    for s in cfg.settings:
        if s.key in keys:
            out.append(cfg.text[pos:s.start])
            out.append("\n" * cfg.text.count("\n", s.start, s.end))
            pos = s.end
    out.append(cfg.text[pos:])
    return "".join(out)


# --- xentap disk specs -----------------------------------------------------------------

@dataclass(frozen=True)
class XentapDisk:
    """One entry of ``xentap_disks``."""

    target: str
    vdev: str
    devid: int
    mode: str           # "r" or "w"
    protect: str | None = None          # the appliance (xentap.protect)
    protect_key: str | None = None      # its public key file, with an endpoint


_DISK_KEYS = ("target", "vdev", "access", "mode", "format", "devtype", "protect",
              "protect-key")
_ACCESS = {"rw": "w", "w": "w", "ro": "r", "r": "r"}


def parse_disk_spec(spec: str) -> XentapDisk:
    """One xentap disk spec -> XentapDisk.  Raises ValueError with the reason."""
    items: dict[str, str] = {}
    rest = spec.strip()
    while rest:
        m = re.match(r"\s*([A-Za-z_-]+)\s*=\s*", rest)
        if not m:
            word = rest.split(",", 1)[0].strip()
            raise ValueError(f"{word!r} is not key=value (positional disk specs are "
                             f"not supported; write target=, vdev=, access=)")
        key = m.group(1).lower()
        rest = rest[m.end():]
        if key not in _DISK_KEYS:
            raise ValueError(f"unknown key {key!r} (known: {', '.join(_DISK_KEYS)})")
        if key == "target" and not re.search(
                rf",\s*(?:{'|'.join(_DISK_KEYS)})\s*=", rest):
            value, rest = rest, ""          # as in xl: the last target= takes the rest
        else:
            value, _, rest = rest.partition(",")
        value = value.strip()
        if key == "mode":
            key = "access"
        if key in items:
            raise ValueError(f"{key} given twice")
        if not value:
            raise ValueError(f"{key}= is empty")
        items[key] = value
    if "target" not in items:
        raise ValueError("target= is missing")
    if "vdev" not in items:
        raise ValueError("vdev= is missing")
    access = items.get("access", "rw").lower()
    if access not in _ACCESS:
        raise ValueError(f"access={items['access']} is not one of rw, w, ro, r")
    if items.get("format", "raw").lower() != "raw":
        raise ValueError(f"format={items['format']}: xentap serves raw images only")
    if items.get("devtype", "disk").lower() != "disk":
        raise ValueError(f"devtype={items['devtype']}: xentap serves disks only")
    target = items["target"]
    if not target.isascii() or any(c < " " for c in target):
        raise ValueError(f"target {target!r} must be printable ASCII")
    devid = K.vdev_to_devid(items["vdev"])           # ValueError with its reason
    protect = items.get("protect")
    if protect is not None:
        from xentap.protect import check_protect

        check_protect(protect)                       # ValueError with its reason
        if _ACCESS[access] != "w":
            raise ValueError("protect= on a read-only disk (no writes to protect)")
    elif "protect-key" in items:
        raise ValueError("protect-key= without protect=")
    return XentapDisk(target=target, vdev=items["vdev"], devid=devid, mode=_ACCESS[access],
                      protect=protect, protect_key=items.get("protect-key"))


def _xl_disk_vdevs(spec: str) -> set[str]:
    """The vdev an xl ``disk`` entry names (``vdev=`` or the third positional
    item), best effort: used only to refuse a vdev given to both."""
    out = set()
    positional = []
    for item in spec.split(","):
        item = item.strip()
        if item.startswith("target="):
            break
        if "=" in item:
            k, _, v = item.partition("=")
            if k.strip() == "vdev":
                out.add(v.strip())
        else:
            positional.append(item)
    if len(positional) >= 3:
        out.add(positional[2])
    return out


def xentap_disks(cfg: XlConfig) -> list[XentapDisk]:
    """The config's xentap disks, validated.  Raises ConfigError with one
    line per problem (``where:line: reason``)."""
    where = cfg.source
    at = cfg.at
    problems: list[str] = []
    value = cfg.get(XENTAP_DISKS_KEY)
    line = cfg.line_of(XENTAP_DISKS_KEY)
    if cfg.get("name") is None:
        problems.append(f"{where}: no name = '...' (xl needs one, and xentap finds the "
                        f"domain by it)")
    elif not isinstance(cfg.get("name"), str) or not cfg.get("name"):
        problems.append(f"{at(cfg.line_of('name'))}: name must be a non-empty string")
    if value is None:
        problems.append(f"{where}: no {XENTAP_DISKS_KEY} = [ ... ] (use xl create for "
                        f"guests without xentap disks)")
        raise ConfigError(problems)
    if not isinstance(value, list):
        problems.append(f"{at(line)}: {XENTAP_DISKS_KEY} must be a list of strings, "
                        f"like [ 'vdev=xvda, target=/srv/disk.img' ]")
        raise ConfigError(problems)
    if not value:
        problems.append(f"{at(line)}: {XENTAP_DISKS_KEY} is empty")
    disks: list[XentapDisk] = []
    seen: dict[int, str] = {}
    xl_vdevs: set[str] = set()
    xl_disk = cfg.get("disk")
    if isinstance(xl_disk, list):
        for d in xl_disk:
            if isinstance(d, str):
                xl_vdevs |= _xl_disk_vdevs(d)
    for n, spec in enumerate(value, 1):
        if not isinstance(spec, str):
            problems.append(f"{at(line)}: {XENTAP_DISKS_KEY} entry {n} is not a string")
            continue
        try:
            disk = parse_disk_spec(spec)
        except ValueError as e:
            problems.append(f"{at(line)}: {XENTAP_DISKS_KEY} entry {n}: {e}")
            continue
        if disk.devid in seen:
            problems.append(f"{at(line)}: {XENTAP_DISKS_KEY} entry {n}: vdev {disk.vdev} "
                            f"is also entry {seen[disk.devid]}")
            continue
        if disk.vdev in xl_vdevs:
            problems.append(f"{at(line)}: {XENTAP_DISKS_KEY} entry {n}: vdev {disk.vdev} "
                            f"is also in disk = [...]")
            continue
        seen[disk.devid] = str(n)
        disks.append(disk)
    if problems:
        raise ConfigError(problems)
    return disks
