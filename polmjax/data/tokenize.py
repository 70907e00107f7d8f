"""Tokenisation of validated rows: token ids plus which tokens are trained on.

`tokenize_example(row, fmt, tokenizer)` returns `(ids, train)`: int32 token ids and a bool mask,
`train[t]` = token t is a training target (the pipeline turns this into next-token targets and a
loss mask). What is trained on:

    text                   every token
    prompt_completion      completion tokens only (all tokens with completion_only_loss=False)
    messages               assistant tokens only (all tokens with completion_only_loss=False)

Conversations are rendered with the tokenizer's chat template. When the template marks assistant
content with `{% generation %}...{% endgeneration %}`, the mask comes from
`apply_chat_template(..., return_assistant_tokens_mask=True)`. Otherwise it is built
incrementally: the conversation is rendered prefix by prefix, and the characters each assistant
turn adds (rendering messages[:i+1] minus rendering messages[:i] with the generation prompt)
are marked; a token is marked if it overlaps marked characters, as transformers does. Each
prefix must render as a prefix of the next, otherwise a DataError says the template is not
prefix-stable (e.g. templates that drop earlier turns' reasoning) and asks for generation markers.

BOS and EOS. Text is always encoded with `add_special_tokens=False`, so the tokenizer never adds
anything by itself; then:
  * BOS: if the tokenizer defines a bos token and the sequence does not already start with it
    (chat templates usually write it), it is prepended, never trained on.
  * EOS: appended, and trained on, after text and after a string completion unless the text
    already ends with it. For conversations the template's own end-of-turn tokens are kept as they
    are (inserting EOS inside a conversation would differ from what the template renders at
    inference); EOS is appended at the end only if the conversation ends with an assistant turn
    whose trained tokens do not contain it, so the model always learns to stop.
String prompt and completion are encoded separately and concatenated, so the prompt's tokens are
exactly those a generator would see, and the boundary is exact.

`tokenize_preference` / `tokenize_unpaired` return the prompt and response ids separately for the
DPO/KTO family. String rows follow the rules above (BOS before the prompt, EOS after each response).
Conversational rows are exactly the template's tokens, as TRL's DPOTrainer and KTOTrainer build them:
the prompt rendered with the generation prompt, each response the rest of prompt + response rendered
(its end-of-turn and the template's trailing newline included); no BOS the template does not write and
no EOS after its end of turn (a DPO pair's log-probs would otherwise include a token that inference
with the template never reaches). The one deliberate difference from TRL: the prompt and the response
are encoded separately, so a token merging across the boundary is split there; TRL then moves the
boundary back to where the tokenisations diverge and warns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from polmjax.data.formats import DataError, RowError, is_conversational, validate_row

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def tokenize_example(
    row: Mapping[str, Any], fmt: str, tokenizer, *, completion_only_loss: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ids int32 [n], train bool [n]) for a validated SFT row (text/prompt_completion/messages)."""
    if fmt == "text":
        ids = _encode(tokenizer, row["text"])
        train = [True] * len(ids)
        ids, train = _append_eos(tokenizer, ids, train)
    elif fmt == "prompt_completion" and not is_conversational(row["prompt"]):
        prompt = _encode(tokenizer, row["prompt"])
        ids, train = _append_eos(tokenizer, _encode(tokenizer, row["completion"]), None)
        ids, train = prompt + ids, [False] * len(prompt) + train
    elif fmt == "prompt_completion":
        prompt_text = _render(tokenizer, row["prompt"], add_generation_prompt=True)
        full_text = _render(tokenizer, row["prompt"] + row["completion"])
        _check_prefix(prompt_text, full_text, "the prompt", "prompt + completion")
        ids, offsets = _encode_with_offsets(tokenizer, full_text)
        train = _overlaps(offsets, [(len(prompt_text), len(full_text))])
        ids, train = _append_eos_to_turn(tokenizer, ids, train)
    elif fmt == "messages":
        ids, train = _tokenize_messages(row["messages"], tokenizer)
        if row["messages"][-1]["role"] == "assistant":
            ids, train = _append_eos_to_turn(tokenizer, ids, train)
    else:
        raise DataError(f"tokenize_example handles text, prompt_completion and messages, not {fmt!r}")
    ids, train = _prepend_bos(tokenizer, ids, train)
    if not completion_only_loss:
        train = [True] * len(ids)
    return np.asarray(ids, np.int32), np.asarray(train, bool)


def tokenize_preference(example: Mapping[str, Any], tokenizer, max_len: int) -> dict[str, np.ndarray]:
    """Tokenises one preference pair: dict(prompt_ids, chosen_ids, rejected_ids), int32.

    Accepts a raw or validated row (all three forms: strings, conversations, implicit prompt).
    Each prompt + response fits in `max_len`: the prompt is cut from the left (keeping its end,
    next to the response) to at most max_len - min(longest response, max_len // 2) tokens, then
    responses are cut on the right.
    """
    row = _validated(example, "preference")
    prompt, responses = _prompt_and_responses(tokenizer, row["prompt"], [row["chosen"], row["rejected"]])
    prompt, (chosen, rejected) = _fit_pair(tokenizer, prompt, responses, max_len)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def tokenize_unpaired(example: Mapping[str, Any], tokenizer, max_len: int) -> dict[str, Any]:
    """Tokenises one KTO example: dict(prompt_ids, completion_ids int32, label bool); same length rule."""
    row = _validated(example, "unpaired")
    prompt, responses = _prompt_and_responses(tokenizer, row["prompt"], [row["completion"]])
    prompt, (completion,) = _fit_pair(tokenizer, prompt, responses, max_len)
    return {"prompt_ids": prompt, "completion_ids": completion, "label": row["label"]}


def fit_responses(tokenizer, prompt_ids, responses, max_len: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The length rule of `tokenize_preference` / `tokenize_unpaired` on already tokenised ids: the prompt
    cut from the left (keeping its BOS and its end) so that each prompt + response fits `max_len`, then
    the responses cut on the right. KTO's KL-baseline sequences (a prompt with another example's
    completion) use it."""
    return _fit_pair(tokenizer, list(prompt_ids), [list(r) for r in responses], max_len)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids generation stops at: the tokenizer's EOS, and the chat template's end-of-turn token.

    The end-of-turn token is the special token the template writes right after an assistant message
    (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma). Exports write these
    ids into config.json and generation_config.json, and polmjax's sampler stops at the same ones.
    """
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if getattr(tokenizer, "chat_template", None):
        marker = "polmjax-end-of-turn-probe"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that cannot render this conversation: EOS alone
            text = ""
        if marker in text:
            after = _encode(tokenizer, text.split(marker, 1)[1])
            special = set(tokenizer.all_special_ids) | {
                i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
            if after and after[0] in special and after[0] not in ids:
                ids.append(int(after[0]))
    return tuple(ids)


def has_generation_markers(tokenizer) -> bool:
    """True if the tokenizer's chat template marks assistant content with {% generation %}."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and bool(_GENERATION_TAG.search(template))


def _tokenize_messages(messages: Sequence[Mapping[str, Any]], tokenizer) -> tuple[list[int], list[bool]]:
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    full_text = _render(tokenizer, messages)
    spans, before = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # A conversation opening with an assistant turn has no prefix to render: the whole
        # first render (template preamble and turn header included) is then that turn's.
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        after = _render(tokenizer, messages[: i + 1])
        _check_prefix(before, after, f"messages[:{i}] with the generation prompt", f"messages[:{i + 1}]")
        _check_prefix(after, full_text, f"messages[:{i + 1}]", "the whole conversation")
        spans.append((len(before), len(after)))
    ids, offsets = _encode_with_offsets(tokenizer, full_text)
    return ids, _overlaps(offsets, spans)


def _prompt_and_responses(tokenizer, prompt, responses) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each response's ids, encoded separately (strings: with BOS and EOS)."""
    if not is_conversational(prompt):
        prompt_ids, _ = _prepend_bos(tokenizer, _encode(tokenizer, prompt), None)
        return prompt_ids, [_append_eos(tokenizer, _encode(tokenizer, r), None)[0] for r in responses]
    # Conversations: exactly the template's tokens, as TRL's DPO/KTO trainers and apply_chat_template
    # give them (no BOS the template does not write, no EOS after its end of turn)
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True)
    out = []
    for response in responses:
        full_text = _render(tokenizer, list(prompt) + list(response))
        _check_prefix(prompt_text, full_text, "the prompt", "prompt + response")
        out.append(_encode(tokenizer, full_text[len(prompt_text):]))
    return _encode(tokenizer, prompt_text), out


def _fit_pair(tokenizer, prompt, responses, max_len):
    longest = max(len(r) for r in responses)
    keep_prompt = max(1, max_len - min(longest, max_len // 2))
    if len(prompt) > keep_prompt:
        bos = getattr(tokenizer, "bos_token_id", None)
        head = [prompt[0]] if bos is not None and prompt[0] == bos else []
        prompt = head + prompt[len(prompt) - (keep_prompt - len(head)):]
    room = max_len - len(prompt)
    as_array = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return as_array(prompt), [as_array(r[:room]) for r in responses]


def _validated(example, fmt):
    try:
        return validate_row(example, fmt)
    except RowError as e:
        raise DataError(f"example: {e}") from None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(
            f"{type(tokenizer).__name__} cannot return character offsets; assistant masks by "
            "incremental templating need a fast tokenizer (or use a template with {% generation %})"
        ) from None
    return list(out["input_ids"]), list(out["offset_mapping"])


def _overlaps(offsets, spans) -> list[bool]:
    """Marks each token whose characters overlap one of the (sorted) character spans."""
    mask, s = [False] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        mask[t] = end > spans[s][0]
    return mask


def _render(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{type(tokenizer).__name__} has no chat template; conversational data needs one "
            "(set tokenizer.chat_template)"
        )
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _check_prefix(prefix: str, text: str, prefix_name: str, text_name: str) -> None:
    if not text.startswith(prefix):
        i = next((k for k, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
        raise DataError(
            f"the chat template is not prefix-stable: rendering {prefix_name} is not a prefix of "
            f"rendering {text_name} (they differ at character {i}: {prefix[i:i + 40]!r} vs "
            f"{text[i:i + 40]!r}). Assistant masks cannot be built incrementally from such a "
            "template; add {% generation %}...{% endgeneration %} markers around assistant "
            "content in the template instead."
        )


def _prepend_bos(tokenizer, ids, train):
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or (ids and ids[0] == bos):
        return ids, train
    return [bos] + ids, None if train is None else [False] + train


def _append_eos(tokenizer, ids, train):
    """Appends EOS (trained on) unless `ids` already end with it; train=None means 'all trained'."""
    eos = getattr(tokenizer, "eos_token_id", None)
    train = [True] * len(ids) if train is None else train
    if eos is None or (ids and ids[-1] == eos):
        return ids, train
    return ids + [eos], train + [True]


def _append_eos_to_turn(tokenizer, ids, train):
    """Appends EOS if the trained tokens of the final turn (the last trained run) lack it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or not any(train):
        return ids, train
    end = len(train) - train[::-1].index(True)
    start = end
    while start > 0 and train[start - 1]:
        start -= 1
    if eos in ids[start:end]:
        return ids, train
    return ids + [eos], train + [True]
