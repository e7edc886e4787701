"""What every bench/ script shares: where things are, the release binary,
starting netkit through its --ready-json line, /proc readers, medians, and the
results file.

Python scripts import it (`sys.path` has bench/ when they run from there);
shell scripts use its command line:

    python3 bench/lib.py tool transfer_bench.py   # path of a ../shared/bench tool
    python3 bench/lib.py bin                      # the release binary (built if needed)
    python3 bench/lib.py results AREA             # path of bench/results/AREA-DATE.txt
"""
import datetime
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RESULTS = os.path.join(BENCH, "results")


def shared_bench():
    """The load tools folder: $NETKIT_SHARED_BENCH, else ../shared/bench beside
    the repository or beside any folder above it (a worktree may sit deeper)."""
    env = os.environ.get("NETKIT_SHARED_BENCH")
    if env:
        return env
    d = ROOT
    while True:
        cand = os.path.join(os.path.dirname(d), "shared", "bench")
        if os.path.isdir(cand):
            return cand
        if os.path.dirname(d) == d:
            sys.exit("bench: cannot find ../shared/bench beside the repository; set NETKIT_SHARED_BENCH=path")
        d = os.path.dirname(d)


def tool(name):
    """Path of one load tool in ../shared/bench; exits with a clear message when missing."""
    path = os.path.join(shared_bench(), name)
    if not os.path.exists(path):
        sys.exit(f"bench: {path} not found; set NETKIT_SHARED_BENCH to the folder that has {name}")
    return path


def netkit_bin(path=None, build=True):
    """The binary to measure: `path` or $NETKIT_BIN as given, else target/release/netkit,
    built first (`cargo build --release`) unless `build` is false."""
    path = path or os.environ.get("NETKIT_BIN")
    if path:
        return path
    if build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    path = os.path.join(ROOT, "target", "release", "netkit")
    if not os.path.exists(path):
        sys.exit(f"bench: {path} not found; run `cargo build --release` or pass --bin")
    return path


def start_netkit(binary, args, env=None, stderr=subprocess.DEVNULL):
    """Starts `netkit --ready-json ARGS` and returns (process, ready) once its
    sockets are bound; `ready` is the parsed ready line (e.g. ready["http"])."""
    p = subprocess.Popen([binary, "--ready-json", *args], stdout=subprocess.PIPE, stderr=stderr,
                         stdin=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    line = p.stdout.readline()
    if not line:
        p.wait()
        sys.exit(f"bench: netkit {' '.join(args)} exited ({p.returncode}) before it was ready")
    ready = json.loads(line)
    if ready.get("ready") is not True:
        p.kill()
        sys.exit(f"bench: not a ready line: {line!r}")
    return p, ready


def host_port(addr):
    """("127.0.0.1", 8080) from "127.0.0.1:8080"."""
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


def proc_status_kb(pid, field):
    """A kB field of /proc/PID/status (VmRSS, VmHWM, …); 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def rss_kb(pid):
    """Resident memory of `pid` in KiB."""
    return proc_status_kb(pid, "VmRSS")


def cpu_s(pid):
    """CPU seconds (user + system) `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_calls(pid):
    """Write system calls (write, writev, sendmsg...) `pid` has made so far
    (`syscw` in /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscw:"))


def context_switches(pid):
    """Context switches (voluntary and not) of all of `pid`'s threads so far
    (threads that already ended are not counted)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                n += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:
            pass
    return n


def read_calls(pid):
    """Read system calls `pid` has made so far (`syscr` in /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscr:"))


def raise_fd_limit():
    """Many clients need many descriptors: lift the soft limit to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def median(values):
    """The median of `values` (0 when there are none)."""
    values = list(values)
    return statistics.median(values) if values else 0


class Results:
    """Tees stdout into bench/results/AREA-DATE.txt (appending; a header line
    names the command and the commit). Use as a context manager."""

    def __init__(self, area):
        os.makedirs(RESULTS, exist_ok=True)
        self.path = results_path(area)

    def __enter__(self):
        self.file = open(self.path, "a")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.file.write(f"# {' '.join(sys.argv)} — {now}, commit {commit}, {os.cpu_count()} cores\n")
        self.stdout = sys.stdout
        sys.stdout = _Tee(self.stdout, self.file)
        return self

    def __exit__(self, *exc):
        sys.stdout = self.stdout
        self.file.write("\n")
        self.file.close()
        print(f"(results appended to {os.path.relpath(self.path)})")


class _Tee(io.TextIOBase):
    def __init__(self, *outs):
        self.outs = outs

    def write(self, s):
        for o in self.outs:
            o.write(s)
        return len(s)

    def flush(self):
        for o in self.outs:
            o.flush()


def results_path(area):
    """bench/results/AREA-YYYY-MM-DD.txt for today (UTC)."""
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(RESULTS, f"{area}-{day}.txt")


def wait_for(pred, timeout, what):
    """Polls `pred` every 10 ms (for state only visible by asking); exits after `timeout` s."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            sys.exit(f"bench: {what} not within {timeout} s")
        time.sleep(0.01)


if __name__ == "__main__":
    cmd = sys.argv[1:2]
    if cmd == ["tool"] and len(sys.argv) == 3:
        print(tool(sys.argv[2]))
    elif cmd == ["bin"]:
        print(netkit_bin())
    elif cmd == ["results"] and len(sys.argv) == 3:
        os.makedirs(RESULTS, exist_ok=True)
        print(results_path(sys.argv[2]))
    else:
        sys.exit(__doc__)
