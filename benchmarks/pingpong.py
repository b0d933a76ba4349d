#!/usr/bin/env python3
"""OSU-style ping-pong between ranks 0 and 1 with mpi4py (same output as pingpong.c).

    mpirun -np 2 python3 pingpong.py [-m MAX_BYTES] [-i ITERS] [-w WARMUP] [-I LARGE_ITERS] [-W LARGE_WARMUP]

Buffers are bytearrays (no numpy needed in the image); Send/Recv use the buffer
interface, so this measures mpi4py's call overhead plus the MPI library.
"""
import argparse
import sys

from mpi4py import MPI

LARGE_MESSAGE = 64 * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", type=int, default=4 << 20, dest="max_size")
    ap.add_argument("-i", type=int, default=1000, dest="iters")
    ap.add_argument("-w", type=int, default=100, dest="warmup")
    ap.add_argument("-I", type=int, default=100, dest="large_iters")
    ap.add_argument("-W", type=int, default=10, dest="large_warmup")
    a = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, nranks = comm.Get_rank(), comm.Get_size()
    if nranks < 2:
        if rank == 0:
            print("pingpong.py: needs at least 2 ranks", file=sys.stderr)
        comm.Abort(2)
    sbuf = bytearray(b"a" * max(a.max_size, 1))
    rbuf = bytearray(b"b" * max(a.max_size, 1))
    if rank == 0:
        print("# OSU-style MPI ping-pong (hpcrun benchmarks, Python mpi4py %s)" % __import__("mpi4py").__version__)
        print("# ranks %d, iterations %d (+%d warm-up), above %d B: %d (+%d)"
              % (nranks, a.iters, a.warmup, LARGE_MESSAGE, a.large_iters, a.large_warmup))
        print("# %-10s %14s %16s" % ("Size", "Latency (us)", "Bandwidth (MB/s)"), flush=True)
    size = 0
    while size <= a.max_size:
        n, skip = (a.large_iters, a.large_warmup) if size > LARGE_MESSAGE else (a.iters, a.warmup)
        s, r = memoryview(sbuf)[:size], memoryview(rbuf)[:size]
        comm.Barrier()
        t0 = 0.0
        for i in range(n + skip):
            if i == skip:
                t0 = MPI.Wtime()
            if rank == 0:
                comm.Send([s, MPI.CHAR], dest=1, tag=1)
                comm.Recv([r, MPI.CHAR], source=1, tag=1)
            elif rank == 1:
                comm.Recv([r, MPI.CHAR], source=0, tag=1)
                comm.Send([s, MPI.CHAR], dest=0, tag=1)
        if rank == 0:
            lat = (MPI.Wtime() - t0) * 1e6 / (2.0 * n)
            bw = size / lat if lat > 0 else 0.0
            print("%-12d %14.2f %16.2f" % (size, lat, bw), flush=True)
        size = size * 2 if size else 1


if __name__ == "__main__":
    main()
