"""Two-process DDP fine-tune on CPU (gloo): both ranks finish with identical weights."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrain.batches import Split, TrainingSet
from retrain.launch.ddp import torchrun_command
from retrain.recipe import fine_tune
from retrain.strategy import choose_strategy
from retrain_helpers import FAST_HYPER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> TrainingSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    x += 2.0 * torch.randn(10, 3, 16, 16, generator=g)[y]  # a per-class template: learnable
    return TrainingSet(Split(x[:48], y[:48]), Split(x[48:64], y[48:64]), Split(x[64:88], y[64:88]),
                       Split(x[88:], y[88:]))


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=10)
        hyper = dataclasses.replace(FAST_HYPER, epochs_head=1, epochs_finetune=2, batch_size=16)
        events: list[dict] = []
        fine_tune(model, _data(), hyper, choose_strategy(10, 1.0, requested="full"), device=torch.device("cpu"),
                  progress=events.append)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    f"{out}/rank{rank}.safetensors")
        Path(f"{out}/rank{rank}.events").write_text(str(sum(e.get("phase") == "finetune" for e in events)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_ddp_fine_tune_ends_with_identical_weights(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = safetensors.torch.load_file(str(tmp_path / "rank0.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "rank1.safetensors"))
    torch.manual_seed(0)
    start = timm.create_model("test_resnet", num_classes=10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])  # it did train
    # only rank 0 reports progress; phase 2 (the DDP part) ran
    assert int((tmp_path / "rank0.events").read_text()) > 0 and (tmp_path / "rank1.events").read_text() == "0"


def test_torchrun_command_runs_the_job_module(tmp_path: Path) -> None:
    cmd = torchrun_command("c.yaml", tmp_path, reason="r", nproc_per_node=2, python="py")
    assert cmd[:5] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == ["-m", "monitor.cli.job", "--config", "c.yaml", "--job-dir", str(tmp_path), "--reason", "r"]
    with pytest.raises(ValueError, match="nproc_per_node >= 2"):
        torchrun_command("c.yaml", tmp_path, reason="r", nproc_per_node=1)


@pytest.mark.slow
def test_torchrun_job_trains_on_two_ranks_and_rank0_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    from retrain.launch.local import launch_local
    from retrain.jobdir import read_progress, read_result
    from retrain_helpers import build_world, digits, source_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    d = digits()
    world = build_world(tmp_path, source_checkpoint(tmp_path_factory.getbasetemp(), d), d, n_production=250,
                        retrain={"hyper": {"epochs_head": 2, "epochs_finetune": 2, "batch_size": 32}})
    job = launch_local(str(world.config_path), tmp_path / "job", reason="ddp", nproc_per_node=2)
    assert job.wait(240) == 0, (tmp_path / "job" / "job.log").read_text()[-2000:]
    result = read_result(tmp_path / "job")
    assert result is not None and result.outcome in ("promoted", "rejected") and result.gate is not None
    started = [e for e in read_progress(tmp_path / "job") if e["event"] == "started"]
    assert len(started) == 1 and started[0]["world_size"] == 2  # only rank 0 writes
