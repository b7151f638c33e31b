"""The only modules that use private names of grpc, aiohttp and torch: one per library, each
small, each with a test (``tests/test_compat.py``) that fails when an upgrade breaks it. The
versions they are known to work with are the ranges in ``pyproject.toml``."""
