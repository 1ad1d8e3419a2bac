"""deploy/: the systemd units and the operator wrapper are consistent and work as written."""

import configparser
import getpass
import os
import shutil
import subprocess
import sys

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
