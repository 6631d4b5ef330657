"""Writing a user-facing file safely: atomically, with the umask's mode, and marked as this toolkit's own.

- A file is written to a temporary beside it and renamed into place, so a crash leaves the old file or the
  new one, never half of one. The temporary's name carries the writer's process id
  (``NAME.<pid>.<random>.tmp``): a later write of the same file removes temporaries whose writer is gone
  (a kill -9 cannot run clean-up code), and never one whose writer still runs.
- Outputs that a later run may replace without ``--force`` (a prediction CSV, a pseudo-label list) are
  marked when written: the folder's hidden ``.finetune-written.json`` holds each such file's SHA-256.
  A file is "an earlier output" only while its content still matches its mark, so a Kaggle
  ``sample_submission.csv`` or a copy of the truth CSV — same header, same Ids — is never taken for
  one, and neither is an earlier prediction that the user has since edited.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Union

from finetune.errors import FinetuneError

__all__ = ["check_writable", "replace_atomically", "temporary_beside", "temporary_path", "mark_written",
           "was_written_here"]

MARKS = ".finetune-written.json"

PathLike = Union[str, Path]


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def replace_atomically(tmp: PathLike, path: PathLike) -> None:
    """Rename a finished temporary file onto `path`, with the mode a plain write would give it.

    mkstemp creates files 0600; without the chmod a checkpoint or submission would be unreadable to the
    group and an overwritten 0644 file would turn 0600. On failure the temporary file is removed.
    """
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(folder: Path, fix: str) -> None:
    """Fail now, in one line naming `folder` and `fix`, when no file can be created in it (created if missing).

    Checked before the work, not when the first file is written: a read-only run folder would otherwise
    fail a resumed run after its first epoch, and a read-only --out after the whole prediction.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise FinetuneError(f"cannot write in {folder}: {err.strerror or type(err).__name__}; {fix}") from None


def _writer_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of `path` left by writers that no longer run (killed mid-write); the ones removed."""
    removed = []
    for name in glob.glob(glob.escape(str(path)) + ".*.tmp"):
        pid = Path(name).name[len(path.name) + 1:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _writer_gone(int(pid)):
            try:
                os.unlink(name)
                removed.append(Path(name))
            except OSError:  # another process cleaned it first, or the folder is read-only: harmless
                pass
    return removed


def temporary_beside(path: Path) -> tuple[int, str]:
    """An open (fd, name) temporary next to `path` for an atomic write, after clearing stale ones of `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)


def temporary_path(path: Path) -> Path:
    """A closed temporary file next to `path`, for a library that writes by file name (cleared like the others)."""
    handle, name = temporary_beside(path)
    os.close(handle)
    return Path(name)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):  # small blocks: flat memory
            sha.update(block)
    return sha.hexdigest()


def _read_marks(folder: Path) -> dict[str, str]:
    try:
        marks = json.loads((folder / MARKS).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: nothing is recognised, so nothing is replaced
        return {}
    return {k: v for k, v in marks.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(
        marks, dict) else {}


def mark_written(path: Path) -> None:
    """Record that this toolkit just wrote `path` (its content hash), so a later run may replace it."""
    path = Path(path)
    marks = {name: digest for name, digest in _read_marks(path.parent).items() if (path.parent / name).is_file()}
    marks[path.name] = _digest(path)
    target = path.parent / MARKS
    fd, tmp = temporary_beside(target)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(marks, handle, indent=1, sort_keys=True)
    replace_atomically(tmp, target)


def was_written_here(path: Path) -> bool:
    """True when `path` is a file this toolkit wrote and nobody has changed since (see `mark_written`)."""
    path = Path(path)
    digest = _read_marks(path.parent).get(path.name)
    try:
        return digest is not None and path.is_file() and _digest(path) == digest
    except OSError:
        return False
