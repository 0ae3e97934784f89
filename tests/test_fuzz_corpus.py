"""Replay the fuzzers' corpus (tests/fuzz/corpus): every input that once reached new
code, or crashed a parser, holds every property of its target, and the decoder's
inputs stay within its cost budget (tests/test_decode_budget.py)."""

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS
from tests.test_decode_budget import assert_within_budget

CORPUS = Path(__file__).parent / "fuzz" / "corpus"
INPUTS = sorted(
    (target, path) for target in TARGETS for path in (CORPUS / target).iterdir() if path.is_file()
)


def test_every_target_has_a_corpus() -> None:
    for target in TARGETS:
        assert len([p for t, p in INPUTS if t == target]) >= 10, target


@pytest.mark.parametrize(("target", "path"), INPUTS, ids=lambda v: getattr(v, "name", v)[:12])
def test_corpus_input(target: str, path: Path) -> None:
    data = path.read_bytes()
    TARGETS[target](data)
    if target == "decoder" and data:
        assert_within_budget(data)
