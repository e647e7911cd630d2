"""LLM-judge reward: ask any OpenAI-compatible endpoint (``tracerl serve``, vLLM, a hosted API) to
grade each response with a rubric prompt, and parse the score from its answer.

    reward:
      functions: [task, judge]          # "judge" names this reward
      weights: [1.0, 0.5]
      judge: {base_url: http://127.0.0.1:8000/v1, model: qwen3-8b, score_max: 10}

The prompt is ``template`` (or the text of ``template_file``) with ``{question}``, ``{response}``
and ``{answer}`` (the gold answer, empty when the task has none) filled in, sent as one user
message to ``/chat/completions`` (``chat: false``: as a prompt to ``/completions``).  The score is
the last match of ``score_pattern``'s first group in the answer, a number within
``[score_min, score_max]``, mapped to ``[0, 1]``.  An answer without such a number is a reward
error for that sample (0 and a report naming the problem and quoting the answer), never a silent
middle value; so is a judge that still fails after ``retries`` (timeouts, connection errors, 429
and 5xx answers are retried with exponential backoff from ``backoff_s``; other 4xx are not).
``concurrency`` requests run at once; ``cache`` keeps each parsed score by (prompt, response) for
the life of the process, so a response the policy repeats is judged once.

Upstream (reference notes: upstream-rewards-eval.md §4) judges chunks of a response with a vLLM
it starts itself and parses ``\\boxed{1|-1}`` with unparseable answers counted as 0; here the
endpoint is the user's and parsing failures are reported.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tracerl.data.tasks import Problem
from tracerl.errors import ConfigError
from tracerl.files import read_utf8

DEFAULT_TEMPLATE = (
    "You are grading a response to a problem.\n\nProblem:\n{question}\n\nReference answer:\n{answer}\n\n"
    "Response:\n{response}\n\nRate the response's correctness and reasoning from 0 (wrong) to 10 (perfect). "
    "End your reply with a line 'Score: N'."
)
RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx


class JudgeError(RuntimeError):
    """The judge gave no usable score for a sample (names the endpoint and what came back)."""


@dataclass
class JudgeConfig:
    base_url: str = ""  # the OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (tracerl serve, vLLM, hosted)
    model: str = ""  # the model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key (unset or empty: no key sent)
    template: str = DEFAULT_TEMPLATE  # rubric prompt: {question}, {response}, {answer}
    template_file: str | None = None  # read the template from this file instead
    chat: bool = True  # true: /chat/completions, the prompt as a user message; false: /completions
    score_pattern: str = r"[Ss]core\s*[:=]\s*(-?\d+(?:\.\d+)?)"  # regex; the last match's group 1 is the score
    score_min: float = 0.0  # the scale of the judge's score; mapped to [0, 1]
    score_max: float = 10.0
    max_tokens: int = 256  # the judge's answer length
    temperature: float = 0.0
    concurrency: int = 8  # requests in flight
    timeout_s: float = 60.0  # per request
    retries: int = 3  # after the first try, for timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k
    cache: bool = True  # judge each (prompt, response) once per process

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reward.judge.{name}: must be >= 1, got {getattr(self, name)}")
        if self.retries < 0 or self.backoff_s < 0 or not self.timeout_s > 0:
            raise ConfigError("reward.judge: need retries >= 0, backoff_s >= 0 and timeout_s > 0")
        if not self.score_max > self.score_min:
            raise ConfigError(f"reward.judge.score_max: must exceed score_min ({self.score_min}), got {self.score_max}")
        try:
            pattern = re.compile(self.score_pattern)
        except re.error as e:
            raise ConfigError(f"reward.judge.score_pattern: not a regular expression: {e}") from None
        if pattern.groups < 1:
            raise ConfigError("reward.judge.score_pattern: needs a group around the number, e.g. 'Score: (\\d+)'")


class Judge:
    """The reward function ``judge``: ``score_many`` judges a batch concurrently, a value or an
    exception per response (Rewards isolates failures per sample)."""

    def __init__(self, config: JudgeConfig) -> None:
        import httpx

        if not config.base_url or not config.model:
            raise ConfigError("reward.judge: set base_url (e.g. http://127.0.0.1:8000/v1) and model to use 'judge'")
        self.config = config
        self.template = config.template
        if config.template_file:
            self.template = read_utf8(config.template_file, ConfigError)
        try:
            self.template.format(question="", response="", answer="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"reward.judge.template: only {{question}}, {{response}}, {{answer}} may be filled in "
                              f"(write other braces twice): {e!r}") from None
        self.pattern = re.compile(config.score_pattern)
        key = os.environ.get(config.api_key_env, "")
        self.client = httpx.Client(base_url=config.base_url.rstrip("/"), timeout=config.timeout_s,
                                   headers={"Authorization": f"Bearer {key}"} if key else {})
        self.cache: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.requests = 0  # sent, retries included (for tests and logs)

    def __call__(self, problem: Problem, response: str, response_ids) -> float:
        return self.judge(problem, response)

    def score_many(self, problems, responses, response_ids) -> list:
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            futures = [pool.submit(self.judge, p, r) for p, r in zip(problems, responses)]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 (this sample's failure, reported by Rewards)
                out.append(e)
        return out

    def judge(self, problem: Problem, response: str) -> float:
        prompt = self.template.format(question=problem.question, response=response, answer=problem.answer or "")
        key = (prompt, response)
        if self.config.cache:
            with self.lock:
                if key in self.cache:
                    return self.cache[key]
        answer = self._ask(prompt)
        score = self.parse(answer)
        if self.config.cache:
            with self.lock:
                self.cache[key] = score
        return score

    def parse(self, answer: str) -> float:
        c = self.config
        matches = self.pattern.findall(answer)
        if not matches:
            raise JudgeError(f"judge {c.model}: no score in its answer {answer[:120]!r} "
                             f"(reward.judge.score_pattern {c.score_pattern!r})")
        last = matches[-1][0] if isinstance(matches[-1], tuple) else matches[-1]
        try:
            value = float(last)
        except ValueError:
            raise JudgeError(f"judge {c.model}: score {last!r} is not a number (answer {answer[:120]!r})") from None
        if not (math.isfinite(value) and c.score_min <= value <= c.score_max):
            raise JudgeError(f"judge {c.model}: score {value} outside [{c.score_min}, {c.score_max}] "
                             f"(answer {answer[:120]!r})")
        return (value - c.score_min) / (c.score_max - c.score_min)

    def _ask(self, prompt: str) -> str:
        import httpx

        c = self.config
        if c.chat:
            route, body = "/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        else:
            route, body = "/completions", {"prompt": prompt}
        body.update(model=c.model, max_tokens=c.max_tokens, temperature=c.temperature)
        last = ""
        for attempt in range(c.retries + 1):
            if attempt:
                time.sleep(c.backoff_s * 2 ** (attempt - 1))
            with self.lock:
                self.requests += 1
            try:
                reply = self.client.post(route, json=body)
            except httpx.TimeoutException:
                last = f"no answer within {c.timeout_s} s"
                continue
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if reply.status_code in RETRY_STATUS or reply.status_code >= 500:
                last = f"HTTP {reply.status_code}: {reply.text[:200]}"
                continue
            if reply.status_code != 200:
                raise JudgeError(f"judge at {c.base_url}{route}: HTTP {reply.status_code}: {reply.text[:200]}")
            try:
                choice = reply.json()["choices"][0]
                text = choice["message"]["content"] if c.chat else choice["text"]
                return text if isinstance(text, str) else ""  # a null content has no score: reported by parse
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"judge at {c.base_url}{route}: not an OpenAI completion: {reply.text[:200]!r}") from None
        raise JudgeError(f"judge at {c.base_url}{route}: failed after {c.retries + 1} tries: {last}")
