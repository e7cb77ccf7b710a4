"""Atomic file output: a crash at any moment leaves either the old file or the complete new one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path`` (ending in ``suffix``, so that writers that choose the
    format by extension still can); on success it is renamed over ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:  # from here on an interruption (SIGINT, or SIGTERM turned into an exception) removes the temporary
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.close(fd)
        yield temp
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable, where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_output(path) as temp:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------- signals

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (temporaries removed, nothing half-written
    left in place)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) instead of ending the
    process on the spot; the previous handler comes back afterwards. Only the main thread can set
    handlers, so elsewhere this does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------- file sets

INCOMPLETE_MARKER = "gradreg_incomplete.json"
_TEMP_RANDOM = 8  # characters mkstemp puts between prefix and suffix


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def is_temp_of(name: str, file_name: str) -> bool:
    """Whether ``file_name`` is one of the hidden temporaries this module makes for ``name``
    (``.NAME.XXXXXXXX`` followed by a suffix: ``.tmp``, or NAME's own extension)."""
    prefix = f".{name}."
    if not file_name.startswith(prefix):
        return False
    rest = file_name[len(prefix):]
    random_part, suffix = rest[:_TEMP_RANDOM], rest[_TEMP_RANDOM:]
    return (len(random_part) == _TEMP_RANDOM and all(c.isalnum() or c == "_" for c in random_part)
            and suffix in ("", ".tmp", "".join(Path(name).suffixes)))


class FileSet:
    """The result files of one run in one folder, replaced as a whole.

    Every file is first written to a hidden temporary beside its target (:meth:`stage`); nothing
    visible changes until :meth:`commit`, which

    1. writes the manifest (the file that names every file of the run with its SHA-256) to a
       temporary as well, so that all the data is on disk;
    2. writes the marker ``gradreg_incomplete.json`` (naming the files of both runs);
    3. removes the previous manifest, renames the new files into place, removes the files of the
       previous run that the new one does not write, and renames the new manifest into place;
    4. removes the marker.

    A kill at any moment leaves the previous complete set (before step 2), the new complete set (after
    step 4), or a folder that holds the marker. Only files named in ``previous`` (the files a
    previous run of the package wrote) are ever removed, and never one of ``protect`` (the inputs).
    """

    def __init__(self, folder, previous=(), protect=()):
        self.folder = Path(folder)
        self.previous = set(previous)
        self.protect = [Path(p) for p in protect if p is not None]
        self.staged: dict[str, str] = {}

    def stage(self, name: str) -> str:
        """A fresh hidden temporary path for the file ``name`` (with its extension, for format-sniffing
        writers); write the file there."""
        if name in self.staged:
            raise ValueError(f"{name} is already staged")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix="".join(Path(name).suffixes), dir=self.folder)
        self.staged[name] = temp
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        return temp

    def discard(self) -> None:
        """Remove every staged temporary (after a failure or an interruption)."""
        for temp in self.staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        self.staged.clear()

    def _protected(self, path: Path) -> bool:
        for source in self.protect:
            try:
                if path.resolve() == source.resolve() or (path.exists() and source.exists()
                                                          and os.path.samefile(path, source)):
                    return True
            except OSError:
                return True  # when in doubt, keep it
        return False

    def commit(self, manifest_name: str, manifest) -> dict:
        """Put the staged files in place as described above; ``manifest(files)`` returns the bytes of the
        manifest, given {name: {"sha256", "bytes"}} of the staged files. Returns {name: final path}."""
        try:
            files = {name: {"sha256": _sha256(temp), "bytes": os.path.getsize(temp)}
                     for name, temp in self.staged.items()}
            manifest_temp = self.stage(manifest_name)
            with open(manifest_temp, "wb") as f:
                f.write(manifest(files))
                f.flush()
                os.fsync(f.fileno())
            for temp in self.staged.values():  # the data is durable before any visible change
                with open(temp, "rb") as f:
                    os.fsync(f.fileno())
            new = set(self.staged)
            marker = {"note": "a gradreg run was interrupted while replacing the result files in this folder; "
                              "they may come from two runs: run it again with --force",
                      "previous": sorted(self.previous), "new": sorted(new)}
            atomic_write(self.folder / INCOMPLETE_MARKER,
                         lambda f: f.write((json.dumps(marker, indent=2) + "\n").encode()))
            _fsync_dir(self.folder)
        except BaseException:
            self.discard()
            raise
        # From here on the marker says the folder is mid-change: a failure leaves it in place.
        try:
            old_manifest = self.folder / manifest_name
            if old_manifest.exists() and not self._protected(old_manifest):
                os.unlink(old_manifest)
            for name, temp in list(self.staged.items()):
                if name != manifest_name:
                    os.replace(temp, self.folder / name)
            for name in sorted(self.previous - new):
                stale = self.folder / name
                if stale.exists() and not self._protected(stale):
                    os.unlink(stale)
            os.replace(manifest_temp, old_manifest)
            _fsync_dir(self.folder)
            os.unlink(self.folder / INCOMPLETE_MARKER)
            _fsync_dir(self.folder)
        finally:
            self.discard()  # whatever was not moved into place
        return {name: self.folder / name for name in sorted(new)}

    def remove_stale_temporaries(self, names) -> list:
        """Remove hidden temporaries of ``names`` left by a killed run (SIGKILL gives no chance to clean)."""
        removed = []
        if not self.folder.is_dir():
            return removed
        for entry in self.folder.iterdir():
            if any(is_temp_of(name, entry.name) for name in names) and str(entry) not in self.staged.values():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                removed.append(entry)
        return removed
