"""The docs site: its generated reference pages are current, every CLI flag and config key is in
them, and no link of the README or the docs leaves the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from torchwire.cli import build_parser
from torchwire.config import (
    BatchingConfig,
    CompileConfig,
    InstancesConfig,
    ModelConfig,
    ServerSettings,
    TensorSpec,
    VersionsConfig,
)

ROOT = Path(__file__).parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_committed_reference_pages_are_generated_from_the_current_code() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_every_flag_and_config_key_is_in_the_reference() -> None:
    cli = (ROOT / "docs/reference/cli.md").read_text()
    settings = (ROOT / "docs/reference/settings.md").read_text()
    flags = _options(build_parser())
    missing = [f for f in flags if f"`{f}`" not in cli and f"`{f}`" not in settings]
    assert not missing, missing
    for model in (
        ModelConfig,
        TensorSpec,
        BatchingConfig,
        InstancesConfig,
        VersionsConfig,
        CompileConfig,
    ):
        for key in model.model_fields:
            assert f"| `{key}` |" in settings, (model.__name__, key)
    for name in ServerSettings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in settings, name


def _options(parser: object) -> set[str]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
        elif not isinstance(action, argparse._HelpAction):
            found |= set(action.option_strings)
    return found


def test_no_link_of_the_readme_or_the_docs_leaves_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    outside = []
    for page in pages:
        if "_build" in page.parts:
            continue
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or an anchor of the page itself
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                outside.append(f"{page.relative_to(ROOT)}: {target}")
    assert not outside, outside


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220
