"""DuDe under DeepSpeed ZeRO-2/ZeRO-3 and DDP: the SVD work split, and multi-process training
that ends where single-process training ends.

The multi-process tests launch `tests/zero_train_script.py` twice with torchrun and the gloo
backend (1 process with a micro-batch of 4, 2 processes with micro-batches of 2: the same global
batch), each launch running several jobs (ZeRO stage x exact/randomized SVD), and compare the
saved adapters (A, B, magnitude, init buffers) in float32 at 1e-5.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from conftest import make_qwen2
from peft import get_peft_model
from safetensors.torch import load_file

from dude_trl import DuDeConfig, initialize_dude_
from dude_trl.distributed import assign_svd_work, rank_share, svd_cost

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
SCRIPT = os.path.join(TESTS_DIR, "zero_train_script.py")
SHIPPED = {stage: os.path.join(REPO_DIR, "deepspeed_configs", f"zero{stage}.json") for stage in (2, 3)}
ATOL = 1e-5
# Shapes (out, in) of the script's targets in the tiny Qwen2 (2 decoder layers).
TARGET_SHAPES = {"q_proj": (32, 32), "v_proj": (16, 32), "down_proj": (32, 64)}


# ---------------------------------------------------------------- the work split (no processes)


def test_assign_svd_work_gives_each_rank_its_share():
    costs = [5.0, 1.0, 3.0, 3.0, 8.0, 2.0, 7.0]
    blocks = assign_svd_work(costs, 3)
    # Most costly first, ties by index; rank k takes the k-th layer of every block.
    assert blocks == [[4, 6, 0], [2, 3, 5], [1]]
    assert [rank_share(blocks, rank) for rank in range(3)] == [[4, 2, 1], [6, 3], [0, 5]]


@pytest.mark.parametrize("num_layers, world_size", [(0, 2), (1, 4), (7, 2), (28, 3), (448, 8)])
def test_assign_svd_work_is_a_balanced_partition(num_layers, world_size):
    rng = random.Random(num_layers)
    costs = [rng.choice([1.0, 4.0, 9.0]) for _ in range(num_layers)]
    blocks = assign_svd_work(costs, world_size)
    shares = [rank_share(blocks, rank) for rank in range(world_size)]
    assert sorted(i for share in shares for i in share) == list(range(num_layers))
    # Each rank decomposes ceil or floor of its fair share, lower ranks first.
    assert [len(s) for s in shares] == [math.ceil((num_layers - k) / world_size) for k in range(world_size)]
    # At most world_size layers in flight at once, and blocks go from costly to cheap.
    assert all(0 < len(block) <= world_size for block in blocks)
    block_costs = [[costs[i] for i in block] for block in blocks]
    assert all(min(a) >= max(b) for a, b in zip(block_costs, block_costs[1:]))


def test_assign_svd_work_rejects_empty_world():
    with pytest.raises(ValueError, match="world_size"):
        assign_svd_work([1.0], 0)


def test_svd_cost_ranks_layers_by_work():
    mlp, attn = svd_cost(27648, 5120, 16, None), svd_cost(5120, 5120, 16, None)
    assert mlp > attn > 0
    assert svd_cost(27648, 5120, 16, 4) < mlp  # randomized is cheaper than exact
    assert svd_cost(27648, 5120, 16, 4) > svd_cost(5120, 5120, 16, 4)


def test_initialize_without_process_group_is_serial(caplog):
    model = get_peft_model(make_qwen2(), DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with caplog.at_level(logging.DEBUG, logger="dude_trl.distributed"):
        initialize_dude_(model, progress=False)
    reports = [r.dude_init_report for r in caplog.records if hasattr(r, "dude_init_report")]
    assert len(reports) == 1 and reports[0].world_size == 1 and reports[0].rank == 0
    assert len(reports[0].decomposed) == reports[0].num_layers == 4
    assert any("DuDe SVD init" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------- multi-process runs (torchrun + gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(path: str, stage: int) -> str:
    """fp32, no offload; under ZeRO-3 nothing is persistent, so every weight (A, B, biases
    included) is really partitioned and gathered on use."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def _launch(nproc: int, model_dir: str, out_dir: str, jobs: list[str], resume_job: str | None = None) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}", SCRIPT, "--model-dir", model_dir, "--out-dir", out_dir,
    ]
    for job in jobs:
        cmd += ["--job", job]
    if resume_job:
        cmd += ["--resume-job", resume_job]
    # One thread per process in both launches, so both see the same floating-point reductions.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{nproc}-process launch failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """Outputs of the 1-process and 2-process launches: {"one": dir, "two": dir}."""
    from zero_train_script import save_tiny_model

    root = tmp_path_factory.mktemp("zero")
    model_dir = str(root / "model")
    save_tiny_model(model_dir)
    z2 = _write_config(str(root / "zero2.json"), 2)
    z3 = _write_config(str(root / "zero3.json"), 3)
    # NAME:CONFIG:SVD ("none": plain DDP; "2": randomized SVD with 2 power iterations).
    common = ["ddp-rand:none:2", f"z2-exact:{z2}:exact", f"z2-rand:{z2}:2", f"z3-exact:{z3}:exact", f"z3-rand:{z3}:2"]
    _launch(1, model_dir, str(root / "one"), ["ddp-exact:none:exact"] + common)
    shipped = []
    if all(map(os.path.exists, SHIPPED.values())):
        shipped = [f"shipped-z2:{SHIPPED[2]}:2", f"shipped-z3:{SHIPPED[3]}:exact"]
    _launch(2, model_dir, str(root / "two"), common + shipped, resume_job="z3-rand")
    return {"one": str(root / "one"), "two": str(root / "two")}


def _rank_json(run_dir: str, job: str, rank: int = 0, prefix: str = "rank") -> dict:
    with open(os.path.join(run_dir, job, f"{prefix}{rank}.json")) as f:
        return json.load(f)


def _adapter(run_dir: str, job: str, folder: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, job, folder, "adapter_model.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def _adapter_kinds(state: dict[str, torch.Tensor]) -> set[str]:
    kinds = {"lora_A", "lora_B", "lora_magnitude_vector", "lora_dude_init_A", "lora_dude_init_B"}
    return {kind for kind in kinds if any(f".{kind}" in key for key in state)}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("job", ["ddp-rand", "z2-exact", "z2-rand", "z3-exact", "z3-rand"])
def test_two_processes_train_like_one(zero_runs, job):
    one, two = zero_runs["one"], zero_runs["two"]
    # Same global batches: the two ranks' micro-batches make up the single process's batch.
    single = _rank_json(one, job)["batches"]
    per_rank = [_rank_json(two, job, rank)["batches"] for rank in (0, 1)]
    assert len(single) == 3
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(per_rank[0][step] + per_rank[1][step])
    init_one = load_file(os.path.join(one, job, "init_rank0.safetensors"))
    init_two = load_file(os.path.join(two, job, "init_rank0.safetensors"))
    _assert_close(init_one, init_two)
    trained_one, trained_two = _adapter(one, job), _adapter(two, job)
    assert _adapter_kinds(trained_two) == {
        "lora_A", "lora_B", "lora_magnitude_vector", "lora_dude_init_A", "lora_dude_init_B"
    }
    _assert_close(trained_one, trained_two)
    # Training moved A away from its SVD init, so this is not a comparison of untrained adapters.
    for key in (k for k in trained_two if k.endswith(".lora_A.weight")):
        init_A = trained_two[key.replace("lora_A.weight", "lora_dude_init_A")]
        assert (trained_two[key] - init_A).abs().max() > 1e-3, key


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("zero, plain", [("z2-exact", "ddp-exact"), ("z3-exact", "ddp-exact"), ("z3-rand", "ddp-rand")])
def test_zero_trains_like_plain_pytorch(zero_runs, zero, plain):
    """Partitioned weights (ZeRO-3, nothing persistent) give the forward the same base weight."""
    _assert_close(_adapter(zero_runs["one"], zero), _adapter(zero_runs["one"], plain))
    _assert_close(_adapter(zero_runs["two"], zero), _adapter(zero_runs["one"], plain))


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("job", ["ddp-rand", "z2-rand", "z3-exact", "z3-rand"])
def test_every_rank_holds_the_same_initialisation(zero_runs, job):
    ranks = [load_file(os.path.join(zero_runs["two"], job, f"init_rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 6 * 6  # 6 layers x (W_res, A, B, m, init A/B)
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("job", ["ddp-rand", "z2-exact", "z3-rand"])
def test_svd_work_is_split_between_ranks(zero_runs, job):
    names = [f"base_model.model.model.layers.{i}.{sub}.{t}" for i in range(2)
             for sub, t in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))]
    shapes = [TARGET_SHAPES[name.rsplit(".", 1)[1]] for name in names]
    niter = None if job.endswith("exact") else 2
    blocks = assign_svd_work([svd_cost(o, i, 4, niter) for o, i in shapes], 2)
    for rank in (0, 1):
        info = _rank_json(zero_runs["two"], job, rank)
        assert info["init_world_size"] == 2
        assert sorted(info["decomposed"]) == sorted(names[i] for i in rank_share(blocks, rank))
        assert len(info["decomposed"]) == 3
    single = _rank_json(zero_runs["one"], job)
    assert single["init_world_size"] == 1 and len(single["decomposed"]) == 6


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_init_gathers_one_block_at_a_time(zero_runs):
    largest = TARGET_SHAPES["down_proj"][0] * TARGET_SHAPES["down_proj"][1]
    total = 2 * sum(o * i for o, i in TARGET_SHAPES.values())
    # One process gathers one layer at a time; two gather one block of two layers.
    assert _rank_json(zero_runs["one"], "z3-exact")["max_init_gather_numel"] == largest
    for rank in (0, 1):
        gathered = _rank_json(zero_runs["two"], "z3-exact", rank)["max_init_gather_numel"]
        assert gathered == 2 * largest < total


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("job, reference", [("shipped-z2", "z2-rand"), ("shipped-z3", "z3-exact")])
def test_shipped_deepspeed_configs_train(zero_runs, job, reference):
    if not os.path.exists(SHIPPED[int(job[-1])]):
        pytest.skip(f"{SHIPPED[int(job[-1])]} is not in this checkout")
    losses = _rank_json(zero_runs["two"], job)["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # "auto" fields resolve to this run's fp32 settings: same result as the explicit test config.
    _assert_close(_adapter(zero_runs["two"], job), _adapter(zero_runs["one"], reference))


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("job", ["ddp-rand", "z2-rand", "z3-exact", "z3-rand"])
def test_disable_adapter_gives_the_pretrained_model_after_distributed_training(zero_runs, job):
    """Reference log-probs under `disable_adapter()` (DPO/KL pipelines) on every process, ZeRO-3 included."""
    for run, ranks in (("one", (0,)), ("two", (0, 1))):
        for rank in ranks:
            assert _rank_json(zero_runs[run], job, rank)["disabled_adapter_max_logit_diff"] <= ATOL, (run, rank)


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_saves_only_the_adapter(zero_runs):
    job_dir = os.path.join(zero_runs["two"], "z3-rand")
    trainable = 2 * sum(4 * (o + i) + o for o, i in TARGET_SHAPES.values())  # A, B, magnitude
    for folder in ("adapter", os.path.join("trainer", "checkpoint-2")):
        path = os.path.join(job_dir, folder)
        files = set(os.listdir(path))
        assert "adapter_model.safetensors" in files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        state = load_file(os.path.join(path, "adapter_model.safetensors"))
        assert all(".lora_" in key for key in state), sorted(state)
        # Besides A, B and the magnitude, the adapter holds DuDe's frozen buffers: the initial
        # factors (as large as A and B) and the base fingerprint (5 numbers per layer).
        buffers = ("lora_dude_init", "lora_dude_base_fingerprint")
        assert sum(t.numel() for k, t in state.items() if not any(b in k for b in buffers)) == trainable
        assert sum(t.numel() for k, t in state.items() if "lora_dude_init" in k) == trainable - 2 * sum(
            o for o, _ in TARGET_SHAPES.values()
        )
    # DeepSpeed's own checkpoint: per-rank partitions of the trainable parameters only.
    step_dir = os.path.join(job_dir, "trainer", "checkpoint-2", "global_step2")
    optimizer_numel, module_keys = 0, set()
    for rank in (0, 1):
        prefix = os.path.join(step_dir, f"zero_pp_rank_{rank}_mp_rank_00")
        module_keys |= set(torch.load(f"{prefix}_model_states.pt", weights_only=False)["module"])
        optim = torch.load(f"{prefix}_optim_states.pt", weights_only=False)
        optimizer_numel += sum(t.numel() for t in optim["optimizer_state_dict"]["fp32_flat_groups"])
    assert all(".lora_" in key for key in module_keys), sorted(module_keys)
    assert trainable <= optimizer_numel <= trainable + 2 * 64  # partition padding only


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_resume_matches_uninterrupted_training(zero_runs):
    job_dir = os.path.join(zero_runs["two"], "z3-rand")
    # The resumed trainer ran only the last step, from the checkpointed adapter and optimizer.
    for rank in (0, 1):
        assert len(_rank_json(zero_runs["two"], "z3-rand", rank, prefix="resumed_rank")["batches"]) == 1
    resumed = _adapter(zero_runs["two"], "z3-rand", "adapter_resumed")
    at_checkpoint = load_file(os.path.join(job_dir, "trainer", "checkpoint-2", "adapter_model.safetensors"))
    _assert_close(resumed, _adapter(zero_runs["two"], "z3-rand"), atol=1e-6)
    assert not all(torch.allclose(resumed[k], at_checkpoint[k], atol=1e-4) for k in resumed)


_FAILING_INIT_SCRIPT = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import make_llama
import dude_trl.distributed as distributed
from dude_trl import DuDeConfig, get_dude_model

dist.init_process_group("gloo")
rank = dist.get_rank()
real = distributed.decompose_layer

def decompose_layer(module, name, *args):
    if rank == 1:
        raise MemoryError("simulated out of memory in " + name)
    return real(module, name, *args)

distributed.decompose_layer = decompose_layer
try:
    get_dude_model(make_llama(), DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), progress=False)
    outcome = "no error"
except Exception as err:
    outcome = type(err).__name__ + ": " + str(err)
with open(os.path.join({out!r}, "rank%d.json" % rank), "w") as f:
    json.dump(outcome, f)
dist.destroy_process_group()
"""


@pytest.mark.multiproc
def test_a_failed_decomposition_raises_on_every_rank(tmp_path):
    """An SVD failing on one process (out of memory, say) must not leave the others waiting in a
    broadcast until the collective timeout: every rank raises at once."""
    script = tmp_path / "failing_init.py"
    script.write_text(_FAILING_INIT_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", str(script)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[1].startswith("MemoryError: simulated out of memory")
    assert outcomes[0].startswith("RuntimeError: DuDe SVD init failed on another process")
