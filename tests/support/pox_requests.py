"""Autodiscover POX request documents: ``body()`` builds a well-formed Outlook request, and
``BAD`` names the broken and hostile ones (billion laughs, external entities, ...) with the
error code the proxy must answer each with."""

from __future__ import annotations

from rpcproxy.autodiscover import pox

SCHEMA = pox.OUTLOOK_RESPONSE_NS


def body(address: str = "test.user@example.com", schema: str = SCHEMA,
         ns: str = pox.REQUEST_NS) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{ns}"><Request>'
            f"<EMailAddress>{address}</EMailAddress>"
            f"<AcceptableResponseSchema>{schema}</AcceptableResponseSchema>"
            "</Request></Autodiscover>").encode()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol">
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
<Request><EMailAddress>&lol9;@example.com</EMailAddress></Request></Autodiscover>"""

EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
<Request><EMailAddress>&xxe;</EMailAddress></Request></Autodiscover>"""

EXTERNAL_DTD = (b'<?xml version="1.0"?><!DOCTYPE Autodiscover SYSTEM "http://127.0.0.1:1/x.dtd">'
                + body())

BAD = {
    "empty": (b"", 600),
    "not xml": (b"hello, world", 600),
    "json": (b'{"EMailAddress": "test.user@example.com"}', 600),
    "truncated": (body()[:-20], 600),
    "billion laughs": (BILLION_LAUGHS, 600),
    "external entity": (EXTERNAL, 600),
    "external dtd": (EXTERNAL_DTD, 600),
    "wrong root namespace": (body(ns="http://example.com/other"), 600),
    "no namespace": (body().replace(b' xmlns="' + pox.REQUEST_NS.encode() + b'"', b""), 600),
    "other schema": (body(schema="http://schemas.microsoft.com/exchange/autodiscover/"
                               "mobilesync/responseschema/2006"), 601),
    "no schema": (body().replace(b"AcceptableResponseSchema", b"Other"), 601),
    "no address": (body(address=""), 600),
    "not an address": (body(address="just text"), 600),
    "long address": (body(address="a" * 400 + "@example.com"), 600),
    "deep nesting": (b"<a>" * 50 + b"</a>" * 50, 600),
    "bad encoding": (b'<?xml version="1.0" encoding="klingon"?><a/>', 600),
    "undefined entity": (body(address="&nope;"), 600),
    "invalid utf-8": (body(address="\u00e9@example.com").replace(b"\xc3\xa9", b"\xff"), 600),
}
