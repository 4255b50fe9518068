"""Make sure a Prefect server answers at PREFECT_API_URL: start a local one (SQLite in PREFECT_HOME) if not.

For a team, point PREFECT_API_URL at a shared server instead (see the README: PostgreSQL, work pools).
"""
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:4200/api"


def healthy(url):
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def ensure(url=None, timeout=180):
    """Return the API URL of a running server, starting one in the background when none answers."""
    url = url or os.environ.get("PREFECT_API_URL", DEFAULT_URL)
    if healthy(url):
        return url
    u = urllib.parse.urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost"):
        sys.exit(f"error: no Prefect server answers at {url}, and only a local one can be started here")
    home = Path(os.environ.get("PREFECT_HOME", ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", u.hostname,
                             "--port", str(u.port or 4200)], stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "PREFECT_HOME": str(home.resolve())})
    (home / "server.pid").write_text(str(proc.pid))     # `kill $(cat .prefect/server.pid)` stops it
    print(f"starting a Prefect server at {url} (log: {home / 'server.log'})", end="", flush=True)
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if time.monotonic() > deadline:
            sys.exit(f"\nerror: the Prefect server did not answer within {timeout} s; see {home / 'server.log'}")
        print(".", end="", flush=True)
        time.sleep(1)
    print(" up")
    return url


if __name__ == "__main__":
    ensure()
