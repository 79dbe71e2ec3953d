"""A stand-in for one part of the RL loop, run as a real process by the supervisor tests.

python supervised_child.py --pids FILE [--port P] [--grandchild-port Q] [--exit-after S --exit-code C]
                           [--ignore-sigterm] [--say TEXT]

--port serves GET /health with 200; --grandchild-port starts a second process in a session of its own (as a
trainer starting its own inference server does) listening on Q; every pid is appended to FILE.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import subprocess
import sys
import threading
import time


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the stdlib's handler name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pids", required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--grandchild-port", type=int)
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--say", default="")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(args.pids, "a") as pids:
        pids.write(f"{os.getpid()}\n")
    if args.grandchild_port:
        subprocess.Popen([sys.executable, __file__, "--pids", args.pids, "--port", str(args.grandchild_port)],
                         start_new_session=True)
    if args.say:
        print(args.say, flush=True)
    if args.port:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        sys.exit(args.exit_code)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
