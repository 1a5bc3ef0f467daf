/* MPI_Allreduce timing in the shape of `oxccl perf all_reduce` (float sum, out of place),
 * so bench/compare_mpi.py can run both side by side. Prints: bytes time_us busbw_gbs */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    int iters = argc > 2 ? atoi(argv[2]) : 20, warm = argc > 3 ? atoi(argv[3]) : 5;
    char *sizes = argc > 1 ? argv[1] : "8,16777216,134217728";
    char *save = NULL;
    for (char *tok = strtok_r(sizes, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        size_t bytes = strtoull(tok, NULL, 10), count = bytes / sizeof(float);
        float *s = malloc(count * sizeof(float) + 64), *r = malloc(count * sizeof(float) + 64);
        for (size_t i = 0; i < count; i++) s[i] = (float)((i * 7 + rank * 3) % 11) - 5.0f;
        memset(r, 0, count * sizeof(float));
        for (int i = 0; i < warm; i++) MPI_Allreduce(s, r, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int i = 0; i < iters; i++) MPI_Allreduce(s, r, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double t = (MPI_Wtime() - t0) / iters, tmax;
        MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (rank == 0) printf("%zu %.3f %.3f\n", count * sizeof(float), tmax * 1e6, (double)count * sizeof(float) / tmax / 1e9 * 2.0 * (n - 1) / n);
        free(s);
        free(r);
    }
    MPI_Finalize();
    return 0;
}
