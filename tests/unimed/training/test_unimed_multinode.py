"""Several hosts, one run folder (issue 30), with real processes: two torchrun nodes (``--nnodes 2``, gloo, one
process per node), each in its own PID, UTS and mount namespace (`namespaces.Host`), train into one folder while
an evaluating host polls it. Killed at the robustness audit's kill points (inside a checkpoint write, after its
files, between its renames, before ``latest``; a full disk), restarted (by the test, or by torchrun's own
``--max-restarts``), the run ends bit for bit where an uninterrupted run ends; the reader never changes the folder
and only ever reads complete checkpoints; the owner (rank 0 at start) removes only what its own host's dead
writers left, even when their PID now belongs to another process. A node that does not see the folder stops the
run with one clear error. Needs root for ``unshare`` (CI runs as root); skipped elsewhere, saying so."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from namespaces import Host, free_port, unavailable
from unimed_eval_poller import weights_hash

from cmoe.reference_models.unimed.model.checkpoint import list_checkpoints, read_checkpoint

REASON = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"needs namespaces: {REASON}")]

TESTS = Path(__file__).resolve().parents[2] / "support"  # the workers and the helpers they import
ROOT = TESTS.parents[1]
WORKER, POLLER = TESTS / "unimed_multinode_worker.py", TESTS / "unimed_eval_poller.py"
RECIPE = ["--config", "tiny"] + [arg for key in (
    "train.steps=6", "train.save_every=2", "train.log_every=1", "train.keep_checkpoints=10", "train.progress=false",
    "train.batch_size=2", "data.synthetic.num_images=24", "data.synthetic.eval_images=4",
    "data.synthetic.qa_questions=8", "eval.coco_caption=false", "eval.max_new_tokens=4") for arg in ("--set", key)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}


class Launch:
    """One start of the job: a torchrun agent per node, each logging to a file. Node A hosts the rendezvous and,
    its address (127.0.0.1) sorting before node B's (127.0.0.2), gets rank 0 in every round."""

    def __init__(self, hosts: list[Host], run: Path, logs: Path, faults: list[dict], max_restarts: int) -> None:
        port, self.hosts = free_port(), hosts
        self.logs = [logs.with_name(f"{logs.name}-{host.name}.log") for host in hosts]
        env = {**ENV, "CMOE_TEST_FAULTS": json.dumps(faults)}
        if max_restarts:  # as docs/robustness.md says: else restarted workers can hang connecting (pytorch #135712)
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        self.procs = [host.popen([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", logs.name, "--rdzv_conf", f"is_host={int(rank == 0)}", "--local_addr", f"127.0.0.{rank + 1}",
            "--max_restarts", str(max_restarts), "--monitor_interval", "0.1", str(WORKER), "--output-dir", str(run),
            *RECIPE], log=log, env=env) for rank, (host, log) in enumerate(zip(hosts, self.logs))]

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def _tails(self) -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-2500:]}" for log in self.logs)

    def wait_for(self, flag: Path) -> None:
        """Wait until a fault of the worker fired (its flag file exists), while both nodes still run."""
        while not flag.exists():
            assert all(proc.poll() is None for proc in self.procs), f"a node stopped before {flag.name}\n{self._tails()}"
            time.sleep(0.05)

    def finish(self) -> None:
        for proc in self.procs:
            proc.wait(timeout=300)
        assert [proc.returncode for proc in self.procs] == [0, 0], self._tails()

    def kill_nodes(self) -> None:
        """Node A dies where its worker stands; the job is then torn down on node B too, to be restarted."""
        for host in self.hosts:
            host.kill_all()
        for proc in self.procs:
            proc.wait(timeout=120)


def _checkpoints(run: Path) -> dict[int, str]:
    return {step: weights_hash(read_checkpoint(path)["trainable"]) for step, path in list_checkpoints(run)}


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[int, str], list[tuple[int, float]]]:
    """Weights at every checkpoint and the metrics of an uninterrupted two-node run."""
    tmp = tmp_path_factory.mktemp("reference")
    hosts = [Host("nodeA", ROOT), Host("nodeB", ROOT)]
    try:
        Launch(hosts, tmp / "run", tmp / "launch", [], 0).finish()
    finally:
        for host in hosts:
            host.close()
    return _checkpoints(tmp / "run"), _losses(tmp / "run")


@pytest.fixture
def hosts():
    made = [Host(name, ROOT) for name in ("nodeA", "nodeB", "evaluator")]
    yield made
    for host in made:
        host.close()


def _count(poller_dir: Path) -> int:
    path = poller_dir / "count"
    return int(path.read_text() or 0) if path.is_file() else 0


def _wait_for_looks(poller_dir: Path, poller: subprocess.Popen, looks: int = 2) -> None:
    """Wait until the evaluating host has looked at the folder `looks` more times."""
    target = _count(poller_dir) + looks
    while _count(poller_dir) < target:
        assert poller.poll() is None, "the evaluating host's poller stopped"
        time.sleep(0.05)


def _leftover(run: Path, pattern: str) -> Path:
    found = sorted(run.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {run}, found {[p.name for p in run.iterdir()]}"
    return found[0]


def _take_pid(host: Host, pid: int) -> subprocess.Popen:
    """A new process of `host` with the PID of a killed one (once that one is reaped), via ns_last_pid."""
    squatter = host.popen(["sh", "-c", f"while [ -e /proc/{pid} ]; do sleep 0.05; done; "
                                       f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid; sleep 600 & echo $!; wait"])
    assert int(squatter.stdout.readline()) == pid, "could not hand the killed writer's PID to another process"
    return squatter


def _tree(run: Path) -> dict[str, tuple]:
    return {p.relative_to(run).as_posix(): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*"))}


def test_two_nodes_and_an_evaluating_host_share_a_run_folder_through_kills_and_restarts(tmp_path, hosts, reference):
    node_a, node_b, evaluator = hosts
    run, polls = tmp_path / "run", tmp_path / "poller"
    polls.mkdir()
    flag = {name: tmp_path / f"{name}.flag" for name in
            ("pause", "half", "renamed", "aside", "before-latest", "die", "disk-full")}

    def fault(action: str, at: str, nth: int, name: str) -> dict:
        return {"action": action, "at": at, "nth": nth, "flag": str(flag[name])}

    def launch(number: int, faults: list[dict], max_restarts: int = 0) -> Launch:
        return Launch([node_a, node_b], run, tmp_path / f"launch{number}", faults, max_restarts)

    poller = evaluator.popen([sys.executable, str(POLLER), str(run), str(polls)], log=tmp_path / "poller.log", env=ENV)

    # 1. Node A's save of step 4 pauses after writing its files; host C evaluates meanwhile (as `cmoe unimed eval`
    #    polled, and once for real), then the save goes on. The save of step 6 is killed half-way through a file.
    job = launch(1, [fault("pause", "files-written", 2, "pause"), fault("half", "optimizer-write", 3, "half")])
    job.wait_for(flag["pause"])
    paused = _leftover(run, ".step_00000004.tmp~nodeA~*")
    before = _tree(paused)
    _wait_for_looks(polls, poller)
    evaluation = evaluator.run([sys.executable, "-m", "cmoe", "unimed", "eval", "--output-dir", str(run), *RECIPE,
                                "--limit-per-task", "1", "--out", str(tmp_path / "eval")], env=ENV, timeout=300)
    assert evaluation.returncode == 0 and (tmp_path / "eval" / "eval.json").is_file(), evaluation.stderr[-3000:]
    assert _tree(paused) == before, "a reader on another host changed a checkpoint being written"
    Path(f"{flag['pause']}.go").touch()
    job.wait_for(flag["half"])
    job.kill_nodes()
    assert not paused.exists() and (run / "step_00000004").is_dir(), "the paused save did not complete"

    # 2. A later process of node A takes the killed writer's PID; the restarted rank 0 still proves the writer
    #    dead (its start time differs) and removes its half-written temporary. Killed right after renaming
    #    step_00000006 into place, before `latest` names it.
    half = _leftover(run, ".step_00000006.tmp~nodeA~*")
    pid = int(half.name.split("~")[4])
    squatter = _take_pid(node_a, pid)
    assert node_a.run(["sh", "-c", f"kill -0 {pid}"]).returncode == 0  # by PID alone the writer looks alive
    job = launch(2, [fault("hold", "renamed", 1, "renamed")])
    job.wait_for(flag["renamed"])
    assert not half.exists()
    assert re.search(rf"remove {re.escape(str(half))} .*its writer is gone", job.output(0)), job.output(0)[-3000:]
    job.kill_nodes()
    squatter.wait(timeout=60)
    squatter.stdout.close()

    # 3. Killed after moving the previous step_00000006 aside, before renaming the new one in. Host C's reader,
    #    `cmoe unimed analyze` and `cmoe unimed clean` (which cannot check node A's PIDs) change nothing.
    job = launch(3, [fault("hold", "swapped-old-aside", 1, "aside")])
    job.wait_for(flag["aside"])
    job.kill_nodes()
    aside = _leftover(run, ".step_00000006.old~nodeA~*")
    _leftover(run, ".step_00000006.tmp~nodeA~*")
    before = _tree(run)
    _wait_for_looks(polls, poller)
    analysis = evaluator.run([sys.executable, "-m", "cmoe", "unimed", "analyze", "--output-dir", str(run), *RECIPE,
                              "--batches-per-task", "1", "--out", str(tmp_path / "analysis")], env=ENV, timeout=300)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    cleaning = evaluator.run([sys.executable, "-m", "cmoe", "unimed", "clean", str(run)], env=ENV, timeout=300)
    assert cleaning.returncode == 0 and "on nodeA" in cleaning.stdout and "--older-than" in cleaning.stdout
    assert _tree(run) == before, "a reader, or a cleaner on another host, changed the run folder"

    # 4. Rank 0 on node A puts step_00000006 back and removes the temporary; killed before `latest` moves on.
    job = launch(4, [fault("hold", "checkpoint-before-latest", 1, "before-latest")])
    job.wait_for(flag["before-latest"])
    assert f"restore {run / 'step_00000006'} from {aside.name}" in job.output(0), job.output(0)[-3000:]
    job.kill_nodes()

    # 5. torchrun's own elastic restart: node A's worker meets a full disk while writing a checkpoint, the
    #    restarted one dies after writing the checkpoint's files, the next one finishes.
    job = launch(5, [fault("disk-full", "optimizer-write", 1, "disk-full"), fault("die", "files-written", 1, "die")],
                 max_restarts=2)
    job.finish()
    assert flag["die"].exists() and flag["disk-full"].exists()
    _wait_for_looks(polls, poller)
    (polls / "stop").touch()
    poller.wait(timeout=120)

    weights, losses = reference
    assert _checkpoints(run) == weights, "the restarted run's checkpoints differ from the uninterrupted run's"
    assert _losses(run) == losses, "metrics lost, repeated or changed"
    assert (run / "latest").read_text().strip() == "step_00000006"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temporaries left behind"
    looks = [json.loads(line) for line in (polls / "looks.jsonl").read_text().splitlines()]
    read = [(look["step"], look["weights"]) for look in looks if "weights" in look]
    assert {step for step, _ in read} == {2, 4, 6}, looks[-3:]
    assert all(weights[step] == digest for step, digest in read), "the reader saw a checkpoint no run wrote whole"
    assert not [look for look in looks if "error" in look], [look for look in looks if "error" in look][:3]
    assert f"skipped {paused.name}" in (tmp_path / "poller.log").read_text()


def test_a_node_that_does_not_see_the_run_folder_stops_the_run_with_one_clear_error(tmp_path, hosts) -> None:
    node_a, node_b, _ = hosts
    run = tmp_path / "run"
    run.mkdir()
    mounted = node_b.run(["mount", "-t", "tmpfs", "tmpfs", str(run)])  # node B's own, node-local folder there
    assert mounted.returncode == 0, mounted.stderr
    job = Launch([node_a, node_b], run, tmp_path / "launch", [], 0)
    for proc in job.procs:
        proc.wait(timeout=300)
    assert all(proc.returncode != 0 for proc in job.procs)
    for rank in (0, 1):
        assert re.search(r"error: output_dir .*: rank 1 on nodeB cannot see what rank 0 \(on nodeA\) wrote there; "
                         r".*shared folder", job.output(rank)), job.output(rank)[-3000:]
    assert list(run.iterdir()) == [], "the run wrote into a folder that not every node sees"


def test_a_reused_pid_does_not_keep_a_dead_writers_temporary(tmp_path, hosts) -> None:
    """A save killed on node A; a later process of node A gets its PID (by PID alone the writer looks alive): the
    owner on node A removes the temporary, a cleaner on node B keeps it (it cannot check node A's PIDs)."""
    node_a, node_b, _ = hosts
    run = tmp_path / "run"
    writer = ("import os, sys, cmoe.checkpointing as c\n"
              "def stage(name):\n"
              "    if name == 'files-written':\n"
              "        print(os.getpid(), flush=True)\n"
              "        os.kill(os.getpid(), 9)\n"
              "c._stage = stage\n"
              "with c.atomic_directory(sys.argv[1]) as tmp:\n"
              "    (tmp / 'weights').write_bytes(b'0' * 1000)\n")
    killed = node_a.run([sys.executable, "-c", writer, str(run / "step_00000002")], env=ENV, timeout=120)
    pid = int(killed.stdout)
    temporary = _leftover(run, f".step_00000002.tmp~nodeA~*~{pid}~*")
    squatter = _take_pid(node_a, pid)
    clean = [sys.executable, "-m", "cmoe", "unimed", "clean", str(run)]
    elsewhere = node_b.run(clean, env=ENV, timeout=120)
    assert elsewhere.returncode == 0 and temporary.exists(), elsewhere.stdout
    assert f"pid {pid} on nodeA" in elsewhere.stdout
    owner = node_a.run(clean, env=ENV, timeout=120)
    assert owner.returncode == 0 and not temporary.exists(), owner.stdout
    assert "its writer is gone" in owner.stdout
    node_a.kill_all()
    squatter.wait(timeout=60)
    squatter.stdout.close()
