"""A seeded short fuzz run (tools/fuzz.py): no input may crash tfl_fuse.optimize.

Every outcome must be a result or a one-line ModelError that validation raised, never the
engine's catch-all ("met an inconsistent model"). A tenth of the inputs also run with
``verify``: LiteRT runs input and output, which must compute the same. A fifth are also written
to a file as optimize_file writes them (folds checked for overflow as they are written, every
fold made a ScaledProduct for it, however small), which must give optimize()'s bytes and report. `make fuzz` runs the long version.
"""

from __future__ import annotations

import fuzz

COUNT = 5000


def test_seeded_fuzz_run_finds_no_crash(tmp_path):
    result = fuzz.run(seed=12, count=COUNT, out=tmp_path, verify_share=0.1, write_share=0.2)
    assert result["failures"] == {}, "\n".join(
        f"{entry['count']} x {name}: {entry['message']} ({entry['input']})"
        for name, entry in result["failures"].items()
    )
    # The mutations reach the rules: many inputs are optimized, many refused.
    assert result["outcomes"]["ok"] > COUNT // 10
    assert result["outcomes"]["refused"] > COUNT // 10
