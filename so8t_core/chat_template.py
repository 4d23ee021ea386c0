"""Rendering a chat template within limits of time, output and memory.

A checkpoint's chat template is Jinja code. llama-cpp-python renders it in Jinja's sandbox, which
refuses access to Python internals and ranges of more than 100,000 items, but bounds neither
time nor output: two nested ranges run for hours, a string repeated a billion times fills memory.
So a template is rendered here in a child process (llama-cpp-python's own formatter, so the prompt
is the one ``Llama.create_chat_completion`` would build), with a CPU and address-space limit, killed
after :data:`RENDER_SECONDS`; output past :data:`MAX_PROMPT_CHARS` is refused as it is produced.

``chat`` renders through :func:`render_chat`, calibration chat records through
:func:`render_conversations` (transformers' renderer, as the fine-tune saw them), and a conversion checks up front
(:func:`check_chat_templates`) that each of the checkpoint's templates renders a one-message
conversation within the limits, so that a release never carries a template that cannot; a template
that does not, or that the sandbox refuses, is one line naming the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Mapping, Sequence

from so8t_core.errors import CheckpointError, So8tError

RENDER_SECONDS = 10  # wall clock for the child, start-up included (a render itself takes milliseconds)
MAX_PROMPT_CHARS = 1 << 20
MEMORY_BYTES = 512 << 20  # what a render may allocate beyond the child's start
SAMPLE_CONVERSATION = [{"role": "user", "content": "Hello!"}]
LIMITS_HINT = "chat templates render a conversation in milliseconds; check the template for loops that never end"

# What each child runs after its imports (``request``: the JSON it read): its own limits of
# address space (beyond what the imports took) and CPU time.
_LIMITS = r"""
try:
    with open("/proc/self/status") as status:
        size = int(next(line.split()[1] for line in status if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + request["memory"],) * 2)
except (OSError, ValueError, StopIteration):
    pass  # no /proc, or limits not supported here: the parent's timeout still holds
resource.setrlimit(resource.RLIMIT_CPU, (request["seconds"], request["seconds"] + 1))
"""

# The child: reads {template, messages, bos_token, eos_token} on stdin, writes {"prompt"} or
# {"error", "message"} on stdout. It sets its own limits after its imports.
_CHILD = r"""
import json, resource, sys

request = json.loads(sys.stdin.read())
import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

"""
_CHILD += _LIMITS + r"""


def raise_exception(message):
    raise ValueError(message)


def render():
    formatter = Jinja2ChatFormatter(template=request["template"], eos_token=request["eos_token"],
                                    bos_token=request["bos_token"], add_generation_prompt=True)
    chunks, size = [], 0
    # The call Jinja2ChatFormatter.__call__ makes, as a stream: output is bounded as it is produced.
    for chunk in formatter._environment.generate(
            messages=request["messages"], eos_token=request["eos_token"], bos_token=request["bos_token"],
            raise_exception=raise_exception, add_generation_prompt=True, functions=None, function_call=None,
            tools=None, tool_choice=None, strftime_now=formatter.strftime_now):
        size += len(chunk)
        if size > request["max_chars"]:
            return {"error": "output", "message": f"renders more than {request['max_chars']} characters"}
        chunks.append(chunk)
    return {"prompt": "".join(chunks)}


try:
    result = render()
except jinja2.exceptions.SecurityError as exc:
    result = {"error": "security", "message": f"is refused by Jinja's sandbox ({exc})"}
except jinja2.TemplateSyntaxError as exc:
    result = {"error": "syntax", "message": f"is not a valid Jinja2 template ({exc})"}
except MemoryError:
    result = {"error": "memory", "message": f"needs more than {request['memory'] >> 20} MiB to render"}
except RecursionError:
    result = {"error": "recursion", "message": "recurses without end"}
except Exception as exc:
    result = {"error": "template", "message": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
sys.stdout.write(json.dumps(result))
"""

# What a conversion refuses: a template that cannot render within the limits, or that the sandbox
# refuses. An error the template raises itself (raise_exception) is its own business.
REFUSED_AT_CONVERSION = ("security", "syntax", "memory", "recursion", "output", "time")


class ChatTemplateError(So8tError):
    """A chat template that cannot be rendered within the limits (``kind``: what went wrong)."""

    def __init__(self, where: str, problem: str, hint: str = "", kind: str = "template") -> None:
        super().__init__(where, problem, hint)
        self.kind = kind

    def __reduce__(self):
        return (type(self), (self.where, self.problem, self.hint, self.kind))


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], bos_token: str = "",
                eos_token: str = "") -> str:
    """The prompt ``template`` makes of ``messages`` (with the generation prompt), rendered as
    llama-cpp-python renders it, within the limits; else a :class:`ChatTemplateError`."""
    request = {"template": template, "messages": list(messages), "bos_token": bos_token, "eos_token": eos_token,
               "max_chars": MAX_PROMPT_CHARS, "memory": MEMORY_BYTES, "seconds": RENDER_SECONDS}
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=json.dumps(request), capture_output=True,
                              text=True, timeout=RENDER_SECONDS)
    except subprocess.TimeoutExpired:
        raise ChatTemplateError("the chat template", f"does not render within {RENDER_SECONDS} s", LIMITS_HINT,
                                "time") from None
    try:
        result = json.loads(proc.stdout)
    except ValueError:  # killed: the CPU limit (SIGXCPU), or out of memory before it could answer
        raise ChatTemplateError("the chat template", f"does not render within the limits ({RENDER_SECONDS} s of "
                                f"CPU, {MEMORY_BYTES >> 20} MiB; the renderer ended with status {proc.returncode})",
                                LIMITS_HINT, "time") from None
    if "error" in result:
        hint = LIMITS_HINT if result["error"] in ("output", "memory", "recursion") else \
            "use the base model's chat template" if result["error"] in ("security", "syntax") else ""
        raise ChatTemplateError("the chat template", result["message"], hint, result["error"])
    return result["prompt"]


# The child for calibration chats: transformers' renderer (what ``apply_chat_template`` writes, no
# generation prompt), every conversation in one process. Reads {template, conversations, special,
# max_chars, memory, seconds}; writes {"prompts"} or {"error", "message", "index"}.
_CONVERSATIONS_CHILD = r"""
import json, resource, sys

request = json.loads(sys.stdin.read())
from transformers.utils.chat_template_utils import render_jinja_template

"""
_CONVERSATIONS_CHILD += _LIMITS + r"""

prompts = []
result = None
for index, conversation in enumerate(request["conversations"]):
    try:
        rendered, _ = render_jinja_template([conversation], chat_template=request["template"], **request["special"])
    except MemoryError:
        result = {"error": "memory", "message": f"needs more than {request['memory'] >> 20} MiB to render"}
    except RecursionError:
        result = {"error": "recursion", "message": "recurses without end"}
    except Exception as exc:  # the template's own errors (raise_exception, undefined names), the sandbox's
        result = {"error": "template", "message": f"{type(exc).__name__}: {str(exc)[:200]}"}
    else:
        if len(rendered[0]) > request["max_chars"] + 2 * sum(len(m["content"]) for m in conversation):
            result = {"error": "output", "message": f"renders more than {request['max_chars']} characters "
                      "beyond the messages' own"}
        prompts.append(rendered[0])
    if result is not None:
        result["index"] = index
        break
sys.stdout.write(json.dumps(result or {"prompts": prompts}))
"""
RENDER_SECONDS_PER_CONVERSATION = 0.1  # a render takes about a millisecond


def render_conversations(template: str, conversations: Sequence[Sequence[Mapping[str, str]]],
                         special: Mapping[str, str]) -> list[str]:
    """Each conversation as transformers' ``apply_chat_template`` renders it (no generation
    prompt; ``special``: the special tokens' text), in one child process within limits of time
    (:data:`RENDER_SECONDS` of CPU plus a tenth of a second per conversation), memory and output per
    conversation. A conversation the template cannot render is a :class:`ChatTemplateError`
    whose ``index`` says which."""
    payload = json.dumps({"template": template, "conversations": [list(c) for c in conversations],
                          "special": dict(special), "max_chars": MAX_PROMPT_CHARS})
    seconds = int(RENDER_SECONDS + RENDER_SECONDS_PER_CONVERSATION * len(conversations))
    memory = MEMORY_BYTES + 8 * len(payload)  # the request itself, parsed, and the prompts it makes
    request = payload[:-1] + f', "memory": {memory}, "seconds": {seconds}}}'
    try:
        # The CPU limit bounds the work; the wall clock is a backstop for a loaded machine, where
        # importing transformers alone can take seconds.
        proc = subprocess.run([sys.executable, "-I", "-c", _CONVERSATIONS_CHILD], input=request,
                              capture_output=True, text=True, timeout=2 * seconds + 10)
    except subprocess.TimeoutExpired:
        raise ChatTemplateError("the chat template", f"does not render the {len(conversations)} conversation(s) within "
                                f"{seconds} s", LIMITS_HINT, "time") from None
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        raise ChatTemplateError("the chat template", f"does not render within the limits ({seconds} s of CPU, "
                                f"{memory >> 20} MiB; the renderer ended with status {proc.returncode})",
                                LIMITS_HINT, "time") from None
    if "error" in result:
        error = ChatTemplateError("the chat template", result["message"],
                                  LIMITS_HINT if result["error"] != "template" else "", result["error"])
        error.index = result["index"]
        raise error
    return result["prompts"]


def _token_text(value: Any) -> str:
    """A tokenizer_config.json special token: a string, or an object with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def check_chat_templates(templates: Mapping[str, str], tokenizer_config: Mapping[str, Any] | None,
                         where: str) -> None:
    """Refuse, before any conversion work, a chat template that does not render a one-message
    conversation within the limits or that Jinja's sandbox refuses. ``templates``: name →
    template, as the GGUF will carry them; ``where``: the file they come from, for the message."""
    cfg = tokenizer_config or {}
    for name, template in templates.items():
        try:
            render_chat(template, SAMPLE_CONVERSATION, _token_text(cfg.get("bos_token")),
                        _token_text(cfg.get("eos_token")))
        except ChatTemplateError as exc:
            if exc.kind in REFUSED_AT_CONVERSION:
                label = "the chat template" if name == "default" else f"the chat template {name!r}"
                raise CheckpointError(where, f"{label} {exc.problem}", exc.hint or "fix or remove the template") \
                    from None
