"""The engine interface is complete (issue 37, item 3): every member the loop and the
checkpointer call on an engine is declared on :class:`Engine`, every engine is built from
the same arguments, and ``trainer.parallel`` builds no model of its own."""

import inspect
import re

from tests.conftest import REPO
from trainer.parallel.engine import Engine
from trainer.parallel.engines import ENGINES


def test_every_member_the_trainer_calls_on_an_engine_is_declared_on_the_interface():
    called = set()
    for path in (REPO / "trainer").rglob("*.py"):
        # the memory benchmark's census looks inside the engines (their wrapped module,
        # the ZeRO optimizer's buffers) on purpose: it measures, it does not train
        if "parallel" not in path.parts and "bench" not in path.parts:
            called |= set(re.findall(r"\bengine\.([a-z_]+)", path.read_text()))
    assert {"forward", "backward", "accumulating", "step", "lr", "save", "load"} <= called
    assert sorted(name for name in called if not hasattr(Engine, name)) == []


def test_every_engine_is_built_from_the_same_arguments_and_overrides_what_it_must():
    base = inspect.signature(Engine.__init__)
    for name, cls in ENGINES.items():
        assert inspect.signature(cls.__init__) == base, name
        assert not cls.__abstractmethods__, f"{name} leaves {sorted(cls.__abstractmethods__)} undeclared"
    assert {"forward", "backward", "accumulating", "step", "lr", "save", "load"} <= Engine.__abstractmethods__


def test_the_parallel_package_builds_no_model_of_its_own():
    for path in (REPO / "trainer" / "parallel").glob("*.py"):
        assert "trainer.models" not in path.read_text(), path.name
