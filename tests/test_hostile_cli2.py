"""A second hostile run at the commands (issue 15): M9 and L3 (files the operator names are
never links, devices or the live database), L1 and L8 (what Twilio, a customer or a stored
row says reaches the terminal with escape sequences and bidi controls made visible), L10
(the anonymisation key off the command line)."""

import json
import os
import sqlite3
import stat
import subprocess
import sys

import pytest

from conftest import T0, add, invoke
from fakes import provider_env
from smsbatch.db import Store

A, US = "+15556660001", "+15550000000"
RLO, LRI, LRM = "\u202e", "\u2066", "\u200f"
OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"  # a clipboard write


def env_of(db_path, **extra):
    return {"SMSBATCH_DB": db_path, **{k: str(v) for k, v in extra.items()}}


def raw_controls(text):
    """The controls a terminal would obey, or that reorder a line, found raw in `text`."""
    return [c for c in text if c in "\x1b\x07\r\x9b" or c in (RLO, LRI, LRM, "\u202a", "\u2069", "\u061c")]


def fingerprint(path):
    return (os.stat(path).st_size, open(path, "rb").read())


# -- M9: export -o ------------------------------------------------------------------------------


def test_export_does_not_follow_a_link_planted_in_a_shared_folder(db_path, tmp_path):
    add(Store(db_path), A, "secret order details", T0)
    shared, private = tmp_path / "shared", tmp_path / "home"
    shared.mkdir()
    private.mkdir()
    victim = private / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA me\n")
    (shared / "trace.jsonl").symlink_to(victim)
    (shared / "new.jsonl").symlink_to(private / "created-by-link")  # a dangling link: would create its target
    for name in ("trace.jsonl", "new.jsonl"):
        result = invoke(["export", "-o", str(shared / name)], env_of(db_path))
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip() == f"Error: {shared / name} is a symbolic link: give the path of a real file " \
                                        "(a link could point anywhere)"
    assert victim.read_text() == "ssh-ed25519 AAAA me\n"
    assert not (private / "created-by-link").exists()
    assert os.path.islink(shared / "trace.jsonl") and sorted(os.listdir(shared)) == ["new.jsonl", "trace.jsonl"]


def test_export_refuses_devices_and_fifos(db_path, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target in ("/dev/null", str(fifo)):  # a FIFO with no reader would also block for ever
        result = invoke(["export", "-o", target], env_of(db_path))
        assert result.exit_code == 1 and f"{target} exists and is not a regular file" in result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_export_never_writes_over_the_live_database_however_it_is_named(db_path, tmp_path):
    store = Store(db_path)
    add(store, A, "kept", T0)
    alias = tmp_path / "alias"
    alias.symlink_to(os.path.dirname(db_path))  # the database's folder, through a link
    name = os.path.basename(db_path)
    assert os.path.exists(db_path + "-wal")  # an open connection in WAL mode keeps one
    for target in (str(alias / name), str(alias / (name + "-wal")), str(alias / (name + "-shm")),
                   os.path.join(os.path.dirname(db_path), ".", name)):
        before = fingerprint(db_path)
        result = invoke(["export", "-o", target], env_of(db_path))
        assert result.exit_code == 1, (target, result.output)
        assert "is the live database" in result.output and "Traceback" not in result.output
        assert fingerprint(db_path) == before
    assert [r[0] for r in store.conn.execute("SELECT body FROM messages")] == ["kept"]


# -- L3: backup -----------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_backup_never_replaces_the_live_database_through_a_linked_folder_or_its_wal(db_path, tmp_path, force):
    store = Store(db_path)
    add(store, A, "before the backup", T0)
    alias = tmp_path / "alias"
    alias.symlink_to(os.path.dirname(db_path))
    name = os.path.basename(db_path)
    for target in (alias / name, alias / (name + "-wal"), tmp_path / (name + "-wal"), tmp_path / (name + "-shm")):
        result = invoke(["--db", db_path, "backup", str(target), *force])
        assert result.exit_code == 1, (target, result.output)
        assert "is the live database" in result.output and len(result.output.strip().splitlines()) == 1
    add(store, A, "acknowledged after the backup", T0 + 1)  # still lands in the file everyone opens
    other = sqlite3.connect(db_path)
    assert [r[0] for r in other.execute("SELECT body FROM messages ORDER BY id")] == [
        "before the backup", "acknowledged after the backup"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_backup_refuses_a_hard_link_to_the_database_and_any_symbolic_link(db_path, tmp_path):
    twin = tmp_path / "twin.db"
    os.link(db_path, twin)
    result = invoke(["--db", db_path, "backup", str(twin), "--force"])
    assert result.exit_code == 1 and "is the live database" in result.output
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "copy.db"
    link.symlink_to(victim)
    for force in ([], ["--force"]):
        result = invoke(["--db", db_path, "backup", str(link), *force])
        assert result.exit_code == 1 and "is a symbolic link" in result.output
    assert victim.read_text() == "precious" and os.path.islink(link)
    result = invoke(["--db", db_path, "backup", str(tmp_path / "good.db")])
    assert result.exit_code == 0 and stat.S_IMODE(os.stat(tmp_path / "good.db").st_mode) == 0o600


# -- L1: strings from Twilio printed by backfill, retry and send ---------------------------------


@pytest.fixture
def twilio_env(db_path, openai_standin, twilio_standin):
    return provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_BACKFILL=0)


def test_backfill_prints_what_twilios_log_says_with_controls_visible(twilio_env, twilio_standin):
    twilio_standin.deliver_inbound(f"+1555{RLO}0001\x1b[2J", US, "hi", T0 - 60)
    result = invoke(["backfill", "--since", str(T0 - 600), "--until", str(T0), "--now", str(T0), "--dry-run"],
                    twilio_env)
    assert "Traceback" not in result.output
    assert raw_controls(result.output) == []


def test_send_prints_twilios_sid_and_error_with_controls_visible(twilio_env, twilio_standin):
    twilio_standin.script = [("sid", f"SM{OSC52}{RLO}abc"), ("error", 400, 21211, f"Invalid {LRI}To{RLO} number\x1b[31m")]
    # A SID that is not one is an unknown outcome (it may have gone out), said in one clean line.
    result = invoke(["send", A, "hello", "--from", US], twilio_env)
    assert result.exit_code == 1 and "outcome unknown" in result.output, result.output
    assert raw_controls(result.output) == []
    result = invoke(["send", A, "hello again", "--from", US], twilio_env)
    assert result.exit_code == 1 and "Error: not sent: Twilio error 21211" in result.output
    assert raw_controls(result.output) == []


def test_retry_prints_a_stored_error_with_controls_visible(db_path, store):
    batch_id = add(store, A, "hi", T0).batch_id
    with store.transaction() as conn:  # an error stored before errors were cleaned, say
        conn.execute("UPDATE batches SET state = 'failed', completed_at = ?, last_error = ? WHERE id = ?",
                     (T0 + 60, f"Twilio error 30008: {RLO}deliver{OSC52}", batch_id))
    result = invoke(["retry", batch_id, "--dry-run"], env_of(db_path))
    assert result.exit_code == 0 and f"would requeue batch {batch_id}" in result.output
    assert raw_controls(result.output) == [] and "\\u202e" in result.output


# -- L8: bidi controls in show and status ----------------------------------------------------------


def test_bidi_controls_in_texts_errors_and_hold_reasons_are_shown_not_obeyed(db_path, store):
    batch_id = add(store, A, f"pay to {RLO}gnp.exe", T0).batch_id
    with store.transaction() as conn:
        conn.execute("UPDATE batches SET state = 'failed', completed_at = ?, last_error = ? WHERE id = ?",
                     (T0 + 60, f"rejected {LRI}by carrier{LRM}", batch_id))
    env = env_of(db_path, COLUMNS=200)
    held = invoke(["hold", A, "--reason", f"angry {RLO}customer", "--now", str(T0 + 100)], env)
    outputs = [held.output] + [invoke(args, env).output for args in
                               (["status", "--now", str(T0 + 120)], ["show", A], ["show", batch_id])]
    for output in outputs:
        assert raw_controls(output) == [], output
    assert "\\u202egnp.exe" in outputs[3] and "\\u2066by carrier\\u200f" in outputs[1]
    assert "angry \\u202ecustomer" in outputs[0]


# -- L10: the anonymisation key ------------------------------------------------------------------


def _export(db_path, args, env=None):
    """`smsbatch export` as a real process: (its argv, stdout, stderr)."""
    argv = [sys.executable, "-m", "smsbatch", "--db", db_path, "export", "--anonymize", *args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMSBATCH_")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean | (env or {}))
    assert done.returncode == 0, done.stderr
    return argv, done.stdout, done.stderr


def test_the_anonymisation_key_comes_from_the_environment_or_a_file_never_the_arguments(db_path, tmp_path):
    add(Store(db_path), A, "hello there", T0)
    key = "k3y-only-the-operator-knows"
    key_file = tmp_path / "anon.key"
    key_file.write_text(key + "\n")
    os.chmod(key_file, 0o600)
    argv_env, from_env, _ = _export(db_path, [], {"SMSBATCH_ANON_KEY": key})
    argv_file, from_file, _ = _export(db_path, ["--key-file", str(key_file)])
    for argv in (argv_env, argv_file):
        assert not any(key in arg for arg in argv)
    assert from_env == from_file and A not in from_env
    assert json.loads(from_env)["from"] != A
    _, other, _ = _export(db_path, [], {"SMSBATCH_ANON_KEY": "another-key"})
    assert other != from_env  # the key is what makes the pseudonyms
    _, on_command_line, warned = _export(db_path, ["--key", key])  # still works, with a warning why not
    assert on_command_line == from_env and "warning: --key shows the key to every local user" in warned
    help_text = invoke(["export", "--help"]).output
    assert "SMSBATCH_ANON_KEY" in help_text and "--key-file" in help_text and "ps" in help_text


def test_a_key_file_that_is_empty_or_binary_is_one_usage_error(db_path, tmp_path):
    empty, binary = tmp_path / "empty", tmp_path / "binary"
    empty.write_text("\n")
    binary.write_bytes(b"\xff\x00")
    for path, why in ((empty, "holds no key"), (binary, "not a UTF-8 text file")):
        result = invoke(["export", "--anonymize", "--key-file", str(path)], env_of(db_path))
        assert result.exit_code == 2 and why in result.output and "Traceback" not in result.output


def test_the_console_stand_in_prints_a_reply_quoting_a_bidi_override_visibly(db_path):
    """`process --sms console` prints each reply on stderr; the offline AI quotes the text."""
    add(Store(db_path), A, f"refund {RLO}01$ ot{LRI}", T0)
    result = invoke(["process", "--ai", "offline", "--sms", "console", "--now", str(T0 + 120)], env_of(db_path))
    assert result.exit_code == 0, result.output
    assert "[console sms from " in result.stderr and raw_controls(result.stderr) == []
