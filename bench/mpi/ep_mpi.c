/* MoE dispatch and combine with Open MPI's MPI_Alltoallv, on exactly the counts `oxccl perf
 * ep` uses (the same generator: splitmix64, Zipf-like expert popularity, experts in blocks
 * over the ranks, new choices at every step), for a side-by-side comparison
 * (bench/ep_mpi.py). One step: the counts (MPI_Alltoall), the dispatch and the combine
 * (MPI_Alltoallv each way); only these calls are timed. Buffers are made once for the
 * most a step can move and touched before the steps (as oxccl perf ep does). The combine
 * returns what the dispatch sent: every element is checked.
 *
 *   mpirun -np 4 ep_mpi TOKENS[,TOKENS...] HIDDEN TOPK EXPERTS ZIPF SEED ITERS WARMUP ELEMBYTES
 *
 * Prints, on rank 0, one line per TOKENS:
 *   ep_mpi,RANKS,TOKENS,HIDDEN,TOPK,EXPERTS,ZIPF,STEP_US,DISPATCH_BYTES,ALGBW_GBS,P50_US,WRONG
 */
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state;
static uint64_t next_u64(void) {
    rng_state += 0x9e3779b97f4a7c15ULL;
    uint64_t z = rng_state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static double unit(void) { return (double)(next_u64() >> 11) / (double)(1ULL << 53); }

/* Rows this rank sends to each rank at `step` (as bench/src/ep.rs rows_to). */
static void rows_to(long tokens, int topk, int experts, double zipf, uint64_t seed, int rank, int world,
                    uint64_t step, const double *cdf, long *rows) {
    double total = cdf[experts - 1];
    int per_rank = (experts + world - 1) / world;
    int want = topk < experts ? topk : experts;
    int picked[256];
    rng_state = seed ^ (step << 20) ^ ((uint64_t)rank * 0x10000001ULL);
    for (int r = 0; r < world; r++) rows[r] = 0;
    for (long t = 0; t < tokens; t++) {
        int np = 0;
        while (np < want) {
            double u = unit() * total;
            int lo = 0, hi = experts; /* first index with cdf >= u */
            while (lo < hi) {
                int mid = (lo + hi) / 2;
                if (cdf[mid] < u) lo = mid + 1; else hi = mid;
            }
            int e = lo < experts - 1 ? lo : experts - 1;
            int seen = 0;
            for (int k = 0; k < np; k++) seen |= picked[k] == e;
            if (!seen) picked[np++] = e;
        }
        for (int k = 0; k < np; k++) {
            int d = picked[k] / per_rank;
            rows[d < world - 1 ? d : world - 1] += 1;
        }
    }
    (void)zipf;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (argc != 10) {
        if (rank == 0) fprintf(stderr, "usage: ep_mpi TOKENS[,..] HIDDEN TOPK EXPERTS ZIPF SEED ITERS WARMUP ELEMBYTES\n");
        MPI_Finalize();
        return 2;
    }
    long hidden = atol(argv[2]);
    int topk = atoi(argv[3]), experts = atoi(argv[4]);
    double zipf = atof(argv[5]);
    uint64_t seed = strtoull(argv[6], NULL, 10);
    int iters = atoi(argv[7]), warmup = atoi(argv[8]), es = atoi(argv[9]);
    if (topk > 256 || experts < 1 || (es != 1 && es != 2 && es != 4 && es != 8)) {
        if (rank == 0) fprintf(stderr, "ep_mpi: topk at most 256, experts at least 1, ELEMBYTES 1, 2, 4 or 8\n");
        MPI_Finalize();
        return 2;
    }
    MPI_Datatype dt = es == 1 ? MPI_UINT8_T : es == 2 ? MPI_UINT16_T : es == 4 ? MPI_UINT32_T : MPI_UINT64_T;
    double *cdf = malloc(sizeof(double) * experts);
    double acc = 0.0;
    for (int e = 0; e < experts; e++) {
        acc += 1.0 / pow((double)(e + 1), zipf);
        cdf[e] = acc;
    }
    long *rows = malloc(sizeof(long) * world);
    int *sc = malloc(sizeof(int) * world), *rc = malloc(sizeof(int) * world);
    int *sd = malloc(sizeof(int) * world), *rd = malloc(sizeof(int) * world);
    double *samples = malloc(sizeof(double) * (iters > 0 ? iters : 1));
    char *list = strdup(argv[1]);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        long tokens = atol(tok);
        double moved = 0.0, total = 0.0;
        long wrong = 0;
        size_t most = (size_t)tokens * topk * hidden * es;
        unsigned char *send = malloc(most ? most : 1), *back = malloc(most ? most : 1);
        unsigned char *at = malloc(most ? most * world : 1);
        memset(send, 1, most);
        memset(back, 1, most);
        memset(at, 1, most * world);
        MPI_Barrier(MPI_COMM_WORLD);
        for (int step = 0; step < warmup + iters; step++) {
            rows_to(tokens, topk, experts, zipf, seed, rank, world, (uint64_t)step, cdf, rows);
            long ns = 0;
            for (int r = 0; r < world; r++) {
                sc[r] = (int)(rows[r] * hidden);
                sd[r] = (int)ns;
                ns += sc[r];
            }
            for (long i = 0; i < ns * es; i++) send[i] = (unsigned char)((rank * 7 + i + step) % 61);
            double t0 = MPI_Wtime();
            MPI_Alltoall(sc, 1, MPI_INT, rc, 1, MPI_INT, MPI_COMM_WORLD);
            long nr = 0;
            for (int r = 0; r < world; r++) {
                rd[r] = (int)nr;
                nr += rc[r];
            }
            MPI_Alltoallv(send, sc, sd, dt, at, rc, rd, dt, MPI_COMM_WORLD);
            MPI_Alltoallv(at, rc, rd, dt, back, sc, sd, dt, MPI_COMM_WORLD);
            double took = MPI_Wtime() - t0;
            if (step >= warmup) {
                samples[step - warmup] = took;
                total += took;
                long off = 0;
                for (int r = 0; r < world; r++)
                    if (r != rank) off += sc[r] + rc[r];
                moved += (double)off * es * 2;
                wrong += memcmp(send, back, (size_t)ns * es) != 0;
            }
        }
        free(send);
        free(back);
        free(at);
        double mean = total / (iters > 0 ? iters : 1), worst;
        MPI_Reduce(&mean, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        qsort(samples, iters, sizeof(double), cmp);
        double p50 = iters > 0 ? samples[(iters + 1) / 2 - 1] : 0.0, p50max;
        MPI_Reduce(&p50, &p50max, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        long wrong_all;
        MPI_Reduce(&wrong, &wrong_all, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
        if (rank == 0)
            printf("ep_mpi,%d,%ld,%ld,%d,%d,%g,%.3f,%.0f,%.3f,%.3f,%ld\n", world, tokens, hidden, topk, experts, zipf,
                   worst * 1e6, moved / 4.0 / (iters > 0 ? iters : 1), moved / 2.0 / (total > 0 ? total : 1e-12) / 1e9,
                   p50max * 1e6, wrong_all);
    }
    free(list);
    MPI_Finalize();
    return 0;
}
