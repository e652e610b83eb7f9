"""lm-evaluation-harness scores what dude_trl exports, problem by problem as the in-loop evaluator does.

A tiny character-level Llama has memorised answers to six problems (right, wrong, right only by
its last number, and one that goes on after its answer line); `DuDeSFTTrainer` fine-tunes a DuDe
adapter on it with the in-loop GSM8K evaluation on, as a user's run does. ``python -m
dude_trl.lm_eval`` then exports the run and scores it with lm-eval, which loads the export with
plain PEFT or transformers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import pytest
from _tiny_answering_lm import PROBLEMS, make_answering_llama
from _tiny_lm_gsm8k import make_tokenizer
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dude_trl import DuDeConfig, DuDeSFTConfig, DuDeSFTTrainer
from dude_trl.eval import GSM8KTask, evaluate, write_samples_jsonl
from dude_trl.eval.gsm8k import AnswerCompleteCriteria, cut_at_answer_end
from dude_trl.lm_eval.__main__ import main as lm_eval_main

pytest.importorskip("lm_eval")

BUDGET = 40  # new tokens, in the loop and in lm-eval
STEPS = 30


def _problem_file(path) -> str:
    with open(path, "w") as handle:
        for question, reference, _ in PROBLEMS:
            handle.write(json.dumps({"question": question, "answer": reference}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """{"base": base model dir, "run": DuDe run dir, "data": problems file, "root": tmp dir}."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = make_tokenizer(chat_template=True)
    base_dir = root / "base"
    make_answering_llama(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    data = _problem_file(root / "problems.jsonl")
    # Training questions differ from the evaluated ones (the trainer refuses an overlap) but are
    # close enough that the adapter changes some answers.
    train = Dataset.from_list([
        {"messages": [{"role": "user", "content": f"{question} Say it."}, {"role": "assistant", "content": ref}]}
        for question, ref, _ in PROBLEMS
    ])
    args = DuDeSFTConfig(
        output_dir=str(root / "run"), max_steps=STEPS, per_device_train_batch_size=6, learning_rate=1e-2,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        eval_task="gsm8k", eval_task_dataset=data, eval_task_on_start=True, eval_task_steps=STEPS,
        eval_task_max_new_tokens=BUDGET, eval_task_batch_size=4,
    )
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    trainer = DuDeSFTTrainer(model=str(base_dir), args=args, train_dataset=train, processing_class=tokenizer,
                             peft_config=config)
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
    return {"base": str(base_dir), "run": args.output_dir, "data": data, "root": root}


def _in_loop(run, step):
    with open(os.path.join(run["run"], f"gsm8k_samples_step{step}.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _agreement(out):
    with open(os.path.join(out, "agreement.json")) as handle:
        return json.load(handle)


def test_cut_ends_where_the_stopping_criterion_stops():
    tokenizer = make_tokenizer()
    texts = [
        "5+6=11\n#### 11\nThen 2+2=4", "The answer is 12\nso 12 it is", "8-2 is 6.", "x\nQuestion: y #### 3\n",
        "#### none\nthe answer is: 7 dollars\nmore", "no digits here\n",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        criterion = AnswerCompleteCriteria(tokenizer, prompt_length=0)
        stop = next((n for n in range(1, ids.shape[1] + 1) if criterion(ids[:, :n], None)[0]), ids.shape[1])
        assert cut_at_answer_end(text) == tokenizer.decode(ids[0, :stop]), text


def test_lm_eval_agrees_with_the_in_loop_evaluator_on_the_run(run):
    out = os.path.join(run["root"], "adapter_eval")
    lm_eval_main([run["run"], "--out", out])  # data, budget and samples: the run's own
    agreement = _agreement(out)
    assert agreement["problems"] == len(PROBLEMS) and agreement["unmatched"] == 0
    assert agreement["disagreements"] == 0 and agreement["differences"] == []
    assert agreement["lm_eval"] == agreement["in_loop"]
    # The adapter was evaluated, not the base: its answers differ from the base's.
    base_completions = [s["completion"] for s in _in_loop(run, 0)]
    assert [s["completion"] for s in _in_loop(run, STEPS)] != base_completions
    # lm-eval's own results file and the export's model card carry the score.
    with open(os.path.join(out, "results.json")) as handle:
        results = json.load(handle)["results"]["gsm8k_local"]
    assert results["exact_match,strict-match"] == pytest.approx(agreement["lm_eval"]["accuracy"])
    with open(os.path.join(out, "adapter", "README.md")) as handle:
        card = handle.read()
    assert "| dude_trl in-loop |" in card and "| lm-eval gsm8k_local |" in card and "`dude`" in card


def test_lm_eval_agrees_on_the_base_model_problem_by_problem(run):
    out = os.path.join(run["root"], "base_eval")
    in_loop = os.path.join(run["run"], "gsm8k_samples_step0.jsonl")
    lm_eval_main([run["base"], "--compare", in_loop, "--out", out, "--max-gen-toks", str(BUDGET)])
    agreement = _agreement(out)
    assert agreement["problems"] == len(PROBLEMS)
    assert agreement["disagreements"] == 0 and agreement["differences"] == []
    # Not a trivial agreement: some answers are right, some wrong, one right only flexibly.
    assert 0 < agreement["lm_eval"]["accuracy"] < agreement["lm_eval"]["accuracy_flexible"] < 1
    with open(os.path.join(out, "gsm8k_local_problems.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    # lm-eval generated past the answer line where the in-loop evaluator stopped; read uncut, the
    # last number would be 4, not 11.
    runs_on = next(r for r in records if r["question"] == PROBLEMS[1][0])
    assert runs_on["response"].startswith(runs_on["completion"]) and "Then" in runs_on["response"]
    assert runs_on["correct_flexible"]


def test_the_merged_export_agrees_too(run):
    out = os.path.join(run["root"], "merged_eval")
    lm_eval_main([run["run"], "--merged", "--out", out])
    agreement = _agreement(out)
    assert agreement["problems"] == len(PROBLEMS) and agreement["disagreements"] == 0
    assert agreement["differences"] == []
    assert os.path.isfile(os.path.join(out, "merged", "model.safetensors"))


def test_plain_prompts_for_models_without_a_chat_template(run, tmp_path):
    """--no-chat-template: gsm8k_local_plain, asked as the in-loop evaluator asks a plain model."""
    tokenizer = make_tokenizer(chat_template=True)
    model = AutoModelForCausalLM.from_pretrained(run["base"]).eval()
    rows = [{"question": q, "answer": a} for q, a, _ in PROBLEMS]
    result = evaluate(model, tokenizer, GSM8KTask(), rows, max_new_tokens=BUDGET, use_chat_template=False,
                      progress=False)
    write_samples_jsonl(result["samples"], str(tmp_path / "plain.jsonl"))
    out = str(tmp_path / "out")
    lm_eval_main([run["base"], "--no-chat-template", "--compare", str(tmp_path / "plain.jsonl"), "--out", out,
                  "--max-gen-toks", str(BUDGET)])
    agreement = _agreement(out)
    assert json.load(open(os.path.join(out, "results.json")))["results"].keys() == {"gsm8k_local_plain"}
    assert agreement["disagreements"] == 0 and agreement["differences"] == []
    assert agreement["in_loop"]["accuracy_flexible"] > 0


def test_the_stock_gsm8k_task_runs_unchanged_on_the_export(run, tmp_path):
    """The hub's gsm8k task (its 5-shot prompt, filters and metric), with only its data pointed at a
    local copy, scores the exported adapter: what `lm_eval --tasks gsm8k` does online."""
    import lm_eval

    stock = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gsm8k_copy.yaml").write_text(
        f"include: {stock}\ntask: gsm8k_copy\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {run['data']}\n    test: {run['data']}\n"
    )
    export = os.path.join(run["root"], "adapter_eval", "adapter")
    if not os.path.isdir(export):
        lm_eval_main([run["run"], "--out", os.path.join(run["root"], "adapter_eval")])
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": run["base"], "peft": export, "tokenizer": export, "dtype": "float32"},
        tasks=["gsm8k_copy"], task_manager=TaskManager(include_path=str(tasks)), num_fewshot=2, device="cpu",
        batch_size=4, gen_kwargs={"max_gen_toks": 16},
    )
    scores = results["results"]["gsm8k_copy"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= scores.keys()


def test_export_loads_in_plain_peft_without_warnings(run, caplog):
    out = os.path.join(run["root"], "adapter_eval")
    if not os.path.isdir(os.path.join(out, "adapter")):
        lm_eval_main([run["run"], "--out", out])
    export = os.path.join(out, "adapter")
    base = AutoModelForCausalLM.from_pretrained(run["base"])
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, export)
    # PEFT 0.21.2 itself calls transformers' deprecated `is_gradient_checkpointing` for every adapter.
    about_the_export = [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]
    assert about_the_export == [] and caplog.records == []
    assert AutoTokenizer.from_pretrained(export).chat_template  # the run's tokenizer, template included
    assert GenerationConfig.from_pretrained(export).eos_token_id == 1


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "is not a directory"),
    (["{base}", "--limit", "0"], "--limit must be a positive integer"),
    (["{base}"], "no problems to score"),
    (["{base}", "--merged"], "--merged applies to a DuDe run"),
    (["{base}", "--data", "{missing}"], "cannot read --data"),
])
def test_cli_user_errors_exit_2(run, tmp_path, capsys, argv, message):
    values = {"base": run["base"], "missing": str(tmp_path / "nothing-here")}
    with pytest.raises(SystemExit) as exit_info:
        lm_eval_main([arg.format(**values) for arg in argv] + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_without_lm_eval_names_the_extra(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        lm_eval_main([run["base"], "--data", run["data"], "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "pip install 'dude_trl[eval]'" in capsys.readouterr().err


def test_cli_never_writes_into_a_folder_it_did_not_create(run, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        lm_eval_main([run["base"], "--data", run["data"], "--out", str(foreign)])
    assert exit_info.value.code == 2 and "did not write" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]


def test_the_smollm2_agreement_benchmark_runs(run, tmp_path):
    """benchmarks/lm_eval_agreement.py, on the tiny run: one row per case, each with its comparison."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import lm_eval_agreement
    finally:
        sys.path.pop(0)
    # Without the GSM8K file the dev-slice cases are skipped (and named), which keeps this test short.
    lm_eval_agreement.main(["--run", run["run"], "--base", run["base"], "--num-problems", "3", "--gsm8k-file",
                            str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "results"),
                            "--work-dir", str(tmp_path / "work")])
    rows = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [(row["model"], row["data"]) for row in rows] == [
        ("base", "curriculum"), ("adapter", "curriculum"), ("adapter merged", "curriculum")]
    assert all(row["problems"] == 3 and row["disagreements"] == 0 for row in rows)
    assert "| adapter merged | curriculum | 3 |" in (tmp_path / "results" / "results.md").read_text()


def test_the_run_records_its_evaluation_settings_as_json(run):
    """What the CLI defaults to comes from JSON the trainer wrote, never from unpickling training_args.bin."""
    with open(os.path.join(run["run"], "eval_settings.json")) as handle:
        settings = json.load(handle)
    assert settings["eval_task_max_new_tokens"] == BUDGET and settings["eval_task_dataset"] == run["data"]
    assert settings["eval_task_batch_size"] == 4
