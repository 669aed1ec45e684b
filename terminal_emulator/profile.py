"""Wire profiles read straight from the ``specs/*.toml`` data files.

The emulator deliberately does not use ``gateway.protocol``: it has its own small loader so that a
bug in the gateway's codec cannot cancel out against the same bug in the terminal. A profile holds
the framing (length header, optional TPDU, frame size limit) and a pyiso8583 field specification.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

__all__ = [
    "DEFAULT_SPECS_DIR",
    "Framing",
    "HeaderKind",
    "ProfileError",
    "WireProfile",
    "load_profile",
    "parse_profile",
    "profile_from_spec",
]

HeaderKind = Literal["2b", "4b", "2a", "4a"]

#: ``specs/`` next to the package in a source checkout (the editable install used by this project).
DEFAULT_SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"

_HEADER_KINDS: tuple[HeaderKind, ...] = ("2b", "4b", "2a", "4a")
_PYISO_KEYS = frozenset({"data_enc", "len_enc", "len_type", "max_len", "desc", "len_count", "left_pad",
                         "right_pad"})
_DEFAULT_TPDU = bytes.fromhex("6000000000")


class ProfileError(ValueError):
    """A wire profile file is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Framing:
    """How one ISO 8583 message travels on TCP.

    ``header``: ``2b``/``4b`` big-endian binary length of 2 or 4 bytes, ``2a``/``4a`` ASCII digits.
    ``tpdu``: the 5-byte TPDU sent after the length header (``None`` when the profile has none).
    """

    header: HeaderKind = "2b"
    length_includes_header: bool = False
    tpdu: bytes | None = None
    max_frame_bytes: int = 8192

    @property
    def header_size(self) -> int:
        return int(self.header[0])

    @property
    def binary_header(self) -> bool:
        return self.header[1] == "b"


@dataclass(frozen=True, slots=True)
class WireProfile:
    """A named wire profile: framing plus a pyiso8583 specification (``spec``)."""

    name: str
    framing: Framing
    spec: Mapping[str, Mapping[str, Any]]
    #: The application header (``h``) to send, as pyiso8583 text (hex for binary headers), if any.
    header_value: str | None = None
    #: ``[dialect] name``: how messages are built and read (``iso87`` or ``cup``, terminal_emulator.dialects).
    dialect: str = "iso87"

    def field_spec(self, number: int) -> Mapping[str, Any]:
        return self.spec[str(number)]


def profile_from_spec(
    name: str, spec: Mapping[str, Mapping[str, Any]], framing: Framing | None = None
) -> WireProfile:
    """A profile from an in-memory pyiso8583 spec (e.g. ``iso8583.specs.default``)."""
    return WireProfile(name=name, framing=framing or Framing(), spec=_clean_spec(spec))


def load_profile(name_or_path: str | Path, specs_dir: Path | None = None) -> WireProfile:
    """Load ``specs/<name>.toml`` (or a path to a ``.toml`` file)."""
    text = str(name_or_path)
    is_path = text.endswith(".toml") or "/" in text
    path = Path(text) if is_path else (specs_dir or DEFAULT_SPECS_DIR) / f"{text}.toml"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"wire profile {text!r} not found ({path})") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"wire profile {path} is not valid TOML: {exc}") from exc
    return parse_profile(data, default_name=path.stem)


def parse_profile(data: Mapping[str, Any], default_name: str = "custom") -> WireProfile:
    """Build a profile from the parsed TOML document."""
    meta = data.get("profile", {})
    name = str(meta.get("name", default_name)) if isinstance(meta, Mapping) else default_name
    framing = _parse_framing(data.get("framing", {}))
    fields = data.get("fields")
    if not isinstance(fields, Mapping) or not fields:
        raise ProfileError(f"wire profile {name!r} has no [fields] table")
    header = fields.get("h")
    header_value = header.get("value") if isinstance(header, Mapping) else None
    dialect = data.get("dialect", {})
    return WireProfile(
        name=name,
        framing=framing,
        spec=_clean_spec(cast(Mapping[str, Any], fields)),
        header_value=str(header_value) if header_value is not None else None,
        dialect=str(dialect.get("name", "iso87")) if isinstance(dialect, Mapping) else "iso87",
    )


def _parse_framing(raw: object) -> Framing:
    if not isinstance(raw, Mapping):
        raise ProfileError("[framing] must be a table")
    header = raw.get("header", "2b")
    if header not in _HEADER_KINDS:
        raise ProfileError(f"[framing] header must be one of {', '.join(_HEADER_KINDS)}, got {header!r}")
    tpdu_raw = raw.get("tpdu", False)
    tpdu: bytes | None
    if tpdu_raw is False or tpdu_raw is None or tpdu_raw == "":
        tpdu = None
    elif tpdu_raw is True:
        tpdu = _DEFAULT_TPDU
    elif isinstance(tpdu_raw, str):
        try:
            tpdu = bytes.fromhex(tpdu_raw)
        except ValueError as exc:
            raise ProfileError("[framing] tpdu must be true/false or 10 hex digits") from exc
        if len(tpdu) != 5:
            raise ProfileError("[framing] tpdu must be 5 bytes (10 hex digits)")
    else:
        raise ProfileError("[framing] tpdu must be true/false or 10 hex digits")
    max_frame = raw.get("max_frame_bytes", 8192)
    if not isinstance(max_frame, int) or max_frame <= 0:
        raise ProfileError("[framing] max_frame_bytes must be a positive integer")
    return Framing(
        header=cast(HeaderKind, header),
        length_includes_header=bool(raw.get("length_includes_header", False)),
        tpdu=tpdu,
        max_frame_bytes=max_frame,
    )


def _clean_spec(fields: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Keep only the keys pyiso8583 knows (drops ``content``) and make sure ``h`` exists."""
    spec: dict[str, dict[str, Any]] = {}
    for key, entry in fields.items():
        if not isinstance(entry, Mapping):
            raise ProfileError(f"field {key!r}: expected a table")
        clean = {k: v for k, v in entry.items() if k in _PYISO_KEYS}
        for required in ("data_enc", "len_enc", "len_type", "max_len"):
            if required not in clean:
                raise ProfileError(f"field {key!r}: missing {required}")
        clean.setdefault("desc", "")
        spec[str(key)] = clean
    for required in ("t", "p"):
        if required not in spec:
            raise ProfileError(f"[fields] must define {required!r}")
    spec.setdefault("h", {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0, "desc": ""})
    return spec
