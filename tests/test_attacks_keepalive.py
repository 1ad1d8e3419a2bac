"""Attacks on HTTP/1.1 keep-alive: what a hostile or odd client does on one kept
connection, or with many. Real sockets, a real server (in this process, or an OS process
when its descriptor limit matters); every text answered 200 is stored exactly once."""

import pytest

from test_hostile_web import form, read_answer, signed_request
from test_keep_alive import connect, server, sids, stored  # noqa: F401 (server: the fixture)

pytestmark = pytest.mark.engines


def test_a_text_after_a_header_block_ending_lf_crlf_is_not_swallowed(server, db_path):
    """An LF-ended header line followed by a CRLF empty line ends the block for the
    request parser; the framer must agree, else the text pipelined after it is taken as
    more headers of the first request: never stored, never answered, the client waits."""
    first = b"GET /health HTTP/1.1\nHost: x\n\r\n"
    with connect(server) as sock:
        sock.sendall(first + signed_request(form(1)))
        assert read_answer(sock)[0] == 200
        sock.settimeout(3)
        status, head, body = read_answer(sock)
        assert status == 200 and b"<Response/>" in body
    assert stored(db_path) == sids(1)

