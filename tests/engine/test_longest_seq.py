"""tools/longest_seq.py's search and probe runner (the GPU probes themselves run on the device machine)."""
import time

import pytest

from hare.tools.longest_seq import run_probe, search


def test_search_finds_the_largest_length_on_the_grid_that_trains():
    probed = []

    def fits(seq):
        probed.append(seq)
        return seq <= 50_000

    assert search(fits, 32768, 131072, 4096) == 32768 + 4 * 4096  # 49152 fits, 53248 does not
    assert probed[:2] == [32768, 131072] and len(probed) <= 2 + 5  # log2(24 grid steps) bisections


@pytest.mark.parametrize("lo,hi", [(61440, 69632), (32768, 40960), (12288, 20480)])
def test_search_moves_a_wrong_bracket(lo, hi):
    probed = []

    def fits(seq):
        probed.append(seq)
        return seq <= 50_000

    assert search(fits, lo, hi, 4096) == 49152
    assert len(probed) == len(set(probed))  # no length probed twice


def test_search_says_when_nothing_trains():
    with pytest.raises(ValueError, match="no length down to 4096"):
        search(lambda seq: False, 16384, 32768, 4096)


def test_probe_timeout_kills_the_whole_process_group():
    t0 = time.time()
    rc, text = run_probe(["bash", "-c", "echo started; sleep 30 & wait"], timeout=1)
    assert rc is None and "started" in text and time.time() - t0 < 10  # the sleep child died with its shell
    rc, text = run_probe(["bash", "-c", "echo RESULT tok/s 1"], timeout=10)
    assert rc == 0 and "RESULT" in text
