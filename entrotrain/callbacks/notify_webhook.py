"""A guard's ``notify`` that posts the firing's message to a chat webhook (Slack, Discord, Teams, Mattermost, ntfy,
any endpoint taking JSON ``{"text": ...}``), without a line of your code and without making training wait.

``EntropyCollapseGuard(notify="env:SLACK_WEBHOOK_URL")`` (or the URL itself) builds a :class:`WebhookNotifier`. The
URL is a secret (anyone holding it can post to your channel) and a recipe's arguments are saved with the run (its
``config.yaml``, the checkpoint's hyperparameters), so prefer ``env:NAME``: the guard reads the URL from the
environment variable ``NAME`` when it is built, and only ``env:NAME`` is saved.

The body follows the service the URL names: ``hooks.slack.com`` and any other host ``{"text": message}`` (Slack,
Microsoft Teams' incoming webhooks, Mattermost, Rocket.Chat, Google Chat); ``discord.com`` / ``discordapp.com``
``{"content": message}`` (cut to Discord's 2000 characters); a host with ``ntfy`` in its name the message as plain
text (ntfy's publish API) with a ``Title`` header.

Each message is posted from a daemon thread, so rank zero returns to training at once and the other ranks never wait
at the next collective for a slow network; at most ``MAX_IN_FLIGHT`` posts are under way at once (a firing beyond
that, while the webhook does not answer, is dropped and reported as a failure). A redirect is not followed (urllib
would turn the POST into a GET without the message): it is reported as a failure. A failed post (unreachable host,
HTTP error, timeout after ``timeout`` seconds) is warned about once, at the next firing or when training ends, and never reaches training. Posts still
under way when training ends are waited for up to ``timeout`` seconds (:meth:`WebhookNotifier.flush`, also run at
interpreter exit), so the firing that stopped a run is not lost when the process exits right after it; the wait is
``timeout`` in all, however many posts hang.

A notifier survives ``copy.deepcopy`` and pickling (DDP spawn, a copy of the trainer's callbacks) without its posts
under way; one built from ``env:NAME`` pickles without the URL and reads ``NAME`` again where it is unpickled.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import urllib.error
import urllib.request
import warnings
import weakref
from time import monotonic
from urllib.parse import urlsplit

from entrotrain.errors import EntrotrainError

__all__ = ["WebhookNotifier", "notifier_from_spec"]

_DISCORD_LIMIT = 2000
_ENV_PREFIX = "env:"
_USER_AGENT = "entrotrain-notify"
#: Posts under way at once; a firing beyond them is dropped (the webhook is not answering).
MAX_IN_FLIGHT = 4


def notifier_from_spec(spec: str, owner: str = "EntropyCollapseGuard(notify)") -> WebhookNotifier | None:
    """The notifier ``spec`` names when it is a webhook: ``"env:NAME"`` (the URL in environment variable ``NAME``)
    or an ``http(s)://`` URL; ``None`` for anything else (an import path)."""
    if spec.startswith(_ENV_PREFIX):
        name = spec[len(_ENV_PREFIX):].strip()
        url = os.environ.get(name, "").strip() if name else ""
        if not url:
            raise EntrotrainError(
                f"{owner}={spec!r}: the environment variable {name or '(none named)'} is "
                f"{'not set' if name and name not in os.environ else 'empty'}; export it with your webhook's URL "
                f"(e.g. `export {name or 'SLACK_WEBHOOK_URL'}=https://hooks.slack.com/services/...`) where training "
                "runs, or pass notify=None."
            )
        return WebhookNotifier(url, owner=owner, env=name)
    if spec.startswith(("http://", "https://")):
        return WebhookNotifier(spec, owner=owner)
    return None


class WebhookNotifier:
    """``notify(message)``: post ``message`` to ``url`` from a daemon thread (module docstring).

    Args:
        url: the webhook's ``http://`` or ``https://`` URL.
        timeout: seconds a post may take (connect and answer) before it counts as failed.
        owner: who it notifies for, in warnings and errors.
        env: the environment variable ``url`` was read from: the notifier is named ``env:NAME`` and pickles without
            the URL (a secret), reading it again where it is unpickled. ``None``: named by the URL's scheme and host.
    """

    def __init__(self, url: str, timeout: float = 10.0, owner: str = "EntropyCollapseGuard(notify)",
                 env: str | None = None) -> None:
        try:
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is not None:
                parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
        except ValueError as err:
            raise EntrotrainError(
                f"{owner}: the webhook URL is malformed ({err}); give the URL exactly as the service shows it, "
                "e.g. https://hooks.slack.com/services/..."
            ) from None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise EntrotrainError(
                f"{owner}: a webhook needs an http:// or https:// URL with a host; got "
                f"{'a ' + type(url).__name__ if not isinstance(url, str) else repr(_redacted(url))}."
            )
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float("inf"):
            raise EntrotrainError(f"{owner}: timeout must be a positive number of seconds; got {timeout!r}.")
        self.url = url
        self.timeout = float(timeout)
        self.owner = owner
        self.shown = f"env:{env}" if env else _redacted(url)  # in repr and warnings: never the URL
        self.host = parts.hostname or ""
        self._threads: list[threading.Thread] = []
        self._failure: str | None = None
        self._failure_warned = False
        self._lock = threading.Lock()
        self._env = env  # pickled instead of the URL
        _PENDING.add(self)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_threads", "_lock")}
        if state.get("_env"):
            state["url"] = None  # a secret: read again from the environment where unpickled
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.url is None:
            self.url = os.environ.get(self._env or "", "").strip()
        self._threads = []
        self._lock = threading.Lock()
        _PENDING.add(self)

    def __repr__(self) -> str:
        return f"WebhookNotifier({self.shown!r})"

    def body(self, message: str) -> tuple[bytes, dict[str, str]]:
        """The request body and headers for ``message``, as the service the URL names expects."""
        if "ntfy" in self.host:
            return message.encode(), {"Content-Type": "text/plain; charset=utf-8", "Title": "entrotrain"}
        if self.host in ("discord.com", "discordapp.com") or self.host.endswith((".discord.com", ".discordapp.com")):
            payload = {"content": message[:_DISCORD_LIMIT]}
        else:
            payload = {"text": message}
        return json.dumps(payload).encode(), {"Content-Type": "application/json"}

    def __call__(self, message: str) -> None:
        """Post ``message`` in the background; warn (once) about an earlier post that failed."""
        self._warn_failure()
        thread = threading.Thread(target=self._post, args=(str(message),), name="entrotrain-notify", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) >= MAX_IN_FLIGHT:
                self._failure = (f"{MAX_IN_FLIGHT} posts still under way, the webhook is not answering; later "
                                 "messages were dropped")
                return
            self._threads.append(thread)
        thread.start()

    def _post(self, message: str) -> None:
        try:
            if not self.url:
                raise ValueError(f"the environment variable {self._env} is not set in this process")
            data, headers = self.body(message)
            # urllib's own "Python-urllib/3.x" is refused by Cloudflare in front of discord.com (HTTP 403, 1010)
            headers = {"User-Agent": _USER_AGENT, **headers}
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            with urllib.request.build_opener(_NoRedirect).open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as err:
            self._failure = self._scrubbed(f"HTTP {err.code} {err.reason}")
        except Exception as err:  # noqa: BLE001 - unreachable, timeout, TLS: reported, never raised into training
            self._failure = self._scrubbed(f"{type(err).__name__}: {getattr(err, 'reason', err)}")

    def _scrubbed(self, text: str) -> str:
        """``text`` (an error's message) without the URL's secret parts: its path, query and credentials (http.client
        quotes the path or the netloc of a URL it refuses)."""
        parts = urlsplit(self.url) if self.url else None
        if parts is None:
            return text
        secrets = [parts.path, parts.query, parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""]
        for secret in sorted({s for s in secrets if len(s) > 1}, key=len, reverse=True):
            text = text.replace(secret, "…")
        return text

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the posts under way (each up to ``timeout``, default the notifier's), then warn (once) if one
        failed."""
        with self._lock:
            threads, self._threads = self._threads, []
        deadline = monotonic() + (self.timeout if timeout is None else timeout)
        for thread in threads:  # all of them within one timeout, not one timeout each
            thread.join(max(0.0, deadline - monotonic()))
        self._warn_failure()

    def _warn_failure(self) -> None:
        if self._failure is None or self._failure_warned:
            return
        self._failure_warned = True
        warnings.warn(
            f"{self.owner}: posting to the webhook {self.shown} failed ({self._failure}); the firing was still "
            "warned about and recorded. Check the URL and that this machine can reach it. Further failures are not "
            "reported.",
            stacklevel=3,
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is an error (urllib would re-send a POST as a GET without its body: the message lost). Built per
    post, so the environment's proxies at the time of the post are honoured, as ``urlopen`` does."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def _redacted(url: str) -> str:
    """``https://hooks.slack.com/…``: the scheme and host only (the path, and credentials in ``user:token@host``,
    hold the webhook's secret)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}/…" if host else "…"


_PENDING: weakref.WeakSet[WebhookNotifier] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:  # pragma: no cover - runs at interpreter exit
    for notifier in list(_PENDING):
        notifier.flush()
