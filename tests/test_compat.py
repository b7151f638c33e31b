"""The private names torchwire uses, each behind ``torchwire.compat``: these tests fail when an
upgrade of grpc, aiohttp or torch changes them (and say which module to look at)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from aiohttp import web

from torchwire.compat import aiohttp_runner, grpc_aio, torch_internals
from torchwire.repository.demo import RecSys, compiler_found


def test_grpc_aio_accept_loop_is_the_one_compat_knows() -> None:
    assert grpc_aio.known(), f"grpcio {grpc.__version__}: see torchwire/compat/grpc_aio.py"

    async def main() -> None:
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            core = grpc_aio.accept_loop(server)
            assert core is not None and core.is_running()
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_grpc_channelz_counts_a_servers_calls() -> None:
    import json

    async def main() -> list[dict[str, object]]:
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return list(json.loads(grpc_aio.channelz_servers()).get("server", []))
        finally:
            await server.stop(None)

    assert any("data" in found for found in asyncio.run(main()))


def test_torch_jit_executor_settings_can_be_read_and_set_back() -> None:
    fuser, optimize = torch_internals.jit_executor_settings()
    try:
        torch_internals.set_jit_executor(not fuser, not optimize)
        assert torch_internals.jit_executor_settings() == (not fuser, not optimize)
    finally:
        torch_internals.set_jit_executor(fuser, optimize)
    assert torch_internals.jit_executor_settings() == (fuser, optimize)


def test_aiohttp_runner_takes_a_shutdown_timeout_after_construction() -> None:
    runner = web.AppRunner(web.Application())
    assert aiohttp_runner.set_shutdown_timeout(runner, 3.5)
    assert runner._shutdown_timeout == 3.5  # what AppRunner.cleanup reads


def test_torch_pt2_archive_layout_is_readable(tmp_path: Path) -> None:
    program = torch.export.export(RecSys().eval(), (torch.zeros(2, 256),))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    archive = torch_internals.open_archive(tmp_path / "model.pt2")
    assert archive.format_path in archive.names
    assert archive.read_string(archive.format_path)
    assert all(isinstance(prefix, str) for prefix in archive.pickled_prefixes)


@pytest.mark.skipif(compiler_found() is None, reason="no C++ compiler: AOTInductor cannot build")
def test_torch_aoti_packages_compile_and_load(tmp_path: Path) -> None:
    module = RecSys().eval()
    program = torch.export.export(module, (torch.zeros(2, 256),))
    torch_internals.aoti_compile_and_package(program, tmp_path / "model.pt2")
    compiled = torch_internals.aoti_load_package(tmp_path / "model.pt2")
    x = torch.zeros(2, 256)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), module(x))
