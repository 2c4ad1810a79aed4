"""The launch kit's Slurm scripts run for real on a one-machine Slurm cluster (slurmctld + slurmd +
munged from Debian 12): sbatch --wait, the job's state in sacct, srun's MPI plugin, the scaling
array and its merge."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import REPO, assert_same_masks, report, run, writer_ranks

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
VENV = Path(sys.prefix)
# This node has no GPUs and little memory: the same overrides a CPU-only site would give.
CPU_NODE = ["--gpus-per-task=0", "--mem=2G", "--cpus-per-task=1"]


def sacct_rows(cluster: dict[str, str]) -> dict[str, list[str]]:
    """JobID -> [JobName, State, ExitCode] from `sacct --completion` (jobcomp/filetxt)."""
    p = run(["sacct", "--completion", "-n", "-P", "-o", "JobID,JobName,State,ExitCode"], timeout=30,
            extra_env=cluster)
    print(p.stdout)
    return {line.split("|")[0]: line.split("|")[1:] for line in p.stdout.splitlines() if "|" in line}


def submitted_id(stdout: str) -> str:
    match = re.search(r"Submitted batch job (\d+)", stdout)
    assert match, stdout
    return match.group(1)


def test_srun_lists_pmix_and_starts_mpi_ranks_with_it(slurm_cluster: dict[str, str]) -> None:
    plugins = run(["srun", "--mpi=list"], timeout=30, extra_env=slurm_cluster)
    assert re.search(r"^\s*pmix\s*$", plugins.stdout + plugins.stderr, re.M), plugins.stdout
    hello = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print('rank', c.rank, 'of', c.size, 'sum', c.allreduce(c.rank + 1))")
    p = run(["srun", "--mpi=pmix", "-n", "2", "--cpus-per-task=1", sys.executable, "-c", hello],
            timeout=120, extra_env=slurm_cluster)
    assert sorted(p.stdout.split("\n")[:2]) == ["rank 0 of 2 sum 3", "rank 1 of 2 sum 3"], p.stdout


def test_sbatch_1node_completes_and_matches_plain_mpirun(slurm_cluster: dict[str, str],
                                                         cluster_run_config: Path,
                                                         one_host_reference: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    log = tmp_path / "job-%j.out"
    p = run(["sbatch", "--wait", "--ntasks-per-node=2", *CPU_NODE, f"--output={log}",
             str(REPO / "launch" / "slurm-1node.sbatch"), str(cluster_run_config),
             "--set", f"output.dir={out}"],
            timeout=600, extra_env={**slurm_cluster, "RESFLOW_VENV": str(VENV)}, cwd=REPO)
    job = submitted_id(p.stdout)
    text = (tmp_path / f"job-{job}.out").read_text()
    print(text)
    assert sacct_rows(slurm_cluster)[job] == ["resflow-1node", "COMPLETED", "0:0"]
    # The kit picked pmix from `srun --mpi=list`, and `resflow info` ran on both ranks.
    assert "srun --mpi=pmix" in text
    assert len(re.findall(r"^binding: rank [01]/2 on ", text, re.M)) == 2
    assert all(s["complete"] for s in report(out)["scenes"])
    assert writer_ranks(out) == {0, 1}
    assert_same_masks(out, one_host_reference)


def test_scaling_array_ranks_1_and_2_then_merge(slurm_cluster: dict[str, str], tiny_gallery: Path,
                                                tmp_path: Path) -> None:
    results = tmp_path / "results"
    p = run(["sbatch", "--wait", "--array=0-1", "--ntasks=2", "--cpus-per-task=1", "--mem=2G",
             f"--output={tmp_path}/scaling-%A_%a.out",
             str(REPO / "launch" / "slurm-scaling-array.sbatch"), "--quick", "--gallery",
             str(tiny_gallery)],
            timeout=600, cwd=REPO,
            extra_env={**slurm_cluster, "RESFLOW_VENV": str(VENV), "RESFLOW_SCALING_OUT": str(results),
                       "RESFLOW_PERF_CACHE": str(tmp_path / "cache"),
                       "RESFLOW_SCALING_MODES": "strong"})  # the merged table is the strong one
    array = submitted_id(p.stdout)
    comp = Path(slurm_cluster["STATE"], "jobcomp.txt").read_text().splitlines()
    tasks = [line for line in comp if f" ArrayJobId={array} " in line]
    assert len(tasks) == 2 and all("JobState=COMPLETED" in t and " ExitCode=0:0" in t for t in tasks)
    rows = sacct_rows(slurm_cluster)
    ids = [re.search(r"JobId=(\d+)", t).group(1) for t in tasks]
    assert all(rows[i] == ["resflow-scaling", "COMPLETED", "0:0"] for i in ids)
    for ranks in (1, 2):
        binding = (results / f"ranks-{ranks}" / "binding.txt").read_text()
        assert len(re.findall(r"^binding: rank \d+/%d " % ranks, binding, re.M)) == ranks
    merged = tmp_path / "merged"
    parts = [str(results / f"ranks-{n}" / "strong" / "scaling-strong.json") for n in (1, 2)]
    m = run([sys.executable, str(REPO / "perf" / "scaling.py"), "--mode", "strong", "--merge", *parts,
             "--out", str(merged)], timeout=120)
    table = (merged / "scaling-strong.md").read_text()
    print(table)
    assert re.search(r"^\| 1 \| [\d.]+ s \(S 1\.00, E 1\.00", table, re.M), m.stdout
    assert re.search(r"^\| 2 \| [\d.]+ s \(S [\d.]+, E [\d.]+", table, re.M), m.stdout
