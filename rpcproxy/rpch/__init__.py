"""The sans-IO core of MS-RPCH: bytes and time in, actions out.

Everything that decides protocol legality lives in this package; nothing here touches a
socket, a clock or asyncio.
"""
