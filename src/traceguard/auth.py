"""The bearer token every listener of ``serve`` and ``consume`` checks.

One check for the OTLP receivers (gRPC metadata, HTTP header) and the API:
the scheme is case-insensitive (RFC 7235) and the token is compared in
constant time, so the answer's timing tells nothing about how much of a
guess was right.
"""

from __future__ import annotations

import hmac


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` value carries ``token`` as its bearer credentials."""
    if not authorization:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


def check_token(token: str | None) -> None:
    """Refuses an empty token instead of letting it turn authentication off."""
    if token is not None and not token.strip():
        raise ValueError("is empty: leave it unset for no authentication, or set the token clients must send")
