"""`smsbatch backup` and `smsbatch prune` on real database files."""

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

from conftest import invoke, wait_for

WRITER = textwrap.dedent("""
    import os, sys
    from smsbatch.batching import Rules
    from smsbatch.db import Store
    db, stop = sys.argv[1], sys.argv[2]
    store, rules, i = Store(db), Rules(max_messages=3), 0
    while not os.path.exists(stop):
        i += 1
        store.add_message(f"SMw{i:030d}", f"+1555{i % 7:07d}", "+15550000000", f"text {i}", 1e9 + i, rules)
""")


def consistent(path):
    """Every batch's message_count matches its stored texts: a copy from one moment."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        mismatched = conn.execute(
            "SELECT count(*) FROM batches b WHERE message_count !="
            " (SELECT count(*) FROM messages m WHERE m.batch_id = b.id)").fetchone()[0]
        return mismatched == 0, conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


def test_backup_while_another_process_writes_is_consistent_and_private(db_path, tmp_path):
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, db_path, str(stop)])
    try:
        count = lambda: sqlite3.connect(db_path).execute("SELECT count(*) FROM messages").fetchone()[0]
        assert wait_for(lambda: count() >= 30)
        for n in range(3):
            before = count()
            dest = str(tmp_path / f"copy{n}.db")
            result = invoke(["--db", db_path, "backup", dest])
            assert result.exit_code == 0, result.output
            ok, texts = consistent(dest)
            assert ok and texts >= before, (texts, before)
            assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
            assert not os.path.exists(dest + "-wal")
            assert f"{texts} texts" in result.output
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert writer.returncode == 0
    assert count() >= texts


def test_backup_refuses_to_overwrite_unless_forced(db_path, tmp_path):
    dest = tmp_path / "copy.db"
    dest.write_text("precious")
    result = invoke(["--db", db_path, "backup", str(dest)])
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert dest.read_text() == "precious" and len(result.output.strip().splitlines()) == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    result = invoke(["--db", db_path, "backup", str(dest), "--force"])
    assert result.exit_code == 0 and consistent(str(dest))[0]


def test_backup_errors_are_one_line(tmp_path, db_path):
    result = invoke(["--db", str(tmp_path / "none.db"), "backup", str(tmp_path / "b.db")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = invoke(["--db", db_path, "backup", str(tmp_path / "no" / "such" / "dir.db")])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output
