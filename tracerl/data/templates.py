"""Prompt templates.

The instruction wordings are the upstream ones (reference notes upstream-rewards-eval.md §1.3:
TraDo/SDAR math CoT, the long-CoT "thinking" variant, code function and stdio), so prompts
match what released checkpoints were trained with.  The instruction is wrapped in the
tokenizer's chat template when it has one; the thinking prefix and a code task's starter code
are appended after the assistant header, so the model continues them.
"""

from __future__ import annotations

from tracerl.errors import ConfigError

MATH_COT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
MATH_THINK = "You need to put your final answer in \\boxed{{}}. This is the problem:\n{question}"
CODE_FUNCTION = (
    "{question}\nPlace your code within a single Python code block ```python ```. "
    "Do not include more than one code block. "
)
CODE_STDIO = (
    "This is the problem:\n{question}\nYou should put your code in ```python ```. "
    "Use input() to read input and print() to produce output in your script. "
)
THINK_PREFIX = "<think>\n"

TEMPLATES = ("auto", "math", "math_think", "code", "raw")


def instruction(template: str, kind: str, question: str, code_style: str = "function") -> tuple[str, str]:
    """(user message, assistant prefix) for a problem."""
    if template not in TEMPLATES:
        raise ConfigError(f"template: unknown {template!r}; valid: {', '.join(TEMPLATES)}")
    if template == "auto":
        template = "code" if kind == "code" else "math"
    if template == "raw":
        return question, ""
    if template == "math":
        return MATH_COT.format(question=question), ""
    if template == "math_think":
        return MATH_THINK.format(question=question), THINK_PREFIX
    if template == "code":
        return (CODE_STDIO if code_style == "stdio" else CODE_FUNCTION).format(question=question), ""
    raise AssertionError(template)


def render_prompt(tokenizer, user: str, assistant_prefix: str = "", *, chat: bool = True) -> list[int]:
    """Token ids of the prompt.  With ``chat`` and a tokenizer chat template, the user turn is
    rendered by it (with the generation prompt); otherwise the text is encoded as it is."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = user
    return tokenizer.encode(text + assistant_prefix, add_special_tokens=False)


def problem_prompt_ids(tokenizer, problem, task) -> list[int]:
    """Token ids of a task problem's prompt (``problem``: a ``data.tasks.Problem``, ``task``: its
    ``TaskConfig``): the template's instruction, in the chat template when ``task.chat``; a code
    problem's starter code is appended after the assistant header, so the model continues it."""
    user, assistant_prefix = instruction(task.template, "code" if problem.kind == "code" else "math",
                                         problem.question, problem.code_style)
    if problem.kind == "code" and problem.prefix and task.template != "raw":
        assistant_prefix += problem.prefix
    return render_prompt(tokenizer, user, assistant_prefix, chat=task.chat)
