"""TRL's dataset formats: detection from column names, row validation and normalisation.

A row is a dict from any source (JSONL line, Parquet/CSV row, `datasets` row). `validate_row`
checks it against one format and returns a normalised copy (only the fields the format uses;
message dicts without `None`-valued keys, which Arrow adds when messages differ in keys), or
raises `RowError(field, problem)`; the loader turns that into a `DataError` naming file and row.

Formats (the column names TRL uses):

    text               text
    prompt_completion  prompt, completion           strings, or lists of messages
    messages           messages                     a conversation: [{"role", "content"}, ...]
    preference         prompt, chosen, rejected     strings or message lists; without `prompt`,
                                                    chosen/rejected share the prompt as a prefix;
                                                    optional `margin` (a number: TRL's RewardTrainer
                                                    subtracts it inside its loss)
    unpaired           prompt, completion, label    label: bool (KTO)
    prompt             prompt (+ any other fields)  RL prompts: the other fields (e.g. `answer`) are
                                                    kept for the reward functions
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from polmjax.errors import UserError

FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}
SFT_FORMATS = ("text", "prompt_completion", "messages")
ROLES = ("system", "developer", "user", "assistant", "tool")


class DataError(UserError, ValueError):
    """A dataset problem the user must fix: names the file, the row and the field."""


class RowError(Exception):
    """One row does not fit its format; `field` is the offending field (e.g. 'messages[2].role')."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(f"field '{field}' {problem}" if field else problem)
        self.field = field
        self.problem = problem


def detect_format(columns: Iterable[str], source: str = "dataset") -> str:
    """Returns the TRL format whose columns are all present; raises DataError if none or several.

    A format whose columns are a strict subset of another matching format's loses (prompt,
    completion, label is `unpaired`, not `prompt_completion`). `chosen` + `rejected` without
    `prompt` is the implicit-prompt `preference` form. Extra columns are ignored. The `prompt`
    format (RL prompts) is never detected: the RL prompt source asks for it.
    """
    cols = set(columns)
    signatures = {fmt: set(keys) for fmt, keys in FORMATS.items() if fmt != "prompt"}  # RL prompts: asked for
    signatures["preference"] = {"chosen", "rejected"}
    matches = [fmt for fmt, keys in signatures.items() if keys <= cols]
    matches = [m for m in matches if not any(signatures[m] < signatures[o] for o in matches)]
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{fmt}: {', '.join(keys)}" for fmt, keys in FORMATS.items())
    found = ", ".join(sorted(cols)) or "(none)"
    if not matches:
        raise DataError(
            f"{source}: cannot detect the dataset format from columns [{found}]; expected one "
            f"of ({expected}). Rename the columns or choose the format with data.format "
            f"(command line: --set data.format=<{'|'.join(FORMATS)}>)"
        )
    raise DataError(
        f"{source}: columns [{found}] fit several formats ({', '.join(matches)}); choose one with "
        f"data.format (command line: --set data.format={matches[0]}); formats: {expected}"
    )


def expected_fields(fmt: str) -> str:
    return ", ".join(f"'{k}'" for k in FORMATS[fmt])


def validate_row(row: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """Checks one row against `fmt` and returns its normalised fields; raises RowError."""
    if not isinstance(row, Mapping):
        raise RowError(None, f"row is a {type(row).__name__}, expected an object with fields")
    if fmt == "text":
        return {"text": _text(row, "text")}
    if fmt == "messages":
        messages = _messages(_required(row, "messages"), "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("messages", "has no assistant message (nothing to train on)")
        return {"messages": messages}
    if fmt in ("prompt_completion", "unpaired"):
        out = _prompt_and(row, "completion")
        if fmt == "unpaired":
            label = _required(row, "label")
            if not isinstance(label, bool) and type(label).__name__ != "bool_":
                raise RowError("label", f"must be a bool (true/false), got {label!r}")
            out["label"] = bool(label)
        return out
    if fmt == "preference":
        return _preference(row)
    if fmt == "prompt":
        prompt = _text_or_messages(row, "prompt", allow_empty=False)
        if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
            raise RowError("prompt", "ends with an assistant message; an RL prompt is what the model answers")
        return {**{k: v for k, v in row.items() if k != "prompt"}, "prompt": prompt}
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def is_conversational(value: Any) -> bool:
    """True for a list of message dicts (the conversational form of a field)."""
    return isinstance(value, list) and all(isinstance(m, Mapping) for m in value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _required(row: Mapping[str, Any], field: str) -> Any:
    if field not in row or _missing(row[field]):
        raise RowError(field, "is missing")
    return row[field]


def _text(row: Mapping[str, Any], field: str, *, allow_empty: bool = False) -> str:
    value = _required(row, field)
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(field, "is empty")
    return value


def _text_or_messages(row: Mapping[str, Any], field: str, *, allow_empty: bool) -> str | list:
    value = _required(row, field)
    if isinstance(value, str):
        return _text(row, field, allow_empty=allow_empty)
    if isinstance(value, (list, tuple)):
        return _messages(value, field)
    raise RowError(
        field, f"must be a string or a list of messages, got {type(value).__name__}"
    )


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        raise RowError(
            field,
            f"must be a list of {{'role', 'content'}} messages, got {type(value).__name__}",
        )
    if not value:
        raise RowError(field, "is an empty list of messages")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise RowError(where, f"must be a {{'role', 'content'}} dict, got {type(message).__name__}")
        role = message.get("role")
        if _missing(role):
            raise RowError(f"{where}.role", "is missing")
        if role not in ROLES:
            raise RowError(f"{where}.role", f"has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if _missing(content):
            if not (role == "assistant" and message.get("tool_calls")):
                raise RowError(f"{where}.content", "is missing")
        elif not isinstance(content, str):
            raise RowError(f"{where}.content", f"must be a string, got {type(content).__name__}")
        elif role == "assistant" and not content.strip() and not message.get("tool_calls"):
            raise RowError(f"{where}.content", "is empty")
        out.append({k: v for k, v in message.items() if not _missing(v)})
    return out


def _prompt_and(row: Mapping[str, Any], field: str) -> dict[str, Any]:
    """prompt + completion (or chosen/rejected): both strings or both message lists."""
    prompt = _text_or_messages(row, "prompt", allow_empty=True)
    response = _text_or_messages(row, field, allow_empty=False)
    _check_same_kind(prompt, response, field)
    return {"prompt": prompt, field: response}


def _check_same_kind(prompt: Any, response: Any, field: str) -> None:
    if isinstance(prompt, str) != isinstance(response, str):
        kinds = {True: "a string", False: "a list of messages"}
        raise RowError(
            field,
            f"is {kinds[isinstance(response, str)]} but 'prompt' is "
            f"{kinds[isinstance(prompt, str)]}; both must be strings or both conversations",
        )
    if isinstance(response, list) and response[-1]["role"] != "assistant":
        raise RowError(field, f"must end with an assistant message, got role {response[-1]['role']!r}")


def _preference(row: Mapping[str, Any]) -> dict[str, Any]:
    if "prompt" in row and not _missing(row["prompt"]):
        out = _prompt_and(row, "chosen")
        rejected = _text_or_messages(row, "rejected", allow_empty=False)
        _check_same_kind(out["prompt"], rejected, "rejected")
        out["rejected"] = rejected
    else:
        out = _implicit_prompt(
            _text_or_messages(row, "chosen", allow_empty=False),
            _text_or_messages(row, "rejected", allow_empty=False),
        )
    if out["chosen"] == out["rejected"]:
        raise RowError("rejected", "is identical to 'chosen' (no preference signal)")
    if "margin" in row and not _missing(row["margin"]):
        out["margin"] = _number(row, "margin")
    return out


def _number(row: Mapping[str, Any], field: str) -> float:
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RowError(field, f"must be a finite number, got {value!r}")
    return float(value)


def _implicit_prompt(chosen: Any, rejected: Any) -> dict[str, Any]:
    """Splits full chosen/rejected sequences into the shared prompt and the two responses.

    Conversations: the longest common prefix of messages. Strings: the longest common prefix of
    characters, backed off by one if it ends in a space (TRL's `extract_prompt`).
    """
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError("rejected", "must be the same kind as 'chosen' (both strings or both conversations)")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise RowError("prompt", "is missing and 'chosen'/'rejected' share no prefix to use as the prompt")
    out = {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    for field in ("chosen", "rejected"):
        if not out[field] or (isinstance(out[field], str) and not out[field].strip()):
            raise RowError(field, "has nothing after the shared prompt")
        _check_same_kind(out["prompt"], out[field], field)
    return out
