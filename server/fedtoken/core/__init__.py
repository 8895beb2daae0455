"""The pure core of fedtoken: no grpc, asyncpg, pkcs11 or aiohttp imports here.

tests/unit/test_layering.py enforces this.
"""
