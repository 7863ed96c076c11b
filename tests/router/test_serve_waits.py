"""`omniroute serve` started while its PostgreSQL is down waits for it, saying so, and
serves once it is up (before, it exited at once with "cannot reach the database")."""

from __future__ import annotations

import time
from pathlib import Path

from router.migrate import upgrade
from tests import peers
from tests.support import ServerProcess, free_port, make_settings, server_env


def test_serve_waits_for_the_database_and_says_so(tmp_path: Path) -> None:
    pg = peers.need(lambda: peers.PrivatePostgres.start(tmp_path / "pg"))
    with pg:
        upgrade(pg.url)
        pg.stop()
        settings = make_settings(tmp_path / "conf", pg.url)
        port = free_port()
        server = ServerProcess(server_env(settings, port), tmp_path / "server.log")
        server.start(wait=False)
        try:
            deadline = time.monotonic() + 30
            while "waiting for the database" not in server.log():
                assert server.proc is not None and server.proc.poll() is None, server.log()
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.2)
            assert "postgres@" in server.log()  # where it waits, without a password
            time.sleep(2.5)  # a few more tries: still waiting, not exited
            assert server.proc is not None and server.proc.poll() is None, server.log()
            pg.restart()
            server.wait_ready(timeout=60)
        finally:
            server.stop()


def test_serve_gives_up_after_db_wait(tmp_path: Path) -> None:
    pg = peers.need(lambda: peers.PrivatePostgres.start(tmp_path / "pg"))
    with pg:
        upgrade(pg.url)
        pg.stop()
        settings = make_settings(tmp_path / "conf", pg.url)
        env = {**server_env(settings, free_port()), "OMNIROUTE_DB_WAIT": "2"}
        server = ServerProcess(env, tmp_path / "server.log")
        server.start(wait=False)
        try:
            assert server.wait_exit(timeout=60) != 0
            assert "cannot reach the database" in server.log()
        finally:
            server.stop()
