"""The asyncio/aiohttp adapter: the only code on a virtual connection's path that awaits."""
