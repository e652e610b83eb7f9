"""Exported adapters load in vanilla PEFT (without dude_trl) and merged models match the DuDe model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_qwen2, make_tokenizer, perturb_trainable_
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from dude_trl import DuDeConfig, get_dude_model
from dude_trl.export import export_dora_adapter, export_merged_model, merge_to_base
from dude_trl.export import saved as export_saved
from dude_trl.export.__main__ import main

METHODS = ["dude", "dude_a", "dude_b", "pissa", "dora", "lora"]
INPUT_IDS = [[5, 17, 42, 8, 66, 23, 9, 31], [12, 3, 77, 45, 60, 14, 29, 50]]
ATOL = 1e-4  # fp32

# Runs in a fresh interpreter that never imports dude_trl: what a user without it installed has.
VANILLA_PEFT_SCRIPT = """
import json, sys, warnings
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

cases, input_ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
results, problems = {}, []
for name, (base_dir, adapter_dir) in cases.items():
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    problems += [f"{name}: {w.message}" for w in caught if "keys" in str(w.message) or "Unexpected" in str(w.message)]
    with torch.no_grad():
        results[name] = model(input_ids=input_ids).logits
assert "dude_trl" not in sys.modules, "the vanilla PEFT check imported dude_trl"
assert not problems, problems
torch.save(results, out)
"""


def make_gpt2() -> GPT2LMHeadModel:
    """GPT-2 stores its projections as Conv1D (``in x out``), which exercises fan_in_fan_out."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def trained(model: PreTrainedModel, config: DuDeConfig) -> PeftModel:
    """A trained DuDe model (`perturb_trainable_`) on `model`."""
    return perturb_trainable_(get_dude_model(model, config, progress=False))


def dude_config(method: str, **kwargs) -> DuDeConfig:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], "svd_niter": 2, **kwargs}
    return DuDeConfig(method=method, **kwargs)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(INPUT_IDS)).logits


CASES = {
    **{method: (make_qwen2, lambda m=method: dude_config(m)) for method in METHODS},
    # rsLoRA, a per-layer rank and a per-layer alpha: the export needs per-layer patterns.
    "patterns": (
        make_qwen2,
        lambda: dude_config("dude", use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}),
    ),
    "conv1d": (
        make_gpt2, lambda: DuDeConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """For every case: (base dir, exported adapter dir, DuDe model logits)."""
    root = tmp_path_factory.mktemp("export")
    results = {}
    for name, (make_base, make_config) in CASES.items():
        base_dir = root / f"base-{make_base.__name__}"
        if not base_dir.exists():
            make_base().save_pretrained(base_dir)
        model = trained(make_base(), make_config())
        results[name] = (str(base_dir), export_dora_adapter(model, root / name), logits(model))
    return results


def test_exported_adapters_load_in_vanilla_peft(exported, tmp_path):
    cases = {name: [base_dir, adapter_dir] for name, (base_dir, adapter_dir, _) in exported.items()}
    out = tmp_path / "logits.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", VANILLA_PEFT_SCRIPT, json.dumps(cases), json.dumps(INPUT_IDS), str(out)],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )
    vanilla = torch.load(out)
    for name, (_, _, expected) in exported.items():
        torch.testing.assert_close(vanilla[name], expected, rtol=0, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def test_exported_config_is_plain_lora(exported):
    _, adapter_dir, _ = exported["dude"]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert "method" not in config and "svd_niter" not in config
    # rank 2r, s' = lora_alpha' / r' = s = 8 / 4 without rsLoRA.
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (8, 16, False, True)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert not any("lora_dude" in k for k in weights)
    A = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    B = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert A.shape == (8, 32) and B.shape == (32, 8)

    _, adapter_dir, _ = exported["pissa"]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert json.load(f)["use_dora"] is False

    _, adapter_dir, _ = exported["patterns"]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    s_default, s_q, s_v = 8 / 4**0.5, 16 / 4**0.5, 8 / 2**0.5  # rsLoRA scalings of the DuDe model
    assert (config["r"], config["use_rslora"]) == (8, False)
    assert config["lora_alpha"] == pytest.approx(s_default * 8)
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 4 for i in range(2)}
    assert config["alpha_pattern"] == pytest.approx(
        {**{f"model.layers.{i}.self_attn.v_proj": s_v * 4 for i in range(2)},
         **{f"model.layers.{i}.self_attn.q_proj": s_q * 8 for i in range(2)}}
    )


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_matches(method):
    model = trained(make_qwen2(), dude_config(method))
    expected = logits(model)
    merged = merge_to_base(model)
    assert isinstance(merged, PreTrainedModel) and not isinstance(merged, PeftModel)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=ATOL)


def test_merge_on_a_quantized_base_dequantizes(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = get_dude_model(tiny_model_dir, dude_config("dude"), quantization_config=nf4, progress=False)
    model = perturb_trainable_(model)
    expected = logits(model)
    merged = merge_to_base(model)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=ATOL)


def test_export_refuses_merged_layers():
    model = trained(make_qwen2(), dude_config("dude"))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        export_dora_adapter(model, "unused")


def test_cli_exports_merged_model_and_dora_adapter(tmp_path, tiny_model_dir):
    model = trained(make_qwen2(), dude_config("dude_b"))
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    main(["--adapter", str(tmp_path / "adapter"), "--base", tiny_model_dir, "--to", "merged", "--out",
          str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32  # the base's own dtype
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=ATOL)
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")

    main(["--adapter", str(tmp_path / "adapter"), "--base", tiny_model_dir, "--to", "dora", "--out",
          str(tmp_path / "dora")])
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "dora")
    torch.testing.assert_close(logits(vanilla.eval()), expected, rtol=0, atol=ATOL)
    with open(tmp_path / "dora" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_model_dir


@pytest.mark.parametrize("to", ["dora", "merged"])
def test_cli_export_carries_what_a_server_needs(tmp_path, tiny_model_dir, to):
    """Tokenizer (the adapter folder's own first, as a run saves it), generation config and a model card."""
    model = trained(make_qwen2(), dude_config("dude_b"))
    model.save_pretrained(tmp_path / "adapter")
    run_tokenizer = make_tokenizer()
    run_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    run_tokenizer.save_pretrained(tmp_path / "adapter")
    GenerationConfig(eos_token_id=[1, 2], max_new_tokens=7).save_pretrained(tiny_model_dir)
    try:
        main([str(arg) for arg in export_args(tmp_path / "adapter", tiny_model_dir, tmp_path / "out", to)])
    finally:
        os.remove(os.path.join(tiny_model_dir, "generation_config.json"))
    out = tmp_path / "out"
    assert AutoTokenizer.from_pretrained(out).chat_template == run_tokenizer.chat_template
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.max_new_tokens) == ([1, 2], 7)
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "`dude_b`" in card
    assert ("rank | 4 (exported: 8) |" if to == "dora" else "rank | 4 |") in card
    assert f"library_name: {'peft' if to == 'dora' else 'transformers'}" in card


# ------------------------------------------------------------------- the CLI never silently wrong


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, tiny_model_dir):
    """A trained DuDe adapter of `tiny_model_dir`, saved as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("cli") / "adapter"
    trained(make_qwen2(), dude_config("dude")).save_pretrained(path)
    return str(path)


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was changed."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def refused(argv, capsys) -> str:
    """Run the CLI on `argv`, assert it exits with status 2 and no traceback; its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def export_args(adapter, base, out, to="merged", *extra):
    return ["--adapter", adapter, "--base", base, "--to", to, "--out", out, *extra]


def leftovers(parent) -> list[str]:
    """Temporary folders the CLI left next to its destination."""
    return [name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name]


@pytest.mark.parametrize("where, message", [
    ("adapter", "is the --adapter directory"),
    ("adapter/merged", "lies inside the --adapter directory"),
    ("adapter/../adapter/sub/dir", "lies inside the --adapter directory"),
    ("parent", "contains the --adapter directory"),
])
def test_cli_refuses_an_out_that_is_or_holds_the_adapter(saved_adapter, tiny_model_dir, capsys, where, message):
    before = snapshot(os.path.dirname(saved_adapter))
    out = os.path.join(os.path.dirname(saved_adapter), where) if where != "parent" else os.path.dirname(saved_adapter)
    err = refused(export_args(saved_adapter, tiny_model_dir, out, "merged", "--overwrite"), capsys)
    assert message in err
    assert snapshot(os.path.dirname(saved_adapter)) == before  # nothing written, nothing removed


def test_cli_refuses_an_out_inside_a_local_base(saved_adapter, tiny_model_dir, capsys):
    before = snapshot(tiny_model_dir)
    err = refused(export_args(saved_adapter, tiny_model_dir, os.path.join(tiny_model_dir, "merged")), capsys)
    assert "lies inside the --base directory" in err
    assert snapshot(tiny_model_dir) == before


@pytest.mark.parametrize("to", ["merged", "dora"])
def test_cli_refuses_an_existing_file_as_out(saved_adapter, tiny_model_dir, tmp_path, capsys, to):
    out = tmp_path / "model.bin"
    out.write_bytes(b"keep me")
    err = refused(export_args(saved_adapter, tiny_model_dir, out, to), capsys)
    assert "exists and is not a directory" in err
    assert out.read_bytes() == b"keep me" and leftovers(tmp_path) == []


def test_library_export_refuses_an_existing_file(tmp_path):
    (tmp_path / "file").write_bytes(b"keep me")
    for export in (export_dora_adapter, export_merged_model):
        with pytest.raises(NotADirectoryError, match="not a directory"):
            export(trained(make_qwen2(), dude_config("dude")), tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"keep me"


def test_cli_replaces_a_non_empty_out_only_with_overwrite(saved_adapter, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dora"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    err = refused(export_args(saved_adapter, tiny_model_dir, out, "dora"), capsys)
    assert "non-empty directory" in err and "--overwrite" in err
    assert snapshot(out) == {"old.txt": b"previous export"}

    main(export_args(saved_adapter, tiny_model_dir, str(out), "dora", "--overwrite"))
    written = set(os.listdir(out))
    assert "old.txt" not in written and {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= written
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()  # an empty folder is no loss: no --overwrite needed
    main(export_args(saved_adapter, tiny_model_dir, str(tmp_path / "empty"), "dora"))
    assert os.path.isfile(tmp_path / "empty" / "adapter_config.json")


def damaged_copy(saved_adapter, tmp_path, damage) -> str:
    adapter = str(tmp_path / "adapter")
    shutil.copytree(saved_adapter, adapter)
    damage(adapter)
    return adapter


def truncate_weights(adapter):
    path = os.path.join(adapter, "adapter_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def break_config_json(adapter):
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        f.write('{"r": 4, "lora_al')


def remove_config(adapter):
    os.remove(os.path.join(adapter, "adapter_config.json"))


@pytest.mark.parametrize("damage, message", [
    (truncate_weights, "corrupt or truncated"),
    (break_config_json, "is not valid JSON"),
    (remove_config, "No adapter_config.json"),
])
def test_cli_names_a_damaged_adapter(saved_adapter, tiny_model_dir, tmp_path, capsys, damage, message):
    adapter = damaged_copy(saved_adapter, tmp_path, damage)
    before = snapshot(adapter)
    err = refused(export_args(adapter, tiny_model_dir, tmp_path / "out"), capsys)
    assert message in err
    assert snapshot(adapter) == before and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_refuses_wrong_base(saved_adapter, tmp_path, capsys):
    make_qwen2(seed=1).save_pretrained(tmp_path / "other")
    before = snapshot(saved_adapter)
    err = refused(export_args(saved_adapter, tmp_path / "other", tmp_path / "merged"), capsys)
    assert "not the one this adapter was trained on" in err
    assert snapshot(saved_adapter) == before and not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (lambda a, b, t: export_args(t / "missing", b, t / "out"), "--adapter '.*missing' does not exist"),
    (lambda a, b, t: export_args(os.path.join(a, "adapter_config.json"), b, t / "out"), "is not a directory"),
    (lambda a, b, t: export_args(a, t / "no-base", t / "out"), "--base '.*no-base' is not a model directory"),
    (lambda a, b, t: export_args(a, "no-such-org/no-such-model", t / "out"),
     "cannot load the base model 'no-such-org/no-such-model'"),
    (lambda a, b, t: export_args(a, b, t / "out", "dora", "--dtype", "bfloat16"), "--dtype applies to --to merged"),
])
def test_cli_names_user_errors(saved_adapter, tiny_model_dir, tmp_path, capsys, args, message):
    before = snapshot(saved_adapter)
    err = refused(args(saved_adapter, tiny_model_dir, tmp_path), capsys)
    assert re.search(message, err), err
    assert snapshot(saved_adapter) == before and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_failure_midway_leaves_nothing(saved_adapter, tiny_model_dir, tmp_path, capsys, monkeypatch):
    def write_then_fail(error):
        def export(model, folder, *args, **kwargs):
            with open(os.path.join(folder, "model.safetensors"), "wb") as f:
                f.write(b"half")
            raise error
        return export

    out = tmp_path / "merged"
    monkeypatch.setattr(export_saved, "export_merged_model", write_then_fail(OSError(28, "No space left on device")))
    err = refused(export_args(saved_adapter, tiny_model_dir, out), capsys)
    assert "No space left on device" in err and "nothing was written" in err
    assert not out.exists() and leftovers(tmp_path) == []

    # A bug (an unexpected exception) still raises, and still leaves nothing behind; an existing
    # export being replaced (--overwrite) is kept as it was.
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    monkeypatch.setattr(export_saved, "export_merged_model", write_then_fail(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        main(export_args(saved_adapter, tiny_model_dir, str(out), "merged", "--overwrite"))
    assert snapshot(out) == {"old.txt": b"previous export"} and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing adapter", "wrong base"])
def test_cli_process_exits_2_without_traceback(saved_adapter, tmp_path, case):
    base = str(tmp_path / "other")
    make_qwen2(seed=1).save_pretrained(base)
    adapter = saved_adapter if case == "wrong base" else str(tmp_path / "missing")
    out = subprocess.run(
        [sys.executable, "-m", "dude_trl.export", *export_args(adapter, base, str(tmp_path / "out"))],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "error: " in out.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
