"""What every suite shares: the run's environment record, saved-for-backward accounting, results files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from runlora_fx.saved_bytes import SavedBytes  # noqa: F401 (re-exported for the suites)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def environment() -> dict:
    """Versions, threads, OpenMP wait policy, load average and commit: what a reader needs to judge a figure."""
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_start": _loadavg(),
        "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional dependency missing
            info[mod] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: never refresh the index
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10, env=env).stdout
        info["worktree_dirty"] = bool(dirty.strip())
    except Exception:  # pragma: no cover - not a git checkout
        info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def loadavg() -> list[float] | None:
    return _loadavg()


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable))
    tmp.replace(path)


def _jsonable(obj):
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats printed with 3 significant digits.

    >>> print(markdown_table(["a", "b"], [[1, 0.12345]]))
    | a | b |
    |---|---|
    | 1 | 0.123 |
    """
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def suite_paths(out: Path, suite: str, quick: bool) -> tuple[Path, Path]:
    stem = f"{suite}_quick" if quick else suite
    return out / f"{stem}.json", out / f"{stem}.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
