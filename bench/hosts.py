"""Hosts of their own on one machine, for the benchmarks: a CPU cgroup with a quota per host.

Two `serve` instances on one machine's shared cores measure how much of the machine one
instance leaves idle, not what a second host adds: on 2 cores, one `serve`, PostgreSQL and
the load generator already use most of them. A Host gives each instance a CPU share of its
own (HOST_CORES a host, the rest for the database server and the load), so that adding an
instance adds CPU, as adding a host does; what the figure then measures is whether the
shared database lets the hosts' texts through side by side.

Needs a writable cpu cgroup: cgroup v1's /sys/fs/cgroup/cpu, or cgroup v2 with the cpu
controller enabled for /sys/fs/cgroup's children (root, on most machines). cgroup_root()
says where, or why not.
"""

import os
import secrets
import time

HOST_CORES = 0.5  # two hosts take one of this machine's two cores, PostgreSQL and wrk the other
PERIOD_US = 10_000  # short periods: a host that used its share waits at most this long (10 ms)
V1, V2 = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup"


def cgroup_root():
    """(kind, folder) of a cpu cgroup hierarchy this process may make groups in, or
    (None, why not)."""
    if os.path.exists(os.path.join(V1, "cpu.cfs_quota_us")):
        root, kind = V1, "v1"
    elif "cpu" in _read(os.path.join(V2, "cgroup.subtree_control")).split():
        root, kind = V2, "v2"
    else:
        return None, "no cpu cgroup controller to give each serve a CPU share of its own"
    if not os.access(root, os.W_OK):
        return None, f"{root} is not writable (run the benchmark as root)"
    return kind, root


class Host:
    """A cpu cgroup with a quota of `cores` (removed on exit); wrap(cmd) runs cmd in it."""

    def __init__(self, cores=HOST_CORES):
        self.kind, root = cgroup_root()
        if self.kind is None:
            raise RuntimeError(root)
        self.path = os.path.join(root, f"smsbatch_bench_{secrets.token_hex(4)}")
        os.mkdir(self.path)
        quota = int(PERIOD_US * cores)
        if self.kind == "v1":
            _write(os.path.join(self.path, "cpu.cfs_period_us"), PERIOD_US)
            _write(os.path.join(self.path, "cpu.cfs_quota_us"), quota)
        else:
            _write(os.path.join(self.path, "cpu.max"), f"{quota} {PERIOD_US}")

    def wrap(self, cmd):
        """cmd, started inside this host (the shell joins the group, then execs cmd)."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _ in range(50):  # its processes were stopped; the kernel may take a moment to empty it
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)
        os.rmdir(self.path)  # raises: say which group was left behind


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))
