"""Sessions that outlive their container: snapshot, restore, fork, pause and resume.

A snapshot is made inside the sandbox (the variables pickled with dill, the modules named, /work and,
when asked, /tmp and home tarred) and carried to the host as opaque bytes in a checked file
(:mod:`.format`). The host never unpickles: a restore opens the pickle inside a new sandbox, so a
crafted snapshot can only hurt the sandbox it is restored into. Paused sessions live in the host's
state directory (:mod:`.store`). The session's methods (``snapshot``, ``restore``, ``fork``,
``pause``, ``resume``) are the API; this package is their machinery.
"""

from .format import LostItem, Snapshot
from .store import DEFAULT_TTL, PausedSession, expire, paused, state_dir

__all__ = ["DEFAULT_TTL", "LostItem", "PausedSession", "Snapshot", "expire", "paused", "state_dir"]
