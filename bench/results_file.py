"""Where the bench scripts put their JSON: ``write_result(path, result)``."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: Path | None, result: dict) -> None:
    """Write ``result`` as indented JSON to ``path`` (folders made as needed) and say so; nothing
    when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
