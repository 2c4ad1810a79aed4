"""Launch material in launch/: scripts parse, Slurm/container recipes say what they must, and the
launchers build their commands as argument lists (checked with --dry-run and stand-in srun/apptainer
commands, so these run anywhere; tests/cluster runs the Slurm scripts on a real Slurm cluster)."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SHELL_SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
TESTCLUSTER_SCRIPTS = sorted((LAUNCH / "testcluster").glob("*.sh"))
SBATCH_SCRIPTS = sorted(LAUNCH.glob("*.sbatch"))
# The venv running these tests holds the real `resflow` console script.
VENV = Path(sys.prefix)


def run_script(args: list[str], env_extra: dict[str, str] | None = None,
               path_prefix: Path | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a launch script with bash and a controlled environment; never raises on failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RESFLOW_", "SPARK_"))}
    env.pop("HDF5_USE_FILE_LOCKING", None)
    env.pop("OMP_NUM_THREADS", None)
    env["RESFLOW_VENV"] = str(VENV)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    env.update(env_extra or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def code_lines(path: Path) -> list[str]:
    """Commands of a script or recipe: comments dropped ('#' after whitespace), continuations joined."""
    lines, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = re.sub(r"(^|\s)#.*$", "", line).strip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        if pending or stripped:
            lines.append((pending + stripped).strip())
        pending = ""
    return lines


def def_sections(path: Path) -> dict[str, str]:
    """Sections of an Apptainer definition file: '%post' -> its body."""
    sections: dict[str, str] = {}
    current = None
    for line in path.read_text().splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            current = match.group(1)
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def recording_command(bin_dir: Path, name: str, log: Path, mpi_list: str = "pmix none pmi2") -> None:
    """Put an executable NAME in bin_dir that appends its arguments (one per line) to log; as srun,
    `--mpi=list` answers with the plugin names in mpi_list (like Slurm's listing) unrecorded."""
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    listing = "MPI plugin types are...\\n" + "".join(f"\\t{m}\\n" for m in mpi_list.split())
    exe.write_text(f'#!/bin/bash\nif [[ "$1" == --mpi=list ]]; then printf "{listing}" >&2; exit 0; fi\n'
                   f'{{ echo "{name}"; printf "%s\\n" "$@"; echo "--"; }} >> "{log}"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def recorded_calls(log: Path) -> list[list[str]]:
    """The argument lists a recording command saw, in call order."""
    calls, current = [], []
    for line in log.read_text().splitlines():
        if line == "--":
            calls.append(current)
            current = []
        else:
            current.append(line)
    return calls


def test_every_launch_script_is_found_and_executable() -> None:
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"install.sh", "mpirun.sh", "spark-submit.sh", "slurm-1node.sbatch",
            "slurm-multinode.sbatch", "slurm-scaling-array.sbatch"} <= names
    assert {p.name for p in TESTCLUSTER_SCRIPTS} == {"slurm-cluster.sh", "netns-hosts.sh",
                                                     "netns-agent.sh"}
    for script in SHELL_SCRIPTS + TESTCLUSTER_SCRIPTS:
        assert os.access(script, os.X_OK), f"{script.name} is not executable (chmod +x)"


@pytest.mark.parametrize("script", SHELL_SCRIPTS + TESTCLUSTER_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_requests_resources_and_uses_srun(script: Path) -> None:
    directives = [ln for ln in script.read_text().splitlines() if ln.startswith("#SBATCH ")]
    joined = "\n".join(directives)
    assert re.search(r"--nodes=\d+", joined)
    assert re.search(r"--ntasks(-per-node)?=\d+", joined)
    assert re.search(r"--time=[\d:-]+", joined)
    # Every srun starts ranks with the plugin the script picked from `srun --mpi=list`.
    srun_lines = [ln for ln in code_lines(script) if re.search(r"\bsrun\b", ln)
                  and "--mpi=list" not in ln and not ln.startswith("echo ")]
    assert srun_lines and all('--mpi="$SRUN_MPI"' in ln for ln in srun_lines)
    assert any("srun --mpi=list" in ln for ln in code_lines(script))


def test_gpu_sbatch_scripts_bind_one_gpu_per_rank() -> None:
    for name in ("slurm-1node.sbatch", "slurm-multinode.sbatch"):
        text = (LAUNCH / name).read_text()
        for directive in ("--ntasks-per-node=", "--gpus-per-task=1", "--gpu-bind=", "--cpus-per-task=",
                          "--mem="):
            assert f"#SBATCH {directive}" in text, f"{name} lacks #SBATCH {directive}"
    assert "#SBATCH --nodes=1" in (LAUNCH / "slurm-1node.sbatch").read_text()
    nodes = re.search(r"#SBATCH --nodes=(\d+)", (LAUNCH / "slurm-multinode.sbatch").read_text())
    assert nodes and int(nodes.group(1)) >= 2


def test_containers_are_built_by_the_install_script() -> None:
    sections = def_sections(LAUNCH / "resflow.def")
    header = (LAUNCH / "resflow.def").read_text().split("%", 1)[0]
    assert re.search(r"^Bootstrap:\s*docker", header, re.M)
    assert re.search(r"^From:\s*debian:bookworm", header, re.M)
    assert re.search(r"bash /opt/resflow/launch/install\.sh", sections["post"])
    assert "RESFLOW_VENV=/opt/resflow/.venv" in sections["post"]
    assert "/opt/resflow/.venv/bin" in sections["environment"]
    assert "H5PY_ALWAYS_USE_MPI=1" in sections["environment"]
    assert 'exec resflow "$@"' in sections["runscript"]
    assert "resflow info" in sections["test"]
    assert {"labels", "help", "files"} <= sections.keys()
    docker_runs = [ln for ln in code_lines(LAUNCH / "Dockerfile") if ln.startswith("RUN ")]
    assert any("launch/install.sh" in ln for ln in docker_runs)
    assert re.search(r"^FROM debian:bookworm", (LAUNCH / "Dockerfile").read_text(), re.M)
    # The documented native install route is the same script.
    docs = [LAUNCH / "README-launch.md"] + ([REPO / "README.md"] if (REPO / "README.md").exists() else [])
    for doc in docs:
        assert "launch/install.sh" in doc.read_text(), f"{doc.name} does not name launch/install.sh"


def test_container_copy_sources_exist_in_the_repository() -> None:
    sources = [line.split()[0] for line in def_sections(LAUNCH / "resflow.def")["files"].splitlines()
               if line.strip()]
    sources += [ln.split()[1] for ln in code_lines(LAUNCH / "Dockerfile") if ln.startswith("COPY ")]
    assert "launch" in sources and "resflow_mpi" in sources and "setup.py" in sources
    for source in sources:
        assert (REPO / source).exists(), f"container recipe copies '{source}', missing from the repo"


def test_mpirun_without_arguments_prints_usage_and_fails() -> None:
    result = run_script([str(LAUNCH / "mpirun.sh")])
    assert result.returncode != 0
    assert "Usage:" in result.stderr and "CONFIG" in result.stderr


def test_mpirun_rejects_bad_input_before_starting_mpi(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("output: {dir: out}\n")
    missing = run_script([str(LAUNCH / "mpirun.sh"), str(tmp_path / "nope.yaml")])
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    bad_ranks = run_script([str(LAUNCH / "mpirun.sh"), "-n", "two", str(config)])
    assert bad_ranks.returncode == 2 and "-n" in bad_ranks.stderr
    bad_bind = run_script([str(LAUNCH / "mpirun.sh"), "--bind-to", "socket", str(config)])
    assert bad_bind.returncode == 2 and "--bind-to" in bad_bind.stderr


def test_mpirun_dry_run_builds_one_argument_list(tmp_path: Path) -> None:
    # A config path with spaces and shell syntax must reach resflow as one literal argument.
    config = tmp_path / "my cfg $(touch pwned).yaml"
    config.write_text("output: {dir: out}\n")
    ranks = (os.cpu_count() or 1) + 1
    result = run_script([str(LAUNCH / "mpirun.sh"), "-n", str(ranks), "--bind-to", "core", "--dry-run",
                         str(config), "--set", "output.dir=a b"],
                        env_extra={"HDF5_USE_FILE_LOCKING": "FALSE", "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:3] == ["mpirun", "-n", str(ranks)]
    assert "--oversubscribe" in argv
    assert argv[argv.index("--bind-to") + 1] == "none"  # core binding is impossible when oversubscribed
    forwarded = {argv[i + 1] for i, arg in enumerate(argv) if arg == "-x"}
    assert {"H5PY_ALWAYS_USE_MPI", "OMP_NUM_THREADS", "HDF5_USE_FILE_LOCKING"} <= forwarded
    assert argv[-5:] == [str(VENV / "bin" / "resflow"), "run", str(config), "--set", "output.dir=a b"]
    assert not (tmp_path / "pwned").exists()


def test_mpirun_dry_run_keeps_core_binding_within_the_cores(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("output: {dir: out}\n")
    result = run_script([str(LAUNCH / "mpirun.sh"), "-n", "1", "--bind-to", "core", "--dry-run",
                         str(config)])
    argv = shlex.split(result.stdout)
    assert result.returncode == 0, result.stderr
    assert "--oversubscribe" not in argv and argv[argv.index("--bind-to") + 1] == "core"
    assert "HDF5_USE_FILE_LOCKING" not in argv  # forwarded only when the user set it


def test_sbatch_container_mode_runs_resflow_inside_apptainer(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    recording_command(tmp_path / "bin", "srun", log)
    image = tmp_path / "resflow.sif"
    image.write_bytes(b"")
    config = tmp_path / "cfg.yaml"
    config.write_text("output: {dir: out}\n")
    result = run_script([str(LAUNCH / "slurm-multinode.sbatch"), str(config), "--restart"],
                        env_extra={"SLURM_CPUS_PER_TASK": "6", "SLURM_SUBMIT_DIR": str(REPO),
                                   "RESFLOW_CONTAINER": str(image), "RESFLOW_BINDS": "/scratch"},
                        path_prefix=tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    info, run = recorded_calls(log)
    expected_prefix = ["srun", "--mpi=pmix", "--cpus-per-task=6", "apptainer", "exec", "--nv",
                       "-B", "/scratch", str(image), "resflow"]
    assert info == expected_prefix + ["info"]
    assert run == expected_prefix + ["run", str(config), "--set", "inference.threads_per_rank=6",
                                     "--restart"]


def test_sbatch_native_mode_uses_the_venv_and_sets_threads(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    recording_command(tmp_path / "bin", "srun", log)
    config = tmp_path / "cfg.yaml"
    config.write_text("output: {dir: out}\n")
    result = run_script([str(LAUNCH / "slurm-1node.sbatch"), str(config)],
                        env_extra={"SLURM_CPUS_PER_TASK": "3", "RESFLOW_SHOW_BINDING": "0"},
                        path_prefix=tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    (run,) = recorded_calls(log)
    assert run[:3] == ["srun", "--mpi=pmix", "--cpus-per-task=3"]
    assert run[3:] == [str(VENV / "bin" / "resflow"), "run", str(config), "--set",
                       "inference.threads_per_rank=3"]


def fake_scaling_study(root: Path) -> None:
    """A stand-in ROOT/perf/scaling.py that records its arguments in the folder it is given."""
    (root / "perf").mkdir()
    (root / "perf" / "scaling.py").write_text(
        "import json, pathlib, sys\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(parents=True)\n"
        "(out / 'args.json').write_text(json.dumps(sys.argv[1:]))\n")


def test_scaling_array_maps_index_to_rank_count(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    recording_command(tmp_path / "bin", "srun", log)
    fake_scaling_study(tmp_path)
    results = tmp_path / "results"
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "2",
           "RESFLOW_ROOT": str(tmp_path), "RESFLOW_SCALING_OUT": str(results)}
    result = run_script([str(LAUNCH / "slurm-scaling-array.sbatch")], env_extra=env,
                        path_prefix=tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-4" in (LAUNCH / "slurm-scaling-array.sbatch").read_text()
    (info,) = recorded_calls(log)
    assert info[:4] == ["srun", "--mpi=pmix", "--ntasks=8", "--cpus-per-task=2"]
    assert info[-1] == "info"
    for mode in ("strong", "weak"):
        args = json.loads((results / "ranks-8" / mode / "args.json").read_text())
        assert args == ["--mode", mode, "--ranks", "8", "--out", str(results / "ranks-8" / mode)]
    out_of_range = run_script([str(LAUNCH / "slurm-scaling-array.sbatch")],
                              env_extra={**env, "SLURM_ARRAY_TASK_ID": "5"}, path_prefix=tmp_path / "bin")
    assert out_of_range.returncode == 2 and "array index 5" in out_of_range.stderr


def test_spark_submit_needs_config_and_master(tmp_path: Path) -> None:
    no_args = run_script([str(LAUNCH / "spark-submit.sh")])
    assert no_args.returncode != 0 and "Usage:" in no_args.stderr
    config = tmp_path / "cfg.yaml"
    config.write_text("output: {dir: out}\n")
    no_master = run_script([str(LAUNCH / "spark-submit.sh"), str(config)])
    assert no_master.returncode == 2 and "SPARK_MASTER" in no_master.stderr
    text = (LAUNCH / "spark-submit.sh").read_text()
    assert '--set "spark.master=$SPARK_MASTER"' in text and "--engine spark" in text


LAUNCH_TEXT_FILES = SHELL_SCRIPTS + [LAUNCH / "resflow.def", LAUNCH / "Dockerfile"] + [
    p for p in TESTCLUSTER_SCRIPTS if p.name != "netns-agent.sh"]
# netns-agent.sh stands in for ssh as Open MPI's plm_rsh_agent: like sshd it must hand the command
# line Open MPI quoted for a remote shell to a shell (bash -c), so it alone is exempt.


@pytest.mark.parametrize("path", LAUNCH_TEXT_FILES, ids=lambda p: p.name)
def test_no_launch_file_evaluates_strings_as_shell_code(path: Path) -> None:
    # Config values and paths travel as argument arrays; a string run as code could inject commands.
    offenders = [ln for ln in code_lines(path)
                 if re.search(r"\beval\b|\b(ba|z|da)?sh\s+-c\b|\bsource\s+<\(", ln)]
    assert offenders == []


@pytest.mark.parametrize("listed, override, expected", [
    ("pmix pmix_v4 none pmi2", "", "pmix"),   # Debian 12's Slurm 22.05
    ("none pmi2 cray_shasta", "", "pmi2"),    # a Slurm built without PMIx
    ("pmix none pmi2", "none", "none"),       # RESFLOW_SRUN_MPI wins
])
def test_sbatch_picks_srun_mpi_plugin_from_the_list(tmp_path: Path, listed: str, override: str,
                                                    expected: str) -> None:
    log = tmp_path / "calls.log"
    recording_command(tmp_path / "bin", "srun", log, mpi_list=listed)
    config = tmp_path / "cfg.yaml"
    config.write_text("output: {dir: out}\n")
    extra = {"SLURM_CPUS_PER_TASK": "1", "RESFLOW_SHOW_BINDING": "0"}
    if override:
        extra["RESFLOW_SRUN_MPI"] = override
    result = run_script([str(LAUNCH / "slurm-1node.sbatch"), str(config)], env_extra=extra,
                        path_prefix=tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    (run,) = recorded_calls(log)
    assert run[1] == f"--mpi={expected}"
    assert f"srun --mpi={expected}" in result.stdout


def test_scaling_array_passes_options_to_the_scaling_study(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    recording_command(tmp_path / "bin", "srun", log)
    fake_scaling_study(tmp_path)
    results = tmp_path / "results"
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_CPUS_PER_TASK": "1", "RESFLOW_ROOT": str(tmp_path),
           "RESFLOW_SCALING_OUT": str(results)}
    result = run_script([str(LAUNCH / "slurm-scaling-array.sbatch"), "--quick", "--gallery", "g d"],
                        env_extra=env, path_prefix=tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    args = json.loads((results / "ranks-1" / "strong" / "args.json").read_text())
    assert args[-3:] == ["--quick", "--gallery", "g d"]
    assert (results / "ranks-1" / "weak" / "args.json").exists()
    strong_only = run_script([str(LAUNCH / "slurm-scaling-array.sbatch")],
                             env_extra={**env, "SLURM_ARRAY_TASK_ID": "1",
                                        "RESFLOW_SCALING_MODES": "strong"},
                             path_prefix=tmp_path / "bin")
    assert strong_only.returncode == 0, strong_only.stderr
    assert (results / "ranks-2" / "strong").is_dir() and not (results / "ranks-2" / "weak").exists()
    bad = run_script([str(LAUNCH / "slurm-scaling-array.sbatch")],
                     env_extra={**env, "RESFLOW_SCALING_MODES": "strong; rm -rf /"},
                     path_prefix=tmp_path / "bin")
    assert bad.returncode == 2 and "RESFLOW_SCALING_MODES" in bad.stderr


def test_netns_agent_runs_only_in_a_namespace_that_owns_the_address() -> None:
    agent = LAUNCH / "testcluster" / "netns-agent.sh"
    bad = subprocess.run(["bash", str(agent), "not-an-ip", "true"], capture_output=True, text=True)
    assert bad.returncode == 255 and "IPv4" in bad.stderr
    none = subprocess.run(["bash", str(agent), "192.0.2.254", "true"], capture_output=True, text=True)
    assert none.returncode == 255 and "no network namespace owns 192.0.2.254" in none.stderr


def test_install_script_rejects_unknown_options() -> None:
    result = run_script([str(LAUNCH / "install.sh"), "--with-slurmm"])
    assert result.returncode == 2 and "--with-slurm" in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "say where torch comes from: --torch-index URL"),
    (["--torch-index", "cpu", "--mpi", "lam"], "--mpi must be openmpi, mpich or site, got 'lam'"),
    (["--torch-index", "cpu", "--wheels"], "--wheels needs a value"),
    (["--torch-indx", "cpu"], "unknown option '--torch-indx'"),
])
def test_pip_install_script_refuses_before_installing(tmp_path: Path, args: list[str],
                                                      message: str) -> None:
    venv = tmp_path / "venv"
    result = run_script([str(LAUNCH / "install-pip.sh"), *args], {"RESFLOW_VENV": str(venv)})
    assert result.returncode == 2 and message in result.stderr
    assert not venv.exists()
