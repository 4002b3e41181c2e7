"""Where a benchmark's JSON goes: ``--out`` is a file, or a folder (ending in / or existing) that
gets ``default_name``."""
import json
from pathlib import Path


def write_result(result: dict, out: str, default_name: str) -> Path:
    path = Path(out)
    if out.endswith("/") or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path = path / default_name
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def readme_path(path: Path) -> str:
    """``path`` as the README links it: relative to the project root when inside it."""
    root = Path(__file__).resolve().parents[1]
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)
