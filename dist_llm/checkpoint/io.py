"""Output directories that are never left half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

from dist_llm.errors import DistLLMError


def check_output_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise DistLLMError(f"output directory {path} already exists; pass --overwrite to replace it")


def make_staging_dir(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    return tmp


def publish_staging_dir(tmp: str, path: str) -> None:
    """Replace `path` by the finished `tmp` (same filesystem, so the final step is a rename)."""
    if os.path.exists(path):
        old = tmp + ".old"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


@contextmanager
def atomic_output_dir(path: str, overwrite: bool):
    """Yield a staging directory next to `path`; on success it becomes `path`, on failure it is removed."""
    check_output_dir(path, overwrite)
    tmp = make_staging_dir(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_staging_dir(tmp, path)


def copy_files(paths: list[str], dst_dir: str) -> None:
    for p in paths:
        shutil.copy2(p, os.path.join(dst_dir, os.path.basename(p)))
