"""The topology infrastructure itself (tests/replication.py, tests/haproxy.py,
tests/galera.py): each class does what the topology tests of issue 14 rely on, shown with
plain PyMySQL and mysqlclient connections (no Django), so the module runs alone.

The facts asserted here are the ones the guard is built on: the refusal codes and
messages each driver raises (1290 read-only, 1047 WSREP not ready), which statements a
node outside the primary component still answers, how fast HAProxy routes around it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import wait_for
from .galera import GaleraCluster, GaleraNode
from .haproxy import Backend, HAProxy, HealthAgent
from .replication import (
    APP_USER,
    MariaDBNode,
    ReplicatedPair,
    connect_app,
    error_of,
    real_mysqldb,
    run_sql,
    try_sql,
)

pytestmark = [pytest.mark.ha, pytest.mark.timeout(120)]

READ_ONLY = (
    1290,
    "The MariaDB server is running with the --read-only option so it cannot execute this statement",
)
WSREP_NOT_READY = (1047, "WSREP has not yet prepared node for application use")
# HAProxy closing an idle client flow (timeout client), seen on the next statement.
LOST = {
    "pymysql": (2013, "Lost connection to MySQL server during query"),
    "mysqlclient": (2013, "Lost connection to server during query"),
}


@pytest.fixture(params=["pymysql", "mysqlclient"])
def drv(request: pytest.FixtureRequest) -> str:
    """Each test once per driver; mysqlclient only where it is the real MySQLdb."""
    if request.param == "mysqlclient":
        try:
            real_mysqldb()
        except ImportError as exc:
            pytest.skip(str(exc))
    return str(request.param)


def port_of(conn: Any) -> int:
    return int(run_sql(conn, "SELECT @@port")[0][0])


def close_quietly(*conns: Any) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.close()


# -- replication ---------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[ReplicatedPair]:
    with ReplicatedPair(endpoint="proxy") as started:
        yield started


def test_replication_applies_a_row_written_on_the_primary(pair: ReplicatedPair) -> None:
    primary, replica = pair.primary, pair.replica
    assert replica.get_global("read_only") == 1
    assert primary.get_global("read_only") == 0
    status = pair.replica_status()
    assert (status["Slave_IO_Running"], status["Slave_SQL_Running"]) == ("Yes", "Yes")
    assert status["Using_Gtid"] == "Slave_Pos"
    conn = pair.connect()
    try:
        assert port_of(conn) == primary.port  # the endpoint leads to the primary
        run_sql(conn, "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))")
        run_sql(conn, "INSERT INTO t VALUES (1, 'written on primary')")
    finally:
        conn.close()
    pair.wait_caught_up()
    on_replica = replica.connect()
    try:
        assert run_sql(on_replica, "SELECT v FROM t") == [("written on primary",)]
    finally:
        on_replica.close()
    # GTID replication: the replica has applied exactly the primary's position.
    assert replica.get_global("gtid_slave_pos") == primary.get_global("gtid_binlog_pos")


def test_the_app_user_cannot_bypass_read_only(pair: ReplicatedPair, drv: str) -> None:
    """MariaDB 10.11: READ_ONLY ADMIN (part of ALL PRIVILEGES ON *.*) bypasses read_only,
    SUPER no longer does; the app user has neither, so the replica refuses its writes."""
    replica = pair.replica
    grants = " ".join(row[0] for row in replica.query(f"SHOW GRANTS FOR {APP_USER}@'%'"))
    for privilege in ("SUPER", "READ_ONLY ADMIN", "CONNECTION ADMIN", "ALL PRIVILEGES"):
        assert privilege not in grants
    pair.primary.query("CREATE TABLE app.t (id INT PRIMARY KEY AUTO_INCREMENT, v INT)")
    pair.wait_caught_up()
    for user, grant in (("with_super", "SUPER"), ("with_roadmin", "READ_ONLY ADMIN")):
        replica.query(f"CREATE USER {user}@'%' IDENTIFIED BY 'pw'")
        replica.query(f"GRANT INSERT ON app.* TO {user}@'%'")
        replica.query(f"GRANT {grant} ON *.* TO {user}@'%'")
    conn = replica.connect(drv)
    try:
        assert try_sql(conn, "SELECT COUNT(*) FROM t") is None
        assert try_sql(conn, "INSERT INTO t (v) VALUES (1)") == READ_ONLY
        assert try_sql(conn, "BEGIN") is None  # BEGIN itself is allowed ...
        assert try_sql(conn, "INSERT INTO t (v) VALUES (1)") == READ_ONLY  # ... writes not
        assert try_sql(conn, "ROLLBACK") is None
        assert try_sql(conn, "CREATE TEMPORARY TABLE tmp (i INT)") is None  # allowed
    finally:
        conn.close()
    observed = {}
    for user in ("with_super", "with_roadmin"):
        other = connect_app("127.0.0.1", replica.port, "pw", driver=drv, user=user)
        try:
            observed[user] = try_sql(other, "INSERT INTO t (v) VALUES (2)")
        finally:
            other.close()
    assert observed == {"with_super": READ_ONLY, "with_roadmin": None}


@pytest.mark.parametrize("kill_sessions", [False, True], ids=["sessions-kept", "killed"])
def test_failover_moves_the_endpoint_and_the_old_primary_refuses_writes(
    pair: ReplicatedPair, drv: str, kill_sessions: bool
) -> None:
    old, new = pair.primary, pair.replica
    setup = pair.connect(drv)
    run_sql(setup, "CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, v VARCHAR(20))")
    before = pair.connect(drv)  # a persistent connection, opened before the failover
    try:
        assert port_of(before) == old.port
        run_sql(before, "INSERT INTO t (v) VALUES ('before')")
        seconds = pair.failover(kill_sessions=kill_sessions)
        assert seconds < 5
        assert (pair.primary, pair.replica) == (new, old)
        assert old.get_global("read_only") == 1 and new.get_global("read_only") == 0
        after = pair.connect(drv)
        try:
            assert port_of(after) == new.port
            run_sql(after, "INSERT INTO t (v) VALUES ('after')")
        finally:
            after.close()
        rows = new.query("SELECT v FROM app.t ORDER BY id")
        assert rows == [("before",), ("after",)]
        assert old.query("SELECT v FROM app.t ORDER BY id") == [("before",)]
        write = try_sql(before, "INSERT INTO t (v) VALUES ('stale')")
        if kill_sessions:
            assert write is not None and write[0] == 2013
        else:
            assert write == READ_ONLY  # alive, on the demoted node, refused
            assert run_sql(before, "SELECT COUNT(*) FROM t") == [(1,)]  # reads still work
            assert port_of(before) == old.port
        # The proxy kept the old flow on the old server and sent the new one elsewhere.
        assert pair.proxy is not None
        assert pair.proxy.stats()["flows"] >= 3
    finally:
        close_quietly(before, setup)


def test_rejoin_and_fail_back(pair: ReplicatedPair) -> None:
    """Repeated failovers (what a soak with failovers needs): the demoted node replicates
    from the new primary and can be promoted again."""
    first = pair.primary
    pair.primary.query("CREATE TABLE app.t (id INT PRIMARY KEY AUTO_INCREMENT, v INT)")
    pair.primary.query("INSERT INTO app.t (v) VALUES (1)")
    pair.failover()
    pair.primary.query("INSERT INTO app.t (v) VALUES (2)")
    pair.rejoin()
    assert pair.replica is first
    assert first.query("SELECT v FROM app.t ORDER BY v") == [(1,), (2,)]
    pair.failover()
    assert pair.primary is first
    conn = pair.connect()
    try:
        assert port_of(conn) == first.port
        run_sql(conn, "INSERT INTO t (v) VALUES (3)")
        assert run_sql(conn, "SELECT v FROM t ORDER BY v") == [(1,), (2,), (3,)]
    finally:
        conn.close()


def test_pair_with_one_server_id_replicates_and_fails_over() -> None:
    """Two servers that share server_id 1 (the default most installations keep):
    replication needs --replicate-same-server-id; the app user logs in on both with the
    same password, and both servers hand out the same thread ids."""
    with ReplicatedPair(same_server_id=True, endpoint="proxy") as pair:
        assert [n.get_global("server_id") for n in pair.nodes] == [1, 1]
        pair.primary.query("CREATE TABLE app.t (id INT PRIMARY KEY)")
        pair.primary.query("INSERT INTO app.t VALUES (1)")
        pair.wait_caught_up()
        assert pair.replica.query("SELECT id FROM app.t") == [(1,)]
        conns = [node.connect() for node in pair.nodes]
        try:
            ids = [run_sql(c, "SELECT @@server_id, CONNECTION_ID()")[0] for c in conns]
            assert ids[0][0] == ids[1][0] == 1
        finally:
            close_quietly(*conns)
        pair.failover()
        conn = pair.connect()
        try:
            assert port_of(conn) == pair.primary.port
            run_sql(conn, "INSERT INTO t VALUES (2)")
        finally:
            conn.close()
        with pytest.raises(RuntimeError, match="log_slave_updates"):
            pair.rejoin()


def test_failover_through_haproxy(drv: str) -> None:
    with ReplicatedPair(endpoint="haproxy") as pair:
        hap = pair.haproxy
        assert hap is not None
        assert hap.server_states() == {"db1": "UP", "db2": "MAINT"}
        before = pair.connect(drv)
        try:
            assert port_of(before) == pair.primary.port
            run_sql(before, "CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT)")
            old = pair.primary
            pair.failover()
            assert hap.server_states() == {"db1": "MAINT", "db2": "UP"}
            after = pair.connect(drv)
            try:
                assert port_of(after) == pair.primary.port != old.port
                run_sql(after, "INSERT INTO t VALUES ()")
            finally:
                after.close()
            # MAINT stops new flows only: the open one still reaches the old primary.
            assert try_sql(before, "INSERT INTO t VALUES ()") == READ_ONLY
        finally:
            close_quietly(before)


def test_haproxy_agents_follow_the_promotion() -> None:
    """With a read_only agent per server, HAProxy finds the new primary by itself."""
    with ReplicatedPair(endpoint="haproxy", haproxy_follow="agent") as pair:
        hap = pair.haproxy
        assert hap is not None
        assert hap.states() == {"db1": "UP", "db2": "DOWN"}
        assert hap.server_state("db2") == "DOWN (agent)"
        pair.failover()
        assert hap.states() == {"db1": "DOWN", "db2": "UP"}
        conn = pair.connect()
        try:
            assert port_of(conn) == pair.nodes[1].port
        finally:
            conn.close()


# -- HAProxy ---------------------------------------------------------------------------


@pytest.fixture
def two_servers() -> Iterator[list[MariaDBNode]]:
    first = MariaDBNode(name="s1")
    second = MariaDBNode(name="s2", app_password=first.app_password)
    try:
        for node in (first, second):
            node.start()
            node.setup_app()
        yield [first, second]
    finally:
        first.close()
        second.close()


def test_haproxy_routes_only_to_servers_that_are_up(two_servers: list[MariaDBNode]) -> None:
    s1, s2 = two_servers
    with HAProxy([Backend("s1", s1.port), Backend("s2", s2.port)]) as hap:
        assert hap.server_states() == {"s1": "UP", "s2": "UP"}
        assert hap.stats()["s1"]["check_status"] == "L7OK"  # mysql-check logged in

        def ports(count: int = 4) -> set[int]:
            seen = set()
            for _ in range(count):
                conn = connect_app(hap.host, hap.port, s1.app_password)
                seen.add(port_of(conn))
                conn.close()
            return seen

        assert ports() == {s1.port, s2.port}  # round robin
        hap.set_server_state("s2", "maint")
        assert hap.server_state("s2") == "MAINT"
        assert ports() == {s1.port}
        hap.set_server_state("s2", "ready")
        hap.wait_server_state("s2", "UP")
        hap.set_server_state("s2", "drain")
        assert hap.server_state("s2") == "DRAIN" and ports() == {s1.port}
        hap.set_server_state("s2", "ready")
        hap.wait_server_state("s2", "UP")
        s1.stop()  # the server goes away: the health check notices
        took = hap.wait_server_state("s1", "DOWN", timeout=3)
        assert took < 1.5
        assert ports() == {s2.port}


def test_haproxy_timeout_client_closes_idle_flows(two_servers: list[MariaDBNode], drv: str) -> None:
    """``timeout client`` shorter than the server's wait_timeout: HAProxy, not the
    server, closes an idle connection, and the client learns it on its next statement."""
    s1, _ = two_servers
    assert s1.get_global("wait_timeout") == 28800
    with HAProxy([Backend("s1", s1.port)], timeout_client=0.5) as hap:
        conn = connect_app(hap.host, hap.port, s1.app_password, driver=drv)
        try:
            assert port_of(conn) == s1.port
            time.sleep(1.0)
            assert hap.sessions("s1") == 0  # HAProxy dropped the flow
            assert try_sql(conn, "SELECT 1") == LOST[drv]
        finally:
            close_quietly(conn)


def test_health_agent_answers() -> None:
    state = {"answer": True}

    def predicate() -> bool | str:
        if state["answer"] == "boom":
            raise RuntimeError("no answer")
        return state["answer"]

    with HealthAgent(predicate) as agent:
        assert agent.answer() == "up"
        state["answer"] = False
        assert agent.answer() == "down"
        state["answer"] = "boom"
        assert agent.answer() == "down #RuntimeError: no answer"
        state["answer"] = "down#read_only"
        assert agent.answer() == "down #read_only"  # HAProxy 2.6 needs the blank


# -- Galera ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def galera() -> Iterator[GaleraCluster]:
    with GaleraCluster(size=3) as cluster:
        cluster.start_haproxy()
        yield cluster


@pytest.fixture
def cluster(galera: GaleraCluster) -> Iterator[GaleraCluster]:
    """The module's cluster, whole and synced again after each test."""
    yield galera
    for node in galera.nodes:
        if not node.running:
            galera.start_node(node)
        elif not node.is_ready():
            galera.heal(node)
        if node.get_global("wsrep_desync"):
            galera.desync(node, False)
    galera.wait_synced()
    assert galera.haproxy is not None
    for node in galera.nodes:
        galera.haproxy.wait_server_state(node.name, "UP", timeout=5)


def test_galera_cluster_replicates_a_row_to_all_nodes(cluster: GaleraCluster) -> None:
    assert cluster.start_seconds < 30
    for node in cluster.nodes:
        status = node.wsrep()
        assert status["wsrep_cluster_size"] == "3"
        assert status["wsrep_local_state_comment"] == "Synced"
    n1 = cluster.nodes[0]
    conn = n1.connect()
    try:
        run_sql(conn, "CREATE TABLE IF NOT EXISTS rows3 (id INT PRIMARY KEY, v VARCHAR(9))")
        run_sql(conn, "INSERT INTO rows3 VALUES (1, 'node1')")
    finally:
        conn.close()
    for node in cluster.nodes:
        other = node.connect()
        try:
            # wsrep_sync_wait: read after every write set the cluster has committed.
            run_sql(other, "SET SESSION wsrep_sync_wait = 1")
            assert run_sql(other, "SELECT v FROM rows3") == [("node1",)]
        finally:
            other.close()


def _isolated(cluster: GaleraCluster) -> GaleraNode:
    node = cluster.nodes[2]
    took = cluster.isolate(node)
    assert took < 10
    status = node.wsrep()
    assert status["wsrep_ready"] == "OFF"
    assert status["wsrep_cluster_status"] == "non-Primary"
    return node


def test_isolated_node_answers_1047(cluster: GaleraCluster, drv: str) -> None:
    node = cluster.nodes[2]
    conn = node.connect(drv)  # opened while the node was healthy
    try:
        run_sql(conn, "CREATE TABLE IF NOT EXISTS t1047 (id INT PRIMARY KEY AUTO_INCREMENT)")
        _isolated(cluster)
        refusals = {
            sql: try_sql(conn, sql)
            for sql in (
                "SELECT COUNT(*) FROM t1047",
                "INSERT INTO t1047 VALUES ()",
                "BEGIN",
                "START TRANSACTION READ ONLY",
                "COMMIT",
                "DO 1",
            )
        }
        assert refusals == dict.fromkeys(refusals, WSREP_NOT_READY)
        # What still works there: statements that touch no table, SET, SHOW, a ping.
        # (A "SELECT 1" liveness check says nothing about the node's state.)
        for sql in ("SELECT 1", "SELECT @@port", "SET @x = 1", "SHOW STATUS LIKE 'wsrep_ready'"):
            assert try_sql(conn, sql) is None, sql
        conn.ping()
        fresh = node.connect(drv)  # new connections are accepted, and refused the same
        try:
            assert try_sql(fresh, "SELECT COUNT(*) FROM t1047") == WSREP_NOT_READY
        finally:
            fresh.close()
        cluster.heal(node)
        assert try_sql(conn, "SELECT COUNT(*) FROM t1047") is None  # the same connection
    finally:
        close_quietly(conn)


def test_haproxy_routes_around_a_node_that_lost_quorum(cluster: GaleraCluster) -> None:
    hap = cluster.haproxy
    assert hap is not None
    node = cluster.nodes[2]
    start = time.monotonic()
    _isolated(cluster)
    hap.wait_server_state(node.name, "DOWN", timeout=3)
    # From the isolation request to DOWN: the node leaves the primary component
    # (evs.suspect_timeout 1 s) and the agent says so at its next check (0.25 s).
    assert time.monotonic() - start < 5
    # (The stats row may show the agent's answer a moment after the state.)
    assert wait_for(
        lambda: hap.stats()[node.name]["last_agt"].startswith("via agent : down (wsrep_ready=OFF)"),
        timeout=3,
    ), hap.stats()[node.name]
    reached = set()
    for _ in range(6):
        conn = cluster.connect()
        try:
            reached.add(port_of(conn))
            run_sql(conn, "CREATE TABLE IF NOT EXISTS routed (id INT PRIMARY KEY AUTO_INCREMENT)")
            run_sql(conn, "INSERT INTO routed VALUES ()")
        finally:
            conn.close()
    assert reached == {cluster.nodes[0].port, cluster.nodes[1].port}
    cluster.heal(node)
    took = hap.wait_server_state(node.name, "UP", timeout=5)
    assert took < 2


def test_desynced_node_still_serves_reads_and_writes(cluster: GaleraCluster, drv: str) -> None:
    """wsrep_desync=ON (what a donor or a backup does): the node refuses nothing, but
    a clustercheck-like agent takes it out of the load balancer."""
    node = cluster.nodes[1]
    hap = cluster.haproxy
    assert hap is not None
    conn = node.connect(drv)
    try:
        run_sql(conn, "CREATE TABLE IF NOT EXISTS tdesync (id INT PRIMARY KEY AUTO_INCREMENT)")
        cluster.desync(node)
        status = node.wsrep()
        assert status["wsrep_local_state_comment"] == "Donor/Desynced"
        assert status["wsrep_ready"] == "ON"
        for sql in ("SELECT COUNT(*) FROM tdesync", "INSERT INTO tdesync VALUES ()", "BEGIN"):
            assert try_sql(conn, sql) is None, sql
        assert try_sql(conn, "INSERT INTO tdesync VALUES ()") is None
        assert try_sql(conn, "COMMIT") is None
        hap.wait_server_state(node.name, "DOWN", timeout=3)
        assert node.agent_answer(available_when_donor=True) is True
    finally:
        close_quietly(conn)
        cluster.desync(node, False)


def test_reject_queries_answers_1047_too(cluster: GaleraCluster) -> None:
    """wsrep_reject_queries=ALL (maintenance): logins work, statements on tables are
    refused like on a node outside the primary component."""
    node = cluster.nodes[1]
    node.set_global("wsrep_reject_queries", "ALL")
    try:
        conn = node.connect()
        try:
            assert try_sql(conn, "SELECT 1") is None
            assert try_sql(conn, "SELECT COUNT(*) FROM mysql.user") == WSREP_NOT_READY
        finally:
            conn.close()
    finally:
        node.set_global("wsrep_reject_queries", "NONE")


def test_galera_node_shutting_down_answers_1047_then_closes(
    cluster: GaleraCluster, drv: str
) -> None:
    """SIGTERM to a node: while it leaves the cluster its open connections get 1047 (or,
    for a write caught while replicating, 1180 "Error while appending streaming
    replication fragment (provider status: Not connected to Primary Component)": not
    committed), then the connection is lost (no 1053 "Server shutdown in progress" on
    10.11)."""
    node = cluster.nodes[2]
    conn = node.connect(drv)
    run_sql(conn, "CREATE TABLE IF NOT EXISTS tshut (id INT PRIMARY KEY AUTO_INCREMENT)")
    errors: list[tuple[int, str]] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            try:
                run_sql(conn, "INSERT INTO tshut VALUES ()")
            except Exception as exc:  # what each statement gets while the node stops
                errors.append(error_of(exc))
                if errors[-1][0] not in (1047, 1180):
                    return

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.2)
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    thread.join(30)
    stop.set()
    node.process.wait(30)
    node.process = None
    close_quietly(conn)
    codes = [code for code, _ in errors]
    assert codes[-1] == 2013, errors
    assert set(codes) <= {1047, 1180, 2013}, errors
    assert all("Primary Component" in text for code, text in errors if code == 1180), errors
    assert 1053 not in codes
    if 1047 in codes:
        assert (1047, WSREP_NOT_READY[1]) in errors
    cluster.start_node(node)  # it rejoins (IST)
