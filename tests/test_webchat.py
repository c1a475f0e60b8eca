"""The chat page at / in a real browser: headless Chromium, driven over the DevTools
protocol on a pipe (--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4),
types a message, presses Enter and watches the reply stream in."""

import fcntl
import json
import os
import shutil
import subprocess
import time

import pytest

from infer_helpers import live_server, make_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "sk-page"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


class DevTools:
    def __init__(self, user_dir):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser reads commands on fd 3 and writes replies on fd 4; move our ends above
        # both first so that placing one cannot overwrite the other
        high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={user_dir}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(high_r, 3), os.dup2(high_w, 4)))
        for fd in (to_browser_r, from_browser_w, high_r, high_w):
            os.close(fd)
        self._buffer, self._next_id, self.session = b"", 0, None

    def call(self, method, **params):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def test_chat_page_streams_a_reply(tmp_path, tiny_tokenizer_dir):
    ckpt = make_checkpoint(tiny_tokenizer_dir, tmp_path / "tiny-chat", chatty=True)
    with live_server(ckpt, "--api-key", KEY) as url:
        browser = DevTools(tmp_path / "profile")
        try:
            target = browser.call("Target.createTarget", url=url + "/")["targetId"]
            browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            deadline = time.monotonic() + 30
            while browser.js("document.readyState") != "complete" or not browser.js("!!window.fetch && "
                                                                                    "!!document.getElementById('input')"):
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            # count every change to the reply's text as it arrives
            browser.js("window.updates = 0; new MutationObserver(() => window.updates++)"
                       ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})")
            browser.js("document.getElementById('key').focus()")
            browser.call("Input.insertText", text=KEY)
            browser.js("document.getElementById('input').focus()")
            browser.call("Input.insertText", text="hello there, how are you?")
            for kind in ("keyDown", "keyUp"):
                browser.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                             windowsVirtualKeyCode=13, text="\r")
            deadline = time.monotonic() + 60
            while browser.js("(document.querySelector('#log .msg:last-child') || {dataset: {}}).dataset.state")\
                    not in ("done", "error"):
                assert time.monotonic() < deadline, "no reply finished streaming"
                time.sleep(0.1)
            user, reply = browser.js("[...document.querySelectorAll('#log .msg')].map(m => [m.className, "
                                     "m.textContent, m.dataset.chunks || '0'])")
            assert user[0] == "msg user" and user[1] == "hello there, how are you?"
            assert reply[0] == "msg assistant", reply
            assert reply[1], "the reply is empty"
            assert int(reply[2]) >= 2, "the reply arrived in one piece, not streamed"
            assert browser.js("window.updates") >= 3
        finally:
            browser.close()
