"""A simulated Cloud TPU slice for tests/test_launcher.py: worker homes on this machine, the
fake gcloud beside this file first on PATH, and helpers to read what happened on the workers."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

FAKES = pathlib.Path(__file__).resolve().parent
ROOT = FAKES.parents[1]
LAUNCHER = ROOT / "launch" / "tpu_pod.py"


def git(repo, *argv) -> str:
    """git -C repo ARGV; its stdout."""
    return subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True, text=True).stdout.strip()


class Pod:
    """A simulated slice: worker homes under `root`, the fake gcloud first on PATH."""

    def __init__(self, root: pathlib.Path, workers: int = 2):
        self.root, self.workers, self.log = root, workers, root / "gcloud.jsonl"
        self.homes = [root / f"worker{i}" for i in range(workers)]
        for home in self.homes:
            home.mkdir(parents=True)
        self.env = dict(os.environ, PATH=f"{FAKES}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log),
                        FAKE_GCLOUD_ROOT=str(root), FAKE_GCLOUD_WORKERS=str(workers))

    def launch(self, *argv, check=True, **env) -> subprocess.CompletedProcess:
        """python launch/tpu_pod.py ARGV (stdout and stderr together in .stdout)."""
        done = subprocess.run([sys.executable, str(LAUNCHER), *argv], env={**self.env, **env}, cwd=self.root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        assert not check or done.returncode == 0, done.stdout
        return done

    def calls(self) -> list[list[str]]:
        """Every recorded gcloud argv so far; the record is emptied."""
        if not self.log.exists():
            return []
        calls = [json.loads(line)["argv"] for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls

    def reuse_this_environment(self, i: int) -> None:
        """Worker i's default venv, made with this interpreter, sees this environment's packages."""
        venv = self.homes[i] / "parcae_jax" / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        (site / "reuse_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def started(self, i: int, name: str) -> list[dict]:
        """What the stand-in trainer on worker i printed at start, per start, for run `name`."""
        log = self.homes[i] / "parcae_jax" / "logs" / f"{name}.worker{i}.log"
        return [json.loads(line[8:]) for line in log.read_text().splitlines() if line.startswith("STARTED ")]

    def kill_all(self) -> None:
        """Teardown: training a test left running, found by the pid files the runs wrote, and
        killed only if that process is still ours (its interpreter is a worker's venv)."""
        for home in self.homes:
            pidfile = home / "parcae_jax" / "train.pid"
            pid = pidfile.read_text().strip() if pidfile.exists() else ""
            try:
                ours = pid and str(home) in pathlib.Path(f"/proc/{pid}/cmdline").read_text()
                if ours:
                    os.killpg(int(pid), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def wait_for(predicate, timeout: float, what: str) -> None:
    """Polls `predicate` until true; fails the test after `timeout` s."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def stub_repository(repo: pathlib.Path) -> pathlib.Path:
    """A git repository whose parcae_jax.main is the stand-in trainer, with the real requirements."""
    (repo / "parcae_jax").mkdir()
    (repo / "parcae_jax" / "__init__.py").write_text("")
    shutil.copy(FAKES / "stub_trainer.py", repo / "parcae_jax" / "main.py")
    shutil.copy(ROOT / "requirements.txt", repo / "requirements.txt")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "stand-in trainer")
    return repo
