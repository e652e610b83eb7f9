"""Bad inputs are refused up front with an error that names the problem and the fix (issue 16):
datasets SFTTrainer cannot train on (or would train on silently wrong), checkpoints with a file cut
short, and `target_parameters` with a DuDe config."""

from __future__ import annotations

import json
import logging
import os
import random
import string

import pytest
import torch
from conftest import make_qwen2, make_tokenizer
from datasets import Dataset, Features, IterableDataset, Json, List, concatenate_datasets
from peft import LoraConfig
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, TrainerCallback
from trl import SFTConfig

from dude_trl import DuDeConfig, DuDeSFTTrainer
from dude_trl.dataset_checks import check_sft_dataset
from dude_trl.methods import METHODS
from dude_trl.resume import checkpoint_problem, torch_file_problem

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
)
TEXT = Dataset.from_dict({"text": [f"{i} plus {i} is {2 * i}." for i in range(8)]})


def _args(tmp_path, **kw) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, max_length=64,
    )
    return SFTConfig(**{**defaults, **kw})


def _trainer(tmp_path, train_dataset=TEXT, args=None, **kw) -> DuDeSFTTrainer:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return DuDeSFTTrainer(
        model=make_qwen2(), args=args or _args(tmp_path), train_dataset=train_dataset, processing_class=tokenizer, **kw
    )


def _chat(assistant_content, n=4) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": assistant_content if i == 2 else "a"}]}
        for i in range(n)
    ]


def _empty_iterable() -> IterableDataset:
    def rows():
        yield from ()

    return IterableDataset.from_generator(rows)


# ------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(train_dataset=Dataset.from_dict({"text": []})), "train_dataset"),
        (dict(train_dataset=TEXT.filter(lambda row: False)), "train_dataset"),
        (dict(train_dataset=_empty_iterable()), "train_dataset"),
        (dict(eval_dataset=Dataset.from_dict({"text": []})), "eval_dataset"),
        (dict(eval_dataset={"dev": TEXT, "test": TEXT.select([])}), r"eval_dataset\['test'\]"),
    ],
    ids=["train", "train_filtered_to_nothing", "train_iterable", "eval", "eval_dict"],
)
def test_empty_dataset_is_refused(tmp_path, kwargs, name):
    """TRL dies on an empty dataset with a bare StopIteration."""
    with pytest.raises(ValueError, match=rf"^{name} is empty \(0 rows; columns .*Check the split"):
        _trainer(tmp_path, **kwargs)


def test_dataset_without_a_column_trl_reads_is_refused(tmp_path):
    """TRL dies on it with a bare KeyError('text'); the error lists the columns and the formats."""
    raw = Dataset.from_dict({"question": ["1+1?"] * 4, "answer": ["2"] * 4})
    with pytest.raises(ValueError, match=r"train_dataset has none of the columns.*\['answer', 'question'\].*"
                                         r"'messages'.*formatting_func.*to_sft_format"):
        _trainer(tmp_path, train_dataset=raw)
    with pytest.raises(ValueError, match=r"eval_dataset\['dev'\] has none of the columns.*\['body'\].*'text'"):
        _trainer(tmp_path, eval_dataset={"dev": Dataset.from_dict({"body": ["x"]})})
    with pytest.raises(ValueError, match=r"train_dataset has a 'prompt' column but no 'completion'"):
        _trainer(tmp_path, train_dataset=Dataset.from_dict({"prompt": ["x"] * 4}))


def test_none_content_in_messages_is_refused(tmp_path):
    """SFTTrainer trains on such a conversation silently (the turn renders empty)."""
    bad = Dataset.from_list(_chat(None))
    with pytest.raises(ValueError, match=r"train_dataset: row 2 of 'messages' has a turn whose 'content' is None "
                                         r"or missing \(turn 1, role='assistant'\) \(1 such row\).*Dataset.filter"):
        _trainer(tmp_path, train_dataset=bad)
    with pytest.raises(ValueError, match=r"eval_dataset\['dev'\]: row 2 of 'messages'"):
        _trainer(tmp_path, eval_dataset={"dev": bad})
    # A turn without the field at all is the same thing to Arrow (and to the chat template).
    rows = _chat("a")
    del rows[2]["messages"][1]["content"]
    with pytest.raises(ValueError, match=r"row 2 of 'messages' has a turn whose 'content' is None or missing"):
        check_sft_dataset(Dataset.from_list(rows), "train_dataset")


MSG = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"text": "a"}, {"text": "b"}, {"text": None}], r"row 2 of 'text' is None"),
        ([{"prompt": "q", "completion": "a"}, {"prompt": None, "completion": "a"}], r"row 1 of 'prompt' is None"),
        ([{"prompt": "q", "completion": None}], r"row 0 of 'completion' is None"),
        ([{"prompt": [MSG[0]], "completion": [MSG[1]]}, {"prompt": [{"role": "user", "content": None}],
                                                         "completion": [MSG[1]]}],
         r"row 1 of 'prompt' has a turn whose 'content' is None or missing \(turn 0, role='user'\)"),
        ([{"prompt": [MSG[0]], "completion": [MSG[1]]}, {"prompt": [MSG[0]], "completion": []}],
         r"row 1 of 'completion' is an empty conversation"),
        ([{"messages": MSG}, {"messages": []}], r"row 1 of 'messages' is an empty conversation"),
        ([{"messages": MSG}, {"messages": None}], r"row 1 of 'messages' is None or missing"),
        ([{"messages": [MSG[0], {"role": None, "content": "a"}]}], r"row 0 of 'messages' has a turn whose 'role'"),
        ([{"conversations": [{"from": "human", "value": None}]}], r"row 0 of 'conversations' has a turn whose 'value'"),
        ([{"conversations": MSG}], r"turns of 'conversations' have no 'from' field.*column named 'messages'"),
        ([{"messages": [{"from": "human", "value": "q"}]}], r"turns of 'messages' have no 'role'.*'conversations'"),
    ],
    ids=["text", "prompt", "completion", "conversational_prompt", "empty_completion", "empty_messages",
         "null_messages", "null_role", "sharegpt_value", "conversations_in_chatml", "messages_in_sharegpt"],
)
def test_missing_values_are_named(rows, match):
    with pytest.raises(ValueError, match=match):
        check_sft_dataset(Dataset.from_list(rows), "train_dataset")


def test_scan_counts_all_rows_and_names_the_row_in_the_datasets_own_order():
    # Three Arrow chunks; after select/shuffle the rows are an indices mapping over the stored table.
    parts = [Dataset.from_dict({"id": list(range(k, k + 1000)), "text": [f"t{i}" for i in range(k, k + 1000)]})
             for k in (0, 1000, 2000)]
    bad_ids = (5, 1700, 2999)
    dataset = concatenate_datasets(parts).map(lambda row: {"text": None if row["id"] in bad_ids else row["text"]})
    dataset = concatenate_datasets([dataset.select(range(0, 1500)), dataset.select(range(1500, 3000))])
    with pytest.raises(ValueError, match=r"row 5 of 'text' is None or missing \(3 such rows\)"):
        check_sft_dataset(dataset, "train_dataset")
    with pytest.raises(ValueError, match=r"row 2 of 'text' is None or missing \(1 such row\)"):
        check_sft_dataset(dataset.select([0, 1, 2999, 2]), "train_dataset")
    shuffled = dataset.shuffle(seed=0)
    ids = list(shuffled["id"])
    expected = min(ids.index(i) for i in bad_ids)
    with pytest.raises(ValueError, match=rf"row {expected} of 'text' is None or missing \(3 such rows\)"):
        check_sft_dataset(shuffled, "train_dataset")
    check_sft_dataset(dataset.select(range(10, 1600)).filter(lambda row: row["id"] != 1700), "train_dataset")


def test_what_trl_accepts_passes_the_check(tmp_path):
    """Every format TRL 1.16's SFTTrainer reads: each builds a trainer (TRL prepares it) without refusal."""
    valid = {
        "text": TEXT,
        "messages": Dataset.from_list(_chat("a")),
        "prompt_completion": Dataset.from_dict({"prompt": ["1+1="] * 4, "completion": ["2"] * 4}),
        "conversational_prompt_completion": Dataset.from_list([{"prompt": [MSG[0]], "completion": [MSG[1]]}] * 4),
        "sharegpt_conversations": Dataset.from_list([{"conversations": [{"from": "user", "value": "q"}]}] * 4),
        "pretokenized": Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4}),
        "text_and_unused_completion": Dataset.from_dict({"text": ["abc"] * 4, "completion": ["x"] * 4}),
        "iterable_with_a_none_row": Dataset.from_dict({"text": ["abc", None, "d", "e"]}).to_iterable_dataset(),
    }
    for label, dataset in valid.items():
        args = _args(tmp_path / label, max_steps=2)
        trainer = _trainer(tmp_path, train_dataset=dataset, args=args, eval_dataset={"dev": TEXT})
        assert trainer.train_dataset is not None, label
    # Another text column, and a formatting_func (it reads columns of its own).
    body = Dataset.from_dict({"body": ["abc"] * 4})
    _trainer(tmp_path, train_dataset=body, args=_args(tmp_path, dataset_text_field="body"))
    raw = Dataset.from_dict({"question": ["1+1?"] * 4, "answer": ["2"] * 4})
    _trainer(tmp_path, train_dataset=raw, formatting_func=lambda row: f"{row['question']} {row['answer']}")
    # Turns TRL reads that the check must not refuse: tool calls without content, turns stored as Json.
    tool_turn = {"role": "assistant", "content": None, "tool_calls": [{"name": "add", "arguments": "1, 1"}]}
    check_sft_dataset(Dataset.from_list([{"messages": [MSG[0], tool_turn]}]), "train_dataset")
    as_json = Dataset.from_list([{"messages": MSG}], features=Features({"messages": List(Json())}))
    check_sft_dataset(as_json, "train_dataset")
    with pytest.raises(ValueError, match=r"'content' is None or missing \(turn 1"):
        check_sft_dataset(Dataset.from_list([{"messages": [MSG[0], {**tool_turn, "tool_calls": []}]}]), "train_dataset")


# ------------------------------------------------------------------------------------------- resume


def _torch_checkpoint(path) -> None:
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    torch.save({"state": {i: torch.randn(64, 64) for i in range(4)}}, path / "optimizer.pt")
    torch.save({"last_epoch": 2}, path / "scheduler.pt")


def test_checkpoint_problem_finds_a_torch_file_cut_short(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    _torch_checkpoint(checkpoint)
    assert checkpoint_problem(checkpoint) is None
    size = os.path.getsize(checkpoint / "optimizer.pt")
    os.truncate(checkpoint / "optimizer.pt", size // 2)
    problem = checkpoint_problem(checkpoint)
    assert problem.startswith("optimizer.pt is damaged") and "no zip central directory" in problem, problem
    (checkpoint / "optimizer.pt").write_bytes(b"")
    assert checkpoint_problem(checkpoint).startswith("optimizer.pt is damaged (0 bytes")
    # In a sub-directory (DeepSpeed's global_step*/), and a file cut short by only a few bytes.
    _torch_checkpoint(tmp_path / "ds")
    (tmp_path / "ds" / "global_step2").mkdir()
    torch.save({"x": torch.ones(3)}, tmp_path / "ds" / "global_step2" / "mp_rank_00_model_states.pt")
    os.truncate(tmp_path / "ds" / "global_step2" / "mp_rank_00_model_states.pt",
                os.path.getsize(tmp_path / "ds" / "global_step2" / "mp_rank_00_model_states.pt") - 10)
    assert checkpoint_problem(tmp_path / "ds").startswith(os.path.join("global_step2", "mp_rank_00_model_states.pt"))
    # torch's legacy (pickle) format is not a zip archive: nothing to check cheaply, so not refused.
    torch.save({"x": 1}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch_file_problem(tmp_path / "legacy.pt") is None


def test_torch_file_check_reads_only_the_end_of_the_file(tmp_path, monkeypatch):
    """Cheap on a multi-GB optimizer state: the archive's entries are never read."""
    path = tmp_path / "optimizer.pt"
    torch.save({"w": torch.zeros(4 * 1024 * 1024)}, path)  # 16 MiB
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    monkeypatch.setattr("io.open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    assert torch_file_problem(path) is None
    assert sum(reads) < 1024 * 1024, sum(reads)


class StepsRun(TrainerCallback):
    """The optimizer steps a `train` call actually runs."""

    def __init__(self) -> None:
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _resume_trainer(model_dir, output_dir, **kw) -> DuDeSFTTrainer:
    rng = random.Random(0)
    texts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(16)) for _ in range(16)]
    data = Dataset.from_dict({"text": texts})
    args = _args(output_dir, max_steps=4, learning_rate=5e-3, logging_steps=1, save_strategy="steps", save_steps=2,
                 max_length=24, **kw)
    config = DuDeConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], method="dude")
    return DuDeSFTTrainer(model=model_dir, args=args, train_dataset=data, processing_class=make_tokenizer(),
                          peft_config=config)


def test_resume_skips_a_checkpoint_whose_optimizer_state_is_cut_short(tiny_model_dir, tmp_path, caplog):
    _resume_trainer(tiny_model_dir, tmp_path).train()
    newest = tmp_path / "checkpoint-4"
    os.truncate(newest / "optimizer.pt", os.path.getsize(newest / "optimizer.pt") // 2)

    resumed = _resume_trainer(tiny_model_dir, tmp_path)
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-4: optimizer.pt is damaged .*"
                                         r"resume_from_checkpoint=True"):
        resumed.train(resume_from_checkpoint=str(newest))
    steps = StepsRun()
    resumed.add_callback(steps)
    with caplog.at_level(logging.WARNING, logger="dude_trl.resume"):
        resumed.train(resume_from_checkpoint=True)
    assert any("checkpoint-4" in r.getMessage() and "optimizer.pt" in r.getMessage() for r in caplog.records)
    assert steps.steps == [3, 4]  # continued from checkpoint-2


# ------------------------------------------------------------------------------------------- target_parameters


@pytest.mark.parametrize("method", METHODS)
def test_target_parameters_is_refused_with_every_method(method):
    with pytest.raises(ValueError, match=rf"DuDeConfig does not support target_parameters .*method='{method}'.*"
                                         r"target_modules=.*peft.LoraConfig\(target_parameters"):
        DuDeConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"], method=method)


def test_plain_lora_config_with_target_parameters_trains_as_in_sft_trainer(tmp_path):
    """The fix the error names works: PEFT's LoRA on fused MoE experts, through DuDeSFTTrainer."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(make_tokenizer()), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    trainer = DuDeSFTTrainer(
        model=Qwen3MoeForCausalLM(config), args=_args(tmp_path, max_steps=2), train_dataset=TEXT,
        processing_class=make_tokenizer(),
        peft_config=LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    )
    trainer.train()
    trained = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name and "experts" in name for name in trained)
