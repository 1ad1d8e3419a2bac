"""`smsbatch check` and `migrate`'s messages, through the CLI, against the stand-ins."""

import json
import os
import socket

import pytest

from conftest import add, invoke
from fakes import FakeTwilio, provider_env

PUBLIC = "https://sms.example.com/sms"
OURS = "+15550000000"


@pytest.fixture
def env(db_path, openai_standin, twilio_standin):
    return provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_PUBLIC_URL=PUBLIC)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_passes_masks_secrets_and_makes_one_account_request(env, twilio_standin):
    twilio_standin.add_number(OURS, PUBLIC)
    result = invoke(["check"], env)
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output and "FAIL" not in result.output
    assert f"number {OURS}: belongs to the account; webhook {PUBLIC} (POST)" in result.output
    assert "model gpt-4o-mini exists" in result.output
    # the account resource carries the auth token, as Twilio's does: it must not be shown
    assert FakeTwilio.TOKEN not in result.output and env["OPENAI_API_KEY"] not in result.output
    assert "OPENAI_API_KEY" in result.output and "******" in result.output
    account_gets = [p for m, p in twilio_standin.account_requests if p.endswith(f"{FakeTwilio.ACCOUNT}.json")]
    assert len(account_gets) == 1


def test_wrong_webhook_fails_with_its_fix_and_fix_webhook_sets_it(env, twilio_standin):
    twilio_standin.add_number(OURS, "https://old.example.com/sms")
    result = invoke(["check"], env)
    assert result.exit_code == 1
    line = next(ln for ln in result.output.splitlines() if f"number {OURS}" in ln)
    assert "FAIL" in line and "https://old.example.com/sms" in line and "fix: smsbatch check --fix-webhook" in line
    result = invoke(["check", "--fix-webhook"], env)
    assert result.exit_code == 0, result.output
    assert [(n["phone_number"], n["sms_url"], n["sms_method"]) for n in twilio_standin.numbers] == [
        (OURS, PUBLIC, "POST")]
    assert "was https://old.example.com/sms" in result.output


def test_a_number_on_a_later_page_is_found(env, twilio_standin):
    """The account's numbers come in pages: ours may be on page 2."""
    twilio_standin.page_cap = 50
    for i in range(60):
        twilio_standin.add_number(f"{OURS}{i:02d}", "https://other.example.com/sms")
    twilio_standin.add_number(OURS, PUBLIC)
    result = invoke(["check", "--json"], env)
    assert result.exit_code == 0, result.output
    pages = [p for m, p in twilio_standin.account_requests if "IncomingPhoneNumbers.json" in p]
    assert len(pages) == 2 and "Page=1" in pages[1]
    others = next(c for c in json.loads(result.output)["checks"] if c["name"] == "other numbers")
    assert others["ok"] and others["detail"].startswith(f"{OURS}00, {OURS}01") and "and 50 more" in others["detail"]


# -- issue 16: our numbers are a setting; issue 15 L7: --fix-webhook changes only them ----------------

SALES, SUPPORT, OTHER_APP = "+15550000001", "+15550000002", "+15550000009"
DEMO = "https://demo.twilio.com/welcome/sms/reply"


def test_check_names_every_listed_number_that_is_wrong_from_day_one(env, twilio_standin):
    """Two numbers, nobody has texted either: both are checked, the wrong one named; the
    account's other number is listed for information only."""
    twilio_standin.add_number(SALES, PUBLIC)
    twilio_standin.add_number(SUPPORT, DEMO)
    twilio_standin.add_number(OTHER_APP, "https://other-app.example.com/in")
    env = env | {"SMSBATCH_NUMBERS": f"{SALES},{SUPPORT}"}
    result = invoke(["check", "--json"], env)
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
    assert checks[f"number {SALES}"]["ok"] and not checks[f"number {SUPPORT}"]["ok"]
    assert checks[f"number {SUPPORT}"]["detail"].startswith(f"webhook is {DEMO} (POST), not {PUBLIC} (POST)")
    assert checks["other numbers"]["ok"] and checks["other numbers"]["detail"].startswith(OTHER_APP)
    assert f"number {OURS}" not in checks  # TWILIO_FROM_NUMBER is not listed when SMSBATCH_NUMBERS is set
    text = invoke(["check"], env).output
    assert "all checks passed" not in text and f"FAIL  number {SUPPORT}" in text


def test_the_messaging_services_numbers_are_checked_too(env, twilio_standin):
    service = "MG" + "1" * 32
    twilio_standin.services[service] = [SALES, SUPPORT]
    twilio_standin.add_number(SALES, PUBLIC)
    twilio_standin.add_number(SUPPORT, DEMO)
    twilio_standin.add_number(OURS, PUBLIC)
    result = invoke(["check", "--json"], env | {"TWILIO_MESSAGING_SERVICE_SID": service})
    checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
    assert [n for n in checks if n.startswith("number ")] == [f"number {OURS}", f"number {SALES}", f"number {SUPPORT}"]
    assert not checks[f"number {SUPPORT}"]["ok"] and result.exit_code == 1


def test_fix_webhook_changes_only_listed_numbers_says_so_first_and_has_a_dry_run(env, twilio_standin, store):
    """A number that only appears in the database (an imported trace, another app's number)
    is never switched over; --dry-run changes nothing; the plan is printed before the change."""
    twilio_standin.add_number(SALES, DEMO, "GET")
    twilio_standin.add_number(SUPPORT, PUBLIC)
    twilio_standin.add_number(OTHER_APP, "https://other-app.example.com/in")
    add(store, "+15551110000", "imported", 1.0, to=OTHER_APP)
    env = env | {"SMSBATCH_NUMBERS": f"{SALES},{SUPPORT}"}
    dry = invoke(["check", "--fix-webhook", "--dry-run"], env)
    assert dry.exit_code == 1
    assert f"would set the webhook of {SALES}: {DEMO} (GET) -> {PUBLIC} (POST)" in dry.output
    assert f"texts in the database went to {OTHER_APP}, not in SMSBATCH_NUMBERS: not checked" in dry.output
    assert not [p for m, p in twilio_standin.account_requests if m == "POST"]
    assert [n["sms_url"] for n in twilio_standin.numbers] == [DEMO, PUBLIC, "https://other-app.example.com/in"]
    fixed = invoke(["check", "--fix-webhook"], env)
    assert fixed.exit_code == 0, fixed.output
    lines = fixed.output.splitlines()
    plan = lines.index(f"setting the webhook of {SALES}: {DEMO} (GET) -> {PUBLIC} (POST)")
    assert plan < next(i for i, line in enumerate(lines) if line.startswith("settings"))  # said before the change
    assert [(n["sms_url"], n["sms_method"]) for n in twilio_standin.numbers] == [
        (PUBLIC, "POST"), (PUBLIC, "POST"), ("https://other-app.example.com/in", "POST")]
    posts = [p for m, p in twilio_standin.account_requests if m == "POST"]
    assert len(posts) == 1 and twilio_standin.numbers[0]["sid"] in posts[0]
    as_json = json.loads(invoke(["check", "--fix-webhook", "--dry-run", "--json"], env).output)
    assert as_json["ok"] and as_json["webhook_changes"] == [] and as_json["dry_run"] is True
    usage = invoke(["check", "--dry-run"], env)
    assert usage.exit_code == 2 and "--dry-run goes with --fix-webhook" in usage.output


def test_a_number_the_account_does_not_own_fails(env):
    result = invoke(["check", "--json"], env)
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["ok"] is False
    number = next(c for c in report["checks"] if c["name"] == f"number {OURS}")
    assert not number["ok"] and "not a number of account" in number["detail"]


def test_rejected_twilio_credentials_name_the_url_not_the_token(env):
    env = env | {"TWILIO_AUTH_TOKEN": "wrong-token-123"}
    result = invoke(["check"], env)
    assert result.exit_code == 1
    line = next(ln for ln in result.output.splitlines() if "twilio credentials" in ln)
    assert f"HTTP 401 from {env['SMSBATCH_TWILIO_BASE_URL']}/2010-04-01/Accounts/{FakeTwilio.ACCOUNT}.json:" in line
    assert "fix: copy TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN" in line
    assert "wrong-token-123" not in result.output


def test_unknown_model_and_unreachable_openai_name_the_url(env, twilio_standin, openai_standin):
    twilio_standin.add_number(OURS, PUBLIC)
    result = invoke(["check", "--json"], env | {"SMSBATCH_AI_MODEL": "gpt-nope"})
    ai = json.loads(result.output)["checks"][-1]
    assert result.exit_code == 1 and ai["name"] == "openai"
    assert ai["detail"] == f"HTTP 404 from {openai_standin.url}/v1/models/gpt-nope: no model 'gpt-nope' there"
    dead = f"http://user:pw@127.0.0.1:{free_port()}/v1"
    result = invoke(["check", "--json"], env | {"OPENAI_BASE_URL": dead})
    ai = json.loads(result.output)["checks"][-1]
    assert ai["detail"].startswith(f"http://127.0.0.1:{dead.rsplit(':', 1)[1]} unreachable")
    assert "pw" not in result.output and "OPENAI_BASE_URL" in ai["fix"]


def test_key_rejected_by_openai(env, twilio_standin, openai_standin):
    openai_standin.api_key = "sk-the-right-one"
    twilio_standin.add_number(OURS, PUBLIC)
    result = invoke(["check", "--json"], env)
    ai = json.loads(result.output)["checks"][-1]
    assert result.exit_code == 1 and "key rejected" in ai["detail"] and ai["fix"] == "check OPENAI_API_KEY"
    assert env["OPENAI_API_KEY"] not in result.output


def test_unmigrated_or_private_database_fails_with_its_fix(tmp_path, env):
    missing = str(tmp_path / "nope.db")
    result = invoke(["check", "--json"], env | {"SMSBATCH_DB": missing})
    db = json.loads(result.output)["checks"][0]
    assert result.exit_code == 1 and db["fix"] == f"smsbatch --db {missing} migrate"
    os.chmod(env["SMSBATCH_DB"], 0o644)
    db = json.loads(invoke(["check", "--json"], env).output)["checks"][0]
    assert not db["ok"] and db["fix"] == f"chmod 600 {env['SMSBATCH_DB']}"


def test_stand_ins_are_skipped(db_path):
    result = invoke(["check"], {"SMSBATCH_DB": db_path, "SMSBATCH_AI": "offline", "SMSBATCH_SMS": "console"})
    assert result.exit_code == 0, result.output
    assert "skipped: SMSBATCH_SMS=console" in result.output and "skipped: SMSBATCH_AI=offline" in result.output


def test_an_unreachable_provider_is_named_in_the_batch_error(db_path, store, clock):
    """A wrong OPENAI_BASE_URL / SMSBATCH_TWILIO_BASE_URL: the error says which address failed."""
    from conftest import T0, real_processor
    from smsbatch.config import Settings

    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings.from_env({"SMSBATCH_DB": db_path, "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": dead + "/v1",
                                  "SMSBATCH_AI_CLIENT_RETRIES": "0", "TWILIO_ACCOUNT_SID": FakeTwilio.ACCOUNT,
                                  "TWILIO_AUTH_TOKEN": "t", "TWILIO_FROM_NUMBER": OURS,
                                  "SMSBATCH_TWILIO_BASE_URL": dead})
    batch_id = add(store, "+15551110000", "urgent: hi", T0).batch_id
    clock.now = T0 + 1
    assert real_processor(settings, clock).run().counts["retrying"] == 1
    assert store.get_batch(batch_id)["last_error"].startswith(f"AI unreachable at {dead}/v1: Connection error")
    from smsbatch.sms import TwilioSender
    from smsbatch.errors import DeliveryError

    with pytest.raises(DeliveryError, match=f"Twilio unreachable at {dead} "):
        TwilioSender(settings).send("+15551110000", "hi")


def test_a_twilio_base_url_with_a_path_is_caught(env):
    env = env | {"SMSBATCH_TWILIO_BASE_URL": env["SMSBATCH_TWILIO_BASE_URL"] + "/2010-04-01"}
    result = invoke(["check", "--json"], env)
    twilio = json.loads(result.output)["checks"][1]
    assert result.exit_code == 1 and twilio["detail"].startswith("HTTP 404 from ")
    assert "scheme+host only" in twilio["fix"]


def test_an_openai_base_url_without_v1_is_named_in_the_batch_error(db_path, store, clock, openai_standin,
                                                                   twilio_standin):
    from conftest import T0, real_processor
    from smsbatch.config import Settings

    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0)
    settings = Settings.from_env(env | {"OPENAI_BASE_URL": openai_standin.url})  # no /v1
    batch_id = add(store, "+15551110000", "urgent: hi", T0).batch_id
    clock.now = T0 + 1
    assert real_processor(settings, clock).run().counts["failed"] == 1
    error = store.get_batch(batch_id)["last_error"]
    assert error.startswith("AI returned HTTP 404") and f"(from {openai_standin.url};" in error
    assert "sk-test-standin-key" not in error


def test_check_never_shows_a_password_or_query_of_the_webhook_urls(env, twilio_standin):
    """SMSBATCH_PUBLIC_URL and Twilio's stored webhook may carry credentials (Twilio allows
    user:password@ in a webhook URL) or a key in the query: shown without them."""
    secret_url = "https://ops:hunter2@sms.example.com/sms?key=abc123"
    twilio_standin.add_number(OURS, "https://ops:hunter2@sms.example.com/sms")
    env = env | {"SMSBATCH_PUBLIC_URL": secret_url}
    result = invoke(["check"], env)
    assert result.exit_code == 1 and "SMSBATCH_PUBLIC_URL" in result.output
    assert "https://sms.example.com/sms (POST), not https://sms.example.com/sms (POST) (they differ in the " \
           "password or query, not shown)" in result.output
    fixed = invoke(["check", "--fix-webhook", "--json"], env)
    assert "webhook set to https://sms.example.com/sms (POST)" in fixed.output
    assert twilio_standin.numbers[0]["sms_url"] == secret_url  # what Twilio gets is the real URL
    for output in (result.output, fixed.output):
        assert "hunter2" not in output and "abc123" not in output and "ops@" not in output


def test_a_web_page_answering_200_is_not_taken_for_openai(env, twilio_standin):
    from fakes import WebPage

    twilio_standin.add_number(OURS, PUBLIC)
    with WebPage() as page:
        result = invoke(["check"], env | {"OPENAI_BASE_URL": page.url + "/v1"})
    assert result.exit_code == 1
    assert f"FAIL  openai: {page.url}/v1/models/gpt-4o-mini answered, but not with model 'gpt-4o-mini'" \
           in result.output and "exists" not in result.output


def test_check_reads_every_prompt_file(env, twilio_standin, tmp_path):
    twilio_standin.add_number(OURS, PUBLIC)
    folder = tmp_path / "prompts"

    def prompts_check():
        result = invoke(["check", "--json"], env | {"SMSBATCH_PROMPTS_DIR": str(folder)})
        return result.exit_code, next(c for c in json.loads(result.output)["checks"] if c["name"] == "prompts")

    code, found = prompts_check()
    assert code == 1 and not found["ok"] and found["detail"] == f"SMSBATCH_PROMPTS_DIR={folder} is not a folder"
    folder.mkdir()
    (folder / f"{OURS}.txt").write_text("You sell bicycles.")
    (folder / "README.md").write_text("not a prompt: ignored")
    code, found = prompts_check()
    assert code == 0 and found["ok"] and found["detail"] == f"{folder}: 1 prompt file, all readable"
    (folder / "sales.txt").write_text("hi")
    code, found = prompts_check()
    assert code == 1 and found["detail"] == f"{folder}/sales.txt is not named like a number, so it is never used"
    (folder / "sales.txt").unlink()
    (folder / "+15550000001.txt").write_bytes(b"\xff\xfe bad")
    code, found = prompts_check()
    assert code == 1 and found["detail"].startswith(f"cannot read the system prompt {folder}/+15550000001.txt: 'utf-8'")
    assert "UTF-8" in found["fix"]
    (folder / "+15550000001.txt").unlink()
    (folder / "+15550000002.txt").mkdir()  # unreadable as a file
    code, found = prompts_check()
    assert code == 1 and found["detail"].startswith(f"cannot read the system prompt {folder}/+15550000002.txt")
