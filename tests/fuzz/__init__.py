"""Coverage-guided fuzzing of the parsers that read untrusted bytes.

``targets`` holds what is checked for each input; ``run`` drives it with atheris
(libFuzzer), outside CI; ``corpus/<target>/`` keeps the inputs worth keeping, and
``tests/test_fuzz_corpus.py`` replays every one of them in the test suite.
"""
