"""Writing customer data to a file: private (0600), never half-written, and never through a
link or onto the live database.

A path an operator gives (`export -o`, `backup`) may sit in a folder others can write to: a
symbolic link planted there would otherwise make smsbatch create or overwrite the file it
points to, and a name that is the database (or its -wal/-shm), reached through a linked
folder, would replace the file every process is writing. Both are refused, compared as
files (device and inode), never as strings.

A link among the folders of the path (`shared/exports -> private/`) redirects the write just
as well, so it is refused too, whoever owns it: a link's owner does not say who chose where it
points (anyone who can write its folder can replace it; as root, every link is root's), and
the last name is refused whatever its owner. The one exception is the system's own links
(/var/run -> /run): owned by root, in folders only root can write from / down, so nobody
but root could have planted them.
"""

import os
import stat
import sys
import tempfile

from smsbatch.errors import SmsbatchError

# The files SQLite keeps for a database: the file itself and its WAL, shared-memory and rollback journal.
DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def check_target(path, database=None):
    """Refuse to write `path` when it is a symbolic link, exists and is not a regular file (a
    device, a FIFO, a folder), is `database` or one of its -wal/-shm/-journal files (the same
    file, or the same name in the same folder, however either path is spelt), or when a folder
    on its way is a link (check_folders).

    Raises:
        SmsbatchError: saying which, in one line.
    """
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    if found is not None and stat.S_ISLNK(found.st_mode):
        raise SmsbatchError(f"{path} is a symbolic link: give the path of a real file (a link could point anywhere)")
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise SmsbatchError(f"{path} exists and is not a regular file: choose another name")
    if database and is_database_file(path, database):
        raise SmsbatchError(f"{path} is the live database {database} or one of its -wal/-shm files: "
                            "choose another name")
    check_folders(path)  # last: of two refusals, "is the live database" says more


def check_folders(path):
    """Refuse `path` when one of the folders on the way to it is a symbolic link other than
    the system's own (see the module's docstring), so no folder link can move the write.

    Raises:
        SmsbatchError: naming the link and where it points, in one line.
    """
    parts = os.path.dirname(os.path.abspath(path)).split(os.sep)[1:]
    walked = os.sep
    for part in filter(None, parts):
        step = os.path.join(walked, part)
        try:
            found = os.lstat(step)
        except OSError:  # missing or unreadable: the write itself will say so
            return
        if stat.S_ISLNK(found.st_mode):
            if not (found.st_uid == 0 and _only_root_writes(walked)):
                raise SmsbatchError(f"{path}: the folder {step} is a symbolic link (to {os.path.realpath(step)}): "
                                    "give the real path (a link could point anywhere)")
            step = os.path.realpath(step)
        walked = step


def _only_root_writes(folder):
    """Are `folder` and every folder above it owned by root and writable by no one else?"""
    while True:
        found = os.stat(folder)
        if found.st_uid != 0 or found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        above = os.path.dirname(folder)
        if above == folder:
            return True
        folder = above


def is_database_file(path, database):
    """Is `path` the database or one of its side files? By identity: the same file (a hard
    link included), or the same name in the same folder (a folder reached through a link)."""
    place = _place(path)
    for db in {database, os.path.realpath(database)}:
        db_place = _place(db)
        if place and db_place and place[0] == db_place[0] and place[1] in {db_place[1] + s for s in DATABASE_SUFFIXES}:
            return True
        for suffix in DATABASE_SUFFIXES:
            try:
                if os.path.samefile(path, db + suffix):
                    return True
            except OSError:  # one of them does not exist: not the same file
                continue
    return False


def _place(path):
    """((device, inode) of the folder holding `path`, its last name), or None if the folder is missing."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino), name


def write_lines(path, lines, database=None):
    """Write `lines` (str, no newline) to `path` ("-": stdout). Returns how many were written.

    `path` must be a regular file or a new name (check_target; `database`: the live database,
    which it must not be). The lines go to a temporary file created in the same folder
    (O_EXCL, O_NOFOLLOW, 0600 whatever the umask), synced, then renamed over `path`: on any
    failure `path` is left as it was, and a link planted meanwhile is replaced, never followed.

    Raises:
        SmsbatchError: `path` is refused (check_target).
        OSError: the write failed (disk full, no permission, ...).
    """
    if path == "-":
        return _write_stream(sys.stdout.buffer, lines)
    check_target(path, database)
    return _write_replacing(os.path.abspath(path), lines)


def _write_stream(stream, lines):
    count = 0
    for line in lines:
        stream.write(line.encode("utf-8") + b"\n")
        count += 1
    stream.flush()
    return count


def _write_replacing(target, lines):
    folder, name = os.path.split(target)
    # mkstemp opens with O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        os.fchmod(fd, 0o600)  # mkstemp makes it 0600 already; say so, whatever the platform
        with os.fdopen(fd, "wb") as stream:
            count = _write_stream(stream, lines)
            os.fsync(stream.fileno())
        os.replace(temporary, target)  # rename replaces a link itself, never what it points to
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return count
