"""A stand-in for the `remora` binary that keeps the contract tests/e2e/harness/process.rs relies on.

The harness self-test runs it so that the harness's process handling (admin address file, /ready,
/listeners?format=json, /stats, signals, logs, validate mode) is checked without the proxy. It mimics Envoy:

- `--mode validate -c FILE`: exit 1 with an error on stderr if the config contains "invalid", else print
  "configuration 'FILE' OK" and exit 0.
- otherwise (serve): exit 3 at once if the config contains "crash"; else bind a listener named "ingress" on
  127.0.0.1:0 and an admin server on 127.0.0.1:0, write the admin address to --admin-address-path (atomically),
  and serve GET /ready, GET /listeners?format=json, GET /stats and POST /healthcheck/fail until SIGTERM, which
  exits 0.
"""

import argparse
import http.server
import json
import os
import signal
import socket
import sys

parser = argparse.ArgumentParser()
parser.add_argument("-c", dest="config", required=True)
parser.add_argument("--admin-address-path")
parser.add_argument("--mode", default="serve")
args, _unknown = parser.parse_known_args()

with open(args.config) as f:
    config = f.read()

if args.mode == "validate":
    if "invalid" in config:
        print("error: the config is invalid", file=sys.stderr)
        sys.exit(1)
    print(f"configuration '{args.config}' OK")
    sys.exit(0)

if "crash" in config:
    print("crashing as the config asks", file=sys.stderr)
    sys.exit(3)

ingress = socket.socket()
ingress.bind(("127.0.0.1", 0))
ingress.listen()
ingress_port = ingress.getsockname()[1]
admin_requests = 0
healthy = True


class Admin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        global admin_requests
        admin_requests += 1
        if self.path == "/ready":
            self.answer(200 if healthy else 503, "LIVE\n" if healthy else "DRAINING\n")
        elif self.path == "/listeners?format=json":
            address = {"socket_address": {"address": "127.0.0.1", "port_value": ingress_port}}
            self.answer(200, json.dumps({"listener_statuses": [{"name": "ingress", "local_address": address}]}))
        elif self.path == "/stats":
            self.answer(200, f"fake.admin_requests: {admin_requests}\nfake.rq_time: P0(nan,1) P50(nan,2)\n")
        else:
            self.answer(404, "no such path\n")

    def do_POST(self):
        global healthy
        if self.path == "/healthcheck/fail":
            healthy = False
            print("health check failed by admin", file=sys.stderr, flush=True)
            self.answer(200, "OK\n")
        else:
            self.answer(404, "no such path\n")

    def log_message(self, format, *log_args):
        print("admin: " + format % log_args, file=sys.stderr, flush=True)


def on_sigterm(_signum, _frame):
    print("caught SIGTERM, exiting", file=sys.stderr, flush=True)
    os._exit(0)


signal.signal(signal.SIGTERM, on_sigterm)
admin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Admin)
host, port = admin.server_address[:2]
if args.admin_address_path:
    partial = args.admin_address_path + ".partial"
    with open(partial, "w") as f:
        f.write(f"{host}:{port}")
    os.replace(partial, args.admin_address_path)
print("fake remora serving", flush=True)
admin.serve_forever()
