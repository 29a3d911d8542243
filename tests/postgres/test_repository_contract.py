"""tests/integration/test_repository.py on PostgreSQL (see tests/postgres/contract.py)."""

from tests.integration import test_repository as _sqlite_suite
from tests.postgres.contract import adopt

adopt(_sqlite_suite, globals(), sqlite_only={
    "test_delete_account_with_foreign_keys_off_gives_the_same_result":
        "SQLite's foreign_keys pragma is per connection; PostgreSQL always enforces them",
})
