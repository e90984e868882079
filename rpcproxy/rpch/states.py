"""Every state a virtual connection can be in, each part named (the transitions are all in
``connection.py``).

Theory of operation
-------------------
A VC's state is five independent enums: ``Phase`` (pairing, backend, open, closed),
``Backend`` (the one backend connection), ``BackendReading`` (paused while PDUs wait for
the client's OUT window), and inside ``Phase.OPENED`` the two channel-recycling
sub-machines, ``OutRecycle`` and ``InRecycle``. Both recycle as the R2 variants, because
the successor always lands on this same VC object (protocol notes 6, in
docs/protocol-notes.md). Nothing else in the VC is state in this sense: the channel
objects it holds are data the states name (which of ``out``/``old_out``/``out_successor``
is set follows from ``OutRecycle``).
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """``WAIT_PAIR``: only one of CONN/A1 (OUT, 3.2.4.5.1 Open_Start->C1W) and CONN/B1 (IN,
    3.2.3.5.1) has arrived; bounded by ``setup_timeout``; the backend connect starts at
    once. ``WAIT_BACKEND``: both arrived, the backend is not up yet. ``OPENED``: CONN/A3
    (with the ``200 Success`` header) and CONN/C2 sent (4.1: the translator synthesises
    A3/C2 instead of relaying A2/B2/B3/C1); RPC PDUs flow both ways. ``CLOSED``: every
    channel and the backend are closed (3.2.3.5.10, 3.2.4.5.14: any error ends the VC)."""

    WAIT_PAIR = "waiting for the other channel"
    WAIT_BACKEND = "connecting to the backend"
    OPENED = "opened"
    CLOSED = "closed"


ANY_PHASE = frozenset(Phase)
OPENED_ONLY = frozenset({Phase.OPENED})


class Backend(enum.Enum):
    IDLE = "not asked for"
    CONNECTING = "ConnectBackend emitted, not up yet"
    UP = "connected"
    UP_UNASKED = "backend_up came before any ConnectBackend (a test or a confused adapter)"


BACKEND_UP = frozenset({Backend.UP, Backend.UP_UNASKED})
BACKEND_ASKED = frozenset({Backend.CONNECTING, Backend.UP})


class BackendReading(enum.Enum):
    RUNNING = "reading the backend"
    PAUSED = "PDUs wait for the client's OUT window: backend reading paused"


class OutRecycle(enum.Enum):
    """OUT_R2 progress (3.2.4.5.4-.7 outbound proxy + server roles).

    When the next write would not fit in what is left of the OUT channel's Content-Length,
    OUT_R2/A2 goes on the old channel and RPC PDUs wait in the send queue (as gromox does):
    ``A3_WAIT``. A new OUT request with OUT_R2/A3 -> OUT_R2/A6 on the old channel:
    ``A7_AND_C1_WAIT``. OUT_R2/A7 on IN -> OUT_R2/B3 as the last PDU on the old channel,
    which is then closed (``C1_WAIT`` if C1 is still due); OUT_R2/C1 on the successor
    (``A7_WAIT`` if A7 is still due). Once both happened the successor's ``200 Success`` is
    written and the queue drains onto it: ``NONE``.

    A recycle is started only if it makes progress: a PDU that could not fit in a fresh
    channel either (Content-Length less the reserve and the RTS waiting to go first) ends
    the VC with that reason instead of recycling forever; the configuration refuses
    Content-Lengths below ``min_out_content_length`` (one largest fragment plus reserve
    plus room for our RTS), so only a VcSettings built by hand can get there.
    """

    NONE = "none"
    A3_WAIT = "sent OUT_R2/A2 on the old channel, waiting for the successor's OUT_R2/A3"
    A7_AND_C1_WAIT = "sent OUT_R2/A6, waiting for OUT_R2/A7 (on IN) and OUT_R2/C1"
    C1_WAIT = "OUT_R2/A7 came first: B3 sent, the old channel closed, waiting for C1"
    A7_WAIT = "OUT_R2/C1 came first, waiting for OUT_R2/A7"


class InRecycle(enum.Enum):
    """IN_R2 progress (3.2.3.5.5).

    A new IN request starting with IN_R2/A1 -> successor recorded and *plugged* (its PDUs
    buffered), IN_R2/A4 sent on OUT: ``PLUGGED``. IN_R2/A5 on the old IN -> switch to the
    successor, replay its buffer, close the old: ``NONE``. A client that got IN_R2/A4
    sends A5 on the old channel and may then fill the successor and recycle it too; its
    next IN_R2/A1 (naming the pending successor as predecessor) travels on another TCP
    connection and can arrive before that A5. It is *queued* (``QUEUED``): plugged like a
    successor, its IN_R2/A4 withheld until A5 completes the pending recycle; then it
    becomes the pending successor (``PLUGGED``). So each channel's PDUs reach the backend
    in channel order.
    """

    NONE = "none"
    PLUGGED = "IN_R2/A4 sent; the successor's PDUs held until IN_R2/A5"
    QUEUED = "plugged, and the next IN_R2/A1 (naming that successor) came before its A5"
