"""Responders: turn a batch (with its conversation) into one reply.

A responder has `answer(messages) -> str`, where `messages` is an OpenAI-style list
of {"role", "content"} dicts, and raises DeliveryError on failure.
"""

import json
import logging
import os
import re
import threading
from dataclasses import dataclass

from smsbatch import deadline, segments
from smsbatch.config import OPENAI_DEFAULT_BASE_URL, display_url
from smsbatch.errors import ConfigError, DeliveryError, read_json, redact, visible

log = logging.getLogger("smsbatch.ai")
MAX_TOKENS = 10**9  # no one chat completion uses more: a larger count is garbage, not usage

PROMPT_FILE_NAME = re.compile(r"^(whatsapp:)?\+?[0-9]{2,15}$")


@dataclass
class Usage:
    """What answering cost: HTTP requests made (retries included) and the tokens billed."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def ask(responder, messages):
    """(reply, Usage) from any responder. The openai responder counts its HTTP requests and
    tokens; others (offline, test stand-ins) count one request and no tokens.

    Raises: DeliveryError, with the Usage of the failed call as `.usage`.
    """
    if hasattr(responder, "ask"):
        return responder.ask(messages)
    try:
        return responder.answer(messages), Usage(requests=1)
    except DeliveryError as exc:
        exc.usage = Usage(requests=1)
        raise


class SystemPrompts:
    """The system prompt for each of our numbers: `<folder>/<number>.txt` (for example
    `+15550001111.txt`) when that file exists, else the default. Files are read once."""

    def __init__(self, default, folder=""):
        """Raises: ConfigError if `folder` is given but is not a folder."""
        if folder and not os.path.isdir(folder):
            raise ConfigError(f"SMSBATCH_PROMPTS_DIR={folder} is not a folder")
        self.default, self.folder = default, folder
        self._cache = {}
        self._lock = threading.Lock()

    def for_number(self, number):
        """The prompt for replies from `number`.

        Raises: ConfigError if its file exists but cannot be read as UTF-8 text.
        """
        if not self.folder or not PROMPT_FILE_NAME.match(number or ""):  # never a path from outside
            return self.default
        with self._lock:
            if number not in self._cache:
                self._cache[number] = self._read(os.path.join(self.folder, number + ".txt"))
            return self._cache[number] or self.default

    @staticmethod
    def _read(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the system prompt {path}: {exc}") from None


def describe_text(body, media):
    """A text as the AI should read it, with picture messages spelled out."""
    urls = json.loads(media) if media else []
    parts = [body.strip()] if body and body.strip() else []
    if urls:
        noun = "picture/attachment" if len(urls) == 1 else f"{len(urls)} pictures/attachments"
        parts.append(f"[sent {noun}: {', '.join(urls)}]")
    return " ".join(parts) or "[empty message]"


def budget_note(max_segments):
    """What the AI is told about the length it has: the characters `max_segments` SMS hold."""
    gsm, ucs = segments.room(max_segments)
    texts = "one text message" if max_segments == 1 else f"{max_segments} text messages"
    return (f"Your reply is sent by SMS and must fit in {texts}: at most {gsm} characters, "
            f"or {ucs} if it uses emoji or letters outside the basic Latin alphabet. "
            "A longer reply is cut off.")


def build_prompt(system_prompt, history, texts, budget=None):
    """The chat messages for one batch: system prompt, recent conversation, then the burst.
    `budget` (budget_note), when given, follows the system prompt as a system message of its own.

    `history` is [(time, role, text, media, source)], oldest first (source: 'ai'/'manual' for
    our replies): the conversation before the burst and every reply we sent since its first
    text. A reply sent by hand since then takes its place among the burst's texts (`texts`:
    rows with body, media, received_at), so the AI sees what a person already answered; when
    it is the last word, a note asks the AI to answer only what is still open. An AI reply
    sent since then answered an earlier batch (never these texts): it goes before the burst.
    """
    first = texts[0]["received_at"]
    by_hand = [h for h in history if h[0] > first and h[4] == "manual"]
    messages = [{"role": "system", "content": system_prompt}]
    if budget:
        messages.append({"role": "system", "content": budget})
    for _, role, text, media, _ in (h for h in history if h[0] <= first or h[4] != "manual"):
        messages.append({"role": role, "content": describe_text(text, media) if role == "user" else text})
    timeline = sorted([(t["received_at"], 0, describe_text(t["body"], t["media"])) for t in texts]
                      + [(h[0], 1, h[2]) for h in by_hand])
    burst = []
    for _, is_reply, content in timeline:
        if is_reply:
            if burst:
                messages.append({"role": "user", "content": _burst(burst, last=False)})
                burst = []
            messages.append({"role": "assistant", "content": content})
        else:
            burst.append(content)
    if burst:
        messages.append({"role": "user", "content": _burst(burst, last=True)})
    else:
        messages.append({"role": "system", "content": ANSWERED_BY_HAND})
    return messages


ANSWERED_BY_HAND = ("Someone on our team already replied by hand (the last reply above) after these texts. "
                    "Answer only what is still open; do not repeat that reply.")


def _burst(lines, last):
    """Texts in a row as one user turn; the last turn asks for them to be answered together."""
    if len(lines) == 1:
        return lines[0]
    ask = "; answer them together" if last else ""
    return f"(The customer sent {len(lines)} texts in a row{ask}.)\n" + "\n".join(
        f"{i}. {line}" for i, line in enumerate(lines, 1))


class OfflineResponder:
    """A deterministic stand-in: no network, no key. Echoes what it was told, so tests
    and the demo can see that one reply covered every text in the burst."""

    name = "offline"

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def answer(self, messages):
        with self._lock:
            self.calls += 1
        last = messages[-1]["content"]
        lines = [ln for ln in last.splitlines() if not ln.startswith("(The customer sent")]
        said = " / ".join(ln.split(". ", 1)[-1] if ln[:1].isdigit() else ln for ln in lines)
        earlier = sum(1 for m in messages[1:-1] if m["role"] == "user")
        context = f" (with {earlier} earlier texts in mind)" if earlier else ""
        return f"Thanks for your message{'s' if len(lines) > 1 else ''}{context}. You said: {said}"


class OpenAIResponder:
    """Chat completions through the `openai` package; the client is built on first use
    so a cron run with nothing to do never pays for importing it."""

    name = "openai"

    def __init__(self, settings):
        self.settings = settings
        self.calls = 0
        self._client = None
        self._lock = threading.Lock()

    def warm(self):
        """Build the client now (imports included), so a first answer does not wait for it."""
        with self._lock:
            self._build()

    def _get_client(self):
        with self._lock:
            self._build()
            self.calls += 1
            return self._client

    def _build(self):
        if self._client is not None:
            return
        import httpx2
        import openai

        # Every request the client makes, its own retries included, passes this hook:
        # requests are counted where they happen, not per answer.
        http = httpx2.Client(event_hooks={"request": [deadline.count_request]})
        self._client = openai.OpenAI(
            api_key=self.settings.openai_api_key,
            base_url=self.settings.openai_base_url or None,
            timeout=self.settings.ai_timeout_seconds,
            max_retries=self.settings.ai_client_retries,
            http_client=http,
        )

    def answer(self, messages):
        """The reply. Raises: DeliveryError, transient or not."""
        return self.ask(messages)[0]

    def ask(self, messages):
        """(reply, Usage), within the settings' total AI deadline (every try and wait included).

        Raises: DeliveryError (its `.usage` says what the failed call cost).
        """
        state = deadline.Call()
        client = self._get_client()  # importing openai is not part of the call's time
        try:
            body = deadline.call(lambda: self._create(client, messages), self.settings.ai_deadline, state=state)
        except deadline.DeadlineExceeded as exc:
            raise _with_usage(DeliveryError(f"AI timed out: {exc}", transient=True), state) from None
        except DeliveryError as exc:
            raise _with_usage(exc, state) from None
        spent = usage_of(body, state.requests)
        text = reply_text(body)
        if text is None:
            # A 200 whose body is cut off or garbled (a proxy's error page, an overloaded
            # server): like a 5xx, worth another try after the backoff.
            error = DeliveryError("AI answered 200 without a readable chat completion", transient=True)
            raise _with_usage(error, state, spent)
        if not text:
            raise _with_usage(DeliveryError("AI returned an empty reply", transient=True), state, spent)
        return text, spent

    def _create(self, client, messages):
        """The chat completion's JSON body. Raises: DeliveryError."""
        import openai

        secrets = self.settings.secrets()
        try:
            # The raw response: its body is read here, so an answer that is not the JSON
            # promised is named as the provider's fault, not mistaken for a bug of ours.
            raw = client.chat.completions.with_raw_response.create(model=self.settings.ai_model, messages=messages)
            return raw.text
        except openai.APIStatusError as exc:
            status = exc.status_code
            transient = status in (408, 409, 429) or status >= 500
            message = redact(exc.message, secrets, limit=200)
            if status == 404:  # most often a wrong OPENAI_BASE_URL (no /v1) or model: say where
                where = display_url(self.settings.openai_base_url or OPENAI_DEFAULT_BASE_URL)
                message += f" (from {where}; OPENAI_BASE_URL ends in /v1, `smsbatch check` tests it)"
            raise DeliveryError(f"AI returned HTTP {status}: {message}", transient=transient) from None
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "unreachable"
            # "Connection error." alone does not say which server: name it (without secrets).
            where = display_url(self.settings.openai_base_url or OPENAI_DEFAULT_BASE_URL)
            raise DeliveryError(f"AI {kind} at {where}: {redact(exc, secrets, limit=200)}", transient=True) from None
        except openai.OpenAIError as exc:
            raise DeliveryError(f"AI error: {redact(exc, secrets, limit=200)}", transient=False) from None


def _with_usage(exc, state, spent=None):
    exc.usage = spent or Usage(requests=state.requests)
    return exc


def usage_of(body, requests):
    """What a chat completion cost: `requests` HTTP requests and the body's usage tokens."""
    try:
        usage = read_json(body).get("usage")
    except (ValueError, AttributeError):
        usage = None
    usage = usage if isinstance(usage, dict) else {}

    def tokens(name):
        """A token count (0 when absent); one that is not a whole number from 0 to MAX_TOKENS
        is counted as 0 (unknown), with a log line: it would not fit the database."""
        value = usage.get(name)
        if value is None:
            return 0
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
            return value
        log.warning("AI usage.%s is not a token count (%s); counted as 0", name, visible(repr(value), 40))
        return 0

    return Usage(requests, tokens("prompt_tokens"), tokens("completion_tokens"))


def reply_text(body):
    """The first choice's message content from a chat completion's JSON body ("" if empty),
    or None when the body is not a chat completion at all."""
    try:
        data = read_json(body)
    except ValueError:
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if content is None:
        return None if not isinstance(message, dict) else ""
    return content.strip() if isinstance(content, str) else None


def make_responder(settings):
    """The responder the settings ask for."""
    return OfflineResponder() if settings.ai == "offline" else OpenAIResponder(settings)
