"""Wire profiles: framing, field layout and response codes, loaded from ``specs/<name>.toml``.

A profile is data (design section 3). This module reads and checks it; it never touches a socket.
A broken profile fails when it is loaded, with a :class:`ProfileError` naming the file, the key and
what is wrong, so that the gateway refuses to start rather than misread a message later.

The ``[fields]`` table is a pyiso8583 specification plus two keys of ours: ``content``, the character
class the codec enforces on each data element, and ``value`` on the application header ``h`` (when
it has a length), the header the codec sends. Only :mod:`gateway.protocol.codec` uses the pyiso8583
part (:attr:`Profile.iso_spec`); everything else reads :attr:`Profile.fields`. The format is described
in docs/profiles.md.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

__all__ = [
    "CONTENT_TYPES",
    "HEADER_KINDS",
    "SPECS_DIR",
    "STANDARD_REASONS",
    "FieldDef",
    "Framing",
    "HeaderKind",
    "Profile",
    "ProfileError",
    "load_profile",
]

#: The repository's ``specs/`` folder, where profiles are looked up by name.
SPECS_DIR: Path = Path(__file__).resolve().parents[2] / "specs"

HeaderKind = Literal["2b", "4b", "2a", "4a"]
#: Length header kinds: 2 or 4 bytes; ``b`` big-endian binary, ``a`` ASCII decimal digits.
HEADER_KINDS: tuple[HeaderKind, ...] = ("2b", "4b", "2a", "4a")

#: Content classes of a data element (our ``content`` key), checked by the codec.
CONTENT_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "n": "digits only",
        "an": "letters, digits and spaces",
        "ans": "printable ASCII characters",
        "b": "binary data as hexadecimal text",
        "z": "track 2 data: digits, '=' or 'D'",
    }
)

#: Every decision reason of design section 5 plus the protocol-level ones. A profile must map each of
#: them to a response code; it may map more.
STANDARD_REASONS: frozenset[str] = frozenset(
    {
        "approved",
        "original_not_found",
        "original_not_approved",
        "not_voidable",
        "not_refundable",
        "already_voided",
        "already_reversed",
        "has_later_activity",
        "terminal_mismatch",
        "batch_settled",
        "pan_mismatch",
        "currency_mismatch",
        "amount_mismatch",
        "unreferenced_refund_disabled",
        "invalid_amount",
        "exceeds_refundable",
        "refund_window_expired",
        "refund_velocity_count",
        "refund_velocity_amount",
        "over_limit",
        "luhn_failed",
        "expired_card",
        "reversed_before_arrival",
        "already_completed",
        "preauth_expired",
        "duplicate_conflict",
        "settlement_mismatch",
        "unknown_message",
        "unsupported_message",
        "not_completable",
        "reversal_unmatched",
        "terminal_not_allowed",
        "format_error",
        "system_error",
        "upstream_declined",
        "upstream_timeout",
        "upstream_unavailable",
        "upstream_pending",
    }
)

_DEFAULT_MAX_FRAME_BYTES = 8192
_SPECIAL_FIELDS = ("h", "t", "p", "1")
_FIELD_KEYS = frozenset(
    {"data_enc", "len_enc", "len_type", "max_len", "desc", "len_count", "left_pad", "right_pad", "content"}
)
_REASON_RE = re.compile(r"[a-z][a-z0-9_]*")
_RESPONSE_CODE_RE = re.compile(r"[0-9A-Z]{2}")
_PAD_RE = re.compile(r"[0-9A-F]")
_HEX_RE = re.compile(r"[0-9A-Fa-f]*")
_NO_HEADER: Mapping[str, Any] = {
    "data_enc": "ascii",
    "len_enc": "ascii",
    "len_type": 0,
    "max_len": 0,
    "desc": "Message Header",
}


class ProfileError(Exception):
    """A profile file is missing, unreadable or wrong. Raised at load time only.

    ``source`` is the file, ``key`` the dotted TOML key at fault (``None`` for the whole file).
    """

    def __init__(self, source: Path, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else str(source)
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Framing:
    """How messages are delimited on the TCP stream.

    ``max_frame_bytes`` bounds what follows the length header (TPDU included).
    """

    header: HeaderKind
    length_includes_header: bool = False
    tpdu: bool = False
    max_frame_bytes: int = _DEFAULT_MAX_FRAME_BYTES

    @property
    def header_size(self) -> int:
        """Bytes taken by the length header (2 or 4)."""
        return int(self.header[0])


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One data element (2..128) as the rest of the gateway sees it.

    ``max_len`` is the longest text value of the element in a :class:`Message` (characters; hex digits
    for binary elements), and the exact length when ``variable`` is false. ``even_length`` says the
    text must have an even number of characters (binary data counted in whole bytes).
    """

    number: int
    content: str
    max_len: int
    variable: bool
    desc: str
    even_length: bool = False


@dataclass(frozen=True, slots=True)
class Profile:
    """A loaded, checked wire profile. ``iso_spec`` is the pyiso8583 spec (for the codec only)."""

    name: str
    description: str
    framing: Framing
    dialect: str
    response_codes: Mapping[str, str]
    fields: Mapping[int, FieldDef]
    iso_spec: Mapping[str, Any]
    source: Path

    def response_code(self, reason: str) -> str:
        """DE39 for a decision reason; an unknown reason gets the ``system_error`` code."""
        code = self.response_codes.get(reason)
        if code is None:
            code = self.response_codes.get("system_error", "96")
        return code


def load_profile(name_or_path: str | Path, specs_dir: Path | None = None) -> Profile:
    """Load and check a profile.

    A bare name (``"iso87-ascii"``) loads ``<specs_dir>/<name>.toml`` (default :data:`SPECS_DIR`);
    a :class:`~pathlib.Path`, or a string ending in ``.toml`` or containing a slash, is a file path.
    Nothing is cached.
    """
    path = _resolve(name_or_path, specs_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(path, None, _not_found_hint(name_or_path, path)) from None
    except OSError as exc:
        raise ProfileError(path, None, f"cannot read the file ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(path, None, "the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, None, f"TOML syntax error: {exc}") from None
    return _Loader(path).profile(data)


def _resolve(name_or_path: str | Path, specs_dir: Path | None) -> Path:
    if isinstance(name_or_path, Path):
        return name_or_path
    if name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path:
        return Path(name_or_path)
    return (specs_dir if specs_dir is not None else SPECS_DIR) / f"{name_or_path}.toml"


def _not_found_hint(name_or_path: str | Path, path: Path) -> str:
    if isinstance(name_or_path, str) and path.name == f"{name_or_path}.toml":
        known = sorted(p.stem for p in path.parent.glob("*.toml")) if path.parent.is_dir() else []
        if known:
            return f"no such profile {name_or_path!r} (known: {', '.join(known)})"
        return f"no such profile {name_or_path!r} (no profiles in {path.parent})"
    return "no such file"


def _is_text_encoding(name: str) -> bool:
    """True for a Python codec that turns str into bytes and back (ascii, latin-1, cp500...)."""
    try:
        "0".encode(name)
        b"0".decode(name)
    except (LookupError, ValueError):
        return False
    return True


class _Loader:
    """Reads one profile's TOML data, raising ProfileError at the first problem."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str | None, problem: str) -> ProfileError:
        return ProfileError(self.path, key, problem)

    # --- typed accessors -------------------------------------------------------------------------

    def table(self, parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
        if key not in parent:
            raise self.fail(where, "missing table")
        value = parent[key]
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a table, not {_kind(value)}")
        return cast(Mapping[str, Any], value)

    def string(self, parent: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
        if key not in parent:
            if default is not None:
                return default
            raise self.fail(where, "missing key")
        value = parent[key]
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {_kind(value)}")
        return value

    def boolean(self, parent: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        value = parent.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {_kind(value)}")
        return value

    def integer(self, parent: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
        if key not in parent:
            if default is not None:
                return default
            raise self.fail(where, "missing key")
        value = parent[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, not {_kind(value)}")
        return value

    def only(self, table: Mapping[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                dotted = f"{where}.{key}" if where else key
                raise self.fail(dotted, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    # --- sections --------------------------------------------------------------------------------

    def profile(self, data: Mapping[str, Any]) -> Profile:
        self.only(data, {"profile", "framing", "dialect", "fields"}, "")
        meta = self.table(data, "profile", "profile")
        self.only(meta, {"name", "description"}, "profile")
        name = self.string(meta, "name", "profile.name")
        if not name.strip():
            raise self.fail("profile.name", "must not be empty")
        description = self.string(meta, "description", "profile.description", default="")
        framing = self.framing(self.table(data, "framing", "framing"))
        dialect_table = self.table(data, "dialect", "dialect")
        self.only(dialect_table, {"name", "response_codes"}, "dialect")
        dialect = self.string(dialect_table, "name", "dialect.name")
        if not dialect.strip():
            raise self.fail("dialect.name", "must not be empty")
        codes = self.response_codes(self.table(dialect_table, "response_codes", "dialect.response_codes"))
        iso_spec, fields = self.fields(self.table(data, "fields", "fields"))
        return Profile(
            name=name,
            description=description,
            framing=framing,
            dialect=dialect,
            response_codes=MappingProxyType(codes),
            fields=MappingProxyType(fields),
            iso_spec=MappingProxyType(iso_spec),
            source=self.path,
        )

    def framing(self, table: Mapping[str, Any]) -> Framing:
        self.only(table, {"header", "length_includes_header", "tpdu", "max_frame_bytes"}, "framing")
        header = self.string(table, "header", "framing.header")
        if header not in HEADER_KINDS:
            raise self.fail(
                "framing.header",
                f"unknown header kind {header!r} (expected one of: {', '.join(HEADER_KINDS)}; "
                "2 or 4 bytes, b = big-endian binary, a = ASCII digits)",
            )
        max_frame = self.integer(table, "max_frame_bytes", "framing.max_frame_bytes", default=_DEFAULT_MAX_FRAME_BYTES)
        if max_frame < 1:
            raise self.fail("framing.max_frame_bytes", f"must be at least 1, not {max_frame}")
        return Framing(
            header=header,
            length_includes_header=self.boolean(
                table, "length_includes_header", "framing.length_includes_header", False
            ),
            tpdu=self.boolean(table, "tpdu", "framing.tpdu", False),
            max_frame_bytes=max_frame,
        )

    def response_codes(self, table: Mapping[str, Any]) -> dict[str, str]:
        where = "dialect.response_codes"
        codes: dict[str, str] = {}
        for reason, code in table.items():
            key = f"{where}.{reason}"
            if not _REASON_RE.fullmatch(reason):
                raise self.fail(key, "a reason must be snake_case (lower-case letters, digits, '_')")
            if not isinstance(code, str):
                raise self.fail(key, f'response code must be a string like "05", not {_kind(code)}')
            if not _RESPONSE_CODE_RE.fullmatch(code):
                raise self.fail(key, f'response code {code!r} is not 2 digits or capital letters (like "05")')
            codes[reason] = code
        missing = sorted(STANDARD_REASONS - codes.keys())
        if missing:
            raise self.fail(where, f"no response code for reason(s): {', '.join(missing)}")
        return codes

    def fields(self, table: Mapping[str, Any]) -> tuple[dict[str, Any], dict[int, FieldDef]]:
        iso_spec: dict[str, Any] = {}
        defs: dict[int, FieldDef] = {}
        for key in table:
            where = f"fields.{key}"
            if key in _SPECIAL_FIELDS:
                continue
            if not key.isdigit() or str(int(key)) != key or not 2 <= int(key) <= 128:
                raise self.fail(where, "a field key must be h, t, p, 1 or a data element number 2..128")
            if key == "65":
                raise self.fail(
                    where, "bit 65 announces a tertiary bitmap (ISO 8583:1987), it carries no data; remove it"
                )
        for key in ("t", "p"):
            if key not in table:
                raise self.fail(f"fields.{key}", "missing table (message type and primary bitmap are needed)")
        if "1" not in table and any(int(k) > 64 for k in table if k.isdigit()):
            raise self.fail("fields.1", "missing table (fields above 64 need the secondary bitmap)")
        for key, value in table.items():
            where = f"fields.{key}"
            if not isinstance(value, dict):
                raise self.fail(where, f"must be a table, not {_kind(value)}")
            spec = self.field_spec(value, where, data_field=key not in _SPECIAL_FIELDS)
            if key == "h":
                self.check_header(value, spec, where)
            elif key in _SPECIAL_FIELDS:
                self.check_special(key, spec, where)
            else:
                content = self.string(value, "content", f"{where}.content")
                defs[int(key)] = self.field_def(int(key), content, spec, where)
            iso_spec[key] = MappingProxyType(spec)
        iso_spec.setdefault("h", MappingProxyType(dict(_NO_HEADER)))
        ordered_defs = {number: defs[number] for number in sorted(defs)}
        return iso_spec, ordered_defs

    def field_spec(self, value: Mapping[str, Any], where: str, *, data_field: bool) -> dict[str, Any]:
        """Check the pyiso8583 keys of one field; return them without our ``content`` key."""
        if data_field:
            allowed = _FIELD_KEYS
        elif where == "fields.h":
            allowed = (_FIELD_KEYS - {"content"}) | {"value"}
        else:
            allowed = _FIELD_KEYS - {"content"}
        self.only(value, allowed, where)
        data_enc = self.string(value, "data_enc", f"{where}.data_enc")
        if data_enc != "b" and not _is_text_encoding(data_enc):
            raise self.fail(f"{where}.data_enc", f'{data_enc!r} is neither "b" (binary/BCD) nor a Python text encoding')
        len_enc = self.string(value, "len_enc", f"{where}.len_enc")
        if len_enc not in ("b", "bcd") and not _is_text_encoding(len_enc):
            raise self.fail(f"{where}.len_enc", f'{len_enc!r} is neither "b", "bcd" nor a Python text encoding')
        len_type = self.integer(value, "len_type", f"{where}.len_type")
        if not 0 <= len_type <= 4:
            raise self.fail(f"{where}.len_type", f"must be 0 (fixed) to 4 (LLLLVAR), not {len_type}")
        max_len = self.integer(value, "max_len", f"{where}.max_len")
        if max_len < 0 or (max_len == 0 and where != "fields.h"):
            raise self.fail(f"{where}.max_len", f"must be at least 1, not {max_len}")
        if len_type:
            capacity = {"b": 256**len_type, "bcd": 10 ** (2 * len_type)}.get(len_enc, 10**len_type) - 1
            if max_len > capacity:
                raise self.fail(
                    f"{where}.max_len",
                    f"{max_len} does not fit a {len_type}-byte {len_enc!r} length (at most {capacity})",
                )
        spec: dict[str, Any] = {
            "data_enc": data_enc,
            "len_enc": len_enc,
            "len_type": len_type,
            "max_len": max_len,
            "desc": self.string(value, "desc", f"{where}.desc", default=""),
        }
        if "len_count" in value:
            len_count = self.string(value, "len_count", f"{where}.len_count")
            if len_count not in ("bytes", "nibbles"):
                raise self.fail(f"{where}.len_count", f'must be "bytes" or "nibbles", not {len_count!r}')
            if len_count == "nibbles" and data_enc != "b":
                raise self.fail(f"{where}.len_count", '"nibbles" needs data_enc = "b" (binary/BCD)')
            spec["len_count"] = len_count
        for pad_key in ("left_pad", "right_pad"):
            if pad_key in value:
                pad = self.string(value, pad_key, f"{where}.{pad_key}")
                if not _PAD_RE.fullmatch(pad):
                    raise self.fail(f"{where}.{pad_key}", f"must be one hex digit 0-9 or A-F, not {pad!r}")
                if spec.get("len_count") != "nibbles":
                    raise self.fail(f"{where}.{pad_key}", 'padding needs len_count = "nibbles"')
                spec[pad_key] = pad
        if (
            spec.get("len_count") == "nibbles"
            and len_type == 0
            and max_len % 2
            and "left_pad" not in spec
            and "right_pad" not in spec
        ):
            raise self.fail(where, f"an odd fixed length of {max_len} nibbles needs left_pad or right_pad")
        return spec

    def check_header(self, value: Mapping[str, Any], spec: dict[str, Any], where: str) -> None:
        """The application header before the MTI: fixed length, and the ``value`` we send."""
        if spec["len_type"] != 0:
            raise self.fail(f"{where}.len_type", "the message header must be fixed length (0)")
        if spec["max_len"] == 0:
            if "value" in value:
                raise self.fail(f"{where}.value", "a header of max_len 0 has no value")
            return
        header = self.string(value, "value", f"{where}.value")
        if spec["data_enc"] == "b":
            ok = len(header) == 2 * spec["max_len"] and _HEX_RE.fullmatch(header) is not None
            expected = f"{2 * spec['max_len']} hex digits"
        else:
            try:
                ok = len(header.encode(spec["data_enc"])) == spec["max_len"]
            except UnicodeEncodeError:
                ok = False
            expected = f"{spec['max_len']} {spec['data_enc']} characters"
        if not ok:
            raise self.fail(f"{where}.value", f"must be {expected} (the header sent in every message)")
        spec["value"] = header

    def check_special(self, key: str, spec: Mapping[str, Any], where: str) -> None:
        if spec["len_type"] != 0:
            raise self.fail(f"{where}.len_type", "must be 0: message type and bitmaps are fixed length")
        if key == "t":
            expected = 2 if spec["data_enc"] == "b" else 4
            what = "2 bytes of BCD" if expected == 2 else "4 characters"
        else:
            expected = 8 if spec["data_enc"] == "b" else 16
            what = "8 binary bytes" if expected == 8 else "16 hex characters"
        if spec["max_len"] != expected:
            raise self.fail(f"{where}.max_len", f"must be {expected} ({what} with data_enc {spec['data_enc']!r})")

    def field_def(self, number: int, content: str, spec: Mapping[str, Any], where: str) -> FieldDef:
        if content not in CONTENT_TYPES:
            raise self.fail(
                f"{where}.content",
                f"unknown content type {content!r} (expected one of: {', '.join(CONTENT_TYPES)})",
            )
        binary = spec["data_enc"] == "b"
        nibbles = spec.get("len_count", "bytes") == "nibbles"
        if binary and content in ("an", "ans"):
            raise self.fail(
                f"{where}.content", f'{content!r} data cannot travel as data_enc "b" (binary decodes to hex)'
            )
        if binary:
            text_len = spec["max_len"] if nibbles else 2 * spec["max_len"]
            padded = "left_pad" in spec or "right_pad" in spec
            even = not nibbles or not padded
        else:
            text_len = spec["max_len"]
            even = content == "b"
        return FieldDef(
            number=number,
            content=content,
            max_len=text_len,
            variable=spec["len_type"] > 0,
            desc=spec["desc"],
            even_length=even,
        )


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
