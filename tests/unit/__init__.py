"""Unit tests: codecs, the sans-IO core, config, NTLM messages, Autodiscover XML. No sockets,
no subprocesses, no Samba."""
