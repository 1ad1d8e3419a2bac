"""deploy/: the systemd units, the operator wrapper and the glue around them (failure reports, backup and
prune timers, logrotate, the nginx and Caddy snippets) are consistent and work as written."""

import configparser
import getpass
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
BIN = "/opt/smsbatch/venv/bin/smsbatch"
UNITS = ("smsbatch-serve.service", "smsbatch-process.service", "smsbatch-process.timer")


def unit(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(os.path.join(DEPLOY, name))
    return parser


@pytest.mark.parametrize("name", UNITS[:2])
def test_services_run_as_the_database_owner_with_full_paths(name):
    service = unit(name)["Service"]
    assert service["User"] == service["Group"] == "smsbatch"
    assert service["EnvironmentFile"] == "/etc/smsbatch/env"
    assert service["ExecStart"].startswith(BIN + " ")
    assert service["StateDirectory"] == "smsbatch" and service["UMask"] == "0077"


def test_serve_restarts_and_the_timer_runs_process_every_minute():
    assert unit("smsbatch-serve.service")["Service"]["Restart"] == "on-failure"
    assert "--for 55" in unit("smsbatch-process.service")["Service"]["ExecStart"]
    timer = unit("smsbatch-process.timer")["Timer"]
    assert timer["OnCalendar"] == "*-*-* *:*:00" and timer["Unit"] == "smsbatch-process.service"


def test_the_env_example_names_the_database_in_the_state_directory():
    lines = open(os.path.join(DEPLOY, "env.example")).read().splitlines()
    assert "SMSBATCH_DB=/var/lib/smsbatch/smsbatch.db" in lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_units(tmp_path):
    """systemd's own check, with the venv's smsbatch standing in for /opt/smsbatch/venv."""
    real = shutil.which("smsbatch", path=os.path.dirname(sys.executable))
    for name in UNITS:
        text = open(os.path.join(DEPLOY, name)).read().replace(BIN, real)
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in UNITS]],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_the_wrapper_reads_the_env_file_and_runs_smsbatch(tmp_path):
    """As the service user (here: whoever runs the tests), with a quoted value holding spaces."""
    db = tmp_path / "smsbatch.db"
    env_file = tmp_path / "env"
    env_file.write_text(f"SMSBATCH_DB={db}\nSMSBATCH_SYSTEM_PROMPT='You answer for Acme. Be short.'\n")
    env = {"PATH": os.environ["PATH"], "SMSBATCH_USER": getpass.getuser(), "SMSBATCH_ENV_FILE": str(env_file),
           "SMSBATCH_BIN": shutil.which("smsbatch", path=os.path.dirname(sys.executable))}
    result = subprocess.run(["sh", os.path.join(DEPLOY, "smsbatch"), "migrate"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{db}: created at schema version")
    assert os.stat(db).st_mode & 0o777 == 0o600


# --- The glue around the units: OnFailure=, backup and prune timers, logrotate, proxies -------------

ALL_UNITS = sorted(n for n in os.listdir(DEPLOY) if n.endswith((".service", ".timer")))
SERVICES = [n for n in ALL_UNITS if n.endswith(".service") and "@" not in n]
TIMERS = [n for n in ALL_UNITS if n.endswith(".timer")]
WEBHOOK_PATHS = {"/sms", "/sms/status", "/status"}


def test_every_shipped_unit_parses_and_runs_as_the_database_owner():
    assert {"smsbatch-failure@.service", "smsbatch-backup.service", "smsbatch-backup.timer",
            "smsbatch-prune.service", "smsbatch-prune.timer"} <= set(ALL_UNITS)
    for name in ALL_UNITS:
        parsed = unit(name)
        assert "Unit" in parsed, name
        if name.endswith(".service"):
            service = parsed["Service"]
            assert service["User"] == service["Group"] == "smsbatch", name
            assert service["ExecStart"].startswith("/opt/smsbatch/"), name


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_reports_its_failure_through_a_shipped_unit(name):
    """OnFailure= names the template shipped next to it, whose script is shipped too."""
    on_failure = unit(name)["Unit"]["OnFailure"]
    assert on_failure == "smsbatch-failure@%n.service"
    template = on_failure.split("@")[0] + "@.service"
    assert template in ALL_UNITS
    script = unit(template)["Service"]["ExecStart"].split()[1]
    assert script == "/opt/smsbatch/bin/smsbatch-notify-failure"
    assert os.access(os.path.join(DEPLOY, os.path.basename(script)), os.X_OK)


@pytest.mark.parametrize("name", TIMERS)
def test_every_timer_starts_a_shipped_service_on_a_calendar_systemd_reads(name):
    timer = unit(name)["Timer"]
    assert timer["Unit"] in SERVICES
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "calendar", timer["OnCalendar"]], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0 and "Next elapse" in result.stdout, result.stderr
    else:
        assert re.fullmatch(r"\*-\*-\* [0-9*]{1,2}:[0-9*]{1,2}:[0-9]{2}", timer["OnCalendar"])


def test_the_backup_and_prune_services_run_the_right_commands():
    assert unit("smsbatch-backup.service")["Service"]["ExecStart"] == "/opt/smsbatch/bin/smsbatch-backup"
    prune = unit("smsbatch-prune.service")["Service"]
    assert prune["ExecStart"] == BIN + " prune --older-than ${SMSBATCH_PRUNE_OLDER_THAN}"
    assert prune["Environment"] == "SMSBATCH_PRUNE_OLDER_THAN=90d"


def host_paths(text, tmp_path):
    """A unit's text with the /opt/smsbatch paths pointed at this checkout and venv."""
    venv_bin = os.path.dirname(sys.executable)
    return text.replace("/opt/smsbatch/venv/bin/", venv_bin + "/").replace("/opt/smsbatch/bin/", DEPLOY + "/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_every_shipped_unit(tmp_path):
    """systemd's own check of all of them together (OnFailure= must resolve), the template as an instance."""
    names = []
    for name in ALL_UNITS:
        target = name.replace("@.service", "@smsbatch-process.service")
        (tmp_path / target).write_text(host_paths(open(os.path.join(DEPLOY, name)).read(), tmp_path))
        names.append(str(tmp_path / target))
    result = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # the journal group may not exist where the tests run; anything else is a real complaint
    complaints = [line for line in result.stderr.splitlines() if line.strip() and "systemd-journal" not in line]
    assert complaints == []


class Recorder:
    """A stand-in for `serve` or a chat webhook: answers 200 to anything, remembers what came."""

    def __init__(self):
        self.seen = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                recorder.seen.append((self.command, self.path, self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = do_PUT = do_DELETE = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def fake_systemctl(tmp_path):
    """A `systemctl` that answers `show` as for a process run that exited 3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text('#!/bin/sh\nif [ "$1" = show ]; then printf "Result=exit-code\\n'
                                       'ExecMainStatus=3\\n"; else echo "status of $4"; fi\n')
    (bin_dir / "systemctl").chmod(0o755)
    return str(bin_dir)


def notify(tmp_path, url):
    env = {"PATH": fake_systemctl(tmp_path) + os.pathsep + os.environ["PATH"], "SMSBATCH_ALERT_WEBHOOK_URL": url}
    return subprocess.run([sys.executable, os.path.join(DEPLOY, "smsbatch-notify-failure"),
                           "smsbatch-process.service"], env=env, capture_output=True, text=True, timeout=60)


def test_a_failed_unit_is_written_to_the_journal_and_posted_to_the_alert_webhook(tmp_path, recorder):
    url = f"http://127.0.0.1:{recorder.port}/hooks/T000/SECRET-PATH"
    result = notify(tmp_path, url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smsbatch-process.service failed (result exit-code, exit status 3)" in result.stdout
    assert "status of smsbatch-process.service" in result.stdout  # the journal gets the details
    [(method, path, body)] = recorder.seen
    assert (method, path) == ("POST", "/hooks/T000/SECRET-PATH")
    text = json.loads(body)["text"]
    assert "smsbatch-process.service failed" in text and "smsbatch status" in text
    assert "status of" not in text  # log lines (phone numbers, texts) are not sent to a chat


def test_an_alert_that_cannot_be_delivered_fails_without_showing_the_webhook_secret(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = notify(tmp_path, f"http://127.0.0.1:{port}/hooks/SECRET-PATH")
    assert result.returncode == 1
    assert "alert to 127.0.0.1 failed" in result.stdout
    assert "SECRET" not in result.stdout + result.stderr


def run_backup(tmp_path, keep):
    db = tmp_path / "smsbatch.db"
    env = {"PATH": os.environ["PATH"], "SMSBATCH_DB": str(db), "SMSBATCH_BACKUP_DIR": str(tmp_path / "backups"),
           "SMSBATCH_BACKUP_KEEP": str(keep), "SMSBATCH_BIN": shutil.which("smsbatch", path=os.path.dirname(sys.executable))}
    subprocess.run([env["SMSBATCH_BIN"], "--db", str(db), "migrate"], check=True, capture_output=True, timeout=60)
    return subprocess.run(["sh", os.path.join(DEPLOY, "smsbatch-backup")], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_backup_keeps_the_newest_copies_and_nothing_else_is_touched(tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir()
    old = ["smsbatch-20250101T031700Z.db", "smsbatch-20250102T031700Z.db", "smsbatch-20250103T031700Z.db"]
    for name in old + ["before-upgrade.db", "smsbatch-notes.db"]:
        (backups / name).write_text("x")
    result = run_backup(tmp_path, keep=2)
    assert result.returncode == 0, result.stderr
    left = sorted(os.listdir(backups))
    new = [n for n in left if n.startswith("smsbatch-2") and n not in old]
    assert len(new) == 1 and re.fullmatch(r"smsbatch-\d{8}T\d{6}Z\.db", new[0])
    assert left == sorted(["before-upgrade.db", "smsbatch-notes.db", old[-1], new[0]])
    assert os.stat(backups / new[0]).st_mode & 0o777 == 0o600
    with sqlite3.connect(backups / new[0]) as copy:  # a real, whole database
        assert copy.execute("SELECT count(*) FROM batches").fetchone() == (0,)
    assert f"deleted the old backup {backups}/{old[0]}" in result.stdout


def test_the_backup_refuses_a_number_to_keep_that_would_delete_everything(tmp_path):
    result = run_backup(tmp_path, keep=0)
    assert result.returncode == 1 and "SMSBATCH_BACKUP_KEEP must be a whole number" in result.stderr
    assert not (tmp_path / "backups").exists()


def test_logrotate_covers_the_logs_the_cron_lines_write(tmp_path):
    text = open(os.path.join(DEPLOY, "logrotate")).read()
    rules = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert rules[0] == "/var/log/smsbatch/*.log {"
    cron = open(os.path.join(os.path.dirname(DEPLOY), "crontab.example")).read()
    logs = set(re.findall(r">> (/var/log/smsbatch/\S+)", cron))
    assert logs and all(re.fullmatch(r"/var/log/smsbatch/[^/]+\.log", path) for path in logs)
    assert "su smsbatch smsbatch" in rules and "copytruncate" not in rules  # cron reopens the file
    if shutil.which("logrotate"):  # logrotate's own reading, on a copy pointed at tmp_path, as this user
        me = getpass.getuser()
        conf = tmp_path / "smsbatch"
        conf.write_text(text.replace("/var/log/smsbatch", str(tmp_path)).replace("smsbatch smsbatch", f"{me} {me}"))
        (tmp_path / "process.log").write_text("a line\n")
        result = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr


def nginx_locations(text):
    """{path: body} of the active `location = PATH { ... }` lines."""
    active = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return dict(re.findall(r"location = (\S+)\s*\{(.*)\}\s*$", active, re.MULTILINE))


def test_nginx_forwards_exactly_the_webhook_paths_and_only_posts():
    text = open(os.path.join(DEPLOY, "nginx.conf")).read()
    locations = nginx_locations(text)
    assert set(locations) == WEBHOOK_PATHS
    for body in locations.values():
        assert "limit_except POST { deny all; }" in body and "proxy_pass http://smsbatch;" in body
    assert re.search(r"upstream smsbatch \{\s*server 127\.0\.0\.1:8080;", text)
    active = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert sum("proxy_pass" in line for line in active) == 3
    assert "location / { return 404; }" in text and "metrics" not in "".join(active)


def test_caddy_forwards_exactly_the_webhook_paths_and_only_posts():
    text = open(os.path.join(DEPLOY, "Caddyfile")).read()
    active = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert set(active[active.index("method POST") + 1].split()[1:]) == WEBHOOK_PATHS
    assert active.count("reverse_proxy 127.0.0.1:8080") == 1
    assert active.index("handle @webhook {") < active.index("reverse_proxy 127.0.0.1:8080")
    assert "respond 404" in active and "metrics" not in "".join(active)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=b"From=%2B15551234567" if method == "POST" else None,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    status = conn.getresponse().status
    conn.close()
    return status


def wait_for(port, proc):
    for _ in range(200):
        assert proc.poll() is None, proc.stderr.read()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the proxy did not start")


def assert_only_webhooks_pass(port, recorder):
    for method, path in [("POST", "/sms"), ("POST", "/status"), ("POST", "/sms/status"), ("GET", "/metrics"),
                         ("POST", "/metrics"), ("GET", "/sms"), ("GET", "/health"), ("POST", "/smsx"),
                         ("POST", "/sms/../metrics"), ("POST", "/admin")]:
        status = request(port, method, path)
        assert (status == 200) == (method == "POST" and path in WEBHOOK_PATHS), (method, path, status)
    assert sorted((m, p) for m, p, _ in recorder.seen) == sorted(("POST", p) for p in WEBHOOK_PATHS)


def start_nginx(tmp_path, upstream_port):
    """deploy/nginx.conf run by nginx itself (TLS left out: the listening port is plain HTTP
    here), in front of 127.0.0.1:`upstream_port`; (process, its port) once it listens."""
    port = free_port()
    snippet = open(os.path.join(DEPLOY, "nginx.conf")).read()
    snippet = re.sub(r"\n\s*listen .*", "", snippet).replace("    server_name", f"    listen 127.0.0.1:{port};\n    server_name")
    snippet = re.sub(r"\n\s*ssl_certificate.*", "", snippet).replace("127.0.0.1:8080", f"127.0.0.1:{upstream_port}")
    temp = "".join(f"{kind}_temp_path {tmp_path}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\naccess_log off;\n{temp}{snippet}\n}}\n")
    check = subprocess.run(["nginx", "-t", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(["nginx", "-c", str(tmp_path / "nginx.conf")], stderr=subprocess.PIPE, text=True)
    wait_for(port, proc)
    return proc, port


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_really_forwards_only_the_webhook_paths(tmp_path, recorder):
    """The snippet run by nginx itself (TLS left out: the listening port is plain HTTP here)."""
    proc, port = start_nginx(tmp_path, recorder.port)
    try:
        assert_only_webhooks_pass(port, recorder)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def start_caddy(tmp_path, upstream_port):
    """deploy/Caddyfile run by Caddy itself on plain HTTP (no certificate to obtain here), in
    front of 127.0.0.1:`upstream_port`; (process, its port) once it listens."""
    port = free_port()
    text = open(os.path.join(DEPLOY, "Caddyfile")).read()
    text = text.replace("sms.example.com {", f"{{\n\tadmin off\n\tauto_https off\n}}\nhttp://127.0.0.1:{port} {{")
    (tmp_path / "Caddyfile").write_text(text.replace("127.0.0.1:8080", f"127.0.0.1:{upstream_port}"))
    env = dict(os.environ, HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.Popen(["caddy", "run", "--config", str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_for(port, proc)
    return proc, port


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy not installed")
def test_caddy_really_forwards_only_the_webhook_paths(tmp_path, recorder):
    """The Caddyfile run by Caddy itself, on plain HTTP (no certificate to obtain here)."""
    proc, port = start_caddy(tmp_path, recorder.port)
    try:
        assert_only_webhooks_pass(port, recorder)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
