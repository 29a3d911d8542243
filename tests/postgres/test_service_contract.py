"""tests/integration/test_service.py on PostgreSQL (see tests/postgres/contract.py)."""

from tests.integration import test_service as _sqlite_suite
from tests.postgres.contract import adopt

adopt(_sqlite_suite, globals(), sqlite_only={})
