"""tests/integration/test_submit_sends.py on PostgreSQL (see tests/postgres/contract.py)."""

from tests.integration import test_submit_sends as _sqlite_suite
from tests.postgres.contract import adopt

adopt(_sqlite_suite, globals(), sqlite_only={
    "test_sends_keep_their_sub_journal_in_memory": "SQLite's temp_store; PostgreSQL has none",
})
