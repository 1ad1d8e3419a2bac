"""`smsbatch copy-to`: an SQLite deployment, filled by the real webhook, processor and
commands, moved into an empty PostgreSQL database: every table equal, opt-outs and holds
still honoured, identity keys continuing after the copied ones; a target with rows, an
SQLite target and a PostgreSQL source refused in one line."""

import json

import pytest

from conftest import T0, Clock, TextMeanwhile, invoke, offline_processor
from fakes import FakeTwilio, message_sid, provider_env
from smsbatch.config import Settings
from smsbatch.db import Store
from smsbatch.web import make_app
from test_web import call, signed

URL = "https://hooks.example.com/sms"
OURS = "+15550000000"
A, B, C, D, E, F = (f"+1555777000{i}" for i in range(1, 7))


def text(app, sid, phone, body):
    params = {"MessageSid": message_sid(sid), "AccountSid": "AC" + "0" * 32, "From": phone, "To": OURS, "Body": body, "NumMedia": "0"}
    body, headers = signed(params, URL, FakeTwilio.TOKEN)
    assert call(app, body=body, headers=headers)[0] == 200


def populate(db_path, env):
    """Fill an SQLite database the way a deployment does: webhook texts (and a forged one),
    STOP, a reply superseded by a text during the AI call, sent replies, holds and a release,
    a reply by hand, and a text still waiting in an open batch."""
    settings = Settings.from_env(env)
    app = make_app(settings, clock=lambda: T0)
    for i, phone in enumerate((A, B, C, D)):
        text(app, f"SMcopy{i}a", phone, f"hello from {phone}")
        text(app, f"SMcopy{i}b", phone, "and a second thing")
    text(app, "SMcopyE", E, "STOP")
    body, headers = signed({"MessageSid": message_sid("forged"), "AccountSid": "AC" + "0" * 32, "From": A, "To": OURS, "Body": "x"}, URL, "wrong token")
    assert call(app, body=body, headers=headers)[0] == 403  # counted in rejections
    app.rejections.flush()
    app.writer.close()
    # A text during A's AI call: that reply is superseded, the next one covers both.
    late = TextMeanwhile(db_path, A, lambda n: "one more" if n == 1 else None, T0 + 40)
    # one batch at a time: the first AI call is A's, so the text lands during A's own answer
    assert offline_processor(settings, Clock(T0 + 30), late).run(concurrency=1).counts["superseded"] == 1
    for args in (["process", "--now", str(T0 + 60), "--ai", "offline", "--json"],
                 ["hold", B, "--reason", "angry customer", "--now", str(T0 + 70)],
                 ["hold", C, "--now", str(T0 + 71)], ["release", C, "--now", str(T0 + 72)],
                 ["send", D, "a reply by hand", "--now", str(T0 + 73)],
                 ["ingest", "--from", F, "--to", OURS, "--body", "still waiting", "--at", str(T0 + 80),
                  "--now", str(T0 + 80)]):
        result = invoke(args, env)
        assert result.exit_code == 0, result.output


def table_rows(store):
    """{table: sorted rows} of every table."""
    return {t: sorted((tuple(r) for r in store.conn.execute(f"SELECT {', '.join(cols)} FROM {t}")), key=repr)
            for t, cols in store.db.tables().items()}


@pytest.mark.postgres
def test_a_deployment_copied_into_postgresql_is_equal_and_keeps_working(tmp_path, pg_url, twilio_standin,
                                                                       openai_standin):
    source = str(tmp_path / "smsbatch.db")
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=source, SMSBATCH_PUBLIC_URL=URL)
    assert invoke(["migrate"], env).exit_code == 0
    populate(source, env)

    result = invoke(["copy-to", pg_url, "--json"], env)
    assert result.exit_code == 0, result.output
    copied = json.loads(result.output)
    old, new = Store(source), Store(pg_url)
    before, after = table_rows(old), table_rows(new)
    assert set(before) == set(after) and before == after
    assert copied["tables"] == {t: len(rows) for t, rows in before.items()}
    for table in ("messages", "batches", "batch_events", "outbound", "opt_outs", "holds", "hold_log",
                  "rejections", "processors", "conversations"):
        assert before[table], f"the fill left {table} empty: the test proves nothing for it"
    assert any(r for r in old.conn.execute("SELECT 1 FROM batches WHERE superseded_by IS NOT NULL"))

    # The copy is the deployment: the open batch is answered, STOP and the hold still hold,
    # new rows get keys after the copied ones.
    pg_env = {**env, "SMSBATCH_DB": pg_url}
    for phone, body, at in ((E, "are you there?", T0 + 100), (B, "hello again", T0 + 101),
                            (A, "new question", T0 + 102)):
        ingest = invoke(["ingest", "--from", phone, "--to", OURS, "--body", body, "--at", str(at),
                         "--now", str(at)], pg_env)
        assert ingest.exit_code == 0, ingest.output
    assert invoke(["hold", D, "--now", str(T0 + 103)], pg_env).exit_code == 0
    sent_before = len(twilio_standin.sent)
    run = invoke(["process", "--now", str(T0 + 200), "--ai", "offline", "--json"], pg_env)
    assert run.exit_code == 0, run.output
    wire = [m["to"] for m in twilio_standin.sent[sent_before:]]
    assert sorted(wire) == sorted([F, A]), wire  # E opted out, B held: nothing to them
    status = invoke(["status", "--json", "--now", str(T0 + 200)], pg_env)
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)
    # Had a sequence not been moved on, these rows would have collided with copied keys.
    for table, key in (("messages", "id"), ("batches", "seq"), ("batch_events", "id"), ("hold_log", "id")):
        copied_max = old.conn.execute(f"SELECT max({key}) FROM {table}").fetchone()[0]
        added = new.conn.execute(f"SELECT count(*) FROM {table} WHERE {key} > ?", (copied_max,)).fetchone()[0]
        assert added == len(after_rows := list(new.conn.execute(f"SELECT 1 FROM {table}"))) - len(before[table]), \
            (table, added, len(after_rows))
        assert added > 0, table
    old.close()
    new.close()


@pytest.mark.postgres
def test_a_target_with_rows_is_refused_and_left_as_it_was(tmp_path, pg_url):
    source = str(tmp_path / "smsbatch.db")
    assert invoke(["--db", source, "migrate"]).exit_code == 0
    assert invoke(["--db", source, "ingest", "--from", A, "--to", OURS, "--body", "hi"]).exit_code == 0
    assert invoke(["--db", pg_url, "migrate"]).exit_code == 0
    assert invoke(["--db", pg_url, "hold", B]).exit_code == 0
    result = invoke(["--db", source, "copy-to", pg_url])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {pg_url} is not empty (table hold_log has "
        "rows): copy-to only fills an empty database"]
    target = Store(pg_url)
    assert target.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert [r[0] for r in target.conn.execute("SELECT phone FROM holds")] == [B]
    target.close()


@pytest.mark.postgres
def test_an_empty_migrated_target_is_filled(tmp_path, pg_url):
    source = str(tmp_path / "smsbatch.db")
    assert invoke(["--db", source, "migrate"]).exit_code == 0
    assert invoke(["--db", source, "ingest", "--from", A, "--to", OURS, "--body", "STOP"]).exit_code == 0
    assert invoke(["--db", pg_url, "migrate"]).exit_code == 0
    result = invoke(["--db", source, "copy-to", pg_url])
    assert result.exit_code == 0, result.output
    assert "opt_outs: 1 row" in result.output and "every opt-out and hold present" in result.output
    target = Store(pg_url)
    assert [tuple(r) for r in target.conn.execute("SELECT phone, scope FROM opt_outs")] == [(A, OURS)]
    target.close()


def test_copying_into_sqlite_or_from_postgresql_is_refused_in_one_line(tmp_path):
    source = str(tmp_path / "smsbatch.db")
    assert invoke(["--db", source, "migrate"]).exit_code == 0
    into_file = invoke(["--db", source, "copy-to", str(tmp_path / "other.db")])
    assert into_file.exit_code == 1 and len(into_file.output.strip().splitlines()) == 1
    assert "fills a PostgreSQL database" in into_file.output and "smsbatch backup" in into_file.output
    from_pg = invoke(["--db", "postgresql://u:secret@db.example/smsbatch", "copy-to", "postgresql://x@y/z"])
    assert from_pg.exit_code == 1 and len(from_pg.output.strip().splitlines()) == 1
    assert "pg_dump" in from_pg.output and "secret" not in from_pg.output
    assert not (tmp_path / "other.db").exists()


def test_copy_to_has_help():
    result = invoke(["copy-to", "--help"])
    assert result.exit_code == 0 and "empty PostgreSQL database" in result.output


@pytest.mark.postgres
def test_a_source_table_the_target_lacks_stops_the_copy_and_keeps_nothing(tmp_path, pg_url):
    source = str(tmp_path / "smsbatch.db")
    assert invoke(["--db", source, "migrate"]).exit_code == 0
    assert invoke(["--db", source, "ingest", "--from", A, "--to", OURS, "--body", "STOP"]).exit_code == 0
    old = Store(source)
    old.conn.execute("CREATE TABLE gadgets (number TEXT PRIMARY KEY, since REAL)")  # a newer smsbatch's
    old.close()
    result = invoke(["--db", source, "copy-to", pg_url])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "has no gadgets(number, since)" in result.output
    target = Store(pg_url)
    assert target.conn.execute("SELECT count(*) FROM opt_outs").fetchone()[0] == 0
    target.close()


def test_a_source_not_migrated_is_refused_in_one_line(tmp_path):
    result = invoke(["--db", str(tmp_path / "missing.db"), "copy-to", "postgresql://x@127.0.0.1:1/none"])
    assert result.exit_code == 1 and result.output.startswith("Error: database ")
    assert "smsbatch migrate" in result.output and len(result.output.strip().splitlines()) == 1
