"""A real three-node MariaDB Galera cluster on loopback ports, for the topology tests
(issue 14).

Why: a Galera node that leaves the primary component keeps its client connections open
and answers every statement with 1047 "WSREP has not yet prepared node for application
use"; HAProxy (with a ``wsrep_ready`` agent) routes new connections around it. The guard
must tell such a refusal from a lost connection, so the tests need the real thing.

Each node is a private ``mariadbd`` (:class:`GaleraNode`) with its own datadir, client
port, gcomm port, IST port and SST port (all free ports of 127.0.0.1), ``galera-4``'s
provider, ``binlog_format=ROW``, InnoDB, ``innodb_autoinc_lock_mode=2``.

Fast start (measured here: 3-4 s for three nodes, against 8-9 s with rsync): a
one-node cluster is bootstrapped once as a template (``mariadb-install-db``, users, the
application database, clean shutdown, so InnoDB and ``grastate.dat`` hold the cluster's
UUID and seqno) and its datadir is copied to every node. Node 1 bootstraps the cluster
from that state (``--wsrep-new-cluster``); the others join one by one at the same
position and need only the few write sets node 1 made since (its view changes) by IST
from node 1's gcache. IST still runs the SST script in "bypass" mode:
``wsrep_sst_method=mysqldump`` there is one ``SET GLOBAL wsrep_start_position`` through
the joiner's client port (about 0.1 s), where rsync starts an rsync daemon (about 2 s a
node). A real SST (a node too far behind) would be a logical dump: slow but correct;
``sst_method="rsync"`` is the alternative (as root the rsync daemon drops to "nobody",
so the datadirs are made reachable for it). ``skip`` does not work: the donor then never
starts the IST and the joiner waits forever. A datadir from ``mariadb-install-db``
alone does not work either: InnoDB holds no wsrep position, and IST aborts with
"Application received wrong state".

Failure timings (``evs.*``) are shortened so a node cut off from the others leaves the
primary component in about a second.

Run ``python -m tests.galera`` to time a start and print the nodes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .haproxy import Backend, HAProxy, HealthAgent
from .mariadb import MariaDBServer
from .replication import MariaDBNode, connect_app
from .servers import _free_port

PROVIDER = "/usr/lib/galera/libgalera_smm.so"
CLUSTER_NAME = "dbkeepalive"
#: How long start() and heal() wait for the cluster to be whole and synced.
SYNC_TIMEOUT = 60.0
#: Group communication timings (ISO 8601 durations): a node cut off from the others is
#: suspected after 1 s and leaves the primary component shortly after (defaults: 5 s /
#: 15 s, far too slow for tests that wait for it); a node that left may reconnect after
#: 0.5 s (gmcast.time_wait, default 5 s: heal() took 3-4 s, 2 s with this).
GCOMM_OPTIONS = (
    "evs.keepalive_period=PT0.2S",
    "evs.inactive_check_period=PT0.2S",
    "evs.suspect_timeout=PT1S",
    "evs.inactive_timeout=PT2S",
    "evs.install_timeout=PT1S",
    "evs.join_retrans_period=PT0.2S",
    "gmcast.time_wait=PT0.5S",
)
WSREP_OPTIONS = (
    "--wsrep-on=ON",
    f"--wsrep-provider={PROVIDER}",
    f"--wsrep-cluster-name={CLUSTER_NAME}",
    "--binlog-format=ROW",
    "--default-storage-engine=InnoDB",
    "--innodb-autoinc-lock-mode=2",
    "--wsrep-slave-threads=2",
)


def _all_ports(count: int) -> list[int]:
    """``count`` distinct free ports (each is free only until someone binds it)."""
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


class GaleraNode(MariaDBNode):
    """One node: a private ``mariadbd`` with wsrep, on its own ports. Built by
    :class:`GaleraCluster` from a copy of the template datadir."""

    def __init__(
        self,
        index: int,
        ports: Sequence[int],
        *,
        app_password: str,
        accounts: MariaDBServer | None = None,
    ) -> None:
        super().__init__(name=f"node{index}", app_password=app_password)
        self.index = index
        self.port, self.gcomm_port, self.ist_port, self.sst_port = ports
        self.cluster_address = "gcomm://"
        self.bootstrap = False
        self.sst_method = "mysqldump"
        if accounts is not None:  # a copy of that server's datadir: the same accounts
            self.root_password = accounts.root_password
            self.password = accounts.password
            self.reader_password = accounts.reader_password

    def wsrep_options(self) -> list[str]:
        provider_options = ";".join(
            (
                f"gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port}",
                f"ist.recv_addr=127.0.0.1:{self.ist_port}",
                "gcache.size=32M",
                "pc.recovery=FALSE",  # no gvwstate.dat: a start is always a fresh start
                *GCOMM_OPTIONS,
            )
        )
        options = [
            *WSREP_OPTIONS,
            f"--wsrep-node-name={self.name}",
            f"--wsrep-node-address=127.0.0.1:{self.gcomm_port}",
            f"--wsrep-node-incoming-address=127.0.0.1:{self.port}",
            f"--wsrep-sst-method={self.sst_method}",
            f"--wsrep-cluster-address={self.cluster_address}",
            f"--wsrep-provider-options={provider_options}",
        ]
        if self.sst_method == "mysqldump":
            # The donor replays into the joiner's own server (SQL over its client
            # port, as a user with every privilege: the accounts are the same on all).
            options += [
                f"--wsrep-sst-receive-address=127.0.0.1:{self.port}",
                f"--wsrep-sst-auth={self.user}:{self.password}",
            ]
        else:
            options.append(f"--wsrep-sst-receive-address=127.0.0.1:{self.sst_port}")
        if self.bootstrap:
            options.append("--wsrep-new-cluster")
        return options

    def _spawn(self) -> None:
        self.options = self.wsrep_options()
        super()._spawn()

    def wsrep(self) -> dict[str, str]:
        """The node's ``wsrep_%`` status (``wsrep_ready``, ``wsrep_cluster_status``,
        ``wsrep_local_state_comment``, ``wsrep_cluster_size`` ...)."""
        return {str(k): str(v) for k, v in self.query("SHOW GLOBAL STATUS LIKE 'wsrep%'")}

    def is_ready(self) -> bool:
        """What a load balancer's check asks: ``wsrep_ready`` is ON (the node is in the
        primary component and accepts statements)."""
        return self.status("wsrep_ready") == "ON"

    def is_synced(self) -> bool:
        status = self.wsrep()
        return (
            status.get("wsrep_ready") == "ON"
            and status.get("wsrep_cluster_status") == "Primary"
            and status.get("wsrep_local_state_comment") == "Synced"
        )

    def set_provider_option(self, option: str) -> None:
        """``SET GLOBAL wsrep_provider_options = option`` (``gmcast.isolate=1`` ...)."""
        self.query("SET GLOBAL wsrep_provider_options = %s", (option,))

    def agent_answer(self, available_when_donor: bool = False) -> bool | str:
        """For :class:`~tests.haproxy.HealthAgent`, what the usual ``clustercheck``
        says: up when ``wsrep_ready`` is ON and the node is Synced; a desynced node or
        donor (which still serves reads and writes) is down unless
        ``available_when_donor``."""
        rows = self.quick_query("SHOW GLOBAL STATUS LIKE 'wsrep%'")
        status = {str(k): str(v) for k, v in rows}
        if status.get("wsrep_ready") != "ON":
            return f"down#wsrep_ready={status.get('wsrep_ready')}"
        state = status.get("wsrep_local_state_comment", "")
        if state == "Synced" or (available_when_donor and state == "Donor/Desynced"):
            return True
        return f"down#{state}"


class GaleraCluster:
    """``size`` :class:`GaleraNode` on loopback; see the module docstring.

    ``nodes[i].connect(driver)`` opens an application connection to one node;
    ``app_password`` is the same on all of them.
    """

    def __init__(self, size: int = 3, *, sst_method: str = "mysqldump") -> None:
        if size < 1:
            raise ValueError("a cluster needs a node")
        if sst_method not in ("mysqldump", "rsync"):
            raise ValueError(f"sst_method must be mysqldump or rsync, not {sst_method!r}")
        self.size = size
        ports = _all_ports(4 * (size + 1))
        # A one-node cluster whose datadir every node starts from (module docstring).
        self._template = GaleraNode(0, ports[:4], app_password=secrets.token_urlsafe(16))
        self._template.name = "template"
        self._template.bootstrap = True
        self.sst_method = sst_method
        self.app_password = self._template.app_password
        self._ports = ports[4:]
        self.nodes: list[GaleraNode] = []
        self.haproxy: HAProxy | None = None
        self.agents: list[HealthAgent] = []
        #: Seconds the last start() took (template, copies, all nodes synced).
        self.start_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> GaleraCluster:
        """Template, copies, node 1 bootstraps, the others join one by one; returns once
        all are Synced. Everything is closed again if a step fails."""
        begin = time.monotonic()
        try:
            if not self.nodes:
                self._prepare()
            first, *others = self.nodes
            first.bootstrap = True
            first.start()
            first.bootstrap = False  # a later restart of node 1 joins the others
            self._start_all(others)
            self.wait_synced()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - begin
        return self

    def close(self) -> None:
        """Stop HAProxy and the agents, every node (in parallel: each leaves the cluster)
        and delete their data."""
        if self.haproxy is not None:
            self.haproxy.close()
            self.haproxy = None
        for agent in self.agents:
            agent.close()
        self.agents = []
        _parallel([node.close for node in self.nodes])
        self._template.close()

    def __enter__(self) -> GaleraCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_synced(
        self, nodes: Sequence[GaleraNode] | None = None, timeout: float = SYNC_TIMEOUT
    ) -> float:
        """Wait until ``nodes`` (all running ones by default) are Primary, Synced and see
        a cluster of that many; returns the seconds it took."""
        start = time.monotonic()
        nodes = [n for n in self.nodes if n.running] if nodes is None else list(nodes)
        deadline = start + timeout
        while True:
            try:
                if all(
                    n.is_synced() and int(n.status("wsrep_cluster_size") or 0) == len(nodes)
                    for n in nodes
                ):
                    return time.monotonic() - start
            except Exception:  # a node still starting refuses the admin connection
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Galera cluster not synced after {timeout}s: "
                    + "; ".join(f"{n.name}: {self._brief(n)}" for n in nodes)
                )
            time.sleep(0.05)

    # -- endpoint --------------------------------------------------------------

    def start_haproxy(self, *, available_when_donor: bool = False, **options: Any) -> HAProxy:
        """HAProxy in front of every node, each with a :class:`HealthAgent` answering
        :meth:`GaleraNode.agent_answer` (``options`` go to :class:`HAProxy`); waits until
        every node is UP. ``connect()`` then goes through it."""
        for node in self.nodes:
            agent = HealthAgent(partial(node.agent_answer, available_when_donor), node.name)
            self.agents.append(agent.start())
        backends = [
            Backend(node.name, node.port, agent=agent)
            for node, agent in zip(self.nodes, self.agents, strict=True)
        ]
        self.haproxy = HAProxy(backends, **options).start()
        for node in self.nodes:
            self.haproxy.wait_server_state(node.name, "UP")
        return self.haproxy

    def connect(self, driver: str = "pymysql", **kwargs: Any) -> Any:
        """A new application connection through HAProxy (start_haproxy() first)."""
        if self.haproxy is None:
            raise RuntimeError("no HAProxy: call start_haproxy() first")
        return connect_app(
            self.haproxy.host,
            self.haproxy.port,
            self.app_password,
            driver=driver,
            **kwargs,
        )

    def node_on_port(self, port: int) -> GaleraNode:
        """The node whose ``@@port`` this is (what a connection reports it reached)."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    # -- faults ----------------------------------------------------------------

    def isolate(self, node: GaleraNode, timeout: float = 15.0) -> float:
        """Cut ``node`` off from the others (``gmcast.isolate=1``: it drops its gcomm
        links and refuses new ones) and wait until it has left the primary component
        (``wsrep_ready`` OFF, status non-Primary) and the others form one without it.
        Its clients stay connected and get 1047. Returns the seconds that took."""
        start = time.monotonic()
        node.set_provider_option("gmcast.isolate=1")
        rest = [n for n in self.nodes if n is not node and n.running]
        _wait(lambda: not node.is_ready(), timeout, f"{node.name} still ready after isolate")
        self.wait_synced(rest, timeout)
        return time.monotonic() - start

    def heal(self, node: GaleraNode, timeout: float = SYNC_TIMEOUT) -> float:
        """Undo :meth:`isolate`: the node rejoins (IST for what it missed) and the whole
        cluster is synced again. Returns the seconds that took."""
        start = time.monotonic()
        node.set_provider_option("gmcast.isolate=0")
        self.wait_synced(timeout=timeout)
        return time.monotonic() - start

    def desync(self, node: GaleraNode, on: bool = True) -> None:
        """``SET GLOBAL wsrep_desync`` on ``node`` (what a donor or a backup does):
        it stops taking part in flow control; its state says Donor/Desynced."""
        node.set_global("wsrep_desync", 1 if on else 0)

    def stop_node(self, node: GaleraNode) -> None:
        """Clean shutdown of one node (it leaves the cluster)."""
        node.stop()

    def start_node(self, node: GaleraNode, timeout: float = SYNC_TIMEOUT) -> None:
        """Start a stopped node again; it rejoins (IST, or SST if too far behind)."""
        node.start()
        self.wait_synced(timeout=timeout)

    # -- internals -------------------------------------------------------------

    def _prepare(self) -> None:
        """The template datadir (a one-node cluster, stopped cleanly) and its copies."""
        template = self._template
        template.start()
        template.setup_app()
        template.stop()
        assert template.tmpdir is not None
        for i in range(self.size):
            node = GaleraNode(
                i + 1,
                self._ports[4 * i : 4 * i + 4],
                app_password=self.app_password,
                accounts=template,
            )
            node.tmpdir = Path(tempfile.mkdtemp(prefix=f"dbkeepalive-galera{i + 1}-"))
            node.socket = str(node.tmpdir / "mysqld.sock")
            (node.tmpdir / "tmp").mkdir()
            shutil.copytree(
                template.tmpdir / "data",
                node.tmpdir / "data",
                symlinks=True,
                ignore=shutil.ignore_patterns("galera.cache", "gvwstate.dat", "*.sock"),
            )
            # rsync (SST, and the marker IST sends through the SST script) runs an rsync
            # daemon on the joiner, which drops to "nobody" when started by root: it
            # must reach and write the datadir.
            if self.sst_method == "rsync" and os.getuid() == 0:
                os.chmod(node.tmpdir, 0o711)
                os.chmod(node.tmpdir / "data", 0o777)
            node._initialized = True
            node.sst_method = self.sst_method
            self.nodes.append(node)
        address = "gcomm://" + ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self.nodes)
        for node in self.nodes:
            node.cluster_address = address
        template.close()

    def _start_all(self, nodes: Sequence[GaleraNode]) -> None:
        """Start ``nodes`` one after the other, each joined before the next is spawned:
        two joiners that connect at once make gcomm drop one of them, which then
        reconnects seconds later (measured: 7 s in parallel, 2 s one by one). Spawned
        from this thread: PR_SET_PDEATHSIG fires when the *thread* that forked a child
        ends, so a node spawned in a worker thread is SIGKILLed as that thread returns."""
        for node in nodes:
            if not node.running:
                node._spawn()
                node._wait_ready()
                self.wait_synced([n for n in self.nodes if n.running])

    @staticmethod
    def _brief(node: GaleraNode) -> str:
        try:
            status = node.wsrep()
        except Exception as exc:
            return f"no answer ({exc})"
        keys = ("wsrep_ready", "wsrep_cluster_status", "wsrep_local_state_comment")
        return " ".join(status.get(k, "?") for k in keys) + (
            f" size={status.get('wsrep_cluster_size')}"
        )


def _parallel(calls: Sequence[Callable[[], Any]]) -> None:
    """Run ``calls`` in threads; re-raise the first error once all have finished."""
    errors: list[BaseException] = []

    def run(call: Callable[[], Any]) -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


if __name__ == "__main__":
    with GaleraCluster() as cluster:
        print(f"started in {cluster.start_seconds:.2f}s")
        for n in cluster.nodes:
            print(n, n.wsrep()["wsrep_cluster_size"], n.wsrep()["wsrep_local_state_comment"])
        sys.stdout.flush()
