"""SFT datasets for math fine-tuning: loading (synthetic, local file or hub) and formatting.

Every source is read in one of two schemas, GSM8K (``question``/``answer``) or
MetaMathQA (``query``/``response``), and converted to a format TRL's
``SFTTrainer`` accepts. The synthetic problem sets themselves live in
:mod:`dude_trl.synthetic`.
"""

from __future__ import annotations

import os

import datasets

from .synthetic import DEFAULT_SYNTHETIC_SIZE, PROBLEM_SETS, make_gsm8k_dataset, make_metamath_dataset

PLAIN_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

# --- SFT formatting ------------------------------------------------------------------------------

_SCHEMAS = (("question", "answer"), ("query", "response"))


def qa_columns(column_names: list[str]) -> tuple[str, str]:
    """Return the (question, answer) column pair of a GSM8K- or MetaMathQA-schema dataset.

    Raises:
        ValueError: naming the columns present and the pairs expected.
    """
    for question_col, answer_col in _SCHEMAS:
        if question_col in column_names and answer_col in column_names:
            return question_col, answer_col
    expected = " or ".join(f"({q!r}, {a!r})" for q, a in _SCHEMAS)
    raise ValueError(f"dataset has columns {sorted(column_names)}; expected the fields {expected}")


def to_sft_format(
    dataset: datasets.Dataset, style: str = "prompt_completion", conversational: bool = True
) -> datasets.Dataset:
    """Convert a GSM8K- or MetaMathQA-schema dataset to a format TRL's ``SFTTrainer`` accepts.

    Args:
        dataset: columns ``question``/``answer`` or ``query``/``response``.
        style: ``"prompt_completion"`` gives ``prompt``/``completion`` columns (the loss
            covers the completion only); ``"messages"`` gives one ``messages`` column.
        conversational: with True, prompt and completion are lists of chat messages
            (the tokenizer's chat template is applied by TRL). With False (only for
            ``prompt_completion``), plain strings in the ``Question: ...\\nAnswer:``
            format that ``dude_trl.gsm8k.evaluate`` uses for models without a chat template.
    """
    question_col, answer_col = qa_columns(dataset.column_names)
    if style not in ("prompt_completion", "messages"):
        raise ValueError(f"style must be 'prompt_completion' or 'messages', got {style!r}")
    if style == "messages" and not conversational:
        raise ValueError("style='messages' is always conversational")

    def convert(example: dict) -> dict:
        question, answer = example[question_col], example[answer_col]
        if style == "messages":
            return {"messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]}
        if conversational:
            return {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        return {"prompt": PLAIN_PROMPT_TEMPLATE.format(question=question), "completion": " " + answer}

    return dataset.map(convert, remove_columns=dataset.column_names)


# The offline GSM8K dev set: the last 500 problems of the training file, never trained on.
GSM8K_DEV_SPLIT = "train[-500:]"
GSM8K_TRAIN_SPLIT = "train[:-500]"

# Hub datasets that need a config name; others load with none.
_HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}


def is_local_json(name: str) -> bool:
    """Whether ``name`` is an existing local ``.json``/``.jsonl`` file."""
    return name.endswith((".json", ".jsonl")) and os.path.isfile(name)


def load_qa_dataset(name: str, split: str, config_name: str | None = None) -> datasets.Dataset:
    """A GSM8K- or MetaMathQA-schema dataset from a local JSON/JSONL file or the hub, any split.

    ``split`` takes the slices of ``datasets`` (``"train[:-500]"``, ``"train[-500:]"``,
    ``"test[:50]"``). A local file has a single split, ``train``.

    Raises:
        ValueError: a local file asked for another split than ``train``, or the data lacks
            the question/answer fields.
    """
    if is_local_json(name):
        if split.split("[", 1)[0] != "train":
            raise ValueError(
                f"{name} is a local file: its one split is 'train', not {split!r}; "
                f"take a slice of it instead, e.g. {GSM8K_DEV_SPLIT!r} or {GSM8K_TRAIN_SPLIT!r}"
            )
        dataset = datasets.load_dataset("json", data_files=name, split=split)
    else:
        dataset = datasets.load_dataset(name, config_name or _HUB_CONFIGS.get(name), split=split)
    qa_columns(dataset.column_names)
    return dataset


def load_sft_dataset(
    name: str | None,
    split: str = "train",
    num_samples: int | None = None,
    seed: int = 0,
    style: str = "prompt_completion",
    conversational: bool = True,
    config_name: str | None = None,
) -> datasets.Dataset:
    """Load a math SFT dataset and convert it with :func:`to_sft_format`.

    Args:
        name: ``None`` or ``"synthetic"`` for synthetic MetaMathQA-style data, ``"curriculum"``
            for the graded synthetic curriculum in GSM8K style (``num_samples`` problems, default
            1000; see :mod:`dude_trl.synthetic`); a local ``.json``/``.jsonl`` file; otherwise a
            hub dataset such as ``"meta-math/MetaMathQA"`` or ``"openai/gsm8k"``.
        split: split to load, slices included (synthetic data has ``train`` and ``test``; a
            local file has ``train``, so ``"train[:-500]"`` trains on all but the dev slice).
        num_samples: keep this many examples, after a seeded shuffle for file/hub data.
        seed: generator seed for synthetic data, shuffle seed otherwise.
        config_name: the hub dataset's config (``openai/gsm8k`` defaults to ``main``).
    """
    if name is None or name in PROBLEM_SETS:
        size = DEFAULT_SYNTHETIC_SIZE if num_samples is None else num_samples
        if name == "curriculum":
            raw = make_gsm8k_dataset(size, seed, split, problem_set="curriculum")
        else:
            raw = make_metamath_dataset(size, seed, split)
    else:
        raw = load_qa_dataset(name, split, config_name)
        if num_samples is not None:
            raw = raw.shuffle(seed=seed).select(range(min(num_samples, len(raw))))
    return to_sft_format(raw, style=style, conversational=conversational)


def _user_text(prompt: object) -> str | None:
    """The question inside one SFT prompt: the last user turn, or the plain-format question."""
    if isinstance(prompt, list):
        users = [turn.get("content") for turn in prompt if isinstance(turn, dict) and turn.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    if isinstance(prompt, str):
        head, sep, rest = prompt.partition("Question: ")
        return rest.rsplit("\nAnswer:", 1)[0] if sep and not head.strip() else prompt
    return None


def training_questions(dataset: datasets.Dataset) -> set[str]:
    """The questions of an SFT dataset in any of the formats :func:`to_sft_format` writes (or raw Q/A)."""
    columns = dataset.column_names
    if "prompt" in columns:
        texts = (_user_text(prompt) for prompt in dataset["prompt"])
    elif "messages" in columns:
        texts = (_user_text(messages) for messages in dataset["messages"])
    else:
        try:
            texts = iter(dataset[qa_columns(columns)[0]])
        except ValueError:
            return set()
    return {" ".join(text.split()) for text in texts if text}


def check_disjoint(train_dataset: datasets.Dataset, eval_questions: list[str], eval_name: str) -> None:
    """Refuse an evaluation set that shares questions with the training data.

    Raises:
        ValueError: naming how many evaluation questions are trained on, one of them, and the fix.
    """
    trained = training_questions(train_dataset)
    shared = [q for q in eval_questions if " ".join(q.split()) in trained]
    if shared:
        raise ValueError(
            f"{len(shared)} of the {len(eval_questions)} evaluation questions of {eval_name} are also in "
            f"the training data (e.g. {shared[0][:80]!r}): accuracy on them measures memory, not learning. "
            f"Hold them out, e.g. train on {GSM8K_TRAIN_SPLIT!r} and evaluate on {GSM8K_DEV_SPLIT!r} of the "
            "same file."
        )
