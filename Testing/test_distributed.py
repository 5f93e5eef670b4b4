"""RefNet training under torchrun with 2 gloo processes on CPU (tiny data), against one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from refnet.distributed import setup

JOB = Path(__file__).resolve().parent / "ddp_train_job.py"
ROOT = JOB.parents[1]


def _run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "work" / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    single = _run([sys.executable, str(JOB), str(one)])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB),
                str(two)])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return one, two


def test_both_ranks_end_with_identical_weights(runs):
    _, two = runs
    a, b = torch.load(two / "rank0.pt", weights_only=True), torch.load(two / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_loss_curve_matches_one_process_with_the_same_global_batch(runs):
    # Each process takes every second crop of the same batch, so the gradient is the one-process gradient up to
    # batch norm's per-process statistics (4 crops instead of 8): the curves agree within 3% per epoch
    # (measured: 0.2%).
    one, two = runs
    single, ddp = _losses(one), _losses(two)
    assert len(single) == len(ddp) == 3
    assert all(abs(a - b) <= 0.03 * a for a, b in zip(single, ddp)), (single, ddp)
    assert ddp[-1] < ddp[0]  # it trains


def test_resuming_with_another_number_of_processes(runs, tmp_path):
    import shutil

    one, _ = runs
    shutil.copytree(one / "work", tmp_path / "work")  # 3 epochs done by one process; 2 processes go on to 4
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB),
                str(tmp_path), "4"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]  # epochs 1-3 from the one-process run, only epoch 4 trained by the two


def test_a_half_set_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT is not set.*torchrun"):
        setup("cpu")
    monkeypatch.delenv("WORLD_SIZE")
    assert setup("cpu")[0].world == 1  # nothing set: one process


def test_base_models_train_under_torchrun_and_the_first_process_predicts(tmp_path):
    from refnet.data.phantoms import PhantomConfig, write_phantom_dataset
    from refnet.segmenters import load_segmenter

    coarse = PhantomConfig.demo(inplane_spacing_mm=(6.0, 6.0), slice_spacing_mm=(9.0, 9.0))
    write_phantom_dataset(tmp_path / "data", [5, 6, 7, 1], config=coarse, seed=0)
    args = ["train-segmenters", "--data", str(tmp_path / "data"), "--architectures", "unet", "--steps", "2",
            "--folds", "2", "--device", "cpu"]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "refnet.cli", *args, "--out", str(tmp_path / "two")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    folder = tmp_path / "two" / "predictions" / "unet-s0-2"
    assert sorted(p.name for p in folder.glob("label*.nii.gz")) == [f"label{i:04d}.nii.gz" for i in (1, 5, 6, 7)]
    record = json.loads((folder / "predictions.json").read_text())
    assert record["folds"] == 2 and set(record["predicted_by"].values()) == {"unet-s0-2", "unet-s0-2-fold0",
                                                                              "unet-s0-2-fold1"}
    assert (tmp_path / "two" / "segmenters" / "unet-s0-2-fold1.pt").exists()
    # The losses against one process: test_base_model_losses_match_one_process_with_the_same_global_batch.
    load_segmenter(tmp_path / "two" / "segmenters" / "unet-s0-2.pt")


def test_a_killed_job_resumes_from_its_last_checkpoint(tmp_path):
    import os
    import signal
    import time

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB),
            str(tmp_path), "40"]
    job = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    log = tmp_path / "work" / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.2)
    # Every process at once, mid-training: the launcher and its workers (which run in their own sessions).
    os.killpg(job.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)
    job.wait()
    time.sleep(0.5)
    done = len(log.read_text().splitlines())
    assert 2 <= done < 40
    again = _run([*args[:-1], str(done + 2)])  # the rerun goes on from the checkpoint: two more epochs
    assert again.returncode == 0, again.stderr[-3000:]
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs[-2:] == [done + 1, done + 2] and epochs[:done] == list(range(1, done + 1))


def test_base_model_losses_match_one_process_with_the_same_global_batch(tmp_path):
    # BatchDiceCELoss sums the Dice terms across the processes, so two processes compute the loss (and,
    # through DDP's averaging, the gradient) of the whole batch; before it, each took the Dice of its half.
    job = Path(__file__).resolve().parent / "ddp_segmenter_job.py"
    single = _run([sys.executable, str(job), str(tmp_path / "one.json")])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(job),
                str(tmp_path / "two.json")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(one) == len(two) == 4
    assert one[0] == pytest.approx(two[0], rel=1e-5)  # the same weights and batch: the same loss
    assert one == pytest.approx(two, rel=1e-3)  # and the same steps after it (float rounding apart)


def test_the_process_group_is_destroyed_before_interpreter_shutdown():
    # A group left to interpreter shutdown can abort a finished gloo job (SIGABRT): setup registers its
    # destruction at exit. atexit runs last-in first-out, so the check registered before setup runs after it.
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import atexit, torch.distributed as dist\n"
            "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
            "from refnet.distributed import setup\n"
            "assert setup('cpu')[0].world == 1 and dist.is_initialized()\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT / "RefNetSegmentRefine")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "initialized at exit: False" in done.stdout, done.stdout + done.stderr[-3000:]
