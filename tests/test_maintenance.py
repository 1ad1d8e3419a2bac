"""`smsbatch backup` and `smsbatch prune` on real database files."""

import json
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


def test_backup_never_replaces_what_is_not_a_regular_file(db_path, tmp_path):
    """A device, FIFO or folder at the backup path stays, even with --force (a FIFO stands in
    for a device node here: the tests never touch a real device)."""
    fifo, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    for force in ([], ["--force"]):
        result = invoke(["--db", db_path, "backup", str(fifo), *force])
        assert result.exit_code == 1, result.output
        assert result.output.strip() == f"Error: {fifo} exists and is not a regular file: choose another name"
        result = invoke(["--db", db_path, "backup", str(folder), *force])
        assert result.exit_code == 2 and "is a directory" in result.output  # click's own refusal
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.isdir(folder) and os.listdir(folder) == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_backup_errors_are_one_line(tmp_path, db_path):
    result = invoke(["--db", str(tmp_path / "none.db"), "backup", str(tmp_path / "b.db")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = invoke(["--db", db_path, "backup", str(tmp_path / "no" / "such" / "dir.db")])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output


# -- prune ------------------------------------------------------------------------

from conftest import T0, TextMeanwhile, add, offline_processor  # noqa: E402

DAY = 86400
OLD, RECENT, NOW = T0, T0 + 95 * DAY, T0 + 100 * DAY
P = {name: f"+1555100{n:04d}" for n, name in enumerate(
    ("sent", "chain", "ongoing", "stopped", "held", "pending", "manual", "kept_chain"))}


def populate(db_path, store, settings, clock):
    """Conversations of every kind, old and recent, made the way smsbatch makes them."""
    add(store, P["sent"], "old question", OLD)
    add(store, P["ongoing"], "old one", OLD)
    add(store, P["stopped"], "hello", OLD)
    add(store, P["kept_chain"], "a", OLD)
    clock.now = OLD + 20
    offline_processor(settings, clock).run()
    add(store, P["stopped"], "STOP", OLD + 25)
    add(store, P["chain"], "first", OLD + 30)
    clock.now = OLD + 50  # a text arrives while the AI answers: the batch folds into the newer one
    offline_processor(settings, clock, responder=TextMeanwhile(db_path, P["chain"], "second", OLD + 51)).run()
    store.hold(P["held"], "legal", OLD)
    add(store, P["held"], "why?", OLD + 60)
    add(store, P["kept_chain"], "b", OLD + 60)
    clock.now = OLD + 100
    offline_processor(settings, clock).run()
    add(store, P["pending"], "still open", OLD + 95)
    # an old batch that a recently finished one was folded into (as version 1 could leave it)
    a, b = [r[0] for r in store.conn.execute(
        "SELECT id FROM batches WHERE phone = ? ORDER BY seq", (P["kept_chain"],))]
    store.conn.execute("UPDATE batches SET state = 'superseded', superseded_by = ?, completed_at = ? WHERE id = ?",
                       (a, RECENT, b))
    store.record_manual("SMmanualold", P["manual"], "+15550000000", "old hand reply", OLD)
    store.record_manual("SMmanualnew", P["manual"], "+15550000000", "new hand reply", RECENT)
    add(store, P["ongoing"], "new one", RECENT)


def phones_of(store, table):
    return {r[0] for r in store.conn.execute(f"SELECT DISTINCT phone FROM {table}")}


def test_prune_deletes_old_finished_history_and_nothing_else(db_path, store, settings, clock):
    populate(db_path, store, settings, clock)
    assert {r[0] for r in store.conn.execute("SELECT state FROM batches WHERE phone = ?", (P["chain"],))} == {
        "superseded", "sent"}
    env = {"SMSBATCH_DB": db_path}
    before = store.conn.execute("SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM messages)").fetchone()
    dry = invoke(["prune", "--older-than", "90d", "--now", str(NOW), "--dry-run", "--json"], env)
    would = json.loads(dry.output)
    assert store.conn.execute("SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM messages)").fetchone() == before
    result = invoke(["prune", "--older-than", "90d", "--now", str(NOW), "--json"], env)
    gone = json.loads(result.output)
    assert result.exit_code == 0 and {k: gone[k] for k in would if k != "dry_run"} == {
        k: would[k] for k in would if k != "dry_run"}
    assert gone["batches"] == 4 and gone["texts"] == 4 and gone["manual_replies"] == 1 and gone["replies"] == 3
    assert store.conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert P["sent"] not in phones_of(store, "batches") and P["chain"] not in phones_of(store, "batches")
    kept = {r[0]: r[1] for r in store.conn.execute("SELECT body, phone FROM messages")}
    assert set(kept) == {"new one", "hello", "STOP", "why?", "still open", "a", "b"}
    assert [r[0] for r in store.conn.execute("SELECT sid FROM outbound WHERE phone = ?", (P["manual"],))] == [
        "SMmanualnew"]
    orphans = store.conn.execute("SELECT count(*) FROM batch_events WHERE batch_id NOT IN (SELECT id FROM batches)")
    assert orphans.fetchone()[0] == 0
    # a conversation whose open-batch pointer was pruned starts again with its next text
    add(store, P["sent"], "back again", NOW)
    assert store.conn.execute("SELECT count(*) FROM batches WHERE phone = ?", (P["sent"],)).fetchone()[0] == 1
    again = invoke(["prune", "--older-than", "90d", "--now", str(NOW)], env)
    assert again.exit_code == 0 and again.output.startswith("deleted 0 batches, 0 texts")


def test_process_prunes_with_retention_days(db_path, store, settings, clock):
    populate(db_path, store, settings, clock)
    env = {"SMSBATCH_DB": db_path, "SMSBATCH_AI": "offline", "SMSBATCH_SMS": "console",
           "SMSBATCH_RETENTION_DAYS": "90", "SMSBATCH_MAX_AGE_SECONDS": str(200 * DAY)}
    result = invoke(["process", "--now", str(NOW)], env)
    assert result.exit_code == 0, result.output
    assert "pruned 4 batches, 4 texts, 4 replies older than 90 days" in result.output
    assert P["sent"] not in phones_of(store, "batches")
    assert store.conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_prune_refuses_a_bad_age(db_path):
    result = invoke(["prune", "--older-than", "ninety days"], {"SMSBATCH_DB": db_path})
    assert result.exit_code == 2 and "bad duration" in result.output


def test_an_absurd_duration_is_refused_in_one_line(db_path):
    """Longer than 100 years (or too many digits for a float) is a typo, not a traceback."""
    env = {"SMSBATCH_DB": db_path}
    for args in (["prune", "--older-than", "1000000d"], ["prune", "--older-than", "4" * 400 + "d"],
                 ["retry", "--failed", "--since", "1000000d"], ["stats", "--since", "99999999w"]):
        result = invoke(args, env)
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
        assert len(errors) == 1 and "at most 100 years (36525d)" in errors[0] and len(errors[0]) < 120
    assert invoke(["prune", "--older-than", "36525d", "--dry-run"], env).exit_code == 0


# -- the upgrade procedure (docs/operations.md) on a database of the first release ------


def test_upgrade_procedure_backup_then_migrate_keeps_everything(tmp_path):
    from legacy import BATCHES, MESSAGES, T, make_v1_database
    from smsbatch.db import SCHEMA_VERSION

    path, copy = str(tmp_path / "v1.db"), str(tmp_path / "before-upgrade.db")
    counts = make_v1_database(path)
    backed = invoke(["--db", path, "backup", copy])  # a database not yet migrated can be backed up
    assert backed.exit_code == 0 and "schema version 1" in backed.output
    result = invoke(["--db", path, "migrate"])
    assert result.exit_code == 0 and result.output.strip() == f"{path}: upgraded from schema version 1 to {SCHEMA_VERSION}"
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == counts["batches"] == len(BATCHES)
    assert sorted(r for r in conn.execute("SELECT sid, body FROM messages")) == sorted((m[0], m[2]) for m in MESSAGES)
    assert conn.execute("SELECT phone, scope FROM opt_outs").fetchall() == [("+15551110004", "*")]
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"batches_superseded_by", "conversations_open_batch"} <= indexes
    assert sqlite3.connect(copy).execute("PRAGMA user_version").fetchone()[0] == 1  # the way back
    # the upgraded history prunes cleanly: the sent, the failed and the superseded batch go; the
    # batch it was folded into is still pending and stays, and so does the opted-out person
    gone = json.loads(invoke(["--db", path, "prune", "--older-than", "1d", "--now", str(T + 30 * 86400),
                              "--json"]).output)
    assert gone["batches"] == 3 and conn.execute("PRAGMA foreign_key_check").fetchall() == []
    left = {r[0] for r in conn.execute("SELECT state FROM batches")}
    assert left == {"skipped", "queued", "open"}  # the STOP, and the two pending batches
