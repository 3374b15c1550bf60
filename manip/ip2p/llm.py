"""The LLM caption-edit backend: any OpenAI-compatible chat endpoint through the `openai` client.

A few-shot prompt built from human-written {input, edit, output} examples asks for one JSON object
per caption. Transport failures (timeouts, connection errors, 429, 5xx) are retried with
exponential backoff, honouring Retry-After; answers that are not the JSON asked for, whose
output caption equals the input, or that are not in the caption's language, are quarantined with
the reason. The caption's language (English or Russian) is passed on: a Russian caption gets the
Russian examples and a system prompt asking for a Russian answer. Every answer that came back is
cached under a key of (model, prompt template of the caption's language, caption), so a rerun
costs no requests and gives the same bytes. The API key is read from the environment by the client and is never part of a
key, a record, a message or a log line.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from manip.multilingual.language import Language, LanguageError, detect_language, language_or_none
from manip.training.checkpoint import atomic_write

from .records import Caption, CaptionEdit, CaptionError, Rejected, check_caption, partition

SYSTEM = (
    "You write edits for an image-editing dataset. Given the caption of an image, reply with a JSON "
    "object with two string fields: \"edit\", a short imperative instruction that changes one thing in "
    "the image, and \"output\", the caption of the edited image, which keeps every word of the input "
    "caption that the edit does not change. Reply with the JSON object only."
)
# Human-written examples per caption language; a caption gets examples in its own language.
EXAMPLES_FILES: dict[Language, str] = {"en": "fewshot_edits.jsonl", "ru": "fewshot_edits_ru.jsonl"}
LANGUAGE_NAMES: dict[Language, str] = {"en": "English", "ru": "Russian"}


class LLMError(RuntimeError):
    """The backend cannot run at all (no key, no endpoint); per-caption problems are Rejected."""


@dataclass(frozen=True)
class LLMSettings:
    model: str
    base_url: str | None = None  # None: OPENAI_BASE_URL, else the client's default
    n_examples: int = 16  # few-shot examples in the prompt, spread over the edit kinds
    temperature: float = 0.7
    max_tokens: int = 200
    json_mode: bool = True  # ask for response_format json_object (most compatible servers accept it)
    timeout: float = 30.0  # seconds per request
    max_attempts: int = 5  # per caption, over timeouts, connection errors, 429 and 5xx
    backoff: float = 1.0  # first retry delay in seconds, doubled each attempt, with jitter
    max_backoff: float = 30.0
    concurrency: int = 4  # requests in flight
    examples: Sequence[dict] = field(default=(), repr=False)  # overrides the shipped examples


def load_examples(path: str | Path | None = None) -> list[dict]:
    """The shipped human-written examples of every language, or a JSONL file of
    {input, edit, output[, kind]}."""
    where = path or "the shipped examples"
    try:
        texts = ([Path(path).read_text(encoding="utf-8")] if path else
                 [resources.files("manip.ip2p").joinpath(name).read_text(encoding="utf-8")
                  for name in EXAMPLES_FILES.values()])
        rows = [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LLMError(f"few-shot examples {where}: not a readable JSONL file ({err})") from None
    for i, r in enumerate(rows, 1):
        if not (isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k].strip() for k in ("input", "edit", "output"))):
            raise LLMError(f"few-shot examples {where}: example {i} needs non-empty input, edit and output strings: "
                           f"{str(r)[:200]}")
    return rows


def examples_by_language(examples: Sequence[dict]) -> dict[Language, list[dict]]:
    """Examples grouped by the language of their input caption, in file order."""
    grouped: dict[Language, list[dict]] = {}
    for e in examples:
        try:
            grouped.setdefault(detect_language(e["input"]), []).append(e)
        except LanguageError as err:
            raise ValueError(f"few-shot example {e['input']!r}: {err}") from None
    return grouped


def pick_examples(examples: Sequence[dict], n: int) -> list[dict]:
    """`n` examples taken round-robin over kinds in file order: the prompt shows every kind of
    edit and is the same on every run."""
    by_kind: dict[str, list[dict]] = {}
    for e in examples:
        by_kind.setdefault(e.get("kind", ""), []).append(e)
    picked: list[dict] = []
    while len(picked) < min(n, len(examples)):
        for rows in by_kind.values():
            if rows and len(picked) < n:
                picked.append(rows.pop(0))
    return picked


def system_prompt(language: Language) -> str:
    if language == "en":
        return SYSTEM
    name = LANGUAGE_NAMES[language]
    return f"{SYSTEM} The caption is in {name}: write the edit and the output in {name}."


def build_messages(examples: Sequence[dict], caption: str, language: Language = "en") -> list[dict]:
    messages = [{"role": "system", "content": system_prompt(language)}]
    for e in examples:
        messages.append({"role": "user", "content": e["input"]})
        messages.append({"role": "assistant", "content": json.dumps({"edit": e["edit"], "output": e["output"]})})
    messages.append({"role": "user", "content": caption})
    return messages


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def json_object(content: str | None) -> dict:
    """The JSON object of an answer, bare or in a code fence; ValueError saying what it is instead."""
    if not content or not content.strip():
        raise ValueError("empty answer")
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    text = fence.group(1) if fence else text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg}): {text[:120]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_answer(content: str | None, caption: str, tokenizer=None,
                 language: Language = "en") -> tuple[str, str] | tuple[None, tuple[str, str]]:
    """(edit, output), or (None, (reason, detail)) for an answer that cannot be used; both must
    be written in the caption's `language`."""
    try:
        obj = json_object(content)
    except ValueError as err:
        return None, ("malformed", str(err))
    edit, output = obj.get("edit"), obj.get("output")
    if not isinstance(edit, str) or not isinstance(output, str) or not edit.strip() or not output.strip():
        return None, ("malformed", f"needs non-empty string fields edit and output, got keys {sorted(obj)}")
    try:
        edit = check_caption(edit, max_chars=300)
        output = check_caption(output, tokenizer)
    except CaptionError as err:
        return None, (f"output {err.reason}", err.detail)
    if _normalise(output) == _normalise(caption):
        return None, ("unchanged", "the output caption is the input caption")
    for name, text in (("edit", edit), ("output", output)):
        try:
            written = detect_language(text)
        except LanguageError as err:
            return None, ("wrong language", f"{name}: {err}")
        if written != language:
            return None, ("wrong language", f"the {name} is in {LANGUAGE_NAMES[written]}, the caption in "
                                            f"{LANGUAGE_NAMES[language]}: {text[:120]!r}")
    return edit, output


class ResponseCache:
    """One file per answer: concurrent writers never clash and a crash loses at most the answer
    in flight."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, entry: dict) -> None:
        atomic_write(self.path(key), json.dumps(entry, ensure_ascii=False, sort_keys=True))


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class ChatEndpoint:
    """One chat-completions request per user message, with the retries and the cache.

    `messages(user)` builds the whole conversation; its shape with a placeholder user message,
    with the sampling settings, is the *template* part of every cache key (`template_of`), so a
    changed prompt, or the conversation of another language, never reads an answer given to
    another one.
    """

    def __init__(self, settings: LLMSettings, cache_dir: str | Path, messages: Callable[[str], list[dict]],
                 sleep: Callable[[float], None] = time.sleep):
        import openai

        if not os.environ.get("OPENAI_API_KEY"):
            raise LLMError("the openai backend needs OPENAI_API_KEY in the environment "
                           "(any value for servers that do not check it)")
        self.settings, self.messages, self.sleep = settings, messages, sleep
        self.client = openai.OpenAI(base_url=settings.base_url or os.environ.get("OPENAI_BASE_URL"),
                                    timeout=settings.timeout, max_retries=0)
        self.template = self.template_of(messages("{caption}"))
        self.cache = ResponseCache(cache_dir)
        self.requests = 0
        self._lock = threading.Lock()
        self._transient = (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                           openai.InternalServerError)
        self._status_error = openai.APIStatusError

    def template_of(self, messages: list[dict]) -> str:
        """Digest of a conversation with its last (user) message as a placeholder, and of the
        sampling settings: what the answer depends on besides the user's text. Conversations
        differ by language (system prompt, examples), so each language has its own."""
        shape = [*messages[:-1], {**messages[-1], "content": "{caption}"}]
        s = self.settings
        return hashlib.sha256(json.dumps(
            {"messages": shape, "temperature": s.temperature, "max_tokens": s.max_tokens, "json_mode": s.json_mode},
            sort_keys=True).encode()).hexdigest()

    def key(self, user: str) -> str:
        blob = json.dumps([self.settings.model, self.template_of(self.messages(user)), user])
        return hashlib.sha256(blob.encode()).hexdigest()

    def _request(self, user: str) -> str | None:
        kwargs = {"response_format": {"type": "json_object"}} if self.settings.json_mode else {}
        with self._lock:
            self.requests += 1
        reply = self.client.chat.completions.create(
            model=self.settings.model, messages=self.messages(user),
            temperature=self.settings.temperature, max_tokens=self.settings.max_tokens, **kwargs)
        return reply.choices[0].message.content if reply.choices else None

    def _transient_error(self, err: Exception) -> bool:
        if isinstance(err, self._transient):
            return True
        return isinstance(err, self._status_error) and getattr(err, "status_code", 0) >= 500

    def _refusal(self, err: Exception) -> str:
        """Why the endpoint refused a request for good (a 4xx other than 429), named by status
        only: the body of an authentication error may echo the key. Refusals of every request
        (no or a wrong key, no such model or path) stop the run with `LLMError`; the others (a
        request it cannot take, too long, say) fail only that caption."""
        if not isinstance(err, self._status_error):
            raise err  # not the endpoint's answer: a fault of this program, to be seen whole
        status = getattr(err, "status_code", 0)
        if status in (401, 403, 404):
            raise LLMError(f"the endpoint refused the request with HTTP {status} ({type(err).__name__}): check "
                           f"OPENAI_API_KEY, the base URL ({self.client.base_url}) and the model name "
                           f"{self.settings.model!r}") from None
        return f"the endpoint refused this request with HTTP {status} ({type(err).__name__})"

    def answer(self, user: str) -> tuple[str | None, str]:
        """(content, "") from the cache or the endpoint, or (None, why) when every attempt failed."""
        key = self.key(user)
        cached = self.cache.get(key)
        if cached is not None:
            return cached["content"], ""
        s = self.settings
        jitter = random.Random(key)
        last = ""
        for attempt in range(s.max_attempts):
            try:
                content = self._request(user)
            except Exception as err:  # noqa: BLE001 - classified below; anything else propagates
                if not self._transient_error(err):
                    return None, self._refusal(err)
                last = f"{type(err).__name__}: {str(err)[:160]}"
                if attempt + 1 < s.max_attempts:
                    delay = min(s.max_backoff, _retry_after(err) or s.backoff * 2**attempt)
                    self.sleep(delay * (0.5 + jitter.random()))
                continue
            if content is None:  # not cached: a rerun asks again
                return None, "the answer had no choices"
            self.cache.put(key, {"model": s.model, "template": self.template_of(self.messages(user)), "caption": user,
                                 "content": content})
            return content, ""
        return None, f"no answer after {s.max_attempts} attempts, last: {last}"


class OpenAIEditor:
    name = "openai"

    def __init__(self, settings: LLMSettings, cache_dir: str | Path, tokenizer=None,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings, self.tokenizer = settings, tokenizer
        grouped = examples_by_language(list(settings.examples) or load_examples())
        self.examples = {language: pick_examples(rows, settings.n_examples) for language, rows in grouped.items()}
        self.endpoint = ChatEndpoint(settings, cache_dir, self.messages, sleep)

    def messages(self, caption: str) -> list[dict]:
        """The conversation for one caption: the system prompt and examples of its language
        (English examples where none of its language were given)."""
        language = language_or_none(caption) or "en"  # `edit_one` rejects the others before asking
        examples = self.examples.get(language) or self.examples.get("en", [])
        return build_messages(examples, caption, language)

    @property
    def requests(self) -> int:
        return self.endpoint.requests

    def key(self, caption: str) -> str:
        return self.endpoint.key(caption)

    def answer(self, caption: str) -> tuple[str | None, str]:
        return self.endpoint.answer(caption)

    def edit_one(self, c: Caption) -> CaptionEdit | Rejected:
        try:
            language = detect_language(c.text)
        except LanguageError as err:
            return Rejected(c.id, c.text, "language", str(err))
        content, failure = self.answer(c.text)
        if content is None:
            return Rejected(c.id, c.text, "endpoint failed", failure)
        edit, output = parse_answer(content, c.text, self.tokenizer, language)
        if edit is None:
            reason, detail = output
            return Rejected(c.id, c.text, reason, detail)
        return CaptionEdit(c.id, c.text, edit, output)

    def edit_all(self, captions: Sequence[Caption], progress: bool = False) -> tuple[list[CaptionEdit], list[Rejected]]:
        results: list[CaptionEdit | Rejected] = []
        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            futures = [pool.submit(self.edit_one, c) for c in captions]
            for f in tqdm(as_completed(futures), total=len(futures), desc="caption edits", disable=not progress):
                results.append(f.result())
        return partition(results)
