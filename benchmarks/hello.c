/* MPI hello for the launch benchmark: MPI_Init, one barrier, rank 0 prints. */
#include <mpi.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    int rank, nranks;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0)
        printf("hello from %d ranks\n", nranks);
    MPI_Finalize();
    return 0;
}
