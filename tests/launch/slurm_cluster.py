"""A throwaway one-node SLURM cluster on this machine, for testing the batch scripts for real.

Debian's `slurm-wlm` and `munge` (install: `bash launch/setup_env.sh --slurm`) are enough: a
private munged, slurmctld and slurmd run in the foreground as children of the test process, with
every file (config, keys, sockets, state, logs) under one temporary folder, on free ports, so they
touch neither /etc/slurm, /etc/munge nor a SLURM or munge already running here. No cgroups:
`ProctrackType=proctrack/linuxproc` and `TaskPlugin=task/none` work in containers and sandboxes.
The daemons need root (slurmd launches jobs as their users).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

SKIP_ENV = "SAM_DISTILL_SKIP_SLURM"
SETUP_HINT = "run `bash launch/setup_env.sh --slurm` as root (apt-get install slurm-wlm munge)"
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel")
BINARIES += ("squeue", "sinfo")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # daemons live here, often not on a user's PATH
FINISHED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
)
FINISHED += ("DEADLINE", "PREEMPTED")

SLURM_CONF = """\
ClusterName=samdistilltest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
# cred_expire: a requeued job waits this long (default 120 s) before it may start again.
AuthInfo=socket={munge_socket},cred_expire=15
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` (no accounting database here).
MinJobAge=3600
# Job ids (and so the batch scripts' MASTER_PORT) differ between clusters running side by side.
FirstJobId={first_job_id}
KillWait=5
# The node may claim more CPUs than it has, so 2-task jobs also run on a 1-core machine.
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if which(name) is None]


def parse_job(text: str) -> dict[str, str]:
    """`scontrol show job -o` output as a dict (values never hold spaces in these tests)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmError(RuntimeError):
    pass


class LocalSlurm:
    """munged + slurmctld + slurmd under `root`; `env` is what client commands need."""

    def __init__(self, root: Path | None = None, cpus: int | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="sam-distill-slurm-"))
        # munged wants every folder above its socket traversable by all.
        self.root.chmod(0o755)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.conf = self.root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        self.env |= {
            "SLURM_CONF": str(self.conf),
            "PATH": os.pathsep.join([self.env.get("PATH", ""), *SBIN]),
        }
        for name in ("SRUN_CPUS_PER_TASK", "SALLOC_PARTITION", "SRUN_PARTITION"):
            self.env.pop(name, None)
        self.procs: dict[str, subprocess.Popen] = {}

    # -- daemons -------------------------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> None:
        out = open(self.root / f"{name}.out", "w")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            [which(name), *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    def _until(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(
                        f"{name} exited with {proc.returncode} while waiting for {what}"
                    )
            if check():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}")

    def _ok(self, *cmd: str) -> bool:
        return self.run(*cmd, check=False).returncode == 0

    def start(self, timeout: float = 60) -> LocalSlurm:
        missing = missing_binaries()
        if missing:
            self.stop()
            raise SlurmError(f"{', '.join(missing)} not found: {SETUP_HINT}")
        if os.geteuid() != 0:
            self.stop()
            raise SlurmError(
                "the local SLURM cluster needs root (slurmd starts jobs as their user): run the "
                f"tests as root, or set {SKIP_ENV}=1 to skip them knowingly"
            )
        try:
            self._start(timeout)
        except BaseException:
            diag = self.diagnostics()
            self.stop()
            raise SlurmError(f"the local SLURM cluster did not start\n{diag}") from None
        return self

    def _start(self, timeout: float) -> None:
        for sub in ("state", "spool", "munge", "munge-key"):
            (self.root / sub).mkdir(exist_ok=True)
        (self.root / "munge-key").chmod(0o700)
        key = self.root / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._spawn(
            "munged",
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.root / 'munged.pid'}",
            f"--seed-file={self.root / 'munge' / 'seed'}",
            f"--log-file={self.root / 'munged.log'}",
        )
        self._until(
            "munged", lambda: self._ok("munge", "-n", "-S", str(self.munge_socket)), timeout
        )
        self.conf.write_text(
            SLURM_CONF.format(
                node=self.node,
                cpus=self.cpus,
                root=self.root,
                munge_socket=self.munge_socket,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                first_job_id=random.randrange(1, 1_000_000),
            )
        )
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf))
        self._until("slurmctld", lambda: self._ok("scontrol", "ping"), timeout)
        self._spawn("slurmd", "-D", "-N", self.node, "-f", str(self.conf))
        self._until(f"node {self.node} idle", lambda: self.node_state() == "idle", timeout)

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).stdout.strip()

    def stop(self) -> None:
        """Cancel every job, stop the daemons this object started, delete the folder."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline
                    and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
                ):
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def diagnostics(self, lines: int = 25) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for name in ("munged.out", "slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- clients -------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        env = self.env | kwargs.pop("env", {})
        result = subprocess.run(
            [which(cmd[0]) or cmd[0], *cmd[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result

    def sbatch(self, script: Path, options=(), args=(), *, env: dict[str, str], cwd: Path) -> str:
        """Submit `script` with sbatch `options` and the script's `args` from `cwd`; the job id."""
        cmd = ("sbatch", "--parsable", *options, str(script), *args)
        return self.run(*cmd, env=env, cwd=cwd).stdout.strip()

    def job(self, job_id: str) -> dict[str, str]:
        return parse_job(self.run("scontrol", "show", "job", "-o", job_id).stdout)

    def wait(self, job_id: str, until=FINISHED, timeout: float = 300) -> dict[str, str]:
        """Poll until the job's state is one of `until`; on timeout cancel it and raise."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in until:
                return job
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise SlurmError(
                    f"job {job_id} still {job['JobState']} after {timeout:.0f} s (cancelled)\n"
                    + self.diagnostics()
                )
            time.sleep(0.3)
