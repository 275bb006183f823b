"""Real SLURM integration test (issue 6): a single-node SLURM cluster on localhost runs workflows
with ``--executor slurm`` and ``--profile profiles/slurm``; the jobs must really go through
sbatch (SLURM job ids in snakemake's log, known to slurmctld, COMPLETED, tagged with their rule)
and their outputs must be right.

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge; they are installed
with ``.ci/install-slurm.sh`` when missing. The module is skipped (with the reason) only when
that is impossible. Each snakemake run is wrapped in ``timeout -k``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm.cluster import SlurmCluster, SlurmRun, ensure_installed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TEST_ACCOUNT = "qatforge-test"  # accepted by sbatch: the test cluster has no accounting

# Reduced target of the real pipeline, run on a pre-built tiny workdir: the listed outputs are
# deleted and rebuilt through SLURM; files in DETERMINISTIC must come back byte-identical.
# TODO(lead): confirm the target (cheap leaf jobs that do not cascade into training).
PIPELINE_TARGETS = ["results/eval/baseline/gguf/Q8_0.json"]
PIPELINE_DELETE = [
    "results/runs/baseline/gguf/TinyQwen3-Q8_0.gguf",
    "results/runs/baseline/gguf/TinyQwen3-Q8_0.gguf.json",
    "results/eval/baseline/gguf/Q8_0.json",
]
PIPELINE_DETERMINISTIC = ["results/runs/baseline/gguf/TinyQwen3-Q8_0.gguf"]
LOCAL_RULES = {"all", "report", "parity_gate", "ollama_modelfile"}  # `localrules:` in the Snakefile

# Three independent rules (one SLURM "stage": status polling, not the jobs, dominates the time).
# Each writes the SLURM job id it ran in; b asks for the node's fake GPU, c for 2 CPUs.
TINY_SNAKEFILE = r"""
localrules: all

rule all:
    input: "a.txt", "b.txt", "c.txt"

rule a:
    output: "a.txt"
    shell: "echo $SLURM_JOB_ID > {output}"

rule b:
    output: "b.txt"
    resources: gpu=1
    shell: "echo $SLURM_JOB_ID ${{CUDA_VISIBLE_DEVICES:-none}} > {output}"

rule c:
    output: "c.txt"
    threads: 2
    run:
        import os
        with open(output[0], "w") as f:
            f.write(f"{os.environ['SLURM_JOB_ID']} {os.environ.get('SLURM_CPUS_PER_TASK', 'none')}\n")
"""


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM integration test must run as root (it writes /etc/slurm, starts daemons)")
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        print(f"SLURM cluster start-up: {cluster.startup_seconds:.1f} s")
        yield cluster


def make_test_profile(cluster: SlurmCluster, dest: Path, source: Path = REPO / "profiles/slurm") -> Path:
    """Copy of the SLURM profile pointed at the test cluster (partition, account, squeue status)."""
    profile = yaml.safe_load((source / "config.yaml").read_text())
    assert profile["executor"] == "slurm", f"{source}/config.yaml: executor must be slurm"
    profile.setdefault("default-resources", {}).update(
        slurm_partition=cluster.partition, slurm_account=TEST_ACCOUNT
    )
    profile.update({
        # no slurmdbd here: sacct never sees the jobs, so query slurmctld (MinJobAge=300)
        "slurm-status-command": "squeue",
        # poll fast: the test jobs take seconds, not hours
        "slurm-init-seconds-before-status-checks": 1,
        "seconds-between-status-checks": 1,
        "slurm-keep-successful-logs": True,
        "jobs": 4,
        "retries": 0,
    })
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def planned_jobs(workdir: Path, targets: list[str]) -> dict[str, int]:
    """Rules snakemake would run for ``targets`` and how often (parsed from a dry run's job stats)."""
    proc = subprocess.run(
        ["timeout", "-k", "10", "300", SNAKEMAKE, "-n", "--quiet", "rules", "--", *targets],
        cwd=workdir, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = re.search(r"^Job stats:\n(.*?)^total\s", proc.stdout + proc.stderr, re.S | re.M)
    assert stats, f"no job stats in the dry run:\n{proc.stdout}{proc.stderr}"
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)\s*$", stats.group(1), re.M)}


def assert_went_through_slurm(run: SlurmRun, cluster: SlurmCluster, expected_rules: dict[str, int]) -> None:
    """Every non-local job was an sbatch job that slurmctld ran to COMPLETED, one per planned job."""
    assert run.returncode == 0, f"snakemake failed ({run.returncode}) after {run.seconds:.0f} s:\n{run.log[-6000:]}"
    assert run.run_id, "no 'SLURM run ID' in snakemake's log: the slurm executor was not used"
    submitted_rules: dict[str, int] = {}
    ctld_log = cluster.controller_log()
    for slurm_id, fields in run.slurm_jobs.items():
        assert fields, f"SLURM job {slurm_id} unknown to slurmctld"
        assert fields["JobState"] == "COMPLETED", f"SLURM job {slurm_id}: {fields['JobState']} {fields.get('Reason')}"
        assert fields["JobName"] == run.run_id, fields
        assert f"JobId={slurm_id}" in ctld_log, f"SLURM job {slurm_id} not in the slurmctld log"
        rule = run.rule_of(slurm_id)
        submitted_rules[rule] = submitted_rules.get(rule, 0) + 1
    assert submitted_rules == expected_rules, (submitted_rules, expected_rules)
    print(f"SLURM run {run.run_id}: {run.seconds:.1f} s, jobs {dict(sorted(run.submitted.items()))}")


def test_tiny_workflow_runs_through_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Three rules (one asking for ``gpu: 1``) run as SLURM jobs with the project's profile."""
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(TINY_SNAKEFILE)
    shutil.copytree(REPO / "profiles/default", workdir / "profiles/default")  # the workflow profile
    profile = make_test_profile(slurm_cluster, tmp_path / "profile")

    run = slurm_cluster.run_snakemake(workdir, ["--profile", str(profile)], timeout=240)

    assert_went_through_slurm(run, slurm_cluster, {"a": 1, "b": 1, "c": 1})
    by_rule = {run.rule_of(sid): sid for sid in run.slurm_jobs}
    # each output was written inside its own SLURM job
    assert (workdir / "a.txt").read_text().split() == [str(by_rule["a"])]
    job_b, visible = (workdir / "b.txt").read_text().split()
    assert (int(job_b), visible) == (by_rule["b"], "0"), "the gpu job did not get the (fake) GPU 0"
    assert (workdir / "c.txt").read_text().split() == [str(by_rule["c"]), "2"], "rule c (threads: 2) did not run with --cpus-per-task=2"
    # SLURM saw the resource requests of the profile and the rules
    jobs = run.slurm_jobs
    assert "gpu:1" in jobs[by_rule["b"]].get("TresPerJob", ""), jobs[by_rule["b"]]
    assert all("gpu" not in jobs[by_rule[r]].get("TresPerJob", "") for r in ("a", "c"))
    assert jobs[by_rule["c"]]["NumCPUs"] == "2"
    assert all(j["Account"] == TEST_ACCOUNT and j["Partition"] == slurm_cluster.partition for j in jobs.values())
    assert all(j["TimeLimit"] == "00:30:00" for j in jobs.values()), "profile runtime: 30 not applied"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipeline_target_runs_through_slurm(slurm_cluster: SlurmCluster, built_workdir: Path, tmp_path: Path) -> None:
    """A reduced target of the real tiny pipeline is rebuilt through SLURM, identical to the local build."""
    workdir = Path(built_workdir)  # its config/config.yaml is the smoke config it was built with
    expected_hash = {p: _sha256(workdir / p) for p in PIPELINE_DETERMINISTIC}
    expected_keys = {p: sorted(json.loads((workdir / p).read_text())) for p in PIPELINE_TARGETS if p.endswith(".json")}
    for p in PIPELINE_DELETE:
        target = workdir / p
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    plan = planned_jobs(workdir, PIPELINE_TARGETS)
    assert plan and "train" not in plan, f"reduced target would retrain: {plan}"
    profile = make_test_profile(slurm_cluster, tmp_path / "profile")
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # as in conftest.snakemake

    run = slurm_cluster.run_snakemake(
        workdir, ["--profile", str(profile), "--", *PIPELINE_TARGETS], timeout=900, extra_env=env
    )

    assert_went_through_slurm(run, slurm_cluster, {r: n for r, n in plan.items() if r not in LOCAL_RULES})
    for p in PIPELINE_DELETE:
        assert (workdir / p).exists(), f"{p} was not rebuilt"
    for p, digest in expected_hash.items():
        assert _sha256(workdir / p) == digest, f"{p} rebuilt through SLURM differs from the local build"
    for p, keys in expected_keys.items():
        assert sorted(json.loads((workdir / p).read_text())) == keys, f"{p}: other fields than the local build"
