"""Static cost of the NF4 kernels' launch variants without a GPU: each is compiled for sm_90a (triton.compile
with an explicit GPUTarget, then the ptxas and cuobjdump that ship in the triton wheel), and the SASS
instructions of its main loop are counted per weight, with registers and shared memory.

    python -m hare.tools.sass_nf4                      # the variants below
    python -m hare.tools.sass_nf4 --gemv 2,256,4,load --dequant 4096,2,load --dtype bf16 fp16 [--out X.json]

GEMV variants: block_n,block_k,num_warps,lut[,split_k[,num_stages[,fp_fusion 0/1]]] (fp_fusion defaults to 1, as
the sweep's); dequant: elements_per_program,num_warps,lut[,programs_per_sm[,num_stages[,streaming 0/1]]].
Shapes are those of real models (blocksize 64, double quantization, every size argument divisible by 16, pointers
16-byte aligned), as the JIT specializes them on the GPU; without that the vector loads and stores do not appear.
A static count is no timing (tools/sweep_nf4.py times them on the GPU): it says what the loop issues per weight,
which bounds a kernel that is issue-bound rather than memory- or latency-bound.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..quant import dequant as dq, gemv as gv

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
DEFAULT_GEMV = ["2,256,4,gather", "2,128,2,gather", "2,256,4,load"]
DEFAULT_DEQUANT = ["2048,2,gather", "4096,2,gather", "4096,2,load"]


def _compile(fn, signature, constexprs, divisible, **options):
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in divisible}
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                          options=options)


def _sass(kernel):
    """(registers, SASS lines) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        info = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin],
                              capture_output=True, text=True, check=True).stderr
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                             check=True).stdout
    regs = re.findall(r"Used (\d+) registers", info)
    lines = [line for line in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    return int(regs[0]) if regs else None, lines


def _loop(lines):
    """Opcode histogram of the largest loop (a backward branch's body)."""
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    best = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < addr[i]:
            body = [x for x, a in zip(lines, addr) if int(target.group(1), 16) <= a <= addr[i]]
            best = max(best, body, key=len)
    hist = {}
    for line in best:
        op = re.sub(r"^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?", "", line).split()[0].split(".")[0]
        hist[op] = hist.get(op, 0) + 1
    return len(best), dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def gemv_kernel(c, dtype):
    cons = dict(BS=64, NESTED=True, NESTED_BS=256, ALIGNED=True, BLOCK_N=c.block_n, BLOCK_K=max(c.block_k, 8),
                LUT_GATHER=c.lut == "gather", LUT_PRMT=c.lut == "prmt", NUM_STAGES=c.num_stages, INTERPRET=False)
    sig = {"x_ptr": PTR[dtype], "packed_ptr": "*u8", "words_ptr": "*i32", "absmax_ptr": "*u8",
           "nabsmax_ptr": "*fp32", "nqmap_ptr": "*fp32", "offset_ptr": "*fp32", "qmap_ptr": "*fp32",
           "out_ptr": PTR[dtype] if c.split_k == 1 else "*fp32", "N": "i32", "K": "i32", "KW": "i32", "chunk": "i32"}
    kernel = _compile(gv._gemv_nf4_kernel, sig, cons, ("N", "K", "KW", "chunk"), num_warps=c.num_warps,
                      enable_fp_fusion=c.fp_fusion)
    return kernel, c.block_n * max(c.block_k, 8) * 8 / (32 * c.num_warps)


def dequant_kernel(c, dtype):
    cons = dict(WB=8, NBLK=max(1, c.elements_per_program // 64), NESTED=True, NESTED_BS=256,
                LUT_GATHER=c.lut == "gather", NUM_STAGES=c.num_stages, STREAMING=c.streaming, INTERPRET=False)
    sig = {"words_ptr": "*i32", "absmax_ptr": "*u8", "nabsmax_ptr": "*fp32", "nqmap_ptr": "*fp32",
           "offset_ptr": "*fp32", "qmap_ptr": "*fp32", "out_ptr": PTR[dtype], "n": "i32", "nwords": "i32"}
    kernel = _compile(dq._dequant_nf4_kernel, sig, cons, ("n", "nwords"), num_warps=c.num_warps,
                      enable_fp_fusion=False)
    return kernel, max(c.elements_per_program, 64) / (32 * c.num_warps)


def _gemv_config(text):
    f = text.split(",")
    ints = [int(v) for v in f[4:]]
    return gv.GemvConfig(int(f[0]), int(f[1]), int(f[2]), lut=f[3], split_k=ints[0] if ints else 1,
                         num_stages=ints[1] if len(ints) > 1 else 1, fp_fusion=bool(ints[2]) if len(ints) > 2 else True)


def _dequant_config(text):
    f = text.split(",")
    ints = [int(v) for v in f[3:]]
    return dq.DequantConfig(int(f[0]), int(f[1]), f[2], programs_per_sm=ints[0] if ints else 0,
                            num_stages=ints[1] if len(ints) > 1 else 1,
                            streaming=bool(ints[2]) if len(ints) > 2 else False)


def report(kind, config, dtype, kernel, per_thread):
    regs, lines = _sass(kernel)
    n, hist = _loop(lines)
    top = " ".join(f"{op} {count / per_thread:.2f}" for op, count in list(hist.items())[:8])
    print(f"{kind:7s} {dtype:4s} {str(tuple(config)):48s} regs {regs:3d} smem {kernel.metadata.shared:5d}  "
          f"loop {n / per_thread:5.2f} per weight  ({top})", flush=True)
    return {"kernel": kind, "dtype": dtype, "config": config._asdict(), "registers": regs,
            "shared_bytes": kernel.metadata.shared, "loop_per_weight": n / per_thread,
            "opcodes_per_weight": {op: count / per_thread for op, count in hist.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemv", nargs="*", default=None, help="GEMV variants (see the module docstring)")
    ap.add_argument("--dequant", nargs="*", default=None, help="dequant variants")
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(PTR))
    ap.add_argument("--out", help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sass_nf4 compiles for the GPU: run it without TRITON_INTERPRET=1")
    both = args.gemv is None and args.dequant is None
    rows = []
    for dtype in args.dtype:
        for text in (DEFAULT_GEMV if both else args.gemv or []):
            c = _gemv_config(text)
            rows.append(report("gemv", c, dtype, *gemv_kernel(c, dtype)))
        for text in (DEFAULT_DEQUANT if both else args.dequant or []):
            c = _dequant_config(text)
            rows.append(report("dequant", c, dtype, *dequant_kernel(c, dtype)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
