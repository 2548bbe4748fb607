"""Separate hosts on one machine: a Linux network namespace per host, joined by a bridge, with
a Ray node in each (tests/test_hosts.py uses the same code through `Hosts`).

    sudo python scripts/hosts.py up [--workers 2]        # network + Ray head and workers; prints how to use them
    sudo python scripts/hosts.py submit -- python rl/run.py configs/default.yaml \
        'rollout.resources={sampler_host: 1}' 'learner.resources={head_host: 1}' rollout.num_samplers=2
    sudo python scripts/hosts.py exec w1 -- ss -ltnp      # any command inside a host's namespace
    sudo python scripts/hosts.py link w1 down             # the host's link down (a node lost), or up
    sudo python scripts/hosts.py down                     # stop every process, remove the namespaces

Hosts: `head` (10.231.0.1), workers `w1`, `w2`, ... (10.231.0.2, ...) and `client` (10.231.0.99),
a host with no Ray node and no token (an outsider on the same network). Each namespace holds
`lo` and one end of a veth pair, whose other end is on the bridge in the root namespace. The
bridge has no address: traffic stays among the namespaces, and nothing outside reaches them.

The Ray nodes: token authentication on (RAY_AUTH_TOKEN_PATH, a 0600 file), each node its own
--temp-dir and --node-ip-address (its namespace's address); custom resources `head_host` on the
head, `sampler_host` and `<name>_host` on each worker (to place actors on a worker, or on one of
them). Ray's node health checks are shortened (HEALTH_CHECKS) so that a lost node is declared
dead in seconds rather than Ray's default of about a minute.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; `permitted()` says why not.
Everything `up` starts is recorded in a state file, and `down` (or `Hosts.remove`) stops it:
every process in the namespaces (all of them started here), then the links, the namespaces,
the temp dirs and the token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)
RAY = str(PYTHON.with_name("ray"))
SUBNET = "10.231.0"  # a /24 made here and removed by `down`; nothing else uses it
STATE = Path(tempfile.gettempdir()) / "rl-hosts.json"
GCS_PORT, DASHBOARD_PORT = 6379, 8265  # each host has its own network stack: fixed ports never clash
# Where Ray puts each worker process's gRPC server (Ray's default range, named so that a test can
# tell Ray's own listener in an actor's process from the project's). Ray binds it to every interface.
RAY_WORKER_PORTS = (10002, 19999)
# Ray's defaults (ray_config_def.h): a check every 3 s after 5 s, each timing out after 10 s,
# 5 failures in a row: a node whose link went down is declared dead after about a minute. Here:
# every 1 s, 3 s timeout, 3 failures: within ~12 s. A healthy node answers in milliseconds; the
# 3 s leave room for a 2-core machine under load (a 1 s timeout declared busy nodes dead here).
HEALTH_CHECKS = {"health_check_initial_delay_ms": 2000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 3000, "health_check_failure_threshold": 3}


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def permitted() -> str | None:
    """None when network namespaces can be made here; otherwise why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if shutil.which("ss") is None:
        return "`ss` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (this runs as uid %d)" % os.geteuid()
    probe = f"rlh-probe-{os.getpid()}"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


class Hosts:
    """The namespaces, their network and their Ray nodes; `remove` undoes everything."""

    def __init__(self, workers: int = 2, prefix: str = "rlh", state: Path | None = None):
        self.prefix, self.state = prefix, state  # state: where the command line keeps what `up` started
        self.names = ["head", *[f"w{i + 1}" for i in range(workers)], "client"]
        self.ip = {name: f"{SUBNET}.{99 if name == 'client' else i + 1}" for i, name in enumerate(self.names)}
        self.bridge = f"{prefix}-br"
        self.temp_dirs: dict[str, str] = {}
        self.token = ""
        self.pids: dict[str, int] = {}  # host -> the pid of its `ray start --block`
        self.log_dir: Path | None = None  # each node's `ray start` output, ray-<host>.log
        self.num_cpus = 1  # CPUs each Ray node offers

    # -- the network ------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def veth(self, host: str) -> str:
        return f"{self.prefix}-v{host}"[:15]  # the root namespace's end (names are at most 15 bytes)

    def create(self):
        """The namespaces, the bridge, a veth pair per host with its address; lo up everywhere."""
        self.remove_network()  # leftovers of a run that could not clean up
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "link", "set", self.bridge, "up")
        for host in self.names:
            ns = self.ns(host)
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", self.veth(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", self.veth(host), "master", self.bridge, "up")
            run("ip", "-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")  # vLLM and Ray talk over loopback inside a host

    def link(self, host: str, up: bool):
        """Take a host's link down (its node is cut off, its processes keep running) or up."""
        run("ip", "link", "set", self.veth(host), "up" if up else "down")

    def exec(self, host: str, args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run a command inside a host's namespace (with the cluster's environment unless `env`)."""
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *args], env=env or self.env(), **kw)

    def popen(self, host: str, args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *args], env=env or self.env(), **kw)

    def namespace_pids(self, host: str) -> list[int]:
        """Every process in the host's namespace (all started here)."""
        out = run("ip", "netns", "pids", self.ns(host), check=False)
        return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []

    def kill_host(self, host: str, sig: int = signal.SIGKILL):
        """Every process in the host's namespace gets `sig` (a node lost at once)."""
        for pid in self.namespace_pids(host):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def listeners(self, host: str) -> list[dict]:
        """The TCP sockets listening in a host's namespace: {"address", "port", "pids"}."""
        out = self.exec(host, ["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split()
            local = parts[3]  # State Recv-Q Send-Q Local Peer [Process]
            address, port = local.rsplit(":", 1)
            pids = [int(p.split("=")[1]) for p in " ".join(parts[5:]).replace(")", ",").split(",")
                    if p.startswith("pid=")]
            rows.append({"address": address.strip("[]"), "port": int(port), "pids": pids})
        return rows

    # -- Ray --------------------------------------------------------------------------

    def env(self) -> dict:
        """A node's and a client's environment: this Python first on PATH, token auth on."""
        return {**os.environ, "PATH": f"{PYTHON.parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": self.token}

    def resources(self, host: str) -> dict:
        if host == "head":
            return {"head_host": 1}
        return {"sampler_host": 1, f"{host}_host": 1}

    def start_ray(self, num_cpus: int = 1, timeout_s: float = 180, log_dir: Path | None = None, attempts: int = 3):
        """The head, then a worker node on every worker host; returns once all are in the cluster.

        `ray start` gives a raylet 30 s to register with the head (hard-coded in Ray 2.60); on a
        2-core machine under load it can miss that and exit: such a node is started again, up
        to `attempts` times."""
        fd, self.token = tempfile.mkstemp(prefix="rlh-token-")
        os.write(fd, secrets.token_hex(32).encode())
        os.close(fd)
        os.chmod(self.token, 0o600)
        self.log_dir, self.num_cpus = log_dir or Path(tempfile.mkdtemp(prefix="rlh-logs-")), num_cpus
        nodes = {}
        for host in self.names[:-1]:  # the client runs no node
            # Short paths: Ray's socket paths must stay under ~107 characters.
            self.temp_dirs[host] = tempfile.mkdtemp(prefix=f"rl{host}-", dir="/tmp")
            nodes[host] = self._start_node(host, num_cpus)
            if host == "head":
                wait_for(lambda: self.job_api_up(), timeout_s, "the head's job API")
        tries = dict.fromkeys(nodes, 1)

        def all_up() -> bool:
            for host, node in nodes.items():
                if node.poll() is not None:  # `ray start` gave up on this node
                    if host == "head" or tries[host] >= attempts:
                        raise RuntimeError(f"the Ray node on {host} did not start {tries[host]} time(s): see "
                                           f"{self.log_dir / f'ray-{host}.log'}")
                    self.kill_host(host)  # what it left running in its namespace
                    nodes[host], tries[host] = self._start_node(host, num_cpus), tries[host] + 1
            return self.alive_nodes() == len(nodes)

        wait_for(all_up, timeout_s, "every worker node", every_s=3)

    def rejoin(self, host: str) -> subprocess.Popen:
        """A worker host comes back (rebooted, same address): whatever still ran in its namespace
        is killed, its link is up again, and a new Ray node (a new node id) joins the cluster."""
        self.kill_host(host)
        self.link(host, up=True)
        return self._start_node(host, self.num_cpus)

    def _start_node(self, host: str, num_cpus: int) -> subprocess.Popen:
        args = [RAY, "start", "--block", f"--node-ip-address={self.ip[host]}", f"--num-cpus={num_cpus}",
                f"--temp-dir={self.temp_dirs[host]}", "--disable-usage-stats",
                f"--min-worker-port={RAY_WORKER_PORTS[0]}", f"--max-worker-port={RAY_WORKER_PORTS[1]}",
                f"--resources={json.dumps(self.resources(host))}"]
        if host == "head":
            args += ["--head", f"--port={GCS_PORT}", f"--dashboard-host={self.ip[host]}",
                     f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
                     f"--system-config={json.dumps(HEALTH_CHECKS)}"]
        else:
            args += [f"--address={self.ip['head']}:{GCS_PORT}"]
        with open(self.log_dir / f"ray-{host}.log", "a") as log:
            node = self.popen(host, args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids[host] = node.pid
        self.save()
        return node

    @property
    def address(self) -> str:
        return f"http://{self.ip['head']}:{DASHBOARD_PORT}"

    def job_api_up(self) -> bool:
        return self.exec("head", [RAY, "job", "list", "--address", self.address], capture_output=True).returncode == 0

    def alive_nodes(self) -> int:
        """How many nodes the head's GCS counts alive (asked from the head's namespace)."""
        out = self.exec("head", [str(PYTHON), "-c", "import ray; ray.init(address='auto', logging_level='ERROR'); "
                                 "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))"],
                        capture_output=True, text=True, timeout=120,
                        env={**self.env(), "RAY_ADDRESS": f"{self.ip['head']}:{GCS_PORT}"})
        # Ray's daemons may print their own lines into the same stream (a raylet's memory monitor
        # warning, say), before or after ours.
        counts = re.findall(r"^alive nodes: (\d+)$", out.stdout, re.M)
        return int(counts[-1]) if out.returncode == 0 and counts else 0

    def submit(self, args: list[str], **kw) -> subprocess.Popen:
        """`ray job submit --working-dir <repo> -- args` from the head's namespace (it waits for the job)."""
        return self.popen("head", [RAY, "job", "submit", "--address", self.address, "--working-dir", str(ROOT),
                                   "--", *args], **kw)

    # -- teardown ---------------------------------------------------------------------

    def stop_processes(self, grace_s: float = 15):
        """SIGTERM to every process in the namespaces (`ray start --block` stops its node), SIGKILL
        to what is left after grace_s (a node whose link is down may not stop by itself)."""
        hosts = [h for h in self.names if self.namespace_pids(h)]
        for host in hosts:
            self.kill_host(host, signal.SIGTERM)
        deadline = time.time() + grace_s
        while any(self.namespace_pids(h) for h in hosts) and time.time() < deadline:
            time.sleep(0.5)
        for host in hosts:
            self.kill_host(host, signal.SIGKILL)
        deadline = time.time() + 10
        while any(self.namespace_pids(h) for h in hosts) and time.time() < deadline:
            time.sleep(0.2)

    def remove_network(self):
        for host in self.names:
            run("ip", "link", "del", self.veth(host), check=False)  # deletes its peer in the namespace too
            run("ip", "netns", "del", self.ns(host), check=False)
        run("ip", "link", "del", self.bridge, check=False)

    def remove(self):
        """Everything `create` and `start_ray` made, whatever state it is in."""
        self.stop_processes()
        self.remove_network()
        for path in self.temp_dirs.values():
            shutil.rmtree(path, ignore_errors=True)
        if self.token:
            Path(self.token).unlink(missing_ok=True)
        if self.state is not None:
            self.state.unlink(missing_ok=True)

    def left_behind(self) -> list[str]:
        """Namespaces or links of ours that still exist (empty after `remove`)."""
        netns = run("ip", "netns", "list", check=False).stdout.split()
        links = run("ip", "-o", "link", "show", check=False).stdout
        return ([n for n in netns if n.startswith(f"{self.prefix}-")]
                + [name for name in [self.bridge, *map(self.veth, self.names)] if f" {name}:" in links
                   or f" {name}@" in links])

    # -- the state file (for the command line) ------------------------------------------

    def save(self):
        if self.state is None:
            return
        self.state.write_text(json.dumps({"workers": len(self.names) - 2, "prefix": self.prefix,
                                     "temp_dirs": self.temp_dirs, "token": self.token, "pids": self.pids}))

    @classmethod
    def load(cls) -> Hosts:
        state = json.loads(STATE.read_text()) if STATE.exists() else {"workers": 2, "prefix": "rlh"}
        hosts = cls(state["workers"], state["prefix"], STATE)
        hosts.temp_dirs, hosts.token, hosts.pids = state.get("temp_dirs", {}), state.get("token", ""), \
            state.get("pids", {})
        return hosts


def wait_for(ready, timeout_s: float, what: str, every_s: float = 1.0):
    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"{what} not up after {timeout_s:g} s")
        time.sleep(every_s)


def main(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the hosts and start Ray on them")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--num-cpus", type=int, default=1, help="CPUs each Ray node offers")
    sub.add_parser("down", help="stop everything and remove the hosts")
    ex = sub.add_parser("exec", help="run a command in a host's namespace, with the cluster's token")
    ex.add_argument("host")
    ex.add_argument("args", nargs=argparse.REMAINDER)
    sb = sub.add_parser("submit", help="ray job submit from the head's namespace")
    sb.add_argument("args", nargs=argparse.REMAINDER)
    lk = sub.add_parser("link", help="take a host's link down or up")
    lk.add_argument("host")
    lk.add_argument("state", choices=["up", "down"])
    args = parser.parse_args(argv)
    if args.command == "up":
        reason = permitted()
        if reason:
            raise SystemExit(reason)
        hosts = Hosts(args.workers, state=STATE)
        try:
            hosts.create()
            hosts.start_ray(args.num_cpus)
        except BaseException:
            hosts.remove()
            raise
        print(json.dumps({"hosts": hosts.ip, "namespaces": {h: hosts.ns(h) for h in hosts.names},
                          "job_address": hosts.address, "token": hosts.token, "state": str(STATE)}, indent=1))
        return
    hosts = Hosts.load()
    rest = getattr(args, "args", [])
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if args.command == "down":
        hosts.remove()
        left = hosts.left_behind()
        print("removed" if not left else f"left behind: {left}")
    elif args.command == "exec":
        raise SystemExit(hosts.exec(args.host, rest).returncode)
    elif args.command == "submit":
        raise SystemExit(hosts.submit(rest).wait())
    elif args.command == "link":
        hosts.link(args.host, args.state == "up")


if __name__ == "__main__":
    main(sys.argv[1:])
