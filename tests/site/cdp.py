"""A small Chrome DevTools Protocol client over --remote-debugging-pipe (no dependency).

Chromium reads commands on fd 3 and writes replies and events on fd 4, each a JSON text ended by
NUL (the transport Puppeteer's `pipe: true` uses). Events of the page session are kept in a list
that a test reads and clears.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time

# Without the background-networking flags Chromium keeps dialling Google services, which a closed
# network refuses; --disable-quic for the same reason.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--window-size=1280,900", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout = timeout  # a hang guard only: every wait ends as soon as its answer comes
        self.profile = tempfile.mkdtemp(prefix="dpo-lab-chromium-")
        # Chromium's ends of the two pipes must be its fds 3 and 4; ours stay non-inheritable.
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        self._log = open(os.path.join(self.profile, "chromium.log"), "wb")
        devnull = os.open(os.devnull, os.O_RDONLY)
        high = [os.dup(fd) for fd in (to_chrome_r, from_chrome_w)]  # so that dup2 onto 3, 4 cannot clash
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, self._log.fileno(), 1),
                   (os.POSIX_SPAWN_DUP2, self._log.fileno(), 2),
                   (os.POSIX_SPAWN_DUP2, high[0], 3), (os.POSIX_SPAWN_DUP2, high[1], 4)]
        argv = [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        self.pid = os.posix_spawn(executable, argv, os.environ, file_actions=actions)
        for fd in (to_chrome_r, from_chrome_w, devnull, *high):
            os.close(fd)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict] = []
        self._events_cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None

    def _read(self):
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                with self._lock:
                    for q in self._replies.values():
                        q.put({"error": {"message": "Chromium closed the pipe"}})
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        q = self._replies.pop(msg["id"], None)
                    if q:
                        q.put(msg)
                else:
                    with self._events_cv:
                        self.events.append(msg)
                        self._events_cv.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = "page") -> dict:
        with self._lock:
            self._next_id += 1
            cid = self._next_id
            q = self._replies[cid] = queue.Queue()
        msg = {"id": cid, "method": method, "params": params or {}}
        if session == "page":
            session = self.session
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=self.timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no reply from Chromium within {self.timeout} s") from None
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def open_page(self):
        """One tab, attached with a flat session; console, network and page events enabled."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=None)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=None)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def wait_event(self, method: str, since: int = 0) -> dict:
        """The first event `method` of the page session at or after index `since` of self.events."""
        def find():
            for ev in self.events[since:]:
                if ev.get("method") == method and ev.get("sessionId") == self.session:
                    return ev
        with self._events_cv:
            if not self._events_cv.wait_for(find, timeout=self.timeout):
                raise CDPError(f"no {method} within {self.timeout} s")
            return find()

    def evaluate(self, expression: str):
        """The value of a JS expression (a promise is awaited); a JS exception is raised here."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True})
        if "exceptionDetails" in res:
            raise CDPError(f"JS error: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", session=None)
        except CDPError:
            pass
        for _ in range(100):  # up to 10 s for a clean exit, then kill: a hang guard only
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
