"""Tiny offline assets: a BPE tokenizer with a ChatML-like chat template, and toy datasets.

Tests and the quickstart experiment use these so that nothing needs the Hugging Face hub. The
tasks are small enough for a tiny model to learn on CPU in a few hundred steps:

    add 23 and 48      -> 71
    reverse: a b c     -> c b a
    sort: 3 1 2        -> 1 2 3

Special tokens: bos `<s>`, eos `<|im_end|>` (the end of every chat turn, as in Qwen's instruct
tokenizers, so templated turns already end with EOS), pad `<pad>`, and `<|im_start|>`.
"""

from __future__ import annotations

import json
import os
import random
import string

from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, IM_START = "<s>", "<|im_end|>", "<pad>", "<|im_start|>"

# ChatML-like. The assistant content and its closing <|im_end|> are inside {% generation %}, so
# `return_assistant_tokens_mask=True` marks exactly those tokens; the newline after <|im_end|> is not.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] }}{{ '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATE_NO_MARKERS = CHAT_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", ""
)


def build_tokenizer(
    out_dir: str | os.PathLike, *, with_generation_markers: bool = True, vocab_size: int = 384
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on the built-in corpus and saves it to `out_dir`.

    Digits are split one per token (the arithmetic task needs them). The result reloads offline
    with `AutoTokenizer.from_pretrained(out_dir)`. `with_generation_markers=False` saves the same
    template without `{% generation %}` markers, to exercise incremental templating.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, IM_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE if with_generation_markers else CHAT_TEMPLATE_NO_MARKERS,
        model_max_length=4096,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def write_toy_sft_dataset(
    path: str | os.PathLike, n: int = 2000, seed: int = 0, format: str = "messages"
) -> str:
    """Writes `n` toy tasks as JSONL in TRL's `messages` or `prompt_completion` format.

    About one conversation in five has two user/assistant exchanges, so multi-turn masking is
    exercised. Returns the path.
    """
    if format not in ("messages", "prompt_completion"):
        raise ValueError(f"format must be 'messages' or 'prompt_completion', got {format!r}")
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            if format == "prompt_completion":
                prompt, answer = _task(rng)
                row = {"prompt": prompt + "\n", "completion": answer}
            else:
                turns = 2 if rng.random() < 0.2 else 1
                messages = []
                for _ in range(turns):
                    prompt, answer = _task(rng)
                    messages += [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ]
                row = {"messages": messages}
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_toy_preference_dataset(
    path: str | os.PathLike, n: int = 500, seed: int = 0, conversational: bool = True, format: str = "preference"
) -> str:
    """Writes `n` toy tasks as JSONL for preference learning; returns the path.

    format="preference": `prompt`, `chosen` = the right answer, `rejected` = a wrong one (DPO, reward
    models). format="unpaired": `prompt`, `completion`, `label` (KTO): the right answer labelled true
    or a wrong one labelled false, about half each. Conversational by default (prompt a user message
    list, responses assistant message lists, TRL's standard form); `conversational=False` writes
    plain strings. The signature fits `Algorithm.toy_data` writers: write(path, n=, seed=, format=).
    """
    if format not in ("preference", "unpaired"):
        raise ValueError(f"format must be 'preference' or 'unpaired', got {format!r}")
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt, answer = _task(rng)
            wrong = _wrong_answer(answer, rng)
            if format == "unpaired":
                label = rng.random() < 0.5
                responses = {"completion": answer if label else wrong}
            else:
                responses = {"chosen": answer, "rejected": wrong}
            if conversational:
                row = {"prompt": [{"role": "user", "content": prompt}]}
                row |= {k: [{"role": "assistant", "content": v}] for k, v in responses.items()}
            else:
                row = {"prompt": prompt + "\n", **responses}
            if format == "unpaired":
                row["label"] = label
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_toy_rl_dataset(path: str | os.PathLike, n: int = 2000, seed: int = 0, format: str = "prompt") -> str:
    """Writes `n` toy tasks as JSONL RL prompts with a verifiable answer: `prompt` (a user message list)
    and `answer` (the exact expected reply, scored by `polmjax.rl.rewards.exact_match_reward`); the
    signature fits `Algorithm.toy_data` writers. Returns the path."""
    if format != "prompt":
        raise ValueError(f"format must be 'prompt', got {format!r}")
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt, answer = _task(rng)
            f.write(json.dumps({"prompt": [{"role": "user", "content": prompt}], "answer": answer}) + "\n")
    return str(path)


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("add", "reverse", "sort"))
    if kind == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return f"add {a} and {b}", str(a + b)
    if kind == "reverse":
        letters = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
        return "reverse: " + " ".join(letters), " ".join(reversed(letters))
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]
    return "sort: " + " ".join(digits), " ".join(sorted(digits))


def _wrong_answer(answer: str, rng: random.Random) -> str:
    if answer.isdigit():
        return str(int(answer) + rng.choice((-1, 1, 10)) if int(answer) > 10 else int(answer) + 1)
    items = answer.split(" ")
    if len(set(items)) == 1:  # "sort: 7 7 7": no permutation differs; change one digit instead
        i = rng.randrange(len(items))
        return " ".join(items[:i] + [str((int(items[i]) + 1) % 10)] + items[i + 1:])
    wrong = items[:]
    while wrong == items:
        rng.shuffle(wrong)
    return " ".join(wrong)


def _corpus():
    rng = random.Random(1234)
    for _ in range(3000):
        prompt, answer = _task(rng)
        yield f"user\n{prompt}\nassistant\n{answer}\n"
    words = (
        "the a an and or of to in is are was be on for with that this it as at by from user "
        "assistant system tool hello world document text sentence example number answer question"
    ).split()
    for _ in range(500):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ".\n"
