"""Machines made of network namespaces: one per node, one for the client, joined by a bridge.

A test that only ever uses 127.0.0.1 shows nothing about a cluster whose nodes have their own
addresses: a node bound to the wrong interface, a certificate without the right address in its
names, a client that needs loopback, all pass there. So with root and ``ip netns`` (Debian's
iproute2), the harness builds a small network of its own::

    namespace kvnet-RUN-hub      bridge br0, one port per host (veth v-n1, v-n2, ..., v-client)
    namespace kvnet-RUN-n1       eth0 10.77.X.1/24 (the other end of v-n1), lo
    namespace kvnet-RUN-n2       eth0 10.77.X.2/24
    ...
    namespace kvnet-RUN-client   eth0 10.77.X.100/24

Every namespace has only ``lo`` and its ``eth0``, and no default route, so nothing in it can
reach anything but the other hosts of the run: no packet ever leaves through the machine's
own interfaces. Nothing is created in the machine's own namespace (each interface is made
inside the hub, its peer moved straight into its host's namespace), so the machine's
interfaces, addresses and routes are never touched. ``X`` is random, avoiding any 10.77.X.0/24
the machine itself routes, only so that the addresses mean one thing to whoever reads them.

``RUN`` is the creating process's pid and a random tag: namespaces from two runs never clash,
and ``sweep_stale`` removes those whose creator is gone (a SIGKILLed run cannot clean up after
itself). ``Topology`` is a context manager: leaving it, by an exception, Ctrl-C or SIGTERM,
kills whatever still runs in its namespaces and deletes them, and a teardown never stops at
the first error.

Faults on the links, each undone by ``heal``:

* ``partition(groups)``: ``ip route add blackhole ADDR/32`` in each host for every host of the
  other groups, both ways. A connection attempt fails at once on the sender's side; packets
  of established connections go nowhere, and the peer hears only silence.
* ``impair(host, Netem(...))``: delay with jitter, loss and reordering on both directions of
  the host's link. With ``tc netem`` on its ``eth0`` and on the hub's end of its veth when the
  kernel has sch_netem; on a kernel built without it (``netem_unusable`` says so), the same
  impairments in user space: iptables sends the host's packets, in and out, to an NFQUEUE that
  ``kvstore.check.nfq_netem`` serves in the host's namespace (needs ``iptables``).
* ``drop(host, percent)``: random loss with nftables (``numgen random``) on the hub's bridge
  for frames to and from the host's port, for kernels without netem; needs ``nft``.

The module knows nothing of the store: it runs ``ip``, ``tc`` and ``nft`` and hands out
addresses and command prefixes.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

PREFIX = "kvnet"
"""Every namespace this module makes is named ``kvnet-PID-TAG-HOST``."""
SUPERNET = "10.77"
DEVICE = "eth0"
"""Each host's interface, in its own namespace."""
BRIDGE = "br0"
CLIENT = "client"
CLIENT_HOST_NUMBER = 100
"""The client's address is 10.77.X.100; node k (1-based) is 10.77.X.k."""
COMMAND_TIMEOUT = 20.0
STOP_GRACE = 5.0
"""Seconds processes left in a namespace get after SIGTERM before SIGKILL, at teardown."""
NFT_TABLE = "kvnet"

_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-([a-z0-9]+)$")


class NetnsError(RuntimeError):
    """A command that builds, faults or tears down the network failed."""


def unusable() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``, no ``ip netns``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or use the loopback tests)"
    if shutil.which("ip") is None:
        return "the ip command is missing (Debian: apt-get install iproute2)"
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode != 0:
        return f"ip netns does not work here: {done.stderr.strip() or done.returncode}"
    return None


def netem_unusable() -> str | None:
    """Why ``tc netem`` cannot be used (no ``tc``, or a kernel without sch_netem), or None.

    Probed in a namespace of its own, on its loopback, and deleted again."""
    if (reason := unusable()) is not None:
        return reason
    if shutil.which("tc") is None:
        return "the tc command is missing (Debian: apt-get install iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}-probe"
    _run(["ip", "netns", "add", probe])
    try:
        done = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem",
                               "delay", "1ms"], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False)
    finally:
        _run(["ip", "netns", "del", probe])
    if done.returncode != 0:
        return (f"this kernel has no netem queueing discipline (CONFIG_NET_SCH_NETEM): tc says "
                f"'{done.stderr.strip()}'")
    return None


@functools.cache
def netem_backend() -> str:
    """``tc`` where the kernel has sch_netem, else ``nfqueue`` (``kvstore.check.nfq_netem``)."""
    return "tc" if netem_unusable() is None else "nfqueue"


def impair_unusable() -> str | None:
    """Why ``Topology.impair`` cannot work here (neither tc netem nor iptables), or None."""
    if (reason := unusable()) is not None:
        return reason
    if netem_backend() == "tc" or shutil.which("iptables") is not None:
        return None
    return (f"{netem_unusable()}, and the iptables command for the user-space netem is missing "
            "(Debian: apt-get install iptables)")


def nft_unusable() -> str | None:
    """Why ``nft`` cannot be used (Debian: nftables), or None."""
    if shutil.which("nft") is None:
        return "the nft command is missing (Debian: apt-get install nftables)"
    return None


@dataclass(frozen=True)
class Netem:
    """A ``tc netem`` impairment of one link, in both directions."""

    delay_ms: int
    jitter_ms: int = 0
    loss_percent: float = 0.0
    reorder_percent: float = 0.0
    """Share of packets sent at once instead of delayed (netem needs a delay to reorder)."""

    def args(self) -> list[str]:
        args = ["delay", f"{self.delay_ms}ms"]
        if self.jitter_ms:
            args.append(f"{self.jitter_ms}ms")
        if self.loss_percent:
            args += ["loss", f"{self.loss_percent:g}%"]
        if self.reorder_percent:
            args += ["reorder", f"{self.reorder_percent:g}%", "50%"]
        return args

    def __str__(self) -> str:
        words = [f"delay {self.delay_ms}ms" + (f"±{self.jitter_ms}ms" if self.jitter_ms else "")]
        if self.loss_percent:
            words.append(f"loss {self.loss_percent:g}%")
        if self.reorder_percent:
            words.append(f"reorder {self.reorder_percent:g}%")
        return " ".join(words)


@dataclass(frozen=True)
class Host:
    name: str
    """``n1``, ``n2``, ... or ``client``."""
    netns: str
    address: str
    """Its IPv4 address on the bridge."""
    port: str
    """The hub's end of its veth."""


class Topology:
    """The plan of one run's network (pure), and the commands that build, fault and remove it.

    ``Topology.plan`` only chooses names and addresses; ``create`` runs the commands."""

    def __init__(self, run: str, subnet: int, hosts: Sequence[Host]) -> None:
        self.run, self.subnet, self.hosts = run, subnet, {h.name: h for h in hosts}
        self.hub = f"{PREFIX}-{run}-hub"
        self._previous_sigterm: object = None
        self._blackholes: set[tuple[str, str]] = set()
        self._impaired: set[str] = set()
        self._dropping: set[str] = set()
        self._queues: dict[str, _UserNetem] = {}

    @classmethod
    def plan(cls, nodes: int, *, run: str | None = None, subnet: int | None = None) -> Topology:
        """Names and addresses for ``nodes`` nodes (n1..nN) and a client."""
        if not 1 <= nodes < CLIENT_HOST_NUMBER:
            raise ValueError(f"between 1 and {CLIENT_HOST_NUMBER - 1} nodes, not {nodes}")
        run = run or f"{os.getpid()}-{secrets.token_hex(2)}"
        subnet = free_subnet() if subnet is None else subnet
        names = [(f"n{k}", k) for k in range(1, nodes + 1)] + [(CLIENT, CLIENT_HOST_NUMBER)]
        return cls(run, subnet, [
            Host(name, f"{PREFIX}-{run}-{name}", f"{SUPERNET}.{subnet}.{number}", f"v-{name}")
            for name, number in names])

    # -- what it is -----------------------------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        return [name for name in self.hosts if name != CLIENT]

    @property
    def client(self) -> Host:
        return self.hosts[CLIENT]

    @property
    def namespaces(self) -> list[str]:
        return [self.hub, *(h.netns for h in self.hosts.values())]

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def exec_prefix(self, host: str) -> list[str]:
        """The command prefix that runs a program on ``host``: ``ip netns exec NS``."""
        return ["ip", "netns", "exec", self.hosts[host].netns]

    def to_json(self) -> str:
        return json.dumps({"run": self.run, "subnet": self.subnet,
                           "hosts": [vars(h) for h in self.hosts.values()]})

    @classmethod
    def from_json(cls, text: str) -> Topology:
        doc = json.loads(text)
        hosts = [Host(**h) for h in doc["hosts"]]
        for host in hosts:
            if _NAME.match(host.netns) is None:
                raise ValueError(f"{host.netns!r} is not a namespace this module makes")
        return cls(str(doc["run"]), int(doc["subnet"]), hosts)

    # -- building and removing -------------------------------------------------------------------

    def setup_commands(self) -> list[list[str]]:
        """Every command ``create`` runs, in order: each names one of the run's namespaces."""
        hub = self.hub
        commands = [["ip", "netns", "add", ns] for ns in self.namespaces]
        commands += [
            ["ip", "-n", hub, "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "-n", hub, "link", "set", BRIDGE, "up"],
        ]
        for host in self.hosts.values():
            commands += [
                ["ip", "-n", hub, "link", "add", host.port, "type", "veth",
                 "peer", "name", DEVICE, "netns", host.netns],
                ["ip", "-n", hub, "link", "set", host.port, "master", BRIDGE],
                ["ip", "-n", hub, "link", "set", host.port, "up"],
                ["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", DEVICE],
                ["ip", "-n", host.netns, "link", "set", DEVICE, "up"],
                ["ip", "-n", host.netns, "link", "set", "lo", "up"],
            ]
        return commands

    def create(self) -> None:
        """Builds the network; on any failure removes what was made and raises."""
        try:
            for command in self.setup_commands():
                _run(command)
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> list[str]:
        """Stops whatever runs in the run's namespaces and deletes them; returns the problems
        (it never stops at the first). Safe to call twice."""
        problems = []
        present = set(list_namespaces())
        mine = [ns for ns in self.namespaces if ns in present]
        _stop_processes(mine)
        for ns in mine:
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
            if done.returncode != 0:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        self._blackholes.clear()
        self._impaired.clear()
        self._dropping.clear()
        self._queues.clear()  # their processes were in the namespaces: stopped above
        return problems

    def __enter__(self) -> Topology:
        sweep_stale()
        self.create()
        with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
            self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupted)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            problems = self.teardown()
        finally:
            if self._previous_sigterm is not None:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]
        if problems and exc is None:
            raise NetnsError("; ".join(problems))

    # -- faults ----------------------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Cuts every link between hosts of different groups (host names), both ways."""
        groups = [set(g) for g in groups]
        for i, group in enumerate(groups):
            for other in groups[i + 1:]:
                for a in group:
                    for b in other:
                        self._blackhole(a, b)
                        self._blackhole(b, a)

    def _blackhole(self, host: str, unreachable: str) -> None:
        if (host, unreachable) in self._blackholes:
            return
        _run(["ip", "-n", self.hosts[host].netns, "route", "add", "blackhole",
              f"{self.address(unreachable)}/32"])
        self._blackholes.add((host, unreachable))

    def heal_partitions(self) -> None:
        for host, unreachable in sorted(self._blackholes):
            _run(["ip", "-n", self.hosts[host].netns, "route", "del", "blackhole",
                  f"{self.address(unreachable)}/32"])
        self._blackholes.clear()

    def blackholes(self) -> list[tuple[str, str]]:
        """(host, address it cannot reach) as the kernel has them now, read back from every
        namespace's routing table (for tests: what ``partition`` did, not what it meant)."""
        found = []
        for host in self.hosts.values():
            out = _run(["ip", "-n", host.netns, "-4", "route", "show", "type", "blackhole"])
            found += [(host.name, line.split()[1].removesuffix("/32"))
                      for line in out.splitlines() if line.strip()]
        return sorted(found)

    def impair(self, host: str, netem: Netem, seed: int = 0) -> str:
        """Delay, jitter, loss and reordering on both directions of ``host``'s link, replacing
        any earlier impairment; returns how (``tc`` or ``nfqueue``, ``netem_backend``).
        ``seed`` seeds the user-space netem's choices."""
        self.unimpair(host)
        h = self.hosts[host]
        self._impaired.add(host)
        if netem_backend() == "tc":
            for ns, dev in ((h.netns, DEVICE), (self.hub, h.port)):
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem",
                      *netem.args()])
            return "tc"
        self._queues[host] = _UserNetem.start(h.netns, netem, seed)
        return "nfqueue"

    def unimpair(self, host: str) -> None:
        if host not in self._impaired:
            return
        h = self.hosts[host]
        queue = self._queues.pop(host, None)
        if queue is not None:
            queue.stop()
        else:
            for ns, dev in ((h.netns, DEVICE), (self.hub, h.port)):
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], ok_codes=(0, 2))
        self._impaired.discard(host)

    def drop(self, host: str, percent: int) -> None:
        """Drops ``percent``% of the frames to and from ``host`` at random (nftables on the
        bridge, in the hub's namespace), replacing any earlier loss on that host."""
        if not 0 < percent < 100:
            raise ValueError(f"a loss between 1 and 99 percent, not {percent} (all is a partition)")
        port = self.hosts[host].port
        self.undrop(host)
        chain = f"drop-{host}"
        rules = (f"add table bridge {NFT_TABLE}\n"
                 f"add chain bridge {NFT_TABLE} {chain} "
                 "{ type filter hook forward priority 0; policy accept; }\n"
                 f'add rule bridge {NFT_TABLE} {chain} iifname "{port}" '
                 f"numgen random mod 100 < {percent} drop\n"
                 f'add rule bridge {NFT_TABLE} {chain} oifname "{port}" '
                 f"numgen random mod 100 < {percent} drop\n")
        _run(["ip", "netns", "exec", self.hub, "nft", "-f", "-"], stdin=rules)
        self._dropping.add(host)

    def undrop(self, host: str) -> None:
        if host not in self._dropping:
            return
        _run(["ip", "netns", "exec", self.hub, "nft", "delete", "chain", "bridge", NFT_TABLE,
              f"drop-{host}"])
        self._dropping.discard(host)

    def heal(self) -> None:
        """Ends every fault: routes back, netem and nftables loss gone."""
        self.heal_partitions()
        for host in sorted(self._impaired):
            self.unimpair(host)
        for host in sorted(self._dropping):
            self.undrop(host)


class _UserNetem:
    """``kvstore.check.nfq_netem`` serving one host's packets, and the iptables rules that send
    them to it: the rules go in after it is listening, and out before it stops (it then
    accepts what it still holds), so no packet waits for a program that is gone."""

    QUEUE = "0"
    RULES = (("OUTPUT", "-o"), ("INPUT", "-i"))
    READY_TIMEOUT = 10.0

    def __init__(self, netns: str, proc: subprocess.Popen[bytes]) -> None:
        self.netns, self.proc = netns, proc

    @classmethod
    def start(cls, netns: str, netem: Netem, seed: int) -> _UserNetem:
        with tempfile.TemporaryDirectory(prefix="kvnet-nfq-") as tmp:
            ready = Path(tmp) / "ready"
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "kvstore.check.nfq_netem",
                 "--queue", cls.QUEUE, "--delay-ms", str(netem.delay_ms),
                 "--jitter-ms", str(netem.jitter_ms), "--loss-percent", str(netem.loss_percent),
                 "--reorder-percent", str(netem.reorder_percent), "--seed", str(seed),
                 "--ready-file", str(ready)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + cls.READY_TIMEOUT
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    _, err = proc.communicate()
                    raise NetnsError(f"the user-space netem did not start in {netns}: "
                                     f"{err.decode(errors='replace').strip() or 'timed out'}")
                time.sleep(0.02)
        queue = cls(netns, proc)
        try:
            for chain, flag in cls.RULES:
                queue._iptables("-A", chain, flag)
        except BaseException:
            queue.stop()
            raise
        return queue

    def _iptables(self, action: str, chain: str, flag: str) -> None:
        _run(["ip", "netns", "exec", self.netns, "iptables", "-w", action, chain, flag, DEVICE,
              "-j", "NFQUEUE", "--queue-num", self.QUEUE, "--queue-bypass"])

    def stop(self) -> None:
        for chain, flag in self.RULES:
            with contextlib.suppress(NetnsError):  # not added (start failed half-way)
                self._iptables("-D", chain, flag)
        self.proc.terminate()
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def list_namespaces() -> list[str]:
    """Every named network namespace on the machine (``ip netns list``)."""
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Deletes the namespaces of runs whose creating process is gone; returns their names."""
    stale = [ns for ns in list_namespaces()
             if (m := _NAME.match(ns)) is not None and not _alive(int(m.group(1)))]
    _stop_processes(stale)
    for ns in stale:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                       timeout=COMMAND_TIMEOUT, check=False)
    return stale


def free_subnet() -> int:
    """A third octet X such that the machine routes nothing inside 10.77.X.0/24."""
    out = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"],
                         capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                         check=False).stdout
    routed = []
    for line in out.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit"):
            word = line.split()[1]
        with contextlib.suppress(ValueError):
            routed.append(ipaddress.ip_network(word, strict=False))
    free = [x for x in range(256) if not any(
        net.prefixlen > 0 and net.overlaps(ipaddress.ip_network(f"{SUPERNET}.{x}.0/24"))
        for net in routed)]
    if not free:
        raise NetnsError(f"every {SUPERNET}.X.0/24 is routed on this machine")
    return secrets.choice(free)


def namespace_pids(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _stop_processes(namespaces: Sequence[str]) -> None:
    """SIGTERM to every process in ``namespaces`` (all started by the run that made them),
    SIGKILL to those still there after ``STOP_GRACE``."""
    pids = {pid for ns in namespaces for pid in namespace_pids(ns)}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if _alive(pid)}
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through __exit__: the namespaces go


def _run(command: list[str], *, stdin: str | None = None,
         ok_codes: Sequence[int] = (0,)) -> str:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode not in ok_codes:
        raise NetnsError(f"{' '.join(command)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


@contextlib.contextmanager
def network(nodes: int) -> Iterator[Topology]:
    """A new network of ``nodes`` nodes and a client, removed on the way out."""
    with Topology.plan(nodes) as topology:
        yield topology
