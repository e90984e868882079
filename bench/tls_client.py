"""The bench's one TLS client context (``--tls``, ``--url https://``, the holder processes).

``client_context(verify=..., max_version=...)``: TLS 1.2 at least; ``max_version`` "1.2" offers
1.2 at most (``--tls-version 1.2``), "1.3" up to 1.3, "" what the library supports. With
``verify`` the server's certificate and host name are checked against the system's CAs
(``--url`` without ``--insecure``); without it nothing is checked (the throwaway certificate
``--tls`` makes for the run, or ``--insecure``), and the system's CA store is not even loaded
(about 15 ms a context, in every holder process).
"""

from __future__ import annotations

import ssl

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def client_context(*, verify: bool, max_version: str = "") -> ssl.SSLContext:
    if verify:
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if max_version:
        ctx.maximum_version = _VERSIONS[max_version]
    return ctx
