"""Findings of session 26 on the webhook ``notify`` (each test failed before its fix)."""

from __future__ import annotations

import copy
import json
import pickle
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks import notify_webhook
from entrotrain.callbacks.notify_webhook import WebhookNotifier
from tests.callbacks.test_notify_webhook import Hook, _no_proxy_for_the_local_server, hook  # noqa: F401 (fixtures)


def test_the_guard_and_its_notifier_deepcopy_and_pickle(hook, monkeypatch) -> None:
    """DDP spawn pickles the callbacks, and a copy of the trainer's callbacks deep-copies them: the notifier's lock
    and threads made both a TypeError. The copy still posts; one built from env:NAME pickles without the URL."""
    monkeypatch.setenv("ENTROTRAIN_TEST_HOOK", hook.url)
    guard = EntropyCollapseGuard("k", threshold=0.1, notify="env:ENTROTRAIN_TEST_HOOK")
    guard.notify("before")  # a post under way (a thread) must not stop the copy
    blob = pickle.dumps(guard)
    assert b"secret" not in blob and b"ENTROTRAIN_TEST_HOOK" in blob
    for copied in (copy.deepcopy(guard), pickle.loads(blob)):
        copied.notify("copied")
        copied.flush_notifications()
    guard.flush_notifications()
    assert sorted(json.loads(body)["text"] for _, _, body in hook.posts) == ["before", "copied", "copied"]
    direct = WebhookNotifier(hook.url)
    direct("x")
    pickle.loads(pickle.dumps(direct)).flush()
    direct.flush()


def test_unpickled_where_the_variable_is_not_set_the_post_fails_with_a_warning(hook, monkeypatch) -> None:
    monkeypatch.setenv("ENTROTRAIN_TEST_HOOK", hook.url)
    blob = pickle.dumps(notify_webhook.notifier_from_spec("env:ENTROTRAIN_TEST_HOOK"))
    monkeypatch.delenv("ENTROTRAIN_TEST_HOOK")
    notifier = pickle.loads(blob)
    notifier("lost")
    with pytest.warns(UserWarning, match="ENTROTRAIN_TEST_HOOK is not set in this process"):
        notifier.flush()
    assert hook.posts == []


def test_flush_waits_one_timeout_in_all_however_many_posts_hang(monkeypatch) -> None:
    """Each hung post was joined for a full timeout in turn (exit blocked for posts x timeout); the waits given to
    join now add up to at most one timeout. Deterministic: the waits asked for are recorded on a fake clock, not timed."""
    release = threading.Event()
    monkeypatch.setattr(WebhookNotifier, "_post", lambda self, message: release.wait(30))
    waits: list[float] = []
    clock = [1000.0]  # a hung thread's join lasts its whole timeout: the clock moves on by it
    monkeypatch.setattr(notify_webhook, "monotonic", lambda: clock[0])

    def join(thread: threading.Thread, timeout: float | None = None) -> None:
        waits.append(timeout)
        clock[0] += timeout

    notifier = WebhookNotifier("http://127.0.0.1:9/x", timeout=5.0)
    for i in range(3):
        notifier(f"m{i}")
    monkeypatch.setattr(threading.Thread, "join", join)
    notifier.flush()
    release.set()
    assert len(waits) == 3 and sum(waits) <= 5.0 + 1e-6


def test_posts_under_way_are_bounded(monkeypatch) -> None:
    """A burst of firings while the webhook hangs started one thread per firing, without bound."""
    release = threading.Event()
    monkeypatch.setattr(WebhookNotifier, "_post", lambda self, message: release.wait(30))
    notifier = WebhookNotifier("http://127.0.0.1:9/x", timeout=1.0)
    try:
        with pytest.warns(UserWarning, match="not answering; later messages were dropped"):  # at the next firing
            for i in range(50):
                notifier(f"m{i}")
        assert len(notifier._threads) == notify_webhook.MAX_IN_FLIGHT
    finally:
        release.set()
    notifier.flush()


def test_a_redirect_is_a_failure_not_a_message_silently_lost() -> None:
    """urllib follows a 302 for a POST as a GET without the body: the post 'succeeded' and the message was lost."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append("POST")
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            seen.append("GET")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        notifier = WebhookNotifier(f"http://127.0.0.1:{server.server_address[1]}/hook")
        notifier("collapse")
        with pytest.warns(UserWarning, match="HTTP 302"):
            notifier.flush()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["POST"]


def test_a_message_the_body_cannot_encode_is_a_warned_failure_not_a_thread_traceback() -> None:
    """ntfy's plain-text body encodes the message as UTF-8: a lone surrogate raised in the thread (a traceback on
    stderr through threading.excepthook, never warned)."""
    errors: list[Any] = []
    hook_before = threading.excepthook
    threading.excepthook = errors.append
    try:
        notifier = WebhookNotifier("https://ntfy.invalid/topic", timeout=1.0)
        notifier("bad \ud800 text")
        with pytest.warns(UserWarning, match="UnicodeEncodeError"):
            notifier.flush()
    finally:
        threading.excepthook = hook_before
    assert errors == []


def test_non_ascii_messages_reach_the_hook_intact(hook) -> None:
    notifier = WebhookNotifier(hook.url)
    notifier("entropie effondrée ✗ 熵")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        notifier.flush()
    assert json.loads(hook.posts[0][2]) == {"text": "entropie effondrée ✗ 熵"}


@pytest.mark.parametrize("spec", ["env:ENTROTRAIN_TEST_HOOK", "https://hooks.slack.com/services/T/B/x"])
def test_the_cli_saves_notify_as_written_in_the_recipe(spec, monkeypatch) -> None:
    """A recipe's ``notify: env:SLACK_WEBHOOK_URL`` is accepted by LightningCLI's parser, but the config it saves
    (config.yaml, the run record, wandb's config) read ``notify: Unable to serialize instance env:...``: a roll-back
    or a rerun from the saved config then fails to import that string."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    monkeypatch.setenv("ENTROTRAIN_TEST_HOOK", "http://127.0.0.1:9/secret")
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    init = {"monitor": "k", "threshold": 0.1, "notify": spec}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = parser.parse_object({"callbacks": [{"class_path": "entrotrain.callbacks.EntropyCollapseGuard",
                                                     "init_args": init}]})
        dumped = yaml.safe_load(parser.dump(config))
    assert dumped["callbacks"][0]["init_args"]["notify"] == spec


def test_credentials_and_paths_never_reach_reprs_or_warnings() -> None:
    """``_redacted`` kept the netloc, credentials included (``https://user:token@ntfy.sh/…``), and a refused URL's
    error quoted its path (http.client: "URL can't contain control characters. '/services/…secret…'")."""
    with_credentials = WebhookNotifier("http://user:tok3n@127.0.0.1:9/topic", timeout=1.0)
    assert "tok3n" not in repr(with_credentials) and "127.0.0.1:9" in repr(with_credentials)
    with_credentials("m")
    with pytest.warns(UserWarning) as caught:
        with_credentials.flush()
    assert caught and all("tok3n" not in str(w.message) for w in caught)
    spaced = WebhookNotifier("http://127.0.0.1:9/services/T0/s3cret path", timeout=1.0)
    spaced("m")
    with pytest.warns(UserWarning, match="failed") as caught:
        spaced.flush()
    assert all("s3cret" not in str(w.message) for w in caught)


def test_posts_name_their_own_user_agent(hook) -> None:
    """urllib's default ``Python-urllib/3.x`` is refused by Cloudflare in front of Discord's webhooks (HTTP 403, error
    1010): every Discord firing failed."""
    notifier = WebhookNotifier(hook.url)
    notifier("m")
    notifier.flush()
    (_, headers, _), = hook.posts
    assert headers["User-Agent"].startswith("entrotrain") and "urllib" not in headers["User-Agent"]


@pytest.mark.parametrize("url", ["http://[::1/services/secret", "https://hooks.slack.com:99999/services/secret",
                                 "https://hooks.slack.com:port/services/secret"])
def test_a_malformed_url_is_an_entrotrain_error_without_the_secret(url, monkeypatch) -> None:
    """urlsplit's ValueError ("Invalid IPv6 URL") escaped raw; a bad port was accepted and failed at every post."""
    from entrotrain.errors import EntrotrainError

    monkeypatch.setenv("ENTROTRAIN_TEST_HOOK", url)
    with pytest.raises(EntrotrainError, match="webhook URL is malformed") as caught:
        EntropyCollapseGuard("k", threshold=0.1, notify="env:ENTROTRAIN_TEST_HOOK")
    assert "secret" not in str(caught.value)
