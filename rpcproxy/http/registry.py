"""The open virtual connections of this process: by cookie, per user, and the GC freeze.

Theory of operation: a VC is registered when its first channel arrives (``runtime_for``)
and forgotten when it ends (``on_closed``, called by its ``VcRuntime``); the per-user count
is what ``max_connections_per_user`` is checked against. The registry is also the
``VcHost`` of every runtime: it hands them the counters and the backend connect settings.

GC freeze: everything alive once the listeners are up is frozen out of the cyclic
collector (``tune_gc``), and so are the VCs themselves at each new high of open VCs
(``FREEZE_FIRST``, then ``FREEZE_GROWTH`` times the previous freeze; see
``_freeze_long_lived`` for why and what was measured).
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import Hashable

from ntlm.verifier import Identity
from rpcproxy.http.vc_io import BackendConnect, VcRuntime
from rpcproxy.metrics import ServerMetrics
from rpcproxy.rpch.channels import VcSettings
from rpcproxy.rpch.connection import VirtualConnection
from rpcproxy.targets import Endpoint, Target

FREEZE_FIRST = 512  # open VCs at the first gc.freeze()
FREEZE_GROWTH = 1.25  # then at each new high this much above the previous one


class VcRegistry:
    """Open VCs by cookie and by user; the host (``VcHost``) of their runtimes."""

    def __init__(self, metrics: ServerMetrics, backend_connect: BackendConnect) -> None:
        self.metrics = metrics
        self.backend_connect = backend_connect  # replaced on reload
        self.vcs: dict[bytes, VcRuntime] = {}
        self.per_user: collections.Counter[Hashable] = collections.Counter()
        self.freeze_mark = FREEZE_FIRST  # VC count at which the next gc.freeze() runs
        self._freeze_pending = False

    def runtime_for(self, cookie: bytes, identity: Identity, target: Target,
                    endpoint: Endpoint, peer: str, settings: VcSettings) -> VcRuntime:
        """The open VC of this cookie, or a new one."""
        rt = self.vcs.get(cookie)
        if rt is not None and not rt.closed:
            return rt
        vc = VirtualConnection(
            cookie, identity=identity, target=target, settings=settings,
            now=asyncio.get_running_loop().time(),
        )
        rt = VcRuntime(self, vc, endpoint, peer)
        self.vcs[cookie] = rt
        self.per_user[identity] += 1
        self.metrics.vcs_opened += 1
        if len(self.vcs) >= self.freeze_mark and not self._freeze_pending:
            self._freeze_pending = True
            asyncio.get_running_loop().call_soon(self._freeze_long_lived)
        return rt

    def on_closed(self, rt: VcRuntime) -> None:
        if self.vcs.get(rt.vc.cookie) is rt:
            del self.vcs[rt.vc.cookie]
            left = self.per_user[rt.vc.identity] - 1
            if left > 0:
                self.per_user[rt.vc.identity] = left
            else:
                del self.per_user[rt.vc.identity]

    def _freeze_long_lived(self) -> None:
        """A new high of open VCs: move what is alive out of the collector's way.

        CPython runs a full collection each time a quarter more objects have survived
        into the old generation, and it walks every VC: measured with 4,200 VCs in a
        worker, 190 ms of CPU and 600 ms of wall time in which no channel moved, again
        and again while clients connect. Freezing what is alive whenever the number of
        open VCs reaches a new high makes full collections walk only what came since.
        Frozen objects are still freed by reference counting (channels and backend
        protocols drop their runtime when their connection ends); only garbage in a
        reference cycle at the moment of a freeze would stay. The next freeze comes at
        FREEZE_GROWTH times this many VCs.
        """
        self._freeze_pending = False
        gc.collect(1)  # young garbage first, so that it is not frozen with the VCs
        gc.freeze()
        self.freeze_mark = max(FREEZE_FIRST, int(len(self.vcs) * FREEZE_GROWTH))
        self.metrics.gc_freezes += 1


def tune_gc() -> None:
    """Keep start-up objects out of the cyclic garbage collector's way.

    Everything alive once the listeners are up (modules, configuration) is frozen out
    of collection, so full collections walk only the virtual connections. The
    thresholds stay CPython's: measured with 5,000 VCs, a young generation of 20,000
    objects made second-generation passes take up to 190 ms, the default keeps them
    under 20 ms.
    """
    gc.collect()
    gc.freeze()
