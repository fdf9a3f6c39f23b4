"""A real `vexport serve` process on 127.0.0.1 and a free port, for tests/test_serve*.py."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

import httpx

URL_LINE = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+) ")


class ServerProcess:
    """``vexport serve MODEL ARGS... --port 0``; ``url`` once it listens, ``wait_ready()`` until /ready says so."""

    def __init__(self, model, *args: str, env: dict | None = None, start_timeout: float = 180.0):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vexport-serve-", suffix=".log", delete=False)
        environment = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1", **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "vexport", "serve", str(model), "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=environment)
        self.url = self._read_url(start_timeout)

    def _read_url(self, timeout: float) -> str:
        end, seen = time.monotonic() + timeout, ""
        while time.monotonic() < end and self.process.poll() is None:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                seen += line
                if match := URL_LINE.search(line):
                    return match.group(1)
        self.stop()
        raise AssertionError(f"vexport serve did not start: stdout {seen!r}, stderr {self.stderr()[-3000:]}")

    def wait_ready(self, headers: dict | None = None, timeout: float = 120.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.process.poll() is None, f"vexport serve exited: {self.stderr()[-3000:]}"
            try:
                response = httpx.get(f"{self.url}/ready", headers=headers, timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"vexport serve never became ready: {self.stderr()[-3000:]}")

    def stderr(self) -> str:
        self.log.flush()
        with open(self.log.name) as fh:
            return fh.read()

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
