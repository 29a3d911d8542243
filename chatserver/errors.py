"""Domain errors: what a use case can refuse, each with the stable code the protocol uses.

Only the server turns these into wire errors and only the CLI into exit codes; the codes are
the ones listed in PROTOCOL.md section 6.
"""


class ChatError(Exception):
    """Base of every refusal a user can cause; ``code`` is the stable wire error code."""

    code = "internal_error"

    def __init__(self, message: str, *, retry_after_ms: int = 0):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


def _error(name: str, code: str) -> type[ChatError]:
    return type(name, (ChatError,), {"code": code, "__doc__": f"Wire code ``{code}``."})


InvalidName = _error("InvalidName", "invalid_name")
InvalidPassword = _error("InvalidPassword", "invalid_password")
NameTaken = _error("NameTaken", "name_taken")
InvalidCredentials = _error("InvalidCredentials", "invalid_credentials")
InvalidPattern = _error("InvalidPattern", "invalid_pattern")
NoSuchAccount = _error("NoSuchAccount", "no_such_account")
EmptyMessage = _error("EmptyMessage", "empty_message")
MessageTooLarge = _error("MessageTooLarge", "message_too_large")
InvalidRequest = _error("InvalidRequest", "invalid_request")
NotLoggedIn = _error("NotLoggedIn", "not_logged_in")
AlreadyLoggedIn = _error("AlreadyLoggedIn", "already_logged_in")
StorageUnavailable = _error("StorageUnavailable", "storage_unavailable")
ShuttingDown = _error("ShuttingDown", "shutting_down")
QueueFull = _error("QueueFull", "queue_full")
RateLimited = _error("RateLimited", "rate_limited")
