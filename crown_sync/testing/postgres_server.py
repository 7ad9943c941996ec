"""A throwaway PostgreSQL cluster for tests and benchmarks.

``initdb`` runs in a private temporary directory; the postmaster listens on 127.0.0.1 only, on a
free port, with its unix socket in the same directory, and is stopped by pid. When this process is
root, the cluster is owned by and run as the ``postgres`` user (``initdb`` refuses root): the
binaries are started with ``subprocess.Popen(user=..., group=...)`` so that the pid we hold is the
postmaster's own (a ``runuser`` wrapper would sit between us and the postmaster).

Usage::

    with PostgresServer() as pg:
        url = pg.url                      # postgresql://postgres@127.0.0.1:PORT/postgres
        pg.sql("SELECT 1")                # run SQL as the superuser
        pg.terminate(pid)                 # pg_terminate_backend
        pg.restart(mode="immediate")      # what `pg_ctl restart -m immediate` does, by pid
        pg.create_role("app", "pw")       # a non-superuser that must give its password (TCP)

``PostgresServer(tls=True)`` also serves TLS with a self-signed certificate made by ``openssl``
(``pg.certificate``, for ``sslrootcert``).

Authentication is ``trust`` except for roles made with :meth:`PostgresServer.create_role`.
"""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence

from .servers import Server, ServerMissing, find_binary, wait_for_port

__all__ = ["PostgresServer", "postgres_bindir"]

# pg_ctl's shutdown modes are signals to the postmaster.
_MODES = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def postgres_bindir() -> str:
    """The directory of the newest installed PostgreSQL's binaries (Debian layout or PATH)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    candidates = list(reversed(candidates)) + ["initdb"]
    return os.path.dirname(find_binary(candidates, "postgresql"))


class PostgresServer(Server):
    """A private PostgreSQL cluster. ``settings`` are extra ``-c name=value`` server settings.

    ``fsync=False`` makes tests faster; durability across ``restart(mode="immediate")`` does not
    depend on it (an immediate shutdown loses what was not written, not what was not fsynced).
    """

    def __init__(self, settings: Optional[Dict[str, Any]] = None, fsync: bool = True,
                 user: str = "postgres", tls: bool = False):
        super().__init__()
        self.tls = tls
        #: With ``tls=True``: the server's self-signed certificate, for ``sslrootcert``.
        self.certificate = os.path.join(self.tmpdir, "server.crt")
        self.bindir = postgres_bindir()
        self.datadir = os.path.join(self.tmpdir, "data")
        self.logfile = os.path.join(self.tmpdir, "postgres.log")
        self.settings = dict(settings or {})
        self.fsync = fsync
        self.superuser = user
        #: The database that :attr:`url` and :meth:`url_for` name (see :meth:`use_database`).
        self.database = "postgres"
        self._run_as = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerMissing(
                    "running as root and there is no 'postgres' user to run the cluster as: "
                    "install the Debian package 'postgresql'"
                ) from None
            self._run_as = entry
            os.chown(self.tmpdir, entry.pw_uid, entry.pw_gid)
        self._initialized = False
        self._log = None

    # -- processes -------------------------------------------------------------------------

    def _popen_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"cwd": self.tmpdir, "env": self._env()}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        return kwargs

    def _env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._run_as is not None:
            env.update(HOME=self.tmpdir, USER="postgres", LOGNAME="postgres")
        return env

    def _run(self, argv: List[str], timeout: float = 120.0) -> str:
        result = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
            **self._popen_kwargs()
        )
        output = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {output[-2000:]}")
        return output

    def initdb(self) -> None:
        if self._initialized:
            return
        self._run([
            os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", self.superuser,
            "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C",
        ])
        if self.tls:
            self._make_certificate()
        self._initialized = True

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 (good for ``sslmode=verify-full``), made by
        the server's user so that the key is its own and private, as the server demands."""
        openssl = find_binary(["openssl"], "openssl")
        self._run([
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", os.path.join(self.tmpdir, "server.key"), "-out", self.certificate,
        ])
        os.chmod(os.path.join(self.tmpdir, "server.key"), 0o600)

    def command(self) -> List[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self.tmpdir,
            "fsync": "on" if self.fsync else "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %a ",
            "wal_level": "replica",
            "max_wal_senders": "4",
        }
        if self.tls:
            settings.update(ssl="on", ssl_cert_file=self.certificate,
                            ssl_key_file=os.path.join(self.tmpdir, "server.key"))
        settings.update({k: str(v) for k, v in self.settings.items()})
        argv = [os.path.join(self.bindir, "postgres"), "-D", self.datadir]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        self.initdb()
        if self.process is not None and self.process.poll() is None:
            return self
        self._log = open(self.logfile, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            **self._popen_kwargs()
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wait_for_port(self.port, timeout)
        import psycopg

        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.process.returncode}): {self.log_tail()}")
            try:
                with psycopg.connect(self.superuser_dsn, connect_timeout=5, autocommit=True) as conn:
                    if self.settings.get("hot_standby") or os.path.exists(
                        os.path.join(self.datadir, "standby.signal")
                    ):
                        return  # a standby answers queries once it is consistent
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0, mode: str = "fast") -> None:
        """Stop the postmaster by pid with one of pg_ctl's modes (smart, fast, immediate)."""
        super().stop(timeout, signum=_MODES[mode])
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, mode: str = "immediate", down: float = 0.0) -> None:
        """What ``pg_ctl restart -m MODE`` does, by pid; ``down``: seconds to stay down."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        self.stop(mode=mode)
        if down:
            time.sleep(down)
        self.start()

    def cleanup(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.logfile, "r", errors="replace") as handle:
                return handle.read()[-chars:]
        except OSError:
            return ""

    # -- clients ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{self.database}"

    def url_for(self, user: Optional[str] = None, password: Optional[str] = None,
                database: Optional[str] = None, **params: Any) -> str:
        """A URL for ``user`` (default the superuser), with libpq or oracle ``params``, naming
        ``database`` (default :attr:`database`)."""
        import urllib.parse

        database = database or self.database
        userinfo = urllib.parse.quote(user or self.superuser, safe="")
        if password is not None:
            userinfo += ":" + urllib.parse.quote(password, safe="")
        query = urllib.parse.urlencode(params)
        return f"postgresql://{userinfo}@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")

    @property
    def superuser_dsn(self) -> str:
        # Over the unix socket: works while TCP settings are being tested.
        return f"host={self.tmpdir} port={self.port} user={self.superuser} dbname={self.database}"

    def sql(self, query: str, params: Sequence[Any] = ()) -> List[tuple]:
        """Run one statement as the superuser in :attr:`database`; returns its rows (empty if
        none)."""
        import psycopg

        with psycopg.connect(self.superuser_dsn, connect_timeout=10, autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description is not None else []

    def create_role(self, name: str, password: str, auth: str = "scram-sha-256",
                    grants: Sequence[str] = ()) -> str:
        """An ordinary (non-superuser) login role that must give ``password`` over TCP.

        The cluster is initialised with trust authentication (the superuser and the tests need
        no password); this puts ``host all NAME 127.0.0.1/32 AUTH`` first in ``pg_hba.conf``
        (first match wins), reloads, and waits until the server enforces it. ``auth`` is
        ``scram-sha-256`` or ``md5``; ``grants`` are role names granted to it (e.g.
        ``pg_read_all_stats``). Returns ``url_for(name, password)``.
        """
        import psycopg
        from psycopg import sql

        if auth not in ("scram-sha-256", "md5"):
            raise ValueError(f"auth must be 'scram-sha-256' or 'md5', got {auth!r}")
        with psycopg.connect(self.superuser_dsn, connect_timeout=10, autocommit=True) as conn:
            conn.execute(sql.SQL("SET password_encryption = {}").format(
                sql.Literal("md5" if auth == "md5" else "scram-sha-256")))
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)))
            for grant in grants:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant), sql.Identifier(name)))
        hba = os.path.join(self.datadir, "pg_hba.conf")
        with open(hba, "r+") as handle:  # rewritten in place: owner and mode stay the postgres user's
            rules = handle.read()
            handle.seek(0)
            handle.write(f'host all "{name}" 127.0.0.1/32 {auth}\n' + rules)
            handle.truncate()
        self.sql("SELECT pg_reload_conf()")
        # The postmaster reloads asynchronously: wait until a wrong password is refused.
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url_for(name, password + "-not"), connect_timeout=5).close()
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    break
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_hba.conf reload not effective: {self.log_tail()}")
            time.sleep(0.05)
        return self.url_for(name, password)

    def incarnation_age(self) -> float:
        """Seconds since this server's incarnation began: its postmaster's start or, after a
        backend crash, the crash recovery (as the PostgreSQL oracle reads it)."""
        from crown_sync.oracles.postgres import _INCARNATION_AGE

        return float(self.sql("SELECT " + _INCARNATION_AGE)[0][0])

    def settle(self, seconds: float, timeout: float = 120.0) -> None:
        """Wait until the incarnation is ``seconds`` old: the PostgreSQL oracle holds a new
        term's child back until a lease has passed since a restart or crash."""
        deadline = time.monotonic() + timeout
        while True:
            left = seconds - self.incarnation_age()
            if left <= 0:
                return
            if time.monotonic() + left > deadline:
                raise RuntimeError(f"the server did not get {seconds}s old within {timeout}s")
            time.sleep(left + 0.01)

    def use_database(self, name: Optional[str]) -> None:
        """Make :attr:`url`, :meth:`url_for` and :meth:`sql` use a new, empty database ``name``
        (created here), or, with None, drop the current one (ending its sessions) and go back to
        ``postgres``. A new database has counted no terminated sessions
        (``pg_stat_database.sessions_killed``), which a PostgreSQL oracle's takeover reads."""
        from psycopg import sql as _sql

        if name is None:
            old, self.database = self.database, "postgres"
            if old != "postgres":
                self.sql(_sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(_sql.Identifier(old)))
            return
        self.sql(_sql.SQL("CREATE DATABASE {}").format(_sql.Identifier(name)))
        self.database = name

    def terminate(self, pid: int) -> bool:
        """``pg_terminate_backend(pid)``: end that session (its advisory locks are freed)."""
        return bool(self.sql("SELECT pg_terminate_backend(%s)", (pid,))[0][0])

    def advisory_holders(self) -> List[tuple]:
        """(pid, classid, objid, application_name) of every granted 64-bit advisory lock (not the
        places in an election's line, objsubid 2)."""
        return self.sql(
            "SELECT l.pid, l.classid::bigint, l.objid::bigint, a.application_name FROM pg_locks l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted ORDER BY l.pid"
        )

    def create_standby(self, port: Optional[int] = None, settings: Optional[Dict[str, Any]] = None,
                       receive: bool = True) -> "PostgresServer":
        """A hot standby of this server (``pg_basebackup -R``) on another free port (or on
        ``port``, e.g. a crashed old primary's, so that a multi-host URL stays valid), with extra
        ``settings``, not started. ``receive=False``: it will not receive WAL (``primary_conninfo``
        cleared), it stays as of the backup. This server may itself be a standby."""
        standby = PostgresServer(settings={"hot_standby": "on", **(settings or {})}, fsync=self.fsync,
                                 user=self.superuser)
        if port is not None:
            standby.port = port
        self._run_basebackup(standby)
        if not receive:
            # After -R's line in the same file: the last setting wins.
            with open(os.path.join(standby.datadir, "postgresql.auto.conf"), "a") as handle:
                handle.write("primary_conninfo = ''\n")
        standby._initialized = True
        return standby

    def _run_basebackup(self, standby: "PostgresServer") -> None:
        argv = [
            os.path.join(self.bindir, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port),
            "-U", self.superuser, "-D", standby.datadir, "-R", "-X", "stream", "--no-sync",
            "--checkpoint=fast",
        ]
        result = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
            **standby._popen_kwargs()
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {result.stdout.decode(errors='replace')[-2000:]}")

    # -- replication -------------------------------------------------------------------------

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until this standby's WAL receiver streams from its primary."""
        self._wait_sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'", (1,),
                       timeout, "the standby streams WAL")

    def stop_wal_receipt(self, timeout: float = 60.0) -> None:
        """Make this standby stop receiving WAL (``primary_conninfo`` cleared): from now on it
        misses what its primary writes, as an asynchronous standby that lags does."""
        self.sql("ALTER SYSTEM SET primary_conninfo = ''")
        self.sql("SELECT pg_reload_conf()")
        self._wait_sql("SELECT count(*) FROM pg_stat_wal_receiver", (0,), timeout,
                       "the standby stopped receiving WAL")

    def adopt_history(self, primary: "PostgresServer") -> None:
        """Copy ``primary``'s timeline history files into this (stopped) standby's pg_wal, as a
        shared WAL archive would deliver them: the standby then knows every timeline up to the
        primary's (a promotion looks for them one by one from its own), and picks a higher one."""
        for source in glob.glob(os.path.join(primary.datadir, "pg_wal", "*.history")):
            target = os.path.join(self.datadir, "pg_wal", os.path.basename(source))
            if not os.path.exists(target):
                shutil.copyfile(source, target)
                if self._run_as is not None:
                    os.chown(target, self._run_as.pw_uid, self._run_as.pw_gid)

    def promote(self, timeout: int = 60) -> bool:
        """``pg_promote(true, timeout)``: end recovery; true once this server is a primary."""
        return bool(self.sql("SELECT pg_promote(true, %s)", (timeout,))[0][0])

    def timeline(self) -> int:
        """A primary's current timeline (the first 8 hex digits of its current WAL file's name)."""
        return int(self.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")[0][0], 16)

    def _wait_sql(self, query: str, row: tuple, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while self.sql(query) != [row]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting until {what}: {self.log_tail()}")
            time.sleep(0.05)
