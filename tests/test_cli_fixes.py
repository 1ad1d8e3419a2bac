"""Round-3 CLI fixes: what still works beside the refusals (linked folders), exports that read
back the same, release hints that name a command that works, console replies said honestly."""

import json
import os
import re
import stat

import pytest

from conftest import T0, add, invoke, offline_processor
from smsbatch import files
from smsbatch.db import Store

A = "+15554440001"
US = "+15550000000"


# -- linked folders: the attack is in test_attacks_round3; ordinary paths still work -----------


@pytest.mark.parametrize("command", [["export", "-o"], ["backup"]])
def test_a_path_through_ordinary_folders_is_written(db_path, store, tmp_path, command):
    add(store, A, "a text", T0)
    target = tmp_path / "a" / "b" / "out.jsonl"
    target.parent.mkdir(parents=True)
    result = invoke(command + [str(target)], env={"SMSBATCH_DB": db_path})
    assert result.exit_code == 0, result.output
    assert target.exists() and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_system_link_only_root_could_have_made_is_still_usable(db_path, store, tmp_path):
    """/var/lock -> /run/lock (root's, in folders only root writes) stays usable: nobody but
    root could have planted it. Skipped where the machine has no such link we may write through."""
    link = "/var/lock"
    if not (os.path.islink(link) and os.lstat(link).st_uid == 0 and files._only_root_writes("/var")
            and os.access(os.path.realpath(link), os.W_OK)):
        pytest.skip("no root-owned system link to a folder we may write")
    add(store, A, "a text", T0)
    target = os.path.join(link, f"smsbatch-test-{os.getpid()}.jsonl")
    try:
        result = invoke(["export", "-o", target], env={"SMSBATCH_DB": db_path})
        assert result.exit_code == 0, result.output
        assert json.loads(open(target).readline())["body"] == "a text"
    finally:
        if os.path.lexists(target):
            os.unlink(target)


def test_a_link_to_an_ordinary_folder_is_refused_with_the_real_path_named(db_path, store, tmp_path):
    add(store, A, "a text", T0)
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    result = invoke(["export", "-o", str(tmp_path / "linked" / "out.jsonl")], env={"SMSBATCH_DB": db_path})
    assert result.exit_code == 1 and f"(to {tmp_path / 'real'})" in result.output
    assert os.listdir(tmp_path / "real") == []


# -- export reads back the same ------------------------------------------------------------


def test_an_export_with_controls_and_letters_reads_back_identically(db_path, store, tmp_path):
    body = "café 👍 refund \u202e0001$ \u2066ok\u2069 \x9b2J \x1b[31m\x7f"
    add(store, A, body, T0, sid="SM" + "a" * 32)
    exported = invoke(["export"], env={"SMSBATCH_DB": db_path}).stdout
    assert "café 👍" in exported  # letters stay readable
    assert not re.search("[\x7f-\x9f\u202a-\u202e\u2066-\u2069\x1b]", exported)
    other = str(tmp_path / "other.db")
    Store(other).migrate()
    result = invoke(["ingest", "--jsonl", "-", "--now", str(T0 + 1)], env={"SMSBATCH_DB": other}, input=exported)
    assert result.exit_code == 0, result.output
    [(stored,)] = Store(other).conn.execute("SELECT body FROM messages").fetchall()
    assert stored == body


# -- release: the hint names a command that works -----------------------------------------


def _held_then_released(db_path, store, settings, clock, release_args, to=US):
    env = {"SMSBATCH_DB": db_path}
    hold = ["hold", "--number", US] if "--number" in release_args else ["hold", A]
    assert invoke(hold + ["--now", str(T0)], env).exit_code == 0
    add(store, A, "anyone there?", T0 + 1, to=to)
    clock.now = T0 + 60
    offline_processor(settings, clock).run()
    result = invoke(["release", *release_args, "--now", str(T0 + 100)], env)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("release_args", [[A], ["--number", US]])
def test_the_release_hint_is_a_command_that_answers_the_held_texts(db_path, store, settings, clock, release_args):
    said = _held_then_released(db_path, store, settings, clock, release_args)
    hint = re.search(r"to answer them: smsbatch (retry [\w ]+)\)", said)
    assert hint and "--answer-pending" not in said, said
    retried = invoke(hint.group(1).split(), {"SMSBATCH_DB": db_path})
    assert retried.exit_code == 0, retried.output
    clock.now = T0 + 200
    assert offline_processor(settings, clock).run().counts["sent"] == 1


# -- console replies: no receipt will ever come, and the console says from which number ----


def test_console_replies_are_said_to_get_no_receipts(db_path, store):
    env = {"SMSBATCH_DB": db_path, "SMSBATCH_AI": "offline", "SMSBATCH_SMS": "console"}
    add(store, A, "hi", T0)
    result = invoke(["process", "--now", str(T0 + 30)], env)
    assert f"[console sms from {US} to {A}]" in result.stderr
    later = str(T0 + 3600)
    status = invoke(["status", "--now", later], env).output
    assert "console (no receipts)" in status and "no receipt yet" not in status
    assert json.loads(invoke(["status", "--json", "--now", later], env).output)["delivery"] == {"console": 1}
    listed = invoke(["deliveries", "--status", "no_receipt", "--now", later], env).output
    assert "console (no receipts)" in listed and "no receipt yet" not in listed.splitlines()[1]
    batch = store.conn.execute("SELECT id FROM batches").fetchone()[0]
    assert "delivery console (no receipts)" in " ".join(invoke(["show", batch], env).output.split())


# -- deploy/env.example: what deployment.md step 3 says to set is there ----------------------


def test_the_env_example_shows_the_numbers_and_the_public_url_and_every_line_is_a_valid_setting():
    from smsbatch.config import Settings

    path = os.path.join(os.path.dirname(__file__), "..", "deploy", "env.example")
    settings = {}
    for line in open(path).read().splitlines():
        line = line.lstrip("#")  # the commented examples too: uncommented, they must be accepted
        if re.match(r"[A-Z_]+=", line) and " " not in line.split("=", 1)[0]:
            key, value = line.split("=", 1)
            settings[key] = value.strip("'")
    assert "SMSBATCH_NUMBERS" in settings and settings["SMSBATCH_PUBLIC_URL"].startswith("https://")
    assert re.search(r"^SMSBATCH_PUBLIC_URL=", open(path).read(), re.M)  # set, not commented out
    loaded = Settings.from_env(settings)
    assert loaded.public_url == settings["SMSBATCH_PUBLIC_URL"] and len(loaded.numbers) == 2
