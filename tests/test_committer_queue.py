"""The PostgreSQL webhook's committers take their groups from one queue (writer_pool._Queue):
never two groups of one conversation at once, and one person's texts in the order they came.
Pure threading, no database: the committers' transactions are tested in test_pg_writer.py."""

import threading
import time

from conftest import T0
from smsbatch.batching import Rules
from smsbatch.intake import Text
from smsbatch.writer import Burst
from smsbatch.writer_pool import _Queue


def burst(*phones):
    item = Burst(lambda failed: None)
    for phone in phones:
        item.run(Text(f"SM{phone}", phone, "+15550000000", "hi", T0, Rules()), T0 + 4)
    return item


def phones(items):
    return [[w.phone for w in item.works] for item in items]


def test_a_committer_leaves_conversations_another_is_writing_and_what_comes_after_them():
    queue = _Queue()
    for item in (burst("A"), burst("A", "B"), burst("C"), burst("B"), burst("D")):
        queue.put(item)
    assert phones(queue.take("one", limit=1)) == [["A"]]
    # A is being written: A+B waits, and so does the later B behind it; C and D do not
    assert phones(queue.take("two", limit=10)) == [["C"], ["D"]]
    assert phones(queue.take("one", limit=10)) == [["A", "B"], ["B"]]  # "one" finished A


def test_a_committer_waits_until_the_conversation_is_free_and_close_ends_it():
    queue = _Queue()
    queue.put(burst("A"))
    assert phones(queue.take("one", limit=10)) == [["A"]]
    queue.put(burst("A"))
    got = []
    waiting = threading.Thread(target=lambda: got.append(queue.take("two", limit=10)))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and not got  # A is still being written by "one"
    queue.done("one")
    waiting.join(5)
    assert phones(got[0]) == [["A"]]
    queue.close()
    assert queue.take("one", limit=10) is None


def test_the_standby_takes_only_what_has_waited_its_patience():
    """The first committer takes at once; the standby (patience) only what the first has left
    waiting that long (it is held up by a lock another host holds), and waits for it."""
    queue = _Queue()
    queue.put(burst("A"))
    assert phones(queue.take("first", limit=10)) == [["A"]]  # "first" is now writing A
    queue.put(burst("B"))
    started = time.monotonic()
    assert phones(queue.take("standby", limit=10, patience=0.2)) == [["B"]]
    assert time.monotonic() - started >= 0.19  # B had to wait 0.2 s for it
    queue.put(burst("C"))
    assert phones(queue.take("first", limit=10)) == [["C"]]  # at once
