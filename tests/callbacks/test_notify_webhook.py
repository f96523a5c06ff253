"""``EntropyCollapseGuard(notify="env:NAME")`` / a webhook URL: each firing is posted to a local HTTP server standing
in for Slack, from a background thread, with the body the service expects; failures are warned about once."""

from __future__ import annotations

import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks.notify_webhook import WebhookNotifier
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from tests.callbacks.test_guard_scenarios import KEY, Script, fit


class Hook:
    """A webhook endpoint on 127.0.0.1: records every POST; ``status`` is its answer; ``hold`` blocks it."""

    def __init__(self, status: int = 200) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.status = status
        self.entered = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                hook.entered.set()
                hook.hold.wait(10)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.posts.append((self.path, dict(self.headers), body))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_for_the_local_server(monkeypatch) -> None:
    """urllib honours http(s)_proxy: a machine's proxy (here a bogus one) is bypassed for 127.0.0.1 by no_proxy."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://proxy.invalid:3128")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def hook():
    server = Hook()
    yield server
    server.close()


def test_a_lightning_firing_is_posted_to_the_webhook_in_the_environment(hook, monkeypatch) -> None:
    monkeypatch.setenv("ENTROTRAIN_TEST_HOOK", hook.url)
    guard = EntropyCollapseGuard(KEY, threshold=0.05, notify="env:ENTROTRAIN_TEST_HOOK")
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 2"):
        fit(guard, Script([0.5, 0.5, 0.01]), 3)
    (post,) = hook.posts  # on_train_end waited for it
    path, headers, body = post
    assert path == "/services/T000/B000/secret" and headers["Content-Type"] == "application/json"
    assert json.loads(body)["text"].startswith("EntropyCollapseGuard at step 2: entropy/attn_norm/min = 0.01 fell")
    assert "secret" not in repr(guard.notify) and "ENTROTRAIN_TEST_HOOK" in repr(guard.notify)


def test_a_plain_loops_firing_is_posted_before_the_loop_ends(hook) -> None:
    guard = EntropyCollapseGuard("watched", threshold=0.5, notify=hook.url)
    monitors = EntropyMonitors(guards=[guard], print_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with monitors.watch(torch.nn.Linear(2, 2)):
            for step in range(3):
                with monitors.step(step):
                    monitors.observe(watched=0.9 if step < 2 else 0.1)
    (post,) = hook.posts
    assert json.loads(post[2])["text"].startswith("EntropyCollapseGuard at step 2: watched = 0.1 fell below 0.5")


def test_training_does_not_wait_for_the_network(hook) -> None:
    """The endpoint holds the request: the call has returned while the post is still under way."""
    notify = WebhookNotifier(hook.url)
    hook.hold.clear()
    notify("collapse")
    assert hook.entered.wait(10)  # the server is inside the request ...
    assert hook.posts == []  # ... which has not finished, yet notify returned
    hook.hold.set()
    notify.flush()
    assert [json.loads(body) for _, _, body in hook.posts] == [{"text": "collapse"}]


def test_a_failed_post_is_warned_about_once_and_never_raised() -> None:
    failing = Hook(status=500)
    try:
        notify = WebhookNotifier(failing.url)
        notify("first")
        with pytest.warns(UserWarning, match=r"posting to the webhook http://127\.0\.0\.1:\d+/… failed \(HTTP 500"):
            notify.flush()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            notify("second")
            notify.flush()  # reported once
        assert len(failing.posts) == 2
    finally:
        failing.close()
    refused = WebhookNotifier(failing.url, timeout=5)  # the server is gone: connection refused
    refused("third")
    with pytest.warns(UserWarning, match="failed"):
        refused.flush()


@pytest.mark.parametrize(
    "url, content_type, expected",
    [
        ("https://hooks.slack.com/services/T/B/x", "application/json", {"text": "m"}),
        ("https://discord.com/api/webhooks/1/x", "application/json", {"content": "m"}),
        ("https://outlook.webhook.office.com/webhookb2/x", "application/json", {"text": "m"}),
        ("https://ntfy.sh/my-topic", "text/plain; charset=utf-8", b"m"),
    ],
)
def test_the_body_is_the_one_each_service_expects(url, content_type, expected) -> None:
    body, headers = WebhookNotifier(url).body("m")
    assert headers["Content-Type"] == content_type
    assert (json.loads(body) if content_type == "application/json" else body) == expected
    long = WebhookNotifier("https://discord.com/api/webhooks/1/x").body("x" * 5000)[0]
    assert len(json.loads(long)["content"]) == 2000  # Discord refuses longer messages


def test_bad_webhook_specs_are_refused_with_the_fix(monkeypatch) -> None:
    monkeypatch.delenv("ENTROTRAIN_UNSET_HOOK", raising=False)
    with pytest.raises(EntrotrainError, match="ENTROTRAIN_UNSET_HOOK is not set; export it"):
        EntropyCollapseGuard(KEY, notify="env:ENTROTRAIN_UNSET_HOOK")
    monkeypatch.setenv("ENTROTRAIN_EMPTY_HOOK", " ")
    with pytest.raises(EntrotrainError, match="is empty"):
        EntropyCollapseGuard(KEY, notify="env:ENTROTRAIN_EMPTY_HOOK")
    with pytest.raises(EntrotrainError, match="http:// or https:// URL with a host"):
        EntropyCollapseGuard(KEY, notify="https://")
    with pytest.raises(EntrotrainError, match="timeout must be a positive"):
        WebhookNotifier("https://hooks.slack.com/x", timeout=0)
    assert "secret" not in repr(WebhookNotifier("https://hooks.slack.com/services/secret"))
