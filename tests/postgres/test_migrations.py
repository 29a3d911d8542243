"""Migrations and the start-up policy on PostgreSQL.

Databases are brought to a revision by the package's own ``upgrade()`` (the server's path) or
by ``alembic.command`` on the URL (the developer's path, through migrations/env.py), never by
``metadata.create_all``. The policy differs from SQLite's in one point: a database behind head
is never upgraded by a server, since several servers may share it; ``chat admin migrate``
does it once.
"""

from __future__ import annotations

import subprocess

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from chatserver.storage.database import Database
from chatserver.storage.migrate import (
    SchemaError,
    alembic_config,
    ensure_schema,
    head_revision,
    schema_status,
    upgrade,
)
from chatserver.storage.tables import Base
from tests.conftest import FAST_HASH_ARGS, chat_command

HEAD = head_revision()


# -- helpers --------------------------------------------------------------------------------

def sql(url: str, statement: str, params: dict | None = None) -> list[tuple]:
    """Run one statement in its own committed transaction; rows if it returns any."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params or {})
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def revision_of(url: str) -> str | None:
    if not sql(url, "SELECT to_regclass('alembic_version') IS NOT NULL")[0][0]:
        return None
    rows = sql(url, "SELECT version_num FROM alembic_version")
    return rows[0][0] if rows else None


def build(url: str, revision: str = "head") -> str:
    db = Database(url)
    try:
        upgrade(db, revision)
    finally:
        db.dispose()
    return url


def url_config(url: str):
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", url)
    return config


def model_diffs(url: str) -> list:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def schema(url: str) -> dict:
    """Everything about the schema that matters, comparable between two databases."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        insp = inspect(engine)
        result = {}
        for table in sorted(insp.get_table_names()):
            if table == "alembic_version":
                continue
            result[table] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"),
                             bool(c.get("identity")))
                            for c in insp.get_columns(table)],
                "pk": (insp.get_pk_constraint(table)["name"],
                       insp.get_pk_constraint(table)["constrained_columns"]),
                "fks": sorted(
                    (fk["name"], tuple(fk["constrained_columns"]), fk["referred_table"],
                     tuple(fk["referred_columns"]), fk.get("options", {}).get("ondelete"))
                    for fk in insp.get_foreign_keys(table)),
                "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                  for i in insp.get_indexes(table)),
                "uniques": sorted((u["name"], tuple(u["column_names"]))
                                  for u in insp.get_unique_constraints(table)),
            }
        return result
    finally:
        engine.dispose()


def chat(*args: str) -> subprocess.CompletedProcess:
    """Run the ``chat`` command line; its exit status, stdout and stderr."""
    return subprocess.run(chat_command(*args), check=False, capture_output=True, text=True,
                          timeout=120)


def column_facts(url: str) -> dict[tuple[str, str], tuple]:
    rows = sql(url, """
        SELECT table_name, column_name, data_type, collation_name, column_default
        FROM information_schema.columns WHERE table_schema = current_schema()""")
    return {(r[0], r[1]): r[2:] for r in rows}


# -- the standard checks --------------------------------------------------------------------

def test_empty_database_is_created_at_head_by_the_start_up_policy(pg_url):
    db = Database(pg_url)
    try:
        assert schema_status(db).state == "empty"
        status = ensure_schema(db)
        assert (status.state, status.current, status.head) == ("empty", None, HEAD)
        assert schema_status(db).state == "current"
        assert ensure_schema(db).state == "current"  # and left alone from then on
    finally:
        db.dispose()
    assert revision_of(pg_url) == HEAD
    assert {"accounts", "messages", "send_receipts"} <= set(schema(pg_url))


def test_models_match_migrations(pg_url):
    build(pg_url)
    assert model_diffs(pg_url) == []
    # and the same through `alembic check`, on the app's own connection
    db = Database(pg_url)
    try:
        config = alembic_config()
        with db.write_engine.connect() as conn:
            config.attributes["connection"] = conn
            command.check(config)  # raises AutogenerateDiffsDetected on any difference
    finally:
        db.dispose()


def test_every_schema_property_the_code_relies_on(pg_url):
    build(pg_url)
    s = schema(pg_url)
    facts = column_facts(pg_url)
    # 64-bit ids from sequences: never reused, even after the highest row is deleted.
    for table in ("accounts", "messages"):
        data_type, _collation, default = facts[(table, "id")]
        assert data_type == "bigint"
        assert (default or "").startswith("nextval(") or any(
            c[0] == "id" and c[4] for c in s[table]["columns"]), (table, default)
    assert facts[("accounts", "name_key")][:2] == ("character varying", "C")
    assert facts[("messages", "body")][0] == "bytea"
    assert facts[("send_receipts", "client_msg_id")][0] == "bytea"
    assert ("uq_accounts_name_key", ("name_key",)) in s["accounts"]["uniques"]
    assert ("ix_messages_recipient_id_id", ("recipient_id", "id"), False) in (
        s["messages"]["indexes"])
    ondelete = {fk[1]: fk[4] for fk in s["messages"]["fks"]}
    assert ondelete == {("recipient_id",): "CASCADE"}  # sender_id is a record (0004)
    assert [i[0] for i in s["messages"]["indexes"]] == ["ix_messages_recipient_id_id"]
    assert s["send_receipts"]["indexes"] == []  # purges walk the primary key (0004)
    assert {fk[1]: fk[4] for fk in s["send_receipts"]["fks"]} == {("sender_id",): "CASCADE"}


def test_each_revision_up_down_up(new_postgres_database):
    """Walk base -> head; at each revision step down one and up again, through alembic on
    the URL. After every step the schema must be what a straight upgrade builds."""
    script = ScriptDirectory.from_config(alembic_config())
    chain = [r.revision for r in reversed(list(script.walk_revisions()))]
    reference = {rev: schema(build(new_postgres_database(), rev)) for rev in chain}
    reference["base"] = {}

    url = new_postgres_database()
    config = url_config(url)
    problems = []
    for rev in chain:
        down = script.get_revision(rev).down_revision or "base"
        command.upgrade(config, rev)
        assert revision_of(url) == rev
        command.downgrade(config, down)
        assert revision_of(url) == (None if down == "base" else down)
        if schema(url) != reference[down]:
            problems.append(f"down {rev} -> {down}: {schema(url)} != {reference[down]}")
        command.upgrade(config, rev)
        assert revision_of(url) == rev
        if schema(url) != reference[rev]:
            problems.append(f"up again {down} -> {rev}: {schema(url)} != {reference[rev]}")
    assert revision_of(url) == HEAD
    assert model_diffs(url) == []
    assert problems == []


def test_data_migration_from_0001_keeps_rows_and_ids_go_on(pg_url):
    build(pg_url, "0001")
    sql(pg_url, "INSERT INTO accounts (name, name_key, password_hash, created_at) "
                "VALUES ('Alice', 'alice', 'h1', 100), ('Bob', 'bob', 'h2', 200)")
    sql(pg_url, "INSERT INTO messages (recipient_id, sender_id, sender_name, sent_at, body) "
                "SELECT b.id, a.id, 'Alice', 300, convert_to('hello', 'UTF8') "
                "FROM accounts a, accounts b WHERE a.name_key = 'alice' AND b.name_key = 'bob'")
    before = sql(pg_url, "SELECT id, name, name_key, password_hash, created_at "
                         "FROM accounts ORDER BY id")
    build(pg_url)  # the admin's `chat admin migrate` path
    assert revision_of(pg_url) == HEAD
    assert sql(pg_url, "SELECT id, name, name_key, password_hash, created_at "
                       "FROM accounts ORDER BY id") == before
    assert sql(pg_url, "SELECT last_login_at FROM accounts ORDER BY id") == [(100,), (200,)]
    assert model_diffs(pg_url) == []
    # The sequences carried on: a new account gets an id above every old one.
    highest = before[-1][0]
    sql(pg_url, f"DELETE FROM accounts WHERE id = {highest}")
    sql(pg_url, "INSERT INTO accounts (name, name_key, password_hash, created_at) "
                "VALUES ('Carol', 'carol', 'h3', 400)")
    assert sql(pg_url, "SELECT id FROM accounts WHERE name_key = 'carol'")[0][0] > highest


# -- start-up policy ------------------------------------------------------------------------

def test_database_behind_is_refused_by_the_server_path_and_left_at_its_revision(pg_url):
    build(pg_url, "0001")
    sql(pg_url, "INSERT INTO accounts (name, name_key, password_hash, created_at) "
                "VALUES ('Alice', 'alice', 'h', 100)")
    db = Database(pg_url)
    try:
        assert schema_status(db).state == "behind"
        for allow_upgrade in (True, False):
            with pytest.raises(SchemaError) as err:
                ensure_schema(db, allow_upgrade=allow_upgrade)
            message = str(err.value)
            assert "chat admin migrate" in message
            assert "0001" in message and HEAD in message
            assert revision_of(pg_url) == "0001"
    finally:
        db.dispose()
    columns = {c["name"] for c in inspect(create_engine(pg_url, poolclass=NullPool))
               .get_columns("accounts")}
    assert "last_login_at" not in columns
    assert sql(pg_url, "SELECT name FROM accounts") == [("Alice",)]


def test_chat_admin_migrate_upgrades_a_database_behind(pg_url):
    build(pg_url, "0001")
    status = chat("admin", "db-status", "--db", pg_url)
    assert status.returncode == 1
    assert "chat admin migrate" in status.stderr
    migrated = chat("admin", "migrate", "--db", pg_url)
    assert migrated.returncode == 0, migrated.stderr
    assert f"from 0001 to {HEAD}" in migrated.stdout
    assert "backed up" not in migrated.stdout  # backups of PostgreSQL are pg_dump's business
    assert revision_of(pg_url) == HEAD
    db = Database(pg_url)
    try:
        assert ensure_schema(db).state == "current"
    finally:
        db.dispose()
    again = chat("admin", "migrate", "--db", pg_url)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    status = chat("admin", "db-status", "--db", pg_url)
    assert status.returncode == 0, status.stderr


def test_chat_serve_refuses_a_database_behind(pg_url):
    build(pg_url, "0001")
    serve = chat("serve", "--db", pg_url, "--port", "0", *FAST_HASH_ARGS)
    assert serve.returncode != 0
    assert "chat admin migrate" in serve.stderr
    assert revision_of(pg_url) == "0001"


def test_database_ahead_is_refused_and_untouched(pg_url):
    build(pg_url)
    sql(pg_url, "UPDATE alembic_version SET version_num = 'ffff'")
    before = schema(pg_url)
    db = Database(pg_url)
    try:
        assert schema_status(db).state == "ahead"
        for allow_upgrade in (True, False):
            with pytest.raises(SchemaError, match="ffff"):
                ensure_schema(db, allow_upgrade=allow_upgrade)
    finally:
        db.dispose()
    migrated = chat("admin", "migrate", "--db", pg_url)
    assert migrated.returncode == 1 and "newer version" in migrated.stderr
    assert revision_of(pg_url) == "ffff"
    assert schema(pg_url) == before


def test_foreign_database_is_refused_and_untouched(pg_url):
    sql(pg_url, "CREATE TABLE notes (id serial PRIMARY KEY, body text)")
    sql(pg_url, "INSERT INTO notes (body) VALUES ('keep me')")
    db = Database(pg_url)
    try:
        assert schema_status(db).state == "foreign"
        with pytest.raises(SchemaError, match="not a chat database"):
            ensure_schema(db)
    finally:
        db.dispose()
    assert revision_of(pg_url) is None
    assert sql(pg_url, "SELECT body FROM notes") == [("keep me",)]
