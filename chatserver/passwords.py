"""Password hashing with Argon2id, with a cap on how many hashes run at once.

Each hash costs ``memory_kib`` of memory and a few tens of milliseconds of CPU; without a cap
a flood of logins could exhaust both. Callers beyond the cap wait their turn.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


@dataclass(frozen=True)
class HashParameters:
    """Argon2id cost. The defaults follow RFC 9106's second recommended option (64 MiB, t=3)."""

    time_cost: int = 3
    memory_kib: int = 65_536
    parallelism: int = 4


class PasswordHasher:
    """Hashes and verifies passwords; at most ``max_concurrent`` computations at a time."""

    def __init__(self, params: HashParameters = HashParameters(), max_concurrent: int = 4):
        self.params = params
        self._argon2 = _Argon2(
            time_cost=params.time_cost, memory_cost=params.memory_kib,
            parallelism=params.parallelism, type=Type.ID,
        )
        self._slots = threading.BoundedSemaphore(max_concurrent)
        # Verified against when the account does not exist, so that an unknown name costs
        # as much time as a wrong password and names cannot be probed by timing.
        self._dummy_hash = self._argon2.hash("not a password of anyone")

    def hash(self, password: str) -> str:
        with self._slots:
            return self._argon2.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        """True if ``password`` matches; an absent hash costs the same and returns False."""
        with self._slots:
            try:
                return self._argon2.verify(password_hash or self._dummy_hash, password) and (
                    password_hash is not None
                )
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the stored hash was made with other parameters than the current ones."""
        return self._argon2.check_needs_rehash(password_hash)
