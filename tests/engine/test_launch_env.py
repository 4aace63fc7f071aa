"""Launch paths of ``engine.distributed`` on CPU: SLURM steps vs the batch step, the rendezvous
address and port, inconsistent launcher variables, the CUDA device of a rank (one GPU per task,
faked with a monkeypatched ``torch.cuda``), the accelerator DeepSpeed picks, the ``args`` that make
DeepSpeed use our device, a rendezvous timeout (real gloo, 2 s) and the keys ``deepspeed.extra``
may not set.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from datetime import timedelta

import pytest
import torch

import engine.distributed as D
from engine.config import ConfigError
from engine.distributed import (
    DistInfo,
    LaunchError,
    check_deepspeed_extra,
    cuda_device_index,
    deepspeed_args,
    deepspeed_config,
    launch_env,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
          "CUDA_VISIBLE_DEVICES", "DEEPSPEED_TIMEOUT")


def _step(procid: int, step: str = "0", job: str = "4242", ntasks: int = 4, localid: int = 0, **extra) -> dict:
    """The variables srun sets for one task of a step (plus the allocation's)."""
    env = {"SLURM_JOB_ID": job, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NTASKS": "16",
           "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_NODELIST": "gpu[001-004]", "SLURM_STEP_ID": step,
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NODELIST": "gpu[003-004]"}
    env.update(extra)
    return env


@pytest.fixture
def clean_env(monkeypatch):
    """os.environ without launcher or SLURM variables; every launcher variable, including those that
    ``init_distributed`` writes itself, is restored (or removed again) afterwards."""
    for k in set(LAUNCH) | {"DS_ACCELERATOR"} | {k for k in os.environ if k.startswith("SLURM_")}:
        monkeypatch.setenv(k, "")  # recorded by monkeypatch, so that teardown restores the original state
        monkeypatch.delenv(k)
    return monkeypatch


# -- SLURM ------------------------------------------------------------------------------------------

def test_srun_step_uses_its_own_nodes_tasks_and_a_step_specific_port():
    a0, a3 = _step(0), _step(3, localid=1)
    launch_env(a0), launch_env(a3)
    assert (a0["RANK"], a0["WORLD_SIZE"], a0["LOCAL_RANK"]) == ("0", "4", "0")
    assert (a3["RANK"], a3["WORLD_SIZE"], a3["LOCAL_RANK"]) == ("3", "4", "1")
    assert a0["MASTER_ADDR"] == a3["MASTER_ADDR"] == "gpu003"  # the step's first node, not the job's
    assert a0["MASTER_PORT"] == a3["MASTER_PORT"]  # identical on every task of the step
    b0 = _step(0, step="1", SLURM_STEP_NODELIST="gpu[001-002]")  # a concurrent step of the same job
    launch_env(b0)
    assert b0["MASTER_ADDR"] == "gpu001" and b0["MASTER_PORT"] != a0["MASTER_PORT"]
    ports = set()
    for job in ("1", "2", "2499", "2501", "123456788"):
        for step in range(8):
            e = _step(0, step=str(step), job=job)
            launch_env(e)
            assert 12000 <= int(e["MASTER_PORT"]) < 32768  # below the ephemeral ports
            ports.add((job, e["MASTER_PORT"]))
    assert len({p for _, p in ports}) == 5 * 8 - 8  # jobs 1 and 2501 share ports (2500 apart); all else differ
    old = _step(2, SLURM_STEP_NODELIST="")  # no step node list: the job's
    del old["SLURM_STEP_NUM_TASKS"]
    launch_env(old)
    assert old["MASTER_ADDR"] == "gpu001" and old["WORLD_SIZE"] == "16"


@pytest.mark.parametrize("step", [None, "4294967291", "4294967294", "4294967290"])
def test_batch_script_without_srun_runs_as_one_process(step, capsys):
    """sbatch's batch step (0xfffffffb; 0xfffffffe before Slurm 20.11), the interactive step, or
    no step at all: rank 0 of 1 on a free local port, with a note, instead of waiting for N ranks."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8",
           "SLURM_JOB_NODELIST": "gpu[001-002]"}
    if step is not None:
        env["SLURM_STEP_ID"] = step
    launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    err = capsys.readouterr().err
    assert "8 tasks" in err and "srun" in err and len(err.strip().splitlines()) == 1


def test_launcher_variables_win_over_slurm():
    env = _step(1, RANK="5", WORLD_SIZE="16", LOCAL_RANK="1", MASTER_ADDR="n1", MASTER_PORT="1234")
    assert launch_env(env) == {} and env["RANK"] == "5"


# -- inconsistent launcher variables ---------------------------------------------------------------

@pytest.mark.parametrize("env,words", [
    ({"RANK": "1"}, ["RANK=1", "WORLD_SIZE is not"]),
    ({"WORLD_SIZE": "4"}, ["WORLD_SIZE=4", "RANK is not"]),
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, ["RANK=-1"]),
    ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE=0"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, ["LOCAL_RANK=-1"]),
    ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x'", "integer"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
    (_step(4), ["RANK=4 (from SLURM_PROCID)", "WORLD_SIZE=4 (from SLURM_STEP_NUM_TASKS)"]),
])
def test_inconsistent_launcher_variables_are_a_config_error(env, words):
    with pytest.raises(LaunchError) as e:
        launch_env(dict(env))
    assert isinstance(e.value, ConfigError)  # the CLI's exit 2, one line
    for w in words:
        assert w in str(e.value)


def test_mpi_wrappers_give_the_local_rank_and_without_one_several_gpus_are_refused():
    """RANK and WORLD_SIZE exported by hand or a wrapper, no LOCAL_RANK: every rank took GPU 0 silently
    (LOCAL_RANK defaulted to 0); with several processes per node NCCL then failed with "Duplicate GPU
    detected". The launcher's local rank is read where there is one, else a warning says so."""
    from engine.distributed import _fill_launch_env, check_local_rank_given

    env = {"RANK": "5", "WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "n0"}
    _, origins = _fill_launch_env(env)
    assert env["LOCAL_RANK"] == "1" and origins["LOCAL_RANK"] == "OMPI_COMM_WORLD_LOCAL_RANK"
    check_local_rank_given(origins, 8, 4)
    env = {"RANK": "5", "WORLD_SIZE": "8", "MPI_LOCALRANKID": "3"}
    assert _fill_launch_env(env)[0]["LOCAL_RANK"] == "3"  # MPICH / Intel MPI
    env = {"RANK": "5", "WORLD_SIZE": "8"}
    _, origins = _fill_launch_env(env)
    assert re.match(r"warning: LOCAL_RANK is not set \(WORLD_SIZE=8\) and 4 CUDA devices .* takes GPU 0",
                    check_local_rank_given(origins, 8, 4, {}))  # right with one process per node, else NCCL fails
    assert check_local_rank_given(origins, 8, 4, {"LOCAL_WORLD_SIZE": "1"}) is None  # one process per node
    assert check_local_rank_given(origins, 8, 1, {}) is None  # one GPU per process: device 0 is right
    assert check_local_rank_given({"LOCAL_RANK": "the environment"}, 8, 4, {}) is None  # torchrun's
    assert check_local_rank_given(_fill_launch_env({})[1], 1, 8, {}) is None  # a single process
    env = _step(4, RANK="2", WORLD_SIZE="4", SLURM_LOCALID="2")  # a wrapper exporting RANK inside srun
    assert _fill_launch_env(env)[1]["LOCAL_RANK"] == "SLURM_LOCALID" and env["LOCAL_RANK"] == "2"


# -- devices ----------------------------------------------------------------------------------------

def test_cuda_device_index():
    assert cuda_device_index(3, 8, {}) == 3
    assert cuda_device_index(3, 1, {"CUDA_VISIBLE_DEVICES": "3"}) == 0  # srun --gpus-per-task=1
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=3 but 2 CUDA device\(s\).*CUDA_VISIBLE_DEVICES=0,1"):
        cuda_device_index(3, 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(LaunchError, match=r"LOCAL_WORLD_SIZE=2 processes .* 1 CUDA device"):  # torchrun, 1 GPU
        cuda_device_index(0, 1, {"LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match=r"LOCAL_SIZE=4"):  # the deepspeed launcher
        cuda_device_index(3, 2, {"LOCAL_SIZE": "4"})


def test_one_gpu_per_task_uses_device_0_and_keeps_local_rank(clean_env, capsys):
    """srun --gpus-per-task=1: CUDA_VISIBLE_DEVICES shows one GPU, SLURM_LOCALID=3."""
    import deepspeed

    mp = clean_env
    for k, v in _step(3, localid=3, CUDA_VISIBLE_DEVICES="3").items():
        mp.setenv(k, v)
    calls: dict = {}

    def set_device(i):
        if i >= 1:
            raise RuntimeError(f"CUDA error: invalid device ordinal ({i})")
        calls["set_device"] = i

    mp.setattr(D, "select_accelerator", lambda device: "cuda")
    mp.setattr(torch.cuda, "device_count", lambda: 1)
    mp.setattr(torch.cuda, "set_device", set_device)
    mp.setattr(torch.distributed, "is_initialized", lambda: False)
    mp.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.update(pg=(backend, kw)))
    mp.setattr(deepspeed, "init_distributed", lambda **kw: calls.update(ds=kw))
    dist = D.init_distributed("auto")
    assert (dist.rank, dist.world_size, dist.local_rank, dist.device_index) == (3, 4, 3, 0)
    assert dist.device == torch.device("cuda", 0) and calls["set_device"] == 0
    backend, kw = calls["pg"]
    assert backend == "nccl" and kw["device_id"] == torch.device("cuda", 0) and kw["rank"] == 3
    assert os.environ["LOCAL_RANK"] == "3"  # the first-local-rank logic reads it
    assert f"rank 3 of 4: connecting to gpu003:{os.environ['MASTER_PORT']}" in capsys.readouterr().err
    assert deepspeed_args(dist, zero_stage=2).device_rank == 0
    with pytest.raises(LaunchError, match="zero_stage=3"):
        deepspeed_args(dist, zero_stage=3)


def test_deepspeed_engine_honours_device_rank(monkeypatch):
    """DeepSpeed 0.19.8 picks its device in ``_set_distributed_vars`` from ``args.device_rank``,
    else ``LOCAL_RANK``: the namespace of :func:`deepspeed_args` makes it use ours."""
    import deepspeed.runtime.engine as ds_engine

    picked = []
    acc = types.SimpleNamespace(set_device=picked.append, device_name=lambda i=None: f"cuda:{i}")
    monkeypatch.setattr(ds_engine, "get_accelerator", lambda: acc)
    monkeypatch.setattr(ds_engine.dist, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(ds_engine.dist, "get_rank", lambda *a, **k: 3)
    fake = types.SimpleNamespace(local_rank=3)
    dist = DistInfo(3, 4, 3, torch.device("cuda", 0), "nccl", device_index=0)
    ds_engine.DeepSpeedEngine._set_distributed_vars(fake, deepspeed_args(dist, zero_stage=1))
    assert picked == [0] and fake.device == torch.device("cuda", 0) and fake.world_size == 4
    cpu = DistInfo(1, 2, 1, torch.device("cpu"), "gloo")
    ds_engine.DeepSpeedEngine._set_distributed_vars(fake, deepspeed_args(cpu, zero_stage=3))
    assert fake.world_size == 4 and fake.global_rank == 3  # device_rank >= 0: the group's world


def test_cuda_without_gpu_is_a_config_error(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES.*--gpus"):
        D.select_accelerator("cuda")


SELECT = r"""
import os, sys, torch
torch.cuda.is_available = lambda: True  # a GPU machine, as DeepSpeed's detection sees it
torch.cuda.device_count = lambda: 1
from engine.distributed import select_accelerator
if sys.argv[1] == "first":
    os.environ.pop("DS_ACCELERATOR", None)
    assert select_accelerator("cpu") == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    print(get_accelerator().device_name())
else:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    print(get_accelerator().device_name())
    try:
        select_accelerator("cpu")
    except RuntimeError as e:
        print("refused:", e)
"""


def test_select_accelerator_before_deepspeed(tmp_path):
    """train.device=cpu on a GPU machine: DeepSpeed must get the CPU accelerator, which it caches
    on import; a DeepSpeed imported earlier (it detected the fake GPU) is refused, not ignored."""
    script = tmp_path / "ds_accelerator_probe.py"
    script.write_text(SELECT)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    out = {}
    for mode in ("first", "late"):
        p = subprocess.run([sys.executable, str(script), mode], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        out[mode] = p.stdout.strip().splitlines()
    assert out["first"][-1] == "cpu"
    assert out["late"][0] == "cuda" and out["late"][1].startswith("refused: deepspeed was imported before")


# -- rendezvous -------------------------------------------------------------------------------------

def test_rendezvous_timeout_is_one_line_naming_its_sources(clean_env):
    """rank 0 of a 2-task srun step alone (real gloo, 2 s timeout): a LaunchError naming the
    expected world size, the address, the port and the variables they came from."""
    port = D._free_port()
    for k, v in _step(0, ntasks=2, SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(port)).items():
        clean_env.setenv(k, v)
    _, origins = D._fill_launch_env(os.environ)
    with pytest.raises(LaunchError) as e:
        D._rendezvous("gloo", 0, 2, None, origins, timedelta(seconds=2))
    msg = str(e.value)
    assert "\n" not in msg
    for w in ("WORLD_SIZE=2 from SLURM_STEP_NUM_TASKS", "MASTER_ADDR=localhost from the first host of "
              "SLURM_STEP_NODELIST", f"MASTER_PORT={port} from the environment", "timeout 2 s"):
        assert w in msg
    assert not torch.distributed.is_initialized()


def test_stale_rank_exits_2_without_traceback(clean_env, tmp_path):
    """`export RANK=1` left over in a shell: the CLI reports it at once instead of hanging."""
    env = dict(os.environ, RANK="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "engine", "pretrain", "-c", os.path.join(REPO, "tests", "engine",
                        "tiny.yaml"), f"train.output_dir={tmp_path / 'o'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "RANK=1" in p.stderr and "WORLD_SIZE" in p.stderr and "Traceback" not in p.stderr


# -- deepspeed.extra --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,field", [
    ({"gradient_accumulation_steps": 2}, "data.batch_size"),
    ({"train_batch_size": 4}, "data.batch_size"),
    ({"train_micro_batch_size_per_gpu": 4}, "data.batch_size"),
    ({"gradient_clipping": 1.0}, "deepspeed.gradient_clipping"),
    ({"bf16": {"enabled": True}}, "deepspeed.precision"),
    ({"fp16": {"enabled": True}}, "deepspeed.precision"),
    ({"fp16": True}, "mapping"),
    ({"amp": {"enabled": True}}, "deepspeed.precision"),
    ({"zero_optimization": {"stage": 3}}, "deepspeed.zero_stage"),
    ({"zero_optimization": 3}, "mapping"),
    ({"optimizer": {"type": "Adam"}}, "optim."),
    ({"scheduler": {"type": "WarmupLR"}}, "schedule."),
])
def test_deepspeed_extra_cannot_override_engine_keys(extra, field):
    with pytest.raises(ConfigError) as e:
        deepspeed_config(micro_batch=2, world_size=2, zero_stage=1, precision="fp32", gradient_clipping=0.02,
                         extra=extra)
    assert field in str(e.value) and "deepspeed.extra." in str(e.value)


def test_deepspeed_extra_other_zero_keys_are_merged():
    extra = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7}, "wall_clock_breakdown": True}
    check_deepspeed_extra(extra)
    c = deepspeed_config(micro_batch=2, world_size=2, zero_stage=2, precision="bf16", gradient_clipping=0.02,
                         extra=extra)
    assert c["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e7}
    assert c["wall_clock_breakdown"] is True and c["train_batch_size"] == 4 and c["bf16"] == {"enabled": True}


def test_deepspeed_extra_misspelt_sections_are_refused(caplog):
    """DeepSpeed ignores a top-level key it does not know: a misspelt section did nothing, silently."""
    for key, want in (("zero_optimisation", "zero_optimization"), ("tensorbord", "tensorboard"), ("bf_16", "bf16")):
        with pytest.raises(ConfigError, match=rf"deepspeed.extra.{key}: not a DeepSpeed option .*did you mean '{want}'"):
            check_deepspeed_extra({key: {"enabled": True}})
    extra = {"some_new_option": 1, "wall_clock_breakdown": True, "comms_logger": {"enabled": True}}
    with caplog.at_level("WARNING"):
        check_deepspeed_extra(extra)
        check_deepspeed_extra(extra)  # once per key, not per check
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == ["deepspeed.extra.some_new_option"]


def test_deepspeed_extra_section_options_at_the_top_level_are_refused():
    """use_node_local_storage, load_universal (checkpoint section), zenflow and the ZeRO buckets
    (zero_optimization), the loss scaler's options (fp16): DeepSpeed ignores them at the top level.
    Three of them were listed as top-level keys, so they passed without a word."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for key, section in (("use_node_local_storage", "checkpoint"), ("load_universal", "checkpoint"),
                         ("zenflow", "zero_optimization"), ("overlap_comm", "zero_optimization"),
                         ("initial_scale_power", "fp16")):
        with pytest.raises(ConfigError, match=rf"deepspeed.extra.{key}: .*'{section}' section .*"
                                              rf"deepspeed.extra.{section}.{key}$"):
            check_deepspeed_extra({key: True})
    # what DeepSpeed itself reads: nested, not at the top level
    base = dict(train_batch_size=1, train_micro_batch_size_per_gpu=1)
    assert DeepSpeedConfig({**base, "checkpoint": {"use_node_local_storage": True}}).use_node_local_storage
    assert not DeepSpeedConfig({**base, "use_node_local_storage": True}).use_node_local_storage
    check_deepspeed_extra({"checkpoint": {"use_node_local_storage": True}})


def test_zero_offload_needs_the_client_optimizer_switch():
    """ZeRO-Offload with the engine's AdamW: DeepSpeed refused it at set-up, advising an optimizer
    section the engine does not allow."""
    off = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match=r"offload_optimizer.device=cpu: .*zero_force_ds_cpu_optimizer=false"):
        check_deepspeed_extra(off)
    check_deepspeed_extra({**off, "zero_force_ds_cpu_optimizer": False})
    check_deepspeed_extra({"zero_optimization": {"offload_optimizer": {"device": "none"}}})  # DeepSpeed takes these
    check_deepspeed_extra({"zero_optimization": {"offload_param": {"device": "cpu"}}})


def test_deepspeed_extra_tunes_the_loss_scaler_of_the_chosen_precision():
    """fp16/bf16 sections may tune everything but ``enabled`` (the loss scaler worked before the
    owned-keys check and has no engine field), and only for the precision the run uses."""
    c = deepspeed_config(micro_batch=2, world_size=1, zero_stage=2, precision="fp16", gradient_clipping=0.02,
                         extra={"fp16": {"loss_scale_window": 500, "initial_scale_power": 12}})
    assert c["fp16"] == {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 500}
    with pytest.raises(ConfigError, match=r"deepspeed.extra.fp16 tunes fp16 training, but deepspeed.precision=bf16"):
        deepspeed_config(micro_batch=2, world_size=1, zero_stage=2, precision="bf16", gradient_clipping=0.02,
                         extra={"fp16": {"loss_scale_window": 500}})


@pytest.mark.parametrize("local_rank", [0, 3])
def test_zero3_with_one_gpu_per_task_is_refused_on_every_rank(monkeypatch, local_rank):
    """srun --gpus-per-task=1: ZeRO-3 needs LOCAL_RANK as a device index; the rank of LOCAL_RANK 0 must
    refuse too (it went on into DeepSpeed and waited for the others until the timeout)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "8(x3),1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", str(local_rank))
    monkeypatch.setenv("SLURM_NODEID", "0")
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    dist = DistInfo(local_rank, 25, local_rank, torch.device("cuda", 0), "nccl", device_index=0)
    with pytest.raises(LaunchError, match="zero_stage=3"):
        deepspeed_args(dist, zero_stage=3)
    assert deepspeed_args(dist, zero_stage=2).device_rank == 0
    if local_rank == 0:
        monkeypatch.setenv("SLURM_NODEID", "3")  # the last node runs one task: its one GPU, ZeRO-3 is fine
        assert deepspeed_args(dist, zero_stage=3).device_rank == 0
        monkeypatch.setenv("SLURM_NODEID", "0")
        monkeypatch.delenv("SLURM_STEP_ID")  # a batch-script process, alone: not an srun step
        assert deepspeed_args(DistInfo(0, 1, 0, torch.device("cuda", 0), "nccl"), zero_stage=3).device_rank == 0


def test_mpirun_gives_the_ranks():
    """`mpirun -np 2 python -m engine ...` (or the deepspeed launcher's openmpi mode) set only the MPI
    variables: each process ran as rank 0 of 1 into the same folder (the second then crashed inside
    DeepSpeed on LOCAL_RANK). Without an address to meet at, it says what to export."""
    from engine.distributed import LaunchError, _fill_launch_env

    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    _, origins = _fill_launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert origins["RANK"] == "OMPI_COMM_WORLD_RANK"
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "n0"}  # MPICH / Intel MPI
    _fill_launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    with pytest.raises(LaunchError, match=r"an MPI launch over several nodes gives the ranks .* export MASTER_ADDR"):
        _fill_launch_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
    one = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}  # a singleton mpirun: as a plain process
    _fill_launch_env(one)
    assert (one["RANK"], one["WORLD_SIZE"], one["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    node = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}  # `mpirun -np 8` on one host (the deepspeed launcher's too)
    _fill_launch_env(node)
    assert (node["RANK"], node["MASTER_ADDR"]) == ("1", "127.0.0.1")
    # mpirun inside a SLURM allocation: its daemons' srun step leaves SLURM_PROCID = the node's index
    inside = _step(1, ntasks=2, OMPI_COMM_WORLD_RANK="5", OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_LOCAL_RANK="5",
                   OMPI_COMM_WORLD_LOCAL_SIZE="8")
    _fill_launch_env(inside)
    assert (inside["RANK"], inside["WORLD_SIZE"], inside["LOCAL_RANK"]) == ("5", "16", "5")
    assert inside["MASTER_ADDR"] == "gpu001"  # the allocation's first host
    pmi = _step(3, PMI_RANK="3", PMI_SIZE="4")  # srun --mpi=pmi2 sets PMI_* equal to its own: srun's branch
    _fill_launch_env(pmi)
    assert (pmi["RANK"], pmi["WORLD_SIZE"], pmi["MASTER_ADDR"]) == ("3", "4", "gpu003")


def test_srun_with_an_exported_world_size_takes_the_task_id():
    """SLURM templates that export WORLD_SIZE (and MASTER_*) before srun were told to "start the job with
    srun" from inside srun; srun's task id is the rank when the sizes agree."""
    from engine.distributed import LaunchError

    env = _step(2, WORLD_SIZE="4", MASTER_ADDR="gpu003", MASTER_PORT="1234")
    launch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("2", "4", "1234")
    # exporting WORLD_SIZE only: the address and port are the step's (they were 127.0.0.1:29500, so the
    # ranks of the other nodes waited for a store on their own loopback until the timeout)
    env, plain = _step(2, WORLD_SIZE="4", SLURM_STEP_NODELIST="gpu[007-008]"), _step(2, SLURM_STEP_NODELIST="gpu[007-008]")
    launch_env(env), launch_env(plain)
    assert env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == plain["MASTER_PORT"] != "29500"
    with pytest.raises(LaunchError, match=r"WORLD_SIZE=8 is exported, but this srun step has 4 task\(s\)"):
        launch_env(_step(2, WORLD_SIZE="8"))


def test_rank_0_must_be_its_nodes_local_rank_0():
    """A single process with LOCAL_RANK=1 (to pick a GPU) skipped the per-node checkpoint work: every
    tag kept, no `latest`, no config.yaml in the tags (a later shape change then failed with a raw
    traceback)."""
    from engine.distributed import LaunchError

    with pytest.raises(LaunchError, match=r"LOCAL_RANK=1 .* RANK=0 .* first process is its node's LOCAL_RANK 0.*"
                                          r"CUDA_VISIBLE_DEVICES"):
        launch_env({"LOCAL_RANK": "1"})
    launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "n0"})  # a second process: fine


def test_tasks_per_node_reads_each_launchers_count():
    """The node's process count, asserted directly: a None and a 1 both pass the ZeRO-3 refusal above,
    so a parse of "4" or "8(x3),1" into None (an `or 0` for the repeat count) went unseen."""
    from engine.distributed import _slurm_tasks_on_node, _tasks_per_node

    assert [_slurm_tasks_on_node("8(x3),1", n) for n in range(5)] == [8, 8, 8, 1, None]
    assert _slurm_tasks_on_node("4", 0) == 4 and _slurm_tasks_on_node("2(x2)", 1) == 2
    assert _slurm_tasks_on_node("4,x", 0) is None  # not SLURM's syntax: unknown, not a guess
    step = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0"}
    assert _tasks_per_node({**step, "SLURM_TASKS_PER_NODE": "8(x3),1", "SLURM_NODEID": "3"}) == 1
    assert _tasks_per_node({**step, "SLURM_TASKS_PER_NODE": "4"}) == 4
    assert _tasks_per_node({**step, "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "4"}) == 2
    assert _tasks_per_node({"LOCAL_WORLD_SIZE": "8", **step}) == 8 and _tasks_per_node({"LOCAL_SIZE": "3"}) == 3
    assert _tasks_per_node({"SLURM_TASKS_PER_NODE": "4"}) is None  # a batch-script process: not an srun step
