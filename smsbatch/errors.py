"""Error types. Library code raises these; the CLI turns them into one-line messages."""


class SmsbatchError(Exception):
    """Base class for every error smsbatch reports to a person."""


class ConfigError(SmsbatchError):
    """A setting is missing or out of range."""


class NotFound(SmsbatchError):
    """A batch (or other record) does not exist."""


class InvalidTransition(SmsbatchError):
    """A batch cannot move from its current state to the one asked for."""


class InvalidInput(SmsbatchError):
    """An inbound text, time or phone number cannot be accepted."""


class DeliveryError(SmsbatchError):
    """An outbound call (AI or SMS) failed.

    `transient` says whether trying again later may succeed; `opted_out` marks
    Twilio's 21610 ("recipient has unsubscribed"); `ambiguous` means the request
    may have reached the provider (a timeout after sending), so the outcome is unknown.
    """

    def __init__(self, message, *, transient, opted_out=False, ambiguous=False):
        super().__init__(message)
        self.transient = transient
        self.opted_out = opted_out
        self.ambiguous = ambiguous


class CannotReconcile(SmsbatchError):
    """The sender cannot be asked whether an earlier send went out."""


class LeaseLost(SmsbatchError):
    """This processor can no longer prove it holds a batch's lease: it must not act on it."""
