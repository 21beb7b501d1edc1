"""Closing many sessions at once without losing an error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from kernelexec import AsyncSession


async def close_all(sessions: Iterable[AsyncSession]) -> None:
    """Close every session, then raise the first failure, if any (after all were tried)."""
    results = await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
