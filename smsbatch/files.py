"""Writing customer data to a file: private (0600) and never half-written."""

import os
import stat
import sys
import tempfile


def write_lines(path, lines):
    """Write `lines` (str, no newline) to `path` ("-": stdout). Returns how many were written.

    A regular file (new or existing) is written to a temporary file in the same folder,
    created 0600 whatever the umask, synced, then renamed over the target: on any failure
    the target is left as it was. Anything else (a device such as /dev/full, a pipe) is
    written in place and flushed, so a failed write is raised here rather than lost at exit.

    Raises:
        OSError: the write failed (disk full, no permission, ...).
    """
    if path == "-":
        return _write_stream(sys.stdout.buffer, lines)
    target = os.path.realpath(path)
    try:
        regular = stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        regular = True
    if not regular:
        with open(target, "wb") as stream:
            return _write_stream(stream, lines)
    return _write_replacing(target, lines)


def _write_stream(stream, lines):
    count = 0
    for line in lines:
        stream.write(line.encode("utf-8") + b"\n")
        count += 1
    stream.flush()
    return count


def _write_replacing(target, lines):
    folder, name = os.path.split(target)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        os.fchmod(fd, 0o600)  # mkstemp makes it 0600 already; say so, whatever the platform
        with os.fdopen(fd, "wb") as stream:
            count = _write_stream(stream, lines)
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return count
