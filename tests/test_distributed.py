"""torchrun data parallel: 2 CPU ranks (gloo) give the results of one process; ranks that disagree
stop; a run that lost a rank resumes from the result cache."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch.multiprocessing as mp

from evalsuite.distributed import World, shard
from helpers import cache_rows

ROOT = Path(__file__).resolve().parents[1]


def test_shard_cuts_contiguous_runs_of_equal_cost():
    costs = [5, 1, 1, 1, 7, 2, 2, 3, 3, 3, 1, 9, 4, 4, 2]
    for size in (1, 2, 3, 4):
        ranks = shard(costs, size)
        assert ranks == sorted(ranks) and set(ranks) == set(range(size))  # contiguous, nobody idle
        loads = [sum(c for c, r in zip(costs, ranks) if r == k) for k in range(size)]
        assert max(loads) - sum(costs) / size <= max(costs)
        assert shard(costs, size) == ranks  # the same on every rank
    assert shard([0, 0], 2) == [0, 0] and shard([], 3) == []


def _agree(rank: int, init_file: str, facts: list[dict], errors):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a stuck group fails the test
    try:
        World(rank, 2).agree(facts[rank])
        errors.put((rank, None))
    except ValueError as e:
        errors.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def _agree_on_two_ranks(tmp_path, facts):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    # a new rendezvous file per group: a file left by the previous group could be read by the next
    init = tmp_path / f"init-{uuid.uuid4().hex}"
    mp.start_processes(_agree, args=(str(init), facts, errors), nprocs=2, start_method="spawn")
    return dict(errors.get() for _ in range(2))


def test_ranks_that_disagree_stop_naming_what_differs(tmp_path):
    same = {"config": "c1", "model.fingerprint_sha256": "w1", "task arc_e": "d1"}
    assert _agree_on_two_ranks(tmp_path, [same, same]) == {0: None, 1: None}
    got = _agree_on_two_ranks(tmp_path, [same, {**same, "task arc_e": "d2"}])
    for msg in got.values():  # both ranks stop, with the same message
        assert msg and "do not run the same evaluation (task arc_e: rank 0 d1, rank 1 d2)" in msg
        assert "config" not in msg.split("(")[1]
    got = _agree_on_two_ranks(tmp_path, [same, {"config": "c1", "model.fingerprint_sha256": "w1"}])
    assert "task arc_e: rank 0 d1, rank 1 (missing)" in got[1]


# ---- end to end with torchrun ------------------------------------------------------------------

def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _torchrun(nproc: int, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "evalsuite", *args]


def _single(*args):
    return [sys.executable, "-m", "evalsuite", *args]


def _ok(cmd, cwd, **env):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=_env(**env))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _load(out: Path):
    (res_file,) = out.glob("*/results.json")
    res = json.loads(res_file.read_text())
    samples = {p.name: [json.loads(line) for line in p.read_text().splitlines()]
               for p in sorted(res_file.parent.glob("samples_*.jsonl"))}
    return res, samples


def _assert_same_results(a, b):
    """Metrics and every per-item record equal; log-probs to 1e-4 (batches differ between runs)."""
    (res_a, samples_a), (res_b, samples_b) = a, b
    assert {n: t["metrics"] for n, t in res_a["tasks"].items()} == {n: t["metrics"] for n, t in res_b["tasks"].items()}
    assert samples_a.keys() == samples_b.keys()
    for name in samples_a:
        assert len(samples_a[name]) == len(samples_b[name])
        for ra, rb in zip(samples_a[name], samples_b[name]):
            lps_a, lps_b = ra.pop("logprobs", []), rb.pop("logprobs", [])
            assert ra == rb
            assert len(lps_a) == len(lps_b) and all(abs(x - y) <= 1e-4 for x, y in zip(lps_a, lps_b))


def test_two_torchrun_ranks_give_the_results_of_one_process(tmp_path):
    args = ["+tasks=[arc_e,nq]", "limit=6", "progress=false", "cache=off"]  # log-likelihood and generation
    _ok(_single(*args, f"output_dir={tmp_path / 'one'}"), tmp_path)
    proc = _ok(_torchrun(2, *args, f"output_dir={tmp_path / 'two'}"), tmp_path)
    assert len(list((tmp_path / "two").iterdir())) == 1  # one run folder, written by rank 0
    one, two = _load(tmp_path / "one"), _load(tmp_path / "two")
    _assert_same_results(one, two)
    assert proc.stdout.count("results: ") == 1  # rank 0 alone prints (and writes) the results
    dist = two[0]["distributed"]
    assert dist["world_size"] == 2 and all(r["computed"] > 0 for r in dist["ranks"])
    assert sum(r["computed"] for r in dist["ranks"]) == one[0]["cache"]["requests_computed"] == \
        two[0]["cache"]["requests_computed"]
    assert two[0]["timing"]["tokens_generated"] == one[0]["timing"]["tokens_generated"]


def _pid_of_rank(rank: int, tag: str) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"EVALSUITE_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_run_that_lost_a_rank_resumes_from_the_cache(tiny_gemma2_folder, tmp_path):
    args = ["+tasks=[arc_e,gsm8k]", "limit=8", f"model.path={tiny_gemma2_folder}", "model.preset=null",
            "batch_size=4", "progress=false"]
    ref = _ok(_single(*args, "cache=off", f"output_dir={tmp_path / 'ref'}"), tmp_path)
    assert ref.returncode == 0
    reference = _load(tmp_path / "ref")
    total = reference[0]["cache"]["requests_computed"]

    out, tag = tmp_path / "out", str(tmp_path)
    job = subprocess.Popen(_torchrun(2, *args, f"output_dir={out}"), cwd=tmp_path, env=_env(EVALSUITE_TEST_TAG=tag),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and cache_rows(out / "cache").get("rank1", 0) < 4:
        time.sleep(0.01)
    pid = _pid_of_rank(1, tag)
    assert job.poll() is None and pid, "the job ended before rank 1 could be killed"
    os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    kept = sum(cache_rows(out / "cache").values())
    assert 4 <= kept < total and not list(out.glob("*/results.json"))

    # Resumed by one process (the world size may change): the cache holds both ranks' files.
    again = _ok(_single(*args, f"output_dir={out}"), tmp_path)
    resumed = _load(out)
    assert resumed[0]["cache"]["requests_from_cache"] == kept
    assert resumed[0]["cache"]["requests_computed"] == total - kept
    _assert_same_results(reference, resumed)
    assert f"{kept} requests read" in again.stdout
