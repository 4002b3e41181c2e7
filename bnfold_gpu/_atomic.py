"""Files written whole or not at all, and the temporary files that takes.

A target is written as a new file beside it (same folder: the rename is atomic), created exclusively
(``O_EXCL | O_NOFOLLOW``, a random part in its name: nothing planted at a guessable name can redirect
the write), flushed to disk, then renamed onto the target. A symlink is written through: its target
gets the new content and the link stays.

Every temporary file or folder is named ``.bnfold-<pid>@<host>-<random>[-<target>].tmp[<suffix>]``
so that a later run on the same host can recognise the ones a killed run left (:func:`remove_stale`;
the host, with its process-id namespace, because a folder may be shared between machines or
containers whose process ids mean nothing to each other), and is registered while it lives so that an emergency exit can remove it
(:func:`remove_live`; :func:`track` registers scratch made elsewhere).
"""
import errno
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from typing import List, Optional, Sequence

_STALE_NAME = re.compile(r"^\.bnfold-(\d+)@.*\.tmp(\.[A-Za-z0-9]+)?$")
_LABEL_CHARS = 80        # of the target's name kept in a temporary name (names are at most 255 bytes)
ROOM_MARGIN = 1 << 20    # left free beyond what a write is expected to take

_lock = threading.RLock()   # also taken by a second Ctrl-C's handler, on a thread that may hold it
_live = set()            # temporary files and folders of this process, removed by remove_live()
_committed: List[str] = []   # targets renamed into place, in order


class TargetError(ValueError):
    """A path that cannot be written as asked; the message is one line naming it."""


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_target(path: str) -> str:
    """The file to write for ``path`` (a symlink's target, followed to the end), refused with a
    TargetError unless a regular file can be created or replaced there: an existing directory, FIFO,
    device or socket is never replaced, and the folder must exist and be writable. Checked before
    any work, so that nothing is done that could not be saved."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise TargetError(f"{path}: {reason(e)}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise TargetError(f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            kind = next((words for test, words in _KINDS if test(st.st_mode)), "a special file")
            raise TargetError(f"{path}: is {kind}, not a regular file; bnfold replaces only "
                              f"regular files")
    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise TargetError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TargetError(f"{path}: folder {folder} is not writable")
    return real


def reason(e: OSError) -> str:
    """An OSError in words, without its errno and path."""
    if e.errno == errno.ELOOP:
        return "a loop of symbolic links"
    words = e.strerror or str(e)
    return words[:1].lower() + words[1:]


def track(path: str) -> None:
    """Register a temporary file or folder for :func:`remove_live` (``untrack`` once removed)."""
    with _lock:
        _live.add(path)


def untrack(path: str) -> None:
    with _lock:
        _live.discard(path)


def host() -> str:
    """This host's name, and its process-id namespace where the system says it (a container may
    share both a folder and the host's name, its process ids meaning nothing outside it)."""
    name = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname()) or "localhost"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except (OSError, AttributeError):
        return name
    return f"{name}.pidns{namespace}"


def _unnamespaced_prefix(pid: int) -> str:
    """The prefix of temporary names before they named the process-id namespace (version 0.1.0's
    first releases): what they left is still recognised."""
    name = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname()) or "localhost"
    return f".bnfold-{pid}@{name}-"


def prefix(pid: Optional[int] = None) -> str:
    """The start of the temporary names of process ``pid`` (this one) on this host."""
    return f".bnfold-{os.getpid() if pid is None else pid}@{host()}-"


def _name_parts(label: Optional[str]):
    tail = f"-{label[:_LABEL_CHARS]}" if label else ""
    return prefix(), tail


def scratch_dir(folder: Optional[str] = None, label: Optional[str] = None) -> str:
    """A new, registered folder in ``folder`` (default: the system's temporary folder) for scratch
    files; remove it with :func:`remove`."""
    prefix, tail = _name_parts(label)
    path = tempfile.mkdtemp(prefix=prefix, suffix=tail + ".tmp", dir=folder)
    track(path)
    return path


def remove(path: str) -> None:
    """Remove one of this process's temporary files or folders (gone already is fine)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        untrack(path)


def remove_live() -> None:
    """Remove every temporary file and folder this process holds: for an exit that cannot unwind.
    Safe to call from any thread."""
    with _lock:
        paths = list(_live)
    for path in paths:
        try:
            remove(path)
        except OSError:
            pass


def committed() -> List[str]:
    """The targets renamed into place so far in this process, in order."""
    with _lock:
        return list(_committed)


def remove_stale(folder: str, keep: Sequence[str] = ()) -> List[str]:
    """Remove from ``folder`` the temporary files and folders that runs of bnfold left when they were
    killed: named as this module names them, owned by this user, made by a process of this host
    (and process-id namespace) that no longer exists. Anything else (other names, symlinks, a live
    process's files, the files ``keep`` names, such as the input of the run that calls this) is
    left alone. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    kept = set()
    for path in keep:
        try:
            st = os.stat(path)
            kept.add((st.st_dev, st.st_ino))
        except (OSError, TypeError, ValueError):
            pass
    for entry in entries:
        m = _STALE_NAME.match(entry.name)
        # the host's name may hold "-": compared whole, through the prefix this host would give
        # (or gave before it named the process-id namespace)
        if not m or _alive(int(m.group(1))) or not entry.name.startswith(
                (prefix(int(m.group(1))), _unnamespaced_prefix(int(m.group(1))))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != os.geteuid() or (st.st_dev, st.st_ino) in kept:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(entry.path)
            elif stat.S_ISREG(st.st_mode):
                os.unlink(entry.path)
            else:
                continue
        except OSError:
            continue
        removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    """False only where ``pid`` is certainly no process (signal 0 delivers nothing)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):   # another user's process, or no pid a process can have
        return True
    return True


def free_bytes(folder: str) -> Optional[int]:
    """Bytes an unprivileged write can still take in ``folder``'s file system; None if unknown."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def check_room(path: str, folder: str, nbytes: int, size_words) -> None:
    """TargetError unless ``folder`` has room for ``nbytes`` (and a margin) more; ``path`` names the
    file to write in the message, ``size_words(n)`` says a size."""
    free = free_bytes(folder)
    need = nbytes + ROOM_MARGIN
    if free is not None and free < need:
        raise TargetError(f"{path}: not enough free space in {folder}: writing needs about "
                          f"{size_words(need)}, {size_words(free)} is free; nothing written")


def _default_mode() -> int:
    """The mode a new file gets: 0o666 less the process's umask, read without changing it where the
    system says it (Linux: /proc/self/status), since setting it, even for a moment, applies to
    files that other threads create meanwhile."""
    umask = _read_umask()
    if umask is None:
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _read_umask():
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fsync_folder(folder: str) -> None:
    """The rename itself on disk; a file system that cannot sync a folder still renamed."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A new file that replaces ``target`` (through symlinks) only on :meth:`commit`.

    ``file`` is the open binary file to write; ``path`` its temporary name, beside the target, with
    ``suffix`` at its end (a reader that goes by the extension can open it before the commit).
    :meth:`finish` flushes it to disk and gives it the replaced file's owner, group and mode (owner
    and group where permitted), or a new file's mode; :meth:`discard` removes it. Used as a context
    manager, it is discarded unless committed."""

    def __init__(self, target: str, suffix: str = ""):
        self.requested = target
        self.target = os.path.realpath(target)
        folder = os.path.dirname(self.target)
        prefix, tail = _name_parts(os.path.basename(self.target))
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=tail + ".tmp" + suffix, dir=folder)
        track(self.path)
        self.file = os.fdopen(fd, "wb")
        self.committed = self.finished = False
        self.sync_seconds = 0.0   # how long flushing it to disk took

    def finish(self) -> None:
        if self.finished:
            return
        self.file.flush()
        since = time.perf_counter()
        os.fsync(self.file.fileno())
        self.sync_seconds = time.perf_counter() - since
        self.file.close()
        try:
            like = os.stat(self.target)
        except FileNotFoundError:
            like = None
        if like is None:
            os.chmod(self.path, _default_mode())
            self.finished = True
            return
        mine = os.stat(self.path)
        if (mine.st_uid, mine.st_gid) != (like.st_uid, like.st_gid):
            for uid in (like.st_uid, -1):          # the group alone where the owner is not ours to give
                try:
                    os.chown(self.path, uid, like.st_gid)
                    break
                except PermissionError:
                    continue
        os.chmod(self.path, stat.S_IMODE(like.st_mode))   # after chown, which clears set-id bits
        self.finished = True

    def commit(self) -> str:
        """Rename the finished file onto the target; returns the target's real path."""
        self.finish()
        os.replace(self.path, self.target)
        with _lock:
            self.committed = True
            _live.discard(self.path)
            _committed.append(self.target)
        _fsync_folder(os.path.dirname(self.target))
        return self.target

    def discard(self) -> None:
        """Remove the temporary file unless committed. Never raises: it runs as an error is being
        raised, which it must not replace; a file it cannot remove (its folder made read-only
        meanwhile) stays registered, and a later run in that folder removes it."""
        if not self.committed:
            try:
                self.file.close()
            except OSError:
                pass
            try:
                remove(self.path)
            except OSError:
                track(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


def write_bytes(target: str, data: bytes) -> str:
    """``target`` holds ``data`` whole, or is left as it was."""
    with AtomicFile(target) as f:
        f.file.write(data)
        return f.commit()


__all__ = ["AtomicFile", "TargetError", "check_target", "check_room", "free_bytes", "prefix",
           "reason", "remove", "remove_live", "remove_stale", "committed", "scratch", "scratch_dir",
           "track", "untrack", "write_bytes"]
