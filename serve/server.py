"""The server: Debian's nginx in front, for the connection-level limits, and uvicorn behind it on a private Unix
socket, for the ASGI app. The one place where the `serve` params become server behaviour; `make serve`, the image
and the tests all run it through `Server`.

Why nginx and not uvicorn alone or Granian (tried on 127.0.0.1, 2026-12-01, granian 2.8.9 / nginx 1.22.1):
uvicorn has no header timeout, no header size limit, and its `limit_concurrency` counts idle sockets (TRAPS.md).
Granian (hyper) closed silent and slowloris sockets at its header timeout and answered 431, but that same timeout
also ends idle keep-alive connections (capped at 60 s, so `keep_alive_s` 75 cannot hold), and its backpressure
counts sockets: 8 silent sockets against a backpressure of 4 held /healthz for 5.7 s. nginx closed silent and
slowloris sockets at `client_header_timeout`, kept an idle keep-alive connection 75 s, answered 431 (494 mapped),
closed after 413, and `limit_conn` counts only connections with a request in progress: /healthz answered in 2 ms
beside 200 silent sockets.

nginx and uvicorn's thread (the event loop, and the decode threads it starts) run under SCHED_BATCH, so that their
many short wake-ups wait for a time slice instead of preempting ONNX Runtime mid-image; the batcher's lanes keep
the normal policy (`serve.batcher.schedule`).
"""
import concurrent.futures
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from serve.batcher import schedule
from stages.config import UserError

# nginx's own refusals, answered by the app's /_error/{status} (JSON, counted in /metrics); 494 is nginx's code for
# headers over the limit, sent as 431. 502/504 mean the app is gone, so nginx answers those itself.
PROXIED_ERRORS = "400 404 408 413 414 500 503"


def nginx_binary():
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if not found:
        raise UserError("nginx not found: `make setup` installs it (apt-get install nginx), the image has it")
    return found


def ms(seconds):
    return f"{round(seconds * 1000)}ms"                 # nginx reads "2.5s" as an error


def nginx_conf(p, upstream, tmp):
    """nginx.conf for the `serve` params `p`, proxying to the Unix socket `upstream`; runtime files under `tmp`."""
    # as root, nginx's workers would become `nobody` and lose the private socket: keep them this process's user
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};" if os.geteuid() == 0 else ""
    upstream_opts = "proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";"
    return f"""
daemon off;
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr crit;                              # bad clients are not news
worker_rlimit_nofile {2 * p.max_sockets + 64};
events {{ worker_connections {p.max_sockets}; }}
http {{
  access_log off;
  server_tokens off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream app {{ server unix:{upstream}; keepalive 16; }}
  limit_conn_zone $server_name zone=active:1m;
  # after the app's 401/408/413 nginx closes the connection (the body is unread) but its own header would say
  # keep-alive: say close as well, so that clients do not try to reuse it
  map $upstream_status $close_after {{ ~(401|408|413)$ close; default ""; }}
  server {{
    listen {p.host}:{p.port} backlog=1024;
    client_header_timeout {ms(p.header_timeout_s)};   # also closes a socket that never sends a request
    client_header_buffer_size 1k;
    large_client_header_buffers 4 {p.max_header_bytes // 4};
    keepalive_timeout {ms(p.keep_alive_s)};
    client_max_body_size {p.max_body_bytes};
    client_body_timeout {ms(2 * p.read_timeout_s)};   # a backstop: the app answers 408 at read_timeout_s
    send_timeout {ms(p.read_timeout_s)};
    lingering_time {ms(p.header_timeout_s)};           # after 413: read the rest of a body this long at most
    lingering_timeout 1s;
    add_header Connection $close_after always;
    absolute_redirect off;                          # never a Location built from the client's Host
    proxy_request_buffering off;                    # the app sees the body as it streams: 401/413 before the end
    proxy_buffering off;
    proxy_read_timeout 300s;
    proxy_set_header Host "app";
    proxy_set_header X-Original-URI $request_uri;
    error_page {PROXIED_ERRORS} /_error/$status;
    error_page 494 =431 /_error/431;
    location /_error/ {{ internal; {upstream_opts} proxy_pass_request_body off; proxy_set_header Content-Length ""; }}
    error_page 502 504 /_gone;
    location = /_gone {{ internal; default_type application/json;
                        return 502 '{{"error": "unavailable", "detail": "the model service is not answering"}}'; }}
    location = /predict {{ limit_conn active {p.max_connections}; limit_conn_status 503; {upstream_opts} }}
    location / {{ {upstream_opts} }}
  }}
}}
"""


def uvicorn_config(app, uds, p, **options):
    """uvicorn's settings behind nginx: no concurrency limit of its own (nginx's counts requests, not sockets)."""
    return uvicorn.Config(app, uds=str(uds), timeout_keep_alive=p.keep_alive_s + 5, timeout_graceful_shutdown=10,
                          server_header=False, date_header=False, loop="uvloop", http="httptools", **options)


class Server:
    """nginx on p.host:p.port in front of the app under uvicorn on a Unix socket, for a `with` block."""

    def __init__(self, app, p, log_level="info"):
        self.app, self.p, self.log_level = app, p, log_level
        self.nginx = self.thread = None

    def __enter__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="serve-"))          # mode 0700: the socket is ours alone
        uds = self.tmp / "app.sock"
        self.uvicorn = uvicorn.Server(uvicorn_config(self.app, uds, self.p, log_level=self.log_level))
        self.thread = threading.Thread(target=self._run_uvicorn, name="uvicorn", daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            if not self.thread.is_alive():                          # the lifespan failed; uvicorn said why
                self.__exit__()
                raise UserError("the app did not start (see the log above)")
            time.sleep(0.02)
        conf = self.tmp / "nginx.conf"
        conf.write_text(nginx_conf(self.p, uds, self.tmp))
        # started from a SCHED_BATCH thread, nginx's processes inherit the policy
        with concurrent.futures.ThreadPoolExecutor(1, initializer=schedule, initargs=(True,)) as starter:
            self.nginx = starter.submit(subprocess.Popen, [nginx_binary(), "-e", "stderr", "-p", str(self.tmp),
                                                           "-c", str(conf)]).result()
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.nginx.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise UserError(f"nginx did not start on {self.p.host}:{self.p.port} (its reason is above)")
            time.sleep(0.02)
        return self

    def _run_uvicorn(self):
        schedule(batch=True)        # the event loop, and the decode threads it starts; the lanes set themselves back
        self.uvicorn.run()

    def _listening(self):
        try:
            socket.create_connection((self.p.host, self.p.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def alive(self):
        return self.nginx.poll() is None and self.thread.is_alive()

    def __exit__(self, *exc):
        """nginx first (no new requests), then uvicorn lets in-flight ones finish and runs the lifespan's end."""
        if self.nginx and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)                  # graceful: finish what is in flight
            try:
                self.nginx.wait(15)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait()
        if self.thread and self.thread.is_alive():
            self.uvicorn.should_exit = True
            self.thread.join(30)
        shutil.rmtree(self.tmp, ignore_errors=True)
