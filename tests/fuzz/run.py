"""Fuzz one target with atheris (libFuzzer), coverage-guided over the protocol package.

    .venv/bin/pip install -c constraints.txt -e '.[fuzz]'
    .venv/bin/python -m tests.fuzz.run decoder -max_total_time=600
    .venv/bin/python -m tests.fuzz.run wsframes -max_total_time=600 -max_len=8192

New inputs go to ``.fuzz/<target>/`` (not kept), starting from the kept corpus in
``tests/fuzz/corpus/<target>/``. To keep those that reach new code, merge them in:

    .venv/bin/python -m tests.fuzz.run decoder -merge=1 tests/fuzz/corpus/decoder .fuzz/decoder

A crash stops the run and leaves ``crash-<hash>`` with the input: add it to the corpus
once fixed, so the suite replays it. Any other libFuzzer option may follow the target.
"""

import sys
from pathlib import Path

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
SCRATCH = HERE.parent.parent / ".fuzz"
NAMES = ("decoder", "wsframes")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in NAMES:
        print(f"usage: python -m tests.fuzz.run {{{','.join(NAMES)}}} [libFuzzer options]")
        return 2
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        print(
            "fuzzing needs atheris: .venv/bin/pip install -c constraints.txt -e '.[fuzz]', "
            "then run this with .venv/bin/python",
            file=sys.stderr,
        )
        return 2
    name, options = argv[0], argv[1:]
    with atheris.instrument_imports(include=["protocol"]):
        from tests.fuzz.targets import TARGETS
    scratch = SCRATCH / name
    scratch.mkdir(parents=True, exist_ok=True)
    if not any(not o.startswith("-") for o in options):  # no corpus named: ours
        options += [str(scratch), str(CORPUS / name)]
    # libFuzzer runs argv[0] again for -merge and -fork: make it something it can run.
    again = SCRATCH / f"run-{name}"
    command = f'cd "{SCRATCH.parent}" && exec "{sys.executable}" -m tests.fuzz.run {name} "$@"'
    again.write_text(f"#!/bin/sh\n{command}\n")
    again.chmod(0o755)
    atheris.Setup([str(again), *options], TARGETS[name])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
