"""Seed matplotlib's font cache in a fresh home directory, at interpreter start.

Installed into the kernel image's site-packages and imported by
``_kernelexec_mplcache.pth``, so it runs in every Python process of the image.

Why: the kernel's root filesystem is read-only and its $HOME is an empty
tmpfs, so matplotlib would scan every font on its first import in each
session (most of a second). Pointing it at a read-only cache does not work:
matplotlib then falls back to a temporary directory, warns, and scans anyway.
So the font list built when the image was built is copied to the (writable)
place where matplotlib will look, if it is not there yet. That costs one
``stat`` when it is. Any failure is ignored: matplotlib is then only slower.
"""

import os
import sys


def _seed() -> None:
    src = os.path.join(sys.prefix, "share", "matplotlib")
    try:
        names = [n for n in os.listdir(src) if n.startswith("fontlist-") and n.endswith(".json")]
    except OSError:
        return
    # The directory matplotlib.get_cachedir() picks on Linux, before it checks that it is writable.
    cache = os.environ.get("MPLCONFIGDIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "matplotlib"
    )
    for name in names:
        dst = os.path.join(cache, name)
        if os.path.exists(dst):
            continue
        tmp = f"{dst}.{os.getpid()}.tmp"  # then renamed: a concurrent process never reads half a file
        try:
            os.makedirs(cache, exist_ok=True)
            with open(os.path.join(src, name), "rb") as f:
                data = f.read()
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass


try:
    _seed()
except Exception:  # noqa: BLE001  # never break interpreter start-up over a cache
    pass
del _seed
