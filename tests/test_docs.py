"""The docs tell the truth about the code: every setting, state, delivery status, module, state move
and command is documented, the schema version is the code's, the command reference is the one
`--help` prints, the README stays short, and every relative link leads somewhere.

When one of these fails after a change to the code, the message says what to add where (or how to
regenerate docs/cli.md). Fix the docs, not the test.
"""

import ast
import importlib.util
import os
import re

import pytest

from smsbatch import delivery, migrations
from smsbatch.cli import cli
from smsbatch.states import TRANSITIONS, State

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PACKAGE = os.path.join(ROOT, "smsbatch")
SETTING = re.compile(r"\b(?:(?:SMSBATCH|TWILIO|OPENAI)_[A-Z0-9_]*[A-Z0-9]|ENABLE_AI_SMS_AGENT|AI_SMS_TEST_NUMBER)\b")
README_LIMIT = 12 * 1024
DEMO = "python3 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/smsbatch demo"
TESTS = "python3 -m venv .venv && .venv/bin/pip install -q '.[test]' && .venv/bin/python -m pytest -q"


def read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def pages():
    """Every page a reader may follow a link to: the README, docs/*.md, bench/README.md."""
    names = ["README.md", os.path.join("bench", "README.md")]
    names += [os.path.join("docs", n) for n in sorted(os.listdir(DOCS)) if n.endswith(".md")]
    return names


def settings_read_by_config():
    """The environment names config.py reads: every such name inside one of its string literals
    (Python constants such as OPENAI_MAX_RETRIES are names, not strings, and are left out)."""
    tree = ast.parse(read("smsbatch", "config.py"))
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return sorted({name for text in strings for name in SETTING.findall(text)})


def test_every_setting_config_reads_is_in_the_configuration_page():
    names = settings_read_by_config()
    assert "SMSBATCH_DB" in names and "ENABLE_AI_SMS_AGENT" in names  # the scan itself works
    page = read("docs", "configuration.md")
    missing = [n for n in names if f"`{n}`" not in page]
    assert not missing, (f"smsbatch/config.py reads {', '.join(missing)}, which docs/configuration.md does not "
                         "document: add a row (variable, default, meaning) to the table of its group")


def test_the_configuration_page_documents_no_setting_that_does_not_exist():
    page = read("docs", "configuration.md")
    ours = page.split("## Read by the shipped scripts")[0]  # the scripts' settings are read by deploy/
    extra = sorted(set(SETTING.findall(ours)) - set(settings_read_by_config()))
    assert not extra, f"docs/configuration.md documents {', '.join(extra)}, which smsbatch/config.py does not read"


def test_every_state_has_a_row_in_troubleshooting():
    page = read("docs", "troubleshooting.md")
    missing = [s.value for s in State if f"| `{s.value}` |" not in page]
    assert not missing, (f"docs/troubleshooting.md has no row for the batch state(s) {', '.join(missing)} "
                         "(smsbatch/states.py): add one to the table under `smsbatch show BATCH_ID`")


def test_every_delivery_status_is_explained_in_troubleshooting():
    page = read("docs", "troubleshooting.md")
    table = page.split("### 3.")[1]
    missing = [s for s in delivery.RANK if f"`{s}`" not in table]
    assert not missing, (f"docs/troubleshooting.md does not explain the delivery status(es) {', '.join(missing)} "
                         "(smsbatch/delivery.py RANK): add them to the table of step 3")
    assert "no receipt yet" in table


def test_the_schema_version_in_the_docs_is_the_code_s():
    latest = migrations.LATEST
    stated = []
    for name in pages():
        text = read(name)
        # "schema version 9", "schema version: **9**", "from schema version 8 to 9" (the 8 is history)
        for pattern in (r"(?<!from )schema version:? \**(\d+)", r"from schema version \d+ to (\d+)"):
            stated += [(name, int(v)) for v in re.findall(pattern, text)]
    wrong = [(name, v) for name, v in stated if v != latest]
    assert stated and not wrong, (f"the schema version is {latest} (smsbatch/migrations.py LATEST), but the docs "
                                  f"say {wrong}: update them, and add the new step to docs/changelog.md")
    changelog = read("docs", "changelog.md")
    rows = [int(v) for v in re.findall(r"^\| (\d+) \|", changelog, re.MULTILINE)]
    assert rows == list(range(1, latest + 1)), (f"docs/changelog.md's table lists schema versions {rows}: add a row "
                                                f"for each step up to {latest} (what it added)")


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(DOCS, "generate_cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_reference_is_what_help_prints(monkeypatch):
    for name in list(os.environ):  # a default shown by --help must not come from this shell
        if SETTING.fullmatch(name):
            monkeypatch.delenv(name)
    expected = load_generator().render()
    assert read("docs", "cli.md") == expected, (
        "docs/cli.md differs from the commands' --help: regenerate it with "
        "`.venv/bin/python docs/generate_cli.py` and commit docs/cli.md")


def test_the_command_reference_has_every_command_and_subcommand():
    page = read("docs", "cli.md")

    def names(group, prefix):
        for name, command in group.commands.items():
            yield f"{prefix} {name}"
            if hasattr(command, "commands"):
                yield from names(command, f"{prefix} {name}")

    missing = [n for n in names(cli, "smsbatch") if f"## {n}\n" not in page]
    assert not missing, f"docs/cli.md has no section for {missing}: run `.venv/bin/python docs/generate_cli.py`"


def test_every_command_has_a_line_in_the_readme():
    readme = read("README.md")
    missing = [n for n in cli.commands if not re.search(rf"`smsbatch (\S+ / )?{n}\b", readme)
               and f"/ `{n}`" not in readme]
    assert not missing, (f"README.md's 'Commands at a glance' has no line for {', '.join(missing)}: "
                         "add one (`smsbatch NAME` | what it does, in one line)")


def test_every_module_is_in_the_architecture_page():
    page = read("docs", "architecture.md")
    modules = sorted(n for n in os.listdir(PACKAGE) if n.endswith(".py") or n == "schema.sql")
    missing = [m for m in modules if f"`{m}`" not in page]
    assert not missing, (f"docs/architecture.md's module map lacks {', '.join(missing)}: add a row "
                         "(module | what it holds)")


def test_every_move_in_transitions_is_in_the_architecture_page_and_no_other():
    page = read("docs", "architecture.md")
    section = page.split("## A batch's life")[1].split("\n## ")[0]
    documented = set(re.findall(r"^- `(\w+)` → `(\w+)`:", section, re.MULTILINE))
    moves = {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}
    missing, extra = sorted(moves - documented), sorted(documented - moves)
    assert not missing, (f"docs/architecture.md does not describe the move(s) {missing} of states.TRANSITIONS: "
                         "add a line \"- `from` → `to`: when it happens\" under 'A batch's life'")
    assert not extra, f"docs/architecture.md describes move(s) {extra} that states.TRANSITIONS does not allow"


def test_the_readme_is_short_and_starts_with_the_two_commands():
    data = open(os.path.join(ROOT, "README.md"), "rb").read()
    assert len(data) <= README_LIMIT, (f"README.md is {len(data)} bytes, over {README_LIMIT}: move material into "
                                       "docs/ and link to it")
    readme = data.decode()
    assert "smsbatch demo" in readme
    sections = readme.split("\n## ")
    quickstart = sections[1]
    assert quickstart.startswith("Quickstart"), "the first section of README.md must be the quickstart"
    commands = [line for line in quickstart.splitlines() if line.startswith("python3 -m venv")]
    assert commands == [DEMO, TESTS], "the quickstart must give the demo command, then the tests command, exactly"
    assert quickstart.index("python3-venv") < quickstart.index(DEMO), "the python3-venv note comes before the commands"
    assert quickstart.index("git clone") < quickstart.index(DEMO)


def anchors(text):
    """GitHub's anchors for a page's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("name", pages())
def test_every_relative_link_leads_to_an_existing_file(name):
    text = read(name)
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # links in code are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), path)) if path else os.path.join(ROOT, name)
        if not os.path.exists(full):
            broken.append(target)
        elif anchor and full.endswith(".md") and anchor not in anchors(open(full, encoding="utf-8").read()):
            broken.append(target)
    assert not broken, f"{name} links to {broken}, which do not exist"
