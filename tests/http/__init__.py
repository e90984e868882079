"""HTTP-level tests: an in-process ProxyServer on loopback with fake backends and
authenticators (HAProxy where a test needs it). No Samba."""
