"""The bash that `tpu_pod.py` runs on every worker of a Cloud TPU VM slice (through
`gcloud compute tpus tpu-vm ssh --worker=all --command=...`), one builder per subcommand.

Every script is self-contained (nothing of the launcher has to be on the worker first),
runs under bash, prefixes each line it prints with `[worker N]` and exits non-zero on the
first failure, after one `error: ...` line. Values from the command line are inserted with
shlex.quote only, so parentheses, quotes, spaces and `$` reach the worker unchanged.

The worker number N is, in this order: $TPU_WORKER_ID (set on GKE, and by the tests), the
TPU VM metadata server's `agent-worker-number` (what jax.distributed itself reads on a
Cloud TPU VM), the `-w-N` suffix of the hostname, else the hostname.
"""

from __future__ import annotations

from shlex import quote

METADATA_WORKER = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
# The JAX installation guide's find-links page for libtpu wheels (`jax[tpu]`).
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
PYTHONS = ("python3.13", "python3.12", "python3.11", "python3")  # searched when --python is not given
STAMP = ".parcae_setup.sha256"  # in the venv: sha256 of requirements.txt + the jax requirement

_PRELUDE = r"""set -uo pipefail
root=%(root)s
venv=%(venv)s
wid=${TPU_WORKER_ID:-}
if [ -z "$wid" ]; then
  wid=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' %(metadata)s 2>/dev/null) || wid=
fi
if [ -z "$wid" ]; then
  wid=$(hostname)
  case $wid in *-w-[0-9]*) wid=${wid##*-w-} ;; esac
fi
fail() { echo "error: $*"; exit 3; }
"""

_EPILOGUE = r"""
main < /dev/null 2>&1 | while IFS= read -r line; do printf '[worker %s] %s\n' "$wid" "$line"; done
exit "${PIPESTATUS[0]}"
"""

# Training processes we started: a session (and process group) whose id is in train.pid.
_PROCESS_HELPERS = r"""alive() {  # a process of group $1 that is not a zombie
  ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'
}
stop_training() {  # SIGTERM (the trainer saves a checkpoint and exits), SIGKILL after $1 s; 1: none
  local pid i
  pid=$(cat "$root/train.pid" 2>/dev/null) || pid=
  if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'parcae_jax[.]main'; then
    echo "stopping training (process group $pid) with SIGTERM; it saves a checkpoint, then exits"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < 2 * $1; i++)); do alive "$pid" || break; sleep 0.5; done
    if alive "$pid"; then
      echo "still running after $1 s: SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    echo "training stopped"
  else
    rm -f "$root/train.pid"
    return 1
  fi
  rm -f "$root/train.pid"
}
free_tpu() {  # anything else still holding the TPU (a run started by hand, a crashed one)
  local devs=() d pids
  for d in /dev/accel* /dev/vfio/[0-9]*; do [ -e "$d" ] && devs+=("$d"); done
  [ ${#devs[@]} -gt 0 ] || return 0
  pids=$( { lsof -t "${devs[@]}" || fuser "${devs[@]}"; } 2>/dev/null | tr -s ' ' '\n' | grep -v '^$' | sort -u)
  [ -n "$pids" ] || return 0
  echo "stopping processes that hold the TPU: $(echo $pids)"
  kill -TERM $pids 2>/dev/null || true
  sleep 10
  kill -KILL $pids 2>/dev/null || true
}
"""


def remote_path(path: str) -> str:
    """`path` as a bash word: absolute as given, relative under the worker's $HOME."""
    return quote(path) if path.startswith("/") else "$HOME/" + quote(path)


def _script(root: str, venv: str, main: str, helpers: str = "") -> str:
    prelude = _PRELUDE % {"root": remote_path(root), "venv": remote_path(venv), "metadata": quote(METADATA_WORKER)}
    return prelude + helpers + "main() {\n  set -e\n" + main + "}\n" + _EPILOGUE


def setup(root: str, venv: str, python: str | None, jax_extra: str, pip_args: list[str], force: bool) -> str:
    """Checks for Python >= 3.11 (writing nothing if there is none), then creates the venv and
    installs the synced commit's requirements.txt plus jax[EXTRA]==(its jax pin), unless the
    venv's stamp says exactly that is installed already."""
    candidates = " ".join(quote(p) for p in ([python] if python else PYTHONS))
    links = f"-f {quote(LIBTPU_FIND_LINKS)}" if jax_extra == "tpu" else ""
    pip_flags = " ".join(map(quote, pip_args))
    main = (rf"""  req=$root/current/requirements.txt
  [ -f "$req" ] || fail "no code at $root/current; run sync first"
  version_of() {{ "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }}
  new_enough() {{ local major minor; IFS=. read -r major minor _ <<< "$1"; """
            rf"""[ "$major" -gt 3 ] || {{ [ "$major" -eq 3 ] && [ "$minor" -ge 11 ]; }}; }}
  py= seen=
  for cand in {candidates}; do
    v=$(version_of "$cand") || continue
    if new_enough "$v"; then py=$cand; break; fi
    seen=${{seen:-$v}}
  done
  if [ -z "$py" ]; then
    [ -n "$seen" ] || fail "worker has no Python ({candidates}); """
            rf"""parcae_jax needs >= 3.11 (install python3.11 or pass --python=...)"
    fail "worker has Python $seen; parcae_jax needs >= 3.11 (install python3.11 or pass --python=...)"
  fi
  jaxver=$(sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' "$req" | head -n 1)
  [ -n "$jaxver" ] || fail "$req pins no jax version (a line jax==X)"
  extra={quote(jax_extra)}
  if [ -n "$extra" ]; then jaxreq="jax[$extra]==$jaxver"; else jaxreq="jax==$jaxver"; fi
  links=({links})
  stamp=$({{ cat "$req"; printf '%s\n' "$jaxreq" "${{links[@]}}"; }} | sha256sum | cut -c1-64)
  if [ {int(force)} = 0 ] && [ -x "$venv/bin/python" ] && [ "$(cat "$venv/{STAMP}" 2>/dev/null)" = "$stamp" ]; then
    echo "setup: $venv already has these requirements (sha256 ${{stamp:0:12}}); skipping pip"
    return 0
  fi
  if [ -x "$venv/bin/python" ]; then
    vv=$(version_of "$venv/bin/python") || vv=unknown
    new_enough "$vv" || fail "$venv has Python $vv; parcae_jax needs >= 3.11 (delete it, or pass --venv=...)"
  else
    echo "setup: creating $venv with $py (Python $v)"
    "$py" -m venv "$venv" || fail "$py -m venv failed (Debian/Ubuntu: sudo apt-get install ${{py##*/}}-venv)"
  fi
  rm -f "$venv/{STAMP}"
  echo "setup: pip install -r $req $jaxreq"
  "$venv/bin/python" -m pip install --disable-pip-version-check {pip_flags} -r "$req" "$jaxreq" "${{links[@]}}"
  echo "$stamp" > "$venv/{STAMP}"
  echo "setup: done (requirements sha256 ${{stamp:0:12}})"
""")
    return _script(root, venv, main)


def sync(root: str, venv: str, sha: str, tarball: str) -> str:
    """Unpacks the shipped `git archive` of commit `sha` into ROOT/<sha> (unless that folder
    exists: it is only ever created whole, by a rename) and points ROOT/current at it."""
    main = rf"""  sha={quote(sha)}
  tarball=$HOME/{quote(tarball)}
  mkdir -p "$root"
  rm -rf "$root"/.incoming.*
  if [ -d "$root/$sha" ]; then
    echo "sync: $sha is already here, unchanged"
  else
    tmp=$(mktemp -d "$root/.incoming.XXXXXX")
    tar -xzf "$tarball" -C "$tmp"
    mv "$tmp/$sha" "$root/$sha"
    rmdir "$tmp"
    echo "sync: unpacked $sha"
  fi
  rm -f "$tarball"
  ln -sfn "$sha" "$root/current.new"
  mv -Tf "$root/current.new" "$root/current"
  echo "sync: $root/current -> $sha"
"""
    return _script(root, venv, main)


def run(root: str, venv: str, name: str, command: list[str], env: list[str], grace: int) -> str:
    """Stops what is left of an earlier run, frees the TPU, then starts `command` (already
    the exact argv) from ROOT/current in the venv, detached in its own session: it outlives
    the ssh connection and writes ROOT/logs/NAME.worker<N>.log."""
    exports = "".join(f"  export {quote(kv)}\n" for kv in env)
    main = rf"""  cd "$root/current" 2>/dev/null || fail "no code at $root/current; run sync first"
  [ -x "$venv/bin/python" ] || fail "no environment at $venv; run setup first"
  commit=$(basename "$(readlink -f "$root/current")")
  mkdir -p "$root/logs"
  log="$root/logs/"{quote(name)}".worker$wid.log"
  stop_training {int(grace)} || true
  free_tpu
  rm -f {LIBTPU_LOCKFILE}
  echo {quote(name)} > "$root/logs/latest"
{exports}  cmd=("$venv/bin/python" {" ".join(map(quote, command))})
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $wid, commit $commit: ${{cmd[*]}}" >> "$log"
  setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' start "$root/train.pid" nohup "${{cmd[@]}}" \
    >> "$log" 2>&1 < /dev/null &
  for ((i = 0; i < 100; i++)); do [ -s "$root/train.pid" ] && break; sleep 0.1; done
  echo "run: started process $(cat "$root/train.pid") from commit $commit; log $log"
"""
    return _script(root, venv, main, _PROCESS_HELPERS)


def logs(root: str, venv: str, name: str | None, lines: int, follow: bool) -> str:
    """The last `lines` lines of this worker's log of run `name` (default: the latest run)."""
    main = rf"""  name={quote(name or "")}
  [ -n "$name" ] || name=$(cat "$root/logs/latest" 2>/dev/null) || fail "no run was started on this worker"
  log="$root/logs/$name.worker$wid.log"
  [ -f "$log" ] || fail "no log $log"
  tail -n {int(lines)} {"-F " if follow else ""}"$log"
"""
    return _script(root, venv, main)


def stop(root: str, venv: str, grace: int) -> str:
    """SIGTERM to the training process group; SIGKILL if it is still there after `grace` s."""
    main = f"  stop_training {int(grace)} || echo 'no training process running'\n  rm -f {LIBTPU_LOCKFILE}\n"
    return _script(root, venv, main, _PROCESS_HELPERS)
