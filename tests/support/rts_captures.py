"""RTS PDUs as literal bytes, transcribed by hand, for byte-exact tests.

Two sources:

* worked examples written by hand from the [MS-RPCH] 2.2.4 PDU and 2.2.3.5 command
  layouts (the ``NOTES_*`` names; docs/protocol-notes.md section 7 lists them);
* what Samba's ncacn_http client sends, reconstructed from reading
  ``source4/librpc/rpc/dcerpc_roh_channel_out.c`` (CONN/A1: flags NONE, 4 commands,
  Version 1, VC cookie, OUT cookie, ReceiveWindowSize 0x40000, frag_length 76),
  ``source4/librpc/rpc/dcerpc_roh_channel_in.c`` (CONN/B1: flags NONE, 6 commands,
  Version 1, VC cookie, IN cookie, ChannelLifetime 0x40000000, ClientKeepalive 0x493E0,
  AssociationGroupId, frag_length 104) and ``librpc/idl/dcerpc.idl`` (RTS cookies are
  GUIDs in NDR, i.e. Data1/2/3 little-endian; every command is a u32 CommandType then
  its payload with no padding). Samba picks random cookies; the GUIDs below are fixed
  stand-ins so the bytes are reproducible.

The hex is written out literally, never produced by the code under test.
"""

from __future__ import annotations


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- cookies (GUID wire form) -----------------------------------------------------------------

# examples: VC 6f2b1e40-8d4a-4c1b-9a3e-2f1d0c5b7a91, OUT a1b2c3d4-0001-4a5b-8c6d-7e8f90a1b2c3,
# IN 5e6f7081-9aab-4bcd-8def-0123456789ab, association group 0badc0de-1234-4567-89ab-cdef01234567
NOTES_VC = h("40 1e 2b 6f 4a 8d 1b 4c 9a 3e 2f 1d 0c 5b 7a 91")
NOTES_OUT = h("d4 c3 b2 a1 01 00 5b 4a 8c 6d 7e 8f 90 a1 b2 c3")
NOTES_IN = h("81 70 6f 5e ab 9a cd 4b 8d ef 01 23 45 67 89 ab")
NOTES_AG = h("de c0 ad 0b 34 12 67 45 89 ab cd ef 01 23 45 67")

# Samba stand-ins: VC d2e5f0a1-3b4c-4d5e-8f60-718293a4b5c6,
# OUT 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0, IN c0ffee00-1111-2222-3333-444455556666,
# association group feedface-0102-0304-0506-0708090a0b0c
SAMBA_VC = h("a1 f0 e5 d2 4c 3b 5e 4d 8f 60 71 82 93 a4 b5 c6")
SAMBA_OUT = h("3c 2d 1e 0f 5a 4b 78 69 87 96 a5 b4 c3 d2 e1 f0")
SAMBA_IN = h("00 ee ff c0 11 11 22 22 33 33 44 44 55 55 66 66")
SAMBA_AG = h("ce fa ed fe 02 01 04 03 05 06 07 08 09 0a 0b 0c")

# --- worked examples (docs/protocol-notes.md section 7) --------------------------------------

# 4.3 CONN/A1, Windows-like client, ReceiveWindowSize 0x10000
NOTES_CONN_A1 = h(
    "05 00 14 03 10 00 00 00 4c 00 00 00 00 00 00 00"
    "00 00 04 00"
    "06 00 00 00 01 00 00 00"
    "03 00 00 00 40 1e 2b 6f 4a 8d 1b 4c 9a 3e 2f 1d 0c 5b 7a 91"
    "03 00 00 00 d4 c3 b2 a1 01 00 5b 4a 8c 6d 7e 8f 90 a1 b2 c3"
    "00 00 00 00 00 00 01 00"
)

# 4.3 CONN/B1, lifetime 1 GiB, keepalive 300000 ms
NOTES_CONN_B1 = h(
    "05 00 14 03 10 00 00 00 68 00 00 00 00 00 00 00"
    "00 00 06 00"
    "06 00 00 00 01 00 00 00"
    "03 00 00 00 40 1e 2b 6f 4a 8d 1b 4c 9a 3e 2f 1d 0c 5b 7a 91"
    "03 00 00 00 81 70 6f 5e ab 9a cd 4b 8d ef 01 23 45 67 89 ab"
    "04 00 00 00 00 00 00 40"
    "05 00 00 00 e0 93 04 00"
    "0c 00 00 00 de c0 ad 0b 34 12 67 45 89 ab cd ef 01 23 45 67"
)

# 4.3 CONN/A3, ConnectionTimeout 120000 ms
NOTES_CONN_A3 = h(
    "05 00 14 03 10 00 00 00 1c 00 00 00 00 00 00 00"
    "00 00 01 00 02 00 00 00 c0 d4 01 00"
)

# 4.3 CONN/C2, IN window 65536, ConnectionTimeout 120000 ms
NOTES_CONN_C2 = h(
    "05 00 14 03 10 00 00 00 2c 00 00 00 00 00 00 00"
    "00 00 03 00"
    "06 00 00 00 01 00 00 00"
    "00 00 00 00 00 00 01 00"
    "02 00 00 00 c0 d4 01 00"
)

# 5.2 FlowControlAckWithDestination to the client: FDClient, BytesReceived 0x8000,
# AvailableWindow 0x10000, IN channel cookie
NOTES_IN_ACK = h(
    "05 00 14 03 10 00 00 00 38 00 00 00 00 00 00 00"
    "02 00 02 00"
    "0d 00 00 00 00 00 00 00"
    "01 00 00 00 00 80 00 00 00 00 01 00"
    "81 70 6f 5e ab 9a cd 4b 8d ef 01 23 45 67 89 ab"
)

# 5.3 FlowControlAckWithDestination from the client: FDOutProxy, BytesReceived 0x9000,
# AvailableWindow 0x10000, OUT channel cookie
NOTES_OUT_ACK = h(
    "05 00 14 03 10 00 00 00 38 00 00 00 00 00 00 00"
    "02 00 02 00 0d 00 00 00 03 00 00 00"
    "01 00 00 00 00 90 00 00 00 00 01 00 d4 c3 b2 a1"
    "01 00 5b 4a 8c 6d 7e 8f 90 a1 b2 c3"
)

# 7.2 OUT_R2/A2: RECYCLE_CHANNEL, Destination FDClient
NOTES_OUT_R2_A2 = h(
    "05 00 14 03 10 00 00 00 1c 00 00 00 00 00 00 00 04 00 01 00 0d 00 00 00 00 00 00 00"
)

# 7.2 OUT_R2/A6: NONE, Destination FDClient, ANCE
NOTES_OUT_R2_A6 = h(
    "05 00 14 03 10 00 00 00 20 00 00 00 00 00 00 00 00 00 02 00 0d 00 00 00 00 00 00 00"
    "0a 00 00 00"
)

# 7.2 OUT_R2/B3: EOF, ANCE
NOTES_OUT_R2_B3 = h(
    "05 00 14 03 10 00 00 00 18 00 00 00 00 00 00 00 20 00 01 00 0a 00 00 00"
)

# 7.2 OUT_R2/C1: PING, Empty
NOTES_OUT_R2_C1 = h(
    "05 00 14 03 10 00 00 00 18 00 00 00 00 00 00 00 01 00 01 00 07 00 00 00"
)

# 7.1 IN_R2/A4: NONE, Destination FDClient
NOTES_IN_R2_A4 = h(
    "05 00 14 03 10 00 00 00 1c 00 00 00 00 00 00 00 00 00 01 00 0d 00 00 00 00 00 00 00"
)

# 3.3 Echo response body
NOTES_ECHO = h("05 00 14 03 10 00 00 00 14 00 00 00 00 00 00 00 40 00 00 00")

# --- Samba client ------------------------------------------------------------------------------

# CONN/A1 as Samba's roh_send_CONN_A1 builds it (ReceiveWindowSize 0x40000)
SAMBA_CONN_A1 = h(
    "05 00 14 03 10 00 00 00 4c 00 00 00 00 00 00 00"
    "00 00 04 00"
    "06 00 00 00 01 00 00 00"
    "03 00 00 00 a1 f0 e5 d2 4c 3b 5e 4d 8f 60 71 82 93 a4 b5 c6"
    "03 00 00 00 3c 2d 1e 0f 5a 4b 78 69 87 96 a5 b4 c3 d2 e1 f0"
    "00 00 00 00 00 00 04 00"
)

# CONN/B1 as Samba's roh_send_CONN_B1 builds it (lifetime 0x40000000, keepalive 0x493E0)
SAMBA_CONN_B1 = h(
    "05 00 14 03 10 00 00 00 68 00 00 00 00 00 00 00"
    "00 00 06 00"
    "06 00 00 00 01 00 00 00"
    "03 00 00 00 a1 f0 e5 d2 4c 3b 5e 4d 8f 60 71 82 93 a4 b5 c6"
    "03 00 00 00 00 ee ff c0 11 11 22 22 33 33 44 44 55 55 66 66"
    "04 00 00 00 00 00 00 40"
    "05 00 00 00 e0 93 04 00"
    "0c 00 00 00 ce fa ed fe 02 01 04 03 05 06 07 08 09 0a 0b 0c"
)
