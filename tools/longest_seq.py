"""Longest sequence that trains at batch 1 (issue 8): a binary search on length, each probe its own process.

    python -m hare.tools.longest_seq --system hare --ckpt /tmp/ckpt_8b --lo 32768 --hi 131072 --cap-gib 24
    python -m hare.tools.longest_seq --system unsloth_4bit --ckpt /tmp/ckpt_8b --lo 32768 --hi 131072 --cap-gib 24

A probe of length L runs one warm-up-free training step of the 8B QLoRA workload (seq L x batch 1, the anchors'
settings) in a fresh process and passes when that process prints its RESULT line and exits 0: for `hare`,
`python -m hare.tools.bench_train --gc offload` (hare's full checkpointing); for an anchor system,
`.anchors/run_anchors.sh X` (the anchors' harness: ../shared/bench-anchors/README.md). [lo, hi) is a guess (lo
trains, hi does not), moved by its width when wrong; the search then halves it down to --step tokens. A probe that
runs out of time counts as a failure and is reported as such (not as out of memory).

--cap-gib C: before the probes a blocker process takes all of the GPU's free memory but C GiB and holds it until
the end, so that each system sees the same C GiB. On a whole H200 the limits fall at lengths where a single step
takes minutes (attention is quadratic in L), beyond a 10-minute device call; under an equal cap they fall where
steps take seconds and the two systems' lengths can be compared as a ratio. Say which was measured.
Writes one JSON line per probe and a summary line to --out.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

def hold(keep_gib):
    """The blocker (--hold-gib): take all free GPU memory but keep_gib, say so, and wait to be killed."""
    import torch
    free, _ = torch.cuda.mem_get_info()
    block = torch.empty(max(free - int(keep_gib * 2**30), 0), dtype=torch.uint8, device="cuda")
    print(f"holding {block.numel() / 2**30:.2f} GiB; free left {torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB",
          flush=True)
    time.sleep(10**6)


def run_probe(cmd, timeout):
    """(returncode or None on timeout, stdout + stderr); the probe runs in its own process group, which is killed
    whole on timeout or when this process is stopped (the anchors' driver is a shell whose python child would
    otherwise live on, holding GPU memory)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        return proc.returncode, text
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        return None, text
    finally:
        if proc.poll() is None:  # stopped from outside (SIGTERM -> SystemExit below) while the probe ran
            os.killpg(proc.pid, signal.SIGKILL)


def search(probe, lo, hi, step):
    """Largest L on the grid lo + k * step with probe(L) true. probe is monotone: what fits at L fits below L.
    [lo, hi) is a guess, probed at both ends first; a wrong guess is moved by its own width (up while hi still
    trains, down while lo does not), so a narrow bracket costs at most a few more probes, never the run. Raises
    when nothing down to `step` tokens trains."""
    width = hi - lo
    if probe(lo):
        while probe(hi):
            lo, hi = hi, hi + width
    else:
        hi = lo
        while True:
            if hi <= step:
                raise ValueError(f"no length down to {step} tokens trains")
            lo = max(hi - width, step)
            if probe(lo):
                break
            hi = lo
    while hi - lo > step:
        mid = lo + (hi - lo) // (2 * step) * step
        mid = mid if mid > lo else lo + step
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo


def command(system, ckpt, seq):
    if system == "hare":
        return [sys.executable, "-m", "hare.tools.bench_train", "--ckpt", ckpt, "--quant", "4bit", "--gc", "offload",
                "--seq", str(seq), "--bs", "1", "--warmup", "0", "--steps", "1", "--out", os.devnull]
    return ["bash", ".anchors/run_anchors.sh", "X", "590", system, "8b", "--seq", str(seq), "--bs", "1",
            "--warmup", "0", "--steps", "1"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", help="hare, or an anchor system (unsloth_4bit, hf_bnb4)")
    p.add_argument("--ckpt", help="hare's 8B checkpoint (.anchors/make_ckpt.py 8b DIR; the anchors use /tmp/ckpt_8b)")
    p.add_argument("--lo", type=int, help="a length expected to train")
    p.add_argument("--hi", type=int, help="a length expected not to")
    p.add_argument("--step", type=int, default=4096, help="resolution of the answer, tokens")
    p.add_argument("--cap-gib", type=float, default=None, help="GPU memory left to the probes (blocker process)")
    p.add_argument("--probe-timeout", type=int, default=300, help="seconds per probe")
    p.add_argument("--out", help="JSON lines")
    p.add_argument("--hold-gib", type=float, default=None, help=argparse.SUPPRESS)  # the blocker process itself
    args = p.parse_args(argv)
    if args.hold_gib is None and None in (args.system, args.ckpt, args.lo, args.hi, args.out):
        p.error("--system, --ckpt, --lo, --hi and --out are required")

    if args.hold_gib is not None:
        return hold(args.hold_gib)
    # `timeout` sends SIGTERM: unwind through the finally clauses, which stop the probe and the blocker
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    blocker = None
    if args.cap_gib is not None:
        blocker = subprocess.Popen([sys.executable, "-m", "hare.tools.longest_seq", "--hold-gib", str(args.cap_gib)],
                                   stdout=subprocess.PIPE, text=True)
        print(blocker.stdout.readline().strip(), flush=True)
    out = open(args.out, "a")

    def probe(seq):
        t0 = time.time()
        rc, text = run_probe(command(args.system, args.ckpt, seq), args.probe_timeout)
        ok = rc == 0 and "RESULT" in text
        status = ("ok" if ok else "timeout" if rc is None else
                  "oom" if "out of memory" in text.lower() else "failed")
        result = ([line.strip() for line in text.splitlines() if "RESULT" in line] or [""])[-1]
        rec = dict(system=args.system, seq=seq, status=status, seconds=round(time.time() - t0, 1), result=result,
                   cap_gib=args.cap_gib)
        print(json.dumps(rec), flush=True)
        out.write(json.dumps(rec) + "\n")
        return ok

    try:
        best = search(probe, args.lo, args.hi, args.step)
        summary = dict(system=args.system, longest_seq=best, step=args.step, cap_gib=args.cap_gib)
        print("LONGEST", json.dumps(summary), flush=True)
        out.write(json.dumps(summary) + "\n")
    finally:
        out.close()
        if blocker is not None:
            blocker.kill()


if __name__ == "__main__":
    main()
