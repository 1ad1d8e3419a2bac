"""The plainer design, for bench_vs_flask.py: smsbatch's webhook app on stock wsgiref with
a thread per connection (socketserver.ThreadingMixIn), every text through the Writer's
lock-guarded, group-committing connection (no selector, no bursts).

    python bench/plain_wsgiref.py DB_PATH    # TWILIO_AUTH_TOKEN, SMSBATCH_PUBLIC_URL from the env
"""

import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smsbatch.config import Settings  # noqa: E402
from smsbatch.web import Webhook  # noqa: E402


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


class PlainWebhook(Webhook):
    burst = None  # never one transaction per burst: each text goes through Writer.submit


def main():
    settings = Settings.from_env({**os.environ, "SMSBATCH_DB": sys.argv[1]})
    server = make_server("127.0.0.1", 0, PlainWebhook(settings), server_class=ThreadingServer,
                         handler_class=QuietHandler)
    print(f"listening on http://127.0.0.1:{server.server_port}/sms", file=sys.stderr, flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever(0.2)


if __name__ == "__main__":
    main()
