/* OSU-style ping-pong between ranks 0 and 1: latency (half round trip) and
 * bandwidth per message size, 0 B .. max size in powers of two.
 *
 *   mpirun -np 2 pingpong [-m MAX_BYTES] [-i ITERS] [-w WARMUP] [-I LARGE_ITERS] [-W LARGE_WARMUP]
 *
 * Sizes above 64 KiB use the "large" iteration counts, as the OSU benchmarks do.
 * Output (rank 0): comment lines start with '#', then "size latency_us bandwidth_MBps".
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LARGE_MESSAGE (64 * 1024)

int main(int argc, char **argv)
{
    long max_size = 4L << 20;
    int iters = 1000, warmup = 100, large_iters = 100, large_warmup = 10;
    int rank, nranks, opt;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    while ((opt = getopt(argc, argv, "m:i:w:I:W:")) != -1) {
        switch (opt) {
        case 'm': max_size = atol(optarg); break;
        case 'i': iters = atoi(optarg); break;
        case 'w': warmup = atoi(optarg); break;
        case 'I': large_iters = atoi(optarg); break;
        case 'W': large_warmup = atoi(optarg); break;
        default:
            if (rank == 0)
                fprintf(stderr, "usage: pingpong [-m max] [-i iters] [-w warmup] [-I large_iters] [-W large_warmup]\n");
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    if (nranks < 2) {
        if (rank == 0)
            fprintf(stderr, "pingpong: needs at least 2 ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }

    char *sbuf = malloc(max_size > 0 ? max_size : 1);
    char *rbuf = malloc(max_size > 0 ? max_size : 1);
    if (!sbuf || !rbuf)
        MPI_Abort(MPI_COMM_WORLD, 3);
    memset(sbuf, 'a', max_size);
    memset(rbuf, 'b', max_size);

    if (rank == 0) {
        printf("# OSU-style MPI ping-pong (hpcrun benchmarks, C)\n");
        printf("# ranks %d, iterations %d (+%d warm-up), above %d B: %d (+%d)\n",
               nranks, iters, warmup, LARGE_MESSAGE, large_iters, large_warmup);
        printf("# %-10s %14s %16s\n", "Size", "Latency (us)", "Bandwidth (MB/s)");
        fflush(stdout);
    }

    for (long size = 0; size <= max_size; size = size ? size * 2 : 1) {
        int n = size > LARGE_MESSAGE ? large_iters : iters;
        int skip = size > LARGE_MESSAGE ? large_warmup : warmup;
        double t0 = 0.0;
        MPI_Barrier(MPI_COMM_WORLD);
        for (int i = 0; i < n + skip; i++) {
            if (i == skip)
                t0 = MPI_Wtime();
            if (rank == 0) {
                MPI_Send(sbuf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD);
                MPI_Recv(rbuf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 1) {
                MPI_Recv(rbuf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(sbuf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD);
            }
        }
        if (rank == 0) {
            double lat = (MPI_Wtime() - t0) * 1e6 / (2.0 * n);
            double bw = lat > 0 ? size / lat : 0.0; /* bytes per us == MB/s */
            printf("%-12ld %14.2f %16.2f\n", size, lat, bw);
            fflush(stdout);
        }
    }
    free(sbuf);
    free(rbuf);
    MPI_Finalize();
    return 0;
}
