"""Process limits the bench needs (many sockets per process)."""

from __future__ import annotations

import resource


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE towards ``want`` (the hard limit too when allowed); returns the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            with open("/proc/sys/fs/nr_open") as fh:
                ceiling = int(fh.read().strip())
        except (OSError, ValueError):
            ceiling = hard
        target = min(want, ceiling)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            pass  # not privileged: settle for the hard limit
    new_soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return new_soft
