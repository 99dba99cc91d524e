#!/usr/bin/env python3
"""Train on a Cloud TPU pod slice: one command per step, every worker at once, through gcloud.

    python launch/tpu_pod.py create --tpu=NAME --zone=ZONE [--accelerator-type=v5p-32] [--spot] [--wait]
    python launch/tpu_pod.py sync   --tpu=NAME --zone=ZONE [--commit=HEAD]   # git archive -> ~/parcae_jax/<sha>
    python launch/tpu_pod.py setup  --tpu=NAME --zone=ZONE [--python=python3.11]  # venv + pinned requirements
    python launch/tpu_pod.py run    --tpu=NAME --zone=ZONE CONFIG WORKDIR [-- trainer flags...]
    python launch/tpu_pod.py logs   --tpu=NAME --zone=ZONE [--follow]
    python launch/tpu_pod.py stop   --tpu=NAME --zone=ZONE
    python launch/tpu_pod.py delete --tpu=NAME --zone=ZONE --yes

`--dry-run` (anywhere) prints every gcloud command, shell-quoted, and runs none. Standard
library only. What runs on the workers is in tpu_worker.py; launch/README.md has the details.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tpu_worker  # noqa: E402  (beside this file, whatever the working directory)

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # TPU, zone and run names: never an option, a path or a quote
PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")  # project ids (legacy ones hold "domain.com:name")


class LaunchError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class Gcloud:
    """Builds gcloud commands for one TPU and runs them (or, with --dry-run, prints them)."""

    def __init__(self, args: argparse.Namespace):
        self.tpu, self.zone, self.dry_run = args.tpu, args.zone, args.dry_run
        self.tail = [f"--project={args.project}"] if args.project else []

    def call(self, argv: list[str], summary: str | None = None, capture: bool = False) -> str:
        """Runs `gcloud argv...`; stops the launcher with gcloud's exit code if it fails."""
        cmd = ["gcloud", *argv, *self.tail]
        if self.dry_run:
            print(shlex.join(cmd), flush=True)
            return ""
        print(f"+ {summary or shlex.join(cmd)}", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
        except FileNotFoundError:
            raise LaunchError("gcloud is not on PATH (install the Google Cloud CLI)") from None
        if done.returncode:
            sys.exit(done.returncode)
        return done.stdout or ""

    def ssh(self, what: str, script: str) -> None:
        """Runs the bash `script` on every worker (concurrently: gcloud --worker=all). The
        script travels base64-encoded, so no value inside it (a flag holding a newline, a quote
        or a here-document delimiter) can end it early or reach the remote shell as a command,
        whatever the login shell is; --dry-run also prints it decoded, as comment lines."""
        encoded = base64.b64encode(script.encode()).decode()
        command = f'bash -c "$(echo {encoded} | base64 -d)"'
        argv = ["compute", "tpus", "tpu-vm", "ssh", self.tpu, f"--zone={self.zone}", "--worker=all",
                f"--command={command}"]
        self.call(argv, f"gcloud {shlex.join(argv[:7])} --command=<{what} script; --dry-run prints it>")
        if self.dry_run:
            print("\n".join(f"#   {line}" for line in [f"{what} script, as each worker runs it:",
                                                          *script.splitlines()]), flush=True)

    def scp(self, local: str, remote: str) -> None:
        """Copies a local file to `remote` (relative to the home folder) on every worker."""
        self.call(["compute", "tpus", "tpu-vm", "scp", local, f"{self.tpu}:{remote}", f"--zone={self.zone}",
                   "--worker=all"])

    def queued(self, verb: str, *rest: str, capture: bool = False) -> str:
        """gcloud compute tpus queued-resources VERB NAME --zone=ZONE ..."""
        return self.call(["compute", "tpus", "queued-resources", verb, self.tpu, f"--zone={self.zone}", *rest],
                         capture=capture)


def cmd_create(args, gcloud: Gcloud) -> None:
    """Queues a request for the slice; the TPU VM gets the same name as the request."""
    flags = [f"--node-id={args.tpu}", f"--accelerator-type={args.accelerator_type}",
             f"--runtime-version={args.runtime_version}"]
    flags += ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    gcloud.queued("create", *flags)
    if args.wait:
        wait_until_active(gcloud, args.poll_seconds)


def wait_until_active(gcloud: Gcloud, poll_seconds: float) -> None:
    """Polls the queued resource until it is ACTIVE (its TPU VMs exist); fails on FAILED/SUSPENDED."""
    while True:
        state = gcloud.queued("describe", "--format=value(state.state)", capture=True).strip()
        if gcloud.dry_run or state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {gcloud.tpu} is {state}")
        print(f"{gcloud.tpu}: {state or 'unknown'}; checking again in {poll_seconds:g} s", file=sys.stderr)
        time.sleep(poll_seconds)


def git(repo: Path, *argv: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True)
    if done.returncode:
        raise LaunchError(f"git {' '.join(argv)} in {repo}: {done.stderr.strip() or 'failed'}")
    return done.stdout


def commit_to_ship(repo: Path, commit: str, allow_dirty: bool) -> str:
    """The full sha of `commit`. Shipping HEAD from a working tree with changes (tracked or
    untracked) is refused, naming them, unless allow_dirty: only the commit would ship."""
    sha = git(repo, "rev-parse", "--verify", f"{commit}^{{commit}}").strip()
    if commit == "HEAD":
        changes = [line[3:] for line in git(repo, "status", "--porcelain").splitlines()]
        if changes:
            listed = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
            message = f"the working tree has changes that are not in {sha[:12]}: {listed}"
            if not allow_dirty:
                raise LaunchError(message + "; commit them, or pass --allow-dirty to ship the commit without them")
            print(f"WARNING: {message}. Shipping {sha[:12]} WITHOUT them (--allow-dirty).", file=sys.stderr)
    return sha


def cmd_sync(args, gcloud: Gcloud) -> None:
    """Ships exactly one commit (git archive) to ROOT/<sha> on every worker; ROOT/current -> it."""
    repo = Path(args.repo).resolve()
    sha = commit_to_ship(repo, args.commit, args.allow_dirty)
    name = f"parcae_jax-{sha}.tar.gz"
    folder = tempfile.mkdtemp(prefix="parcae_jax_sync_") if not gcloud.dry_run else tempfile.gettempdir()
    local = os.path.join(folder, name)  # a folder of its own: two launchers shipping one commit do not collide
    if not gcloud.dry_run:
        git(repo, "archive", "--format=tar.gz", f"--prefix={sha}/", "-o", local, sha)
    try:
        gcloud.scp(local, name)
        gcloud.ssh("sync", tpu_worker.sync(args.root, args.venv, sha, name))
    finally:
        if not gcloud.dry_run:
            shutil.rmtree(folder, ignore_errors=True)


def cmd_setup(args, gcloud: Gcloud) -> None:
    """Python >= 3.11 check, venv, pinned requirements + jax[EXTRA] (skipped when unchanged)."""
    script = tpu_worker.setup(args.root, args.venv, args.python, args.jax_extra, shlex.split(args.pip_args),
                              args.force)
    gcloud.ssh("setup", script)


def run_name(args) -> str:
    name = args.name or args.workdir.rstrip("/").rsplit("/", 1)[-1]
    if not NAME.fullmatch(name):
        raise LaunchError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (pass --name=...)")
    return name


def check_names(args) -> None:
    """Every name that reaches gcloud's argv or a worker's path, by one rule, in every
    subcommand: a TPU named '-x' would be read as an option, a log name holding a slash as a path."""
    for flag, value, rule in (("--tpu", args.tpu, NAME), ("--zone", args.zone, NAME),
                              ("--project", args.project, PROJECT), ("--name", getattr(args, "name", None), NAME)):
        if value is not None and not rule.fullmatch(value):
            raise LaunchError(f"{flag}={value!r}: use letters, digits, '.', '_' and '-', starting with a letter or "
                              "digit")


def cmd_run(args, gcloud: Gcloud) -> None:
    """Starts the trainer on every worker, detached, after stopping what is left of an earlier run.

    `venv/bin/python -m parcae_jax.main --config=CONFIG --workdir=WORKDIR FLAGS`, from the
    synced commit's folder; FLAGS are the arguments after `--`, each shell-quoted."""
    if not (args.workdir.startswith("gs://") or args.workdir.startswith("/")):
        raise LaunchError(f"workdir {args.workdir!r} must be gs://... or an absolute path on storage "
                          "every worker sees (it is where the run resumes from)")
    if not args.workdir.startswith("gs://"):
        print(f"note: workdir {args.workdir} is not on GCS; every worker must see the same folder there",
              file=sys.stderr)
    for kv in args.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv, re.S):
            raise LaunchError(f"--env {kv!r}: expected NAME=VALUE")
    command = ["-m", "parcae_jax.main", f"--config={args.config}", f"--workdir={args.workdir}", *args.flags]
    gcloud.ssh("run", tpu_worker.run(args.root, args.venv, run_name(args), command, args.env, args.grace))


def cmd_logs(args, gcloud: Gcloud) -> None:
    """Each worker's log of the run (default: the latest), every line prefixed [worker N]."""
    gcloud.ssh("logs", tpu_worker.logs(args.root, args.venv, args.name, args.lines, args.follow))


def cmd_stop(args, gcloud: Gcloud) -> None:
    """SIGTERM to the training processes (a checkpoint is saved), SIGKILL after --grace s."""
    gcloud.ssh("stop", tpu_worker.stop(args.root, args.venv, args.grace))


def cmd_delete(args, gcloud: Gcloud) -> None:
    """Deletes the queued resource and, with it (--force), its TPU VMs."""
    gcloud.queued("delete", "--force", *(["--quiet"] if args.yes else []))


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tpu", required=True, help="queued resource and TPU VM name")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", help="default: gcloud's configured project")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run none")
    common.add_argument("--root", default="parcae_jax", help="folder on the workers (relative: under $HOME)")
    common.add_argument("--venv", default=None, help="the workers' virtual env (default: ROOT/venv)")
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    top.add_argument("--dry-run", dest="dry_run_first", action="store_true", help=argparse.SUPPRESS)
    sub = top.add_subparsers(dest="subcommand", required=True)

    def add(name, func):
        p = sub.add_parser(name, parents=[common], help=func.__doc__.splitlines()[0])
        p.set_defaults(func=func)
        return p

    p = add("create", cmd_create)
    p.add_argument("--accelerator-type", default="v5p-32")
    p.add_argument("--runtime-version", default="v2-alpha-tpuv5", help="v2-alpha-tpuv5 is v5p's")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, can be preempted")
    kind.add_argument("--reserved", action="store_true", help="use the project's reservation")
    p.add_argument("--wait", action="store_true", help="return once the slice is ACTIVE")
    p.add_argument("--poll-seconds", type=float, default=30)
    p = add("setup", cmd_setup)
    p.add_argument("--python", help="interpreter for the venv (default: newest of %s that is >= 3.11)"
                   % ", ".join(tpu_worker.PYTHONS))
    p.add_argument("--jax-extra", default="tpu", help="jax[EXTRA]==<pin>; empty for plain (CPU) jax")
    p.add_argument("--pip-args", default="", help="more pip install options, e.g. '--no-index --find-links=DIR'")
    p.add_argument("--force", action="store_true", help="run pip even if the requirements are unchanged")
    p = add("sync", cmd_sync)
    p.add_argument("--commit", default="HEAD")
    p.add_argument("--allow-dirty", action="store_true", help="ship HEAD although the working tree has changes")
    p.add_argument("--repo", default=str(REPO), help="git repository to ship from")
    p = add("run", cmd_run)
    p.epilog = "Trainer flags go after --, e.g. -- --config.mesh.shape='(-1,8,1)' --config.train.steps=1000"
    p.add_argument("config", help="config file, relative to the repository root (configs/1p3b.py)")
    p.add_argument("workdir", help="gs://BUCKET/PATH (or an absolute path every worker sees)")
    p.add_argument("--name", help="run name for the log files (default: the workdir's last component)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the trainer")
    p.add_argument("--grace", type=int, default=300, help="seconds an earlier run gets to checkpoint")
    p = add("logs", cmd_logs)
    p.add_argument("--name", help="run name (default: the latest run)")
    p.add_argument("--lines", type=int, default=40)
    p.add_argument("--follow", action="store_true", help="keep printing (tail -F) until interrupted")
    p = add("stop", cmd_stop)
    p.add_argument("--grace", type=int, default=300, help="seconds to wait for the checkpoint before SIGKILL")
    p = add("delete", cmd_delete)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return top


def parse(argv: list[str]) -> argparse.Namespace:
    """Trainer flags are everything after the first `--` (run only)."""
    flags = []
    if "--" in argv:
        argv, flags = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser().parse_args(argv)
    if flags and args.subcommand != "run":
        parser().error(f"{args.subcommand} takes no trainer flags (after --)")
    args.flags = flags
    args.dry_run = args.dry_run or args.dry_run_first
    args.venv = args.venv or f"{args.root.rstrip('/')}/venv"
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line entry point; returns the exit code."""
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        check_names(args)
        args.func(args, Gcloud(args))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
