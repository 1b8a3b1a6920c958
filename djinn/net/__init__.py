"""The wire: a sans-I/O frame codec, message encoding, and a thin asyncio layer on top."""
