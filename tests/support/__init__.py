"""Helpers the tests share (fakes, raw HTTP/RPCH clients, RTS captures, the Samba DC and
serve-process fixtures); no tests here."""
