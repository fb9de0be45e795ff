"""The adversarial corpus: attacks against the preset, and lenient re-readings of what got through.

- ``cases/*.toml``: one ``[[case]]`` table per attack, with its raw bytes and expected outcome;
- ``corpus.py``: loads and validates the case files;
- ``lenient.py``: pure functions that re-read raw upstream bytes and request paths the way
  lenient backends do;
- ``backend.py``: the recording upstream with a few extra protocol-switch answers;
- ``test_corpus.py``: drives the real proxy with every case on every listener it applies to.
"""
