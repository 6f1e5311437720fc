"""The sbatch scripts (slurm/*.sh) on a real one-node Slurm cluster on localhost.

The cluster comes from tests/slurm/start_local_slurm.sh: as root with apt-get (CI) it installs
Debian's Slurm and munge when missing and starts the daemons; elsewhere these tests skip, saying
why. Jobs are submitted exactly as a user would (`sbatch --wait slurm/train_8b.sh ...` from the
repo root), shrunk to one node, two CPU tasks and no GPU from the command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SLURM_TESTS = REPO / "tests" / "slurm"
SKIP_STATUS = 77  # tests/slurm/*.sh: cannot run here (not root, no apt-get)
CPU_SHRINK = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0"]


def _slurm_is_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.fixture(scope="module")
def local_slurm():
    """A running local cluster; stopped afterwards only when this fixture started it."""
    was_up = _slurm_is_up()
    start = subprocess.run(["bash", str(SLURM_TESTS / "start_local_slurm.sh")],
                           capture_output=True, text=True, timeout=600)
    if start.returncode == SKIP_STATUS:
        pytest.skip(f"no local Slurm: {start.stderr.strip()}")
    assert start.returncode == 0, f"start_local_slurm.sh failed:\n{start.stderr}"
    # Jobs left by an interrupted earlier test run would hold the node's CPUs.
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True)
    stale = [line.split()[0] for line in queued.stdout.splitlines()
             if line.split()[1:] and line.split()[1].startswith("test-")]
    if stale:
        subprocess.run(["scancel", *stale], check=False)
        deadline = time.monotonic() + 60
        while subprocess.run(["squeue", "-h", "-j", ",".join(stale)], capture_output=True,
                             text=True).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    yield
    if not was_up:
        subprocess.run(["bash", str(SLURM_TESTS / "stop_local_slurm.sh")], check=True)


def _job_env(**extra: str) -> dict[str, str]:
    """The submitting shell's environment (sbatch passes it on), minus any outer job's Slurm."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(extra)
    return env


def _sbatch(script: str, workdir: Path, env: dict[str, str], sbatch_args=(),
            script_args=()) -> subprocess.Popen:
    """Submit from the repo root, as users do; the job's working dir (and its slurm-%j.out) is
    `workdir`, so the script must find the repo from $SLURM_SUBMIT_DIR alone."""
    cmd = ["sbatch", "--wait", "--parsable", f"--chdir={workdir}",
           f"--job-name=test-{uuid.uuid4().hex[:8]}", *sbatch_args, script, *script_args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for `sbatch --wait` (its exit status is the job's); cancel the job on a timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        name = next(a for a in proc.args if a.startswith("--job-name=")).split("=", 1)[1]
        subprocess.run(["scancel", f"--name={name}"], check=False)
        proc.kill()
        raise
    return proc.returncode, out + err


def _job_log(workdir: Path) -> str:
    logs = sorted(workdir.glob("slurm-*.out"))
    assert len(logs) == 1, f"expected one slurm-<jobid>.out in {workdir}, found {logs}"
    return logs[0].read_text()


def _wait_for(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.1)


def test_launch_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        install = subprocess.run(["bash", str(SLURM_TESTS / "apt_install.sh"), "shellcheck"],
                                 capture_output=True, text=True, timeout=300)
        if install.returncode == SKIP_STATUS:
            pytest.skip(f"no shellcheck: {install.stderr.strip()}")
        assert install.returncode == 0, install.stderr
    scripts = sorted(str(p.relative_to(REPO)) for p in
                     [*REPO.glob("slurm/*.sh"), *SLURM_TESTS.glob("*.sh")])
    assert "slurm/train_8b.sh" in scripts
    check = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_train_8b_script_launches_two_cpu_ranks_through_srun(local_slurm, tmp_path):
    # The launcher smoke test through the very script users submit; CONFIG is the trainer's,
    # ignored by this entry, which gets the positional arguments as they are.
    env = _job_env(ENTRY="megatron_ease.distributed", CONFIG="examples/tiny_cpu_ease.yaml")
    rc, out = _finish(_sbatch("slurm/train_8b.sh", tmp_path, env, CPU_SHRINK,
                              ["--tensor-model-parallel-size", "2"]))
    log = _job_log(tmp_path)
    assert rc == 0, f"sbatch --wait exited {rc}: {out}\n{log}"
    job_id = out.split()[0]
    assert (tmp_path / f"slurm-{job_id}.out").exists()
    ranks = re.findall(r"^rank=(\d) .*launcher=slurm backend=gloo .*tp_rank=(\d)", log, re.M)
    assert sorted(ranks) == [("0", "0"), ("1", "1")], log
    assert "world=2 allreduce_ok" in log, log


def _submit_fake_preempt_job(tmp_path):
    """Submit train_8b.sh running tests.slurm.fake_preempt on 2 CPU tasks; return its state dir,
    the ``sbatch --wait`` process and the job id once both ranks are up."""
    state = tmp_path / "state"
    state.mkdir()
    env = _job_env(ENTRY="tests.slurm.fake_preempt", FAKE_PREEMPT_DIR=str(state))
    proc = _sbatch("slurm/train_8b.sh", tmp_path, env, CPU_SHRINK)
    ready = [state / "ready.0", state / "ready.1"]
    _wait_for(ready, timeout=60)
    return state, proc, ready[0].read_text()


def test_preempted_job_is_requeued_and_resumes(local_slurm, tmp_path):
    # USR1 to the tasks, as `--signal=USR1@900` sends it before the time limit: every rank
    # "saves" and exits 75, the script requeues, the second run finds the checkpoint.
    state, proc, job_id = _submit_fake_preempt_job(tmp_path)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    rc, out = _finish(proc)
    log = _job_log(tmp_path)
    assert rc == 0, f"sbatch --wait exited {rc}: {out}\n{log}"
    assert f"requeueing job {job_id}" in log, log
    for rank in (0, 1):
        assert f"fake_preempt rank={rank} restart=0" in log, log
        assert f"rank={rank} got SIGUSR1: saved, exiting 75" in log, log
        assert f"fake_preempt rank={rank} restart=1" in log, log
        assert f"rank={rank} resumed" in log, log
    assert "restart=2" not in log, log


def test_cancelled_job_is_not_requeued(local_slurm, tmp_path):
    # scancel sends SIGTERM to the tasks (which save and exit 75, like preemption) and to the
    # batch shell, so the script must not turn a cancel into a requeue.
    state, proc, job_id = _submit_fake_preempt_job(tmp_path)
    subprocess.run(["scancel", job_id], check=True)
    rc, out = _finish(proc)
    log = _job_log(tmp_path)
    assert rc != 0, f"a cancelled job reported success: {out}\n{log}"
    assert "requeueing" not in log and "restart=1" not in log, log
    assert (state / "checkpoint.0").exists() and (state / "checkpoint.1").exists(), log


def test_requeued_training_resumes_from_latest_checkpoint(local_slurm, tmp_path):
    run_dir = tmp_path / "run"
    env = _job_env(CONFIG="examples/tiny_cpu_ease.yaml", RUN_DIR=str(run_dir))
    checkpoints = run_dir / "checkpoints"
    for steps, workdir in ((2, tmp_path / "first"), (4, tmp_path / "second")):
        workdir.mkdir()
        # The tiny config at a smaller batch, provisioning its own small synthetic dataset;
        # a short warm start (first job only) makes mixed-accuracy groups common.
        data = tmp_path / "synthetic"
        small = [f"data.train_shards={data}/train/*.tar", f"data.eval_shards={data}/eval/*.tar",
                 f"data.tokenizer={data}/tokenizer", "data.synthetic_train_samples=128",
                 "data.synthetic_eval_samples=16", "train.prompts_per_step=2",
                 "dapo.group_size=4", "train.micro_batch_size=4", "dapo.max_response_length=4",
                 "dapo.overlong_buffer_length=1", "dapo.max_gen_batches=0",
                 "train.warm_start_steps=10", "train.warm_start_lr=3e-3"]
        rc, out = _finish(_sbatch("slurm/train_8b.sh", workdir, env, CPU_SHRINK,
                                  [f"train.steps={steps}", "checkpoint.interval=1", *small]),
                          timeout=600)
        assert rc == 0, f"train.steps={steps}: sbatch exited {rc}: {out}\n{_job_log(workdir)}"
    first, second = _job_log(tmp_path / "first"), _job_log(tmp_path / "second")
    assert "resumed from" not in first, first
    assert re.search(rf"resumed from {re.escape(str(checkpoints))}\S* at step 2\b", second), second
    # The same script evaluates the run (ENTRY=megatron_ease.evaluate): with RUN_DIR it reads
    # the run's latest checkpoint and writes RUN_DIR/eval/results.json; two ranks share the
    # samples (data parallel), rank 0 reports.
    workdir = tmp_path / "eval"
    workdir.mkdir()
    rc, out = _finish(_sbatch("slurm/train_8b.sh", workdir,
                              {**env, "ENTRY": "megatron_ease.evaluate"}, CPU_SHRINK,
                              ["--samples", "8", *small]), timeout=600)
    log = _job_log(workdir)
    assert rc == 0, f"evaluation: sbatch exited {rc}: {out}\n{log}"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["checkpoint"] == str(checkpoints / "iter_0000004")
    assert results["eval_samples"] == 8 and 0.0 <= results["accuracy"] <= 1.0
    assert [json.loads(line) for line in log.splitlines() if line.startswith("{")] == [results]
