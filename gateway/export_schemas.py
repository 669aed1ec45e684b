"""Write the JSON Schema of every correction event type into a directory (docs/events/).

Run ``python -m gateway.export_schemas [TARGET]`` after changing ``gateway.events``; a unit test
fails while the committed files differ from what this generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from gateway.events import EVENT_TYPES, event_schema

__all__ = ["export_schemas", "render_schema"]


def render_schema(event_type: str) -> bytes:
    """The schema file content for one event type: indented JSON with a trailing newline."""
    return orjson.dumps(event_schema(event_type), option=orjson.OPT_INDENT_2) + b"\n"


def export_schemas(target: Path) -> list[Path]:
    """Write ``<type>.schema.json`` for every event type into ``target``; returns the paths written."""
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for event_type in EVENT_TYPES:
        path = target / f"{event_type}.schema.json"
        path.write_bytes(render_schema(event_type))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else Path("docs/events")
    for path in export_schemas(target):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
