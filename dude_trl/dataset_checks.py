"""Checking what `SFTTrainer` is given, before TRL sees it.

TRL's ``SFTTrainer`` dies with a bare ``StopIteration`` on an empty dataset and a bare
``KeyError`` on one without a column it reads, and trains silently on a conversation turn whose
content is None (the chat template renders it as empty text). `check_sft_dataset` refuses each
with a message naming the dataset, the row and the fix; `DuDeSFTTrainer` runs it on its train and
eval datasets.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .data import qa_columns

# The turn fields TRL reads in each conversational column: (speaker, text). TRL renames ShareGPT's
# "conversations" (from/value) to "messages" (role/content) itself.
_TURN_FIELDS = {
    "messages": ("role", "content"),
    "prompt": ("role", "content"),
    "completion": ("role", "content"),
    "conversations": ("from", "value"),
}
# Rows per slice when a column has to be gathered row by row (see `_scan`): bounds the copy.
_SCAN_ROWS = 65_536
# Why an empty or null value matters, per column kind.
_WHY_TURNS = "the chat template would render what is missing as empty text, and the model would train on that"
_WHY_TEXT = "TRL would fail on it with a bare error, or train on an empty example"


def _usable_columns(text_field: str) -> str:
    return (
        f"{text_field!r} (plain text; SFTConfig(dataset_text_field=...) names another column), 'messages' "
        "(lists of {'role', 'content'} turns), 'prompt' and 'completion' (strings or lists of turns), "
        "'conversations' (ShareGPT {'from', 'value'} turns) or pre-tokenized 'input_ids'"
    )


def check_sft_dataset(
    dataset: Union[datasets.Dataset, datasets.IterableDataset],
    name: str,
    text_field: str = "text",
    check_columns: bool = True,
) -> None:
    """Refuse a dataset TRL's ``SFTTrainer`` cannot train on, or would train on silently wrong.

    - empty (TRL dies with a bare ``StopIteration``);
    - with ``check_columns``: none of the columns ``SFTTrainer`` reads (see `_usable_columns`;
      TRL dies with a bare ``KeyError``), or ``prompt`` without ``completion`` and vice versa;
    - for a `datasets.Dataset` (not an `IterableDataset`, which would need a full pass): a null
      row in the column used, an empty conversation, or a turn whose speaker or text is None or
      missing (an assistant turn with ``tool_calls`` may have no content). The whole column is
      scanned with Arrow compute, not row by row.

    Pass ``check_columns=False`` when TRL does not read the columns itself (a ``formatting_func``,
    ``skip_prepare_dataset=True``); only emptiness is checked then.

    Args:
        name: how the error names the dataset (``"train_dataset"``, ``"eval_dataset['dev']"``).
        text_field: ``SFTConfig.dataset_text_field``.

    Raises:
        ValueError: naming the dataset, the problem, its columns and the fix.
    """
    columns = dataset.column_names
    if isinstance(dataset, datasets.IterableDataset):
        # TRL reads the first example itself; reading it here costs one example.
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(_empty_message(name, columns or []))
        columns = columns if columns is not None else list(first)
    elif len(dataset) == 0:
        raise ValueError(_empty_message(name, columns))
    if not check_columns or (isinstance(dataset, datasets.Dataset) and dataset.format["type"] == "custom"):
        # A `with_transform` dataset's columns are not what its rows hold; TRL explains what it accepts.
        return
    used = _used_columns(columns, name, text_field)
    if isinstance(dataset, datasets.Dataset):
        for column in used:
            _check_column_values(dataset, column, name)


def _empty_message(name: str, columns: list[str]) -> str:
    fix = " or pass eval_dataset=None to skip evaluation" if name.startswith("eval") else ""
    return (
        f"{name} is empty (0 rows; columns {sorted(columns)}): there is nothing to "
        f"{'evaluate' if fix else 'train'} on. Check the split, slice or filter that produced it{fix}."
    )


def _used_columns(columns: list[str], name: str, text_field: str) -> list[str]:
    """The columns TRL's ``SFTTrainer`` will read, in its order of precedence; a ValueError when none."""
    present = set(columns)
    if "input_ids" in present:
        return []  # pre-tokenized: TRL takes input_ids (and labels/masks) as they are
    has_prompt, has_completion = "prompt" in present, "completion" in present
    if has_prompt and has_completion:
        return ["prompt", "completion"]
    if has_prompt:  # TRL's prompt-completion path reads example["completion"] whatever else is there
        raise ValueError(
            f"{name} has a 'prompt' column but no 'completion' (columns {sorted(columns)}): SFTTrainer trains on "
            f"the completion of each prompt. Add a 'completion' column, or rename 'prompt' to {text_field!r} to "
            "train on the whole text."
        )
    for column in ("messages", "conversations", text_field):
        if column in present:
            return [column]
    if has_completion:
        raise ValueError(
            f"{name} has a 'completion' column but no 'prompt' (columns {sorted(columns)}). Add the 'prompt' "
            f"column, or rename 'completion' to {text_field!r} to train on the whole text."
        )
    hint = ""
    try:
        question, answer = qa_columns(columns)
        hint = f" For {question!r}/{answer!r} data, dude_trl.data.to_sft_format(dataset) converts it."
    except ValueError:
        pass
    raise ValueError(
        f"{name} has none of the columns SFTTrainer trains on (columns {sorted(columns)}). Give it one of "
        f"{_usable_columns(text_field)}, or pass formatting_func=... to build the text from these columns.{hint}"
    )


def _check_column_values(dataset: datasets.Dataset, column: str, name: str) -> None:
    """Scan one column for rows TRL would fail on or train on wrong; a ValueError naming the first."""
    turns = _turn_struct(dataset.data.column(column).type)
    if turns is None:  # text, or turns stored as Json: only a null row is visibly wrong

        def flags(chunk: pa.Array) -> np.ndarray:
            return chunk.is_null().to_numpy(zero_copy_only=False)

    else:
        speaker, text = _TURN_FIELDS[column]
        fields = [turns.field(i).name for i in range(turns.num_fields)]
        if speaker not in fields:
            other = "messages" if column == "conversations" else "conversations"
            other_fields = _TURN_FIELDS[other]
            renamed = ""
            if set(other_fields) <= set(fields):
                renamed = f" ({'/'.join(other_fields)} turns go in a column named {other!r})"
            raise ValueError(
                f"{name}: the turns of {column!r} have no {speaker!r} field (fields {fields}), so TRL does not read "
                f"them as a conversation. Give each turn {speaker!r} and {text!r}{renamed}."
            )

        def flags(chunk: pa.Array) -> np.ndarray:
            return _bad_conversation_rows(chunk, speaker, text, allow_empty=column == "prompt")

    count, first = _scan(dataset, column, flags)
    if count:
        value = dataset.with_format(None)[first][column]
        why = _WHY_TURNS if turns is not None else _WHY_TEXT
        raise ValueError(
            f"{name}: row {first} of {column!r} {_describe(value, column, turns is not None)} ({count} such "
            f"row{'s' if count > 1 else ''}); {why}. Fill in the missing values or drop those rows "
            "(Dataset.filter) before training."
        )


def _turn_struct(column_type: pa.DataType) -> Optional[pa.StructType]:
    """The struct type of a column of lists of turns, None for any other column (text, Json)."""
    if (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)) and pa.types.is_struct(
        column_type.value_type
    ):
        return column_type.value_type
    return None


def _bad_conversation_rows(chunk: pa.Array, speaker: str, text: str, allow_empty: bool) -> np.ndarray:
    """Per row of `chunk` (lists of turns): null, empty (unless `allow_empty`), or holding a turn
    that is null, has no speaker, or has no text and no ``tool_calls``."""
    bad = chunk.is_null().to_numpy(zero_copy_only=False, writable=True)
    if not allow_empty:
        bad |= pc.fill_null(pc.equal(pc.list_value_length(chunk), 0), False).to_numpy(zero_copy_only=False)
    turns = pc.list_flatten(chunk)
    if len(turns) == 0:
        return bad
    field_index = turns.type.get_field_index
    no_text = pc.is_null(pc.struct_field(turns, text)) if field_index(text) >= 0 else pa.repeat(True, len(turns))
    if field_index("tool_calls") >= 0:
        calls = pc.struct_field(turns, "tool_calls")
        has_calls = (
            pc.fill_null(pc.greater(pc.list_value_length(calls), 0), False)
            if pa.types.is_list(calls.type) or pa.types.is_large_list(calls.type)
            else pc.is_valid(calls)
        )
        no_text = pc.and_(no_text, pc.invert(has_calls))
    bad_turn = pc.or_(pc.is_null(turns), pc.or_(pc.is_null(pc.struct_field(turns, speaker)), no_text))
    bad[pc.filter(pc.list_parent_indices(chunk), bad_turn).to_numpy(zero_copy_only=False)] = True
    return bad


def _scan(dataset: datasets.Dataset, column: str, flags: Callable[[pa.Array], np.ndarray]) -> tuple[int, Optional[int]]:
    """(how many rows `flags` marks, the first of them) over `column`, in the dataset's own row
    order. The stored Arrow column is scanned zero-copy; a select/shuffle/filter mapping is then
    applied to the per-row marks (gathering the rows themselves is orders of magnitude slower)."""
    stored = dataset.data.column(column)
    marked = np.concatenate([flags(chunk) for chunk in stored.chunks] or [np.zeros(0, dtype=bool)])
    mapping = getattr(dataset, "_indices", None)  # datasets' private indices mapping, if any
    if mapping is not None:
        marked = marked[mapping.column(0).to_numpy()]
    if len(marked) != len(dataset):  # a layout this code does not know: gather the rows, slice by slice
        view = dataset.select_columns([column]).with_format("arrow")
        slices = (view[start : start + _SCAN_ROWS].column(0) for start in range(0, len(dataset), _SCAN_ROWS))
        marked = np.concatenate([flags(chunk) for table in slices for chunk in table.chunks])
    rows = np.flatnonzero(marked)
    return len(rows), (int(rows[0]) if len(rows) else None)


def _describe(value: Any, column: str, conversational: bool) -> str:
    """What is wrong with one flagged row's value, for the error message."""
    if value is None:
        return "is None or missing"
    if not conversational or len(value) == 0:
        return "is an empty conversation" if conversational else "is None"
    speaker, text = _TURN_FIELDS[column]
    for i, turn in enumerate(value):
        if turn is None:
            return f"has a None turn (turn {i})"
        if turn.get(speaker) is None:
            return f"has a turn whose {speaker!r} is None or missing (turn {i})"
        if turn.get(text) is None and not turn.get("tool_calls"):
            return f"has a turn whose {text!r} is None or missing (turn {i}, {speaker}={turn[speaker]!r})"
    return "is malformed"
