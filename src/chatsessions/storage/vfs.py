"""The file store's only door to the operating system.

Every file-system call of the file store goes through a `FileSystem`, so that
tests can inject faults (ENOSPC, EIO) or record every write, fsync, rename and
creation to simulate power loss, as SQLite does with its VFS.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class FileSystem:
    """Real POSIX calls. Subclasses override single methods to misbehave."""

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes) -> None:
        """Write all of `data` at the current position (the files are O_APPEND)."""
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        chunks: list[bytes] = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def read_file(self, path: Path) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        try:
            return self.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            self.close(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path) -> None:
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def stat_size(self, path: Path) -> int | None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def writable(self, path: Path) -> bool:
        return os.access(path, os.W_OK)

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)

    def lock(self, path: Path) -> int:
        """Take an exclusive, non-blocking lock; raises BlockingIOError when held elsewhere."""
        fd = self.open(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
