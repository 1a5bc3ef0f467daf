/*
 * A C program of OxCCL's NCCL library tests: it uses only the project's nccl.h and checks
 * every exported call on host memory. Started by nccl/tests/c_abi.rs:
 *
 *   nccl_test SCENARIO RANK NRANKS IDFILE
 *
 * Rank 0 writes the unique id to IDFILE; the others wait for it. Prints "PASS SCENARIO rank R".
 */
#include <nccl.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int rank, nranks;
static const char* scenario;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "rank %d: %s:%d: check failed: %s: ", rank,     \
              scenario, __LINE__, #cond);                             \
      fprintf(stderr, __VA_ARGS__);                                   \
      fprintf(stderr, "\n");                                          \
      exit(1);                                                        \
    }                                                                 \
  } while (0)

#define NCCL(call)                                                                   \
  do {                                                                               \
    ncclResult_t r_ = (call);                                                        \
    CHECK(r_ == ncclSuccess, "%s -> %d (%s): %s", #call, (int)r_,                    \
          ncclGetErrorString(r_), ncclGetLastError(NULL));                           \
  } while (0)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void share_id(ncclUniqueId* id, const char* path) {
  if (rank == 0) {
    NCCL(ncclGetUniqueId(id));
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE* f = fopen(tmp, "wb");
    CHECK(f && fwrite(id, sizeof *id, 1, f) == 1, "writing %s", tmp);
    fclose(f);
    CHECK(rename(tmp, path) == 0, "renaming %s", tmp);
  } else {
    double until = now() + 60;
    FILE* f;
    while (!(f = fopen(path, "rb"))) {
      CHECK(now() < until, "no id in %s after 60 s", path);
      usleep(10000);
    }
    CHECK(fread(id, sizeof *id, 1, f) == 1, "reading %s", path);
    fclose(f);
  }
}

/* Small integers, exact in every type: value of rank r at index i. */
static double val(int r, size_t i) { return (double)((i * 3 + r * 7) % 5 + 1); }

/* bfloat16 and float16 bit patterns of small integers (exact). */
static uint16_t to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float x;
  memcpy(&x, &u, 4);
  return x;
}
static uint16_t to_f16(float x) {
  if (x == 0) return 0;
  uint32_t u;
  memcpy(&u, &x, 4);
  uint32_t sign = (u >> 16) & 0x8000, e = ((u >> 23) & 0xff) - 127 + 15, m = (u >> 13) & 0x3ff;
  return (uint16_t)(sign | (e << 10) | m);
}
static float from_f16(uint16_t h) {
  if ((h & 0x7fff) == 0) return 0;
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = ((h >> 10) & 0x1f) - 15 + 127, m = (uint32_t)(h & 0x3ff) << 13;
  uint32_t u = sign | (e << 23) | m;
  float x;
  memcpy(&x, &u, 4);
  return x;
}

static size_t size_of(ncclDataType_t t) {
  switch (t) {
    case ncclInt8: case ncclUint8: case ncclFloat8e4m3: case ncclFloat8e5m2: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    default: return 8;
  }
}

static void put(void* b, ncclDataType_t t, size_t i, double v) {
  switch (t) {
    case ncclInt8: ((int8_t*)b)[i] = (int8_t)v; break;
    case ncclUint8: ((uint8_t*)b)[i] = (uint8_t)v; break;
    case ncclInt32: ((int32_t*)b)[i] = (int32_t)v; break;
    case ncclUint32: ((uint32_t*)b)[i] = (uint32_t)v; break;
    case ncclInt64: ((int64_t*)b)[i] = (int64_t)v; break;
    case ncclUint64: ((uint64_t*)b)[i] = (uint64_t)v; break;
    case ncclFloat16: ((uint16_t*)b)[i] = to_f16((float)v); break;
    case ncclFloat32: ((float*)b)[i] = (float)v; break;
    case ncclFloat64: ((double*)b)[i] = v; break;
    case ncclBfloat16: ((uint16_t*)b)[i] = to_bf16((float)v); break;
    default: ((uint8_t*)b)[i] = (uint8_t)v; break;
  }
}

static double get(const void* b, ncclDataType_t t, size_t i) {
  switch (t) {
    case ncclInt8: return ((const int8_t*)b)[i];
    case ncclUint8: return ((const uint8_t*)b)[i];
    case ncclInt32: return ((const int32_t*)b)[i];
    case ncclUint32: return ((const uint32_t*)b)[i];
    case ncclInt64: return (double)((const int64_t*)b)[i];
    case ncclUint64: return (double)((const uint64_t*)b)[i];
    case ncclFloat16: return from_f16(((const uint16_t*)b)[i]);
    case ncclFloat32: return ((const float*)b)[i];
    case ncclFloat64: return ((const double*)b)[i];
    case ncclBfloat16: return from_bf16(((const uint16_t*)b)[i]);
    default: return ((const uint8_t*)b)[i];
  }
}

static const ncclDataType_t TYPES[] = {ncclInt8, ncclUint8, ncclInt32, ncclUint32, ncclInt64,
                                       ncclUint64, ncclFloat16, ncclFloat32, ncclFloat64, ncclBfloat16};

static void every_call(ncclComm_t comm) {
  const size_t n = 12;
  int count = -1, me = -1;
  NCCL(ncclCommCount(comm, &count));
  NCCL(ncclCommUserRank(comm, &me));
  CHECK(count == nranks && me == rank, "count %d rank %d", count, me);
  for (size_t k = 0; k < sizeof TYPES / sizeof *TYPES; k++) {
    ncclDataType_t t = TYPES[k];
    size_t s = size_of(t);
    char* a = calloc(n * nranks, s);
    char* b = calloc(n * nranks, s);
    double sum[64], mx[64];
    for (size_t i = 0; i < n; i++) {
      sum[i] = 0;
      mx[i] = 0;
      for (int r = 0; r < nranks; r++) {
        sum[i] += val(r, i);
        mx[i] = fmax(mx[i], val(r, i));
      }
    }
    /* all_reduce out of place (sum) and in place (max) */
    for (size_t i = 0; i < n; i++) put(a, t, i, val(rank, i));
    NCCL(ncclAllReduce(a, b, n, t, ncclSum, comm, NULL));
    for (size_t i = 0; i < n; i++) CHECK(get(b, t, i) == sum[i], "type %d all_reduce[%zu] %g", t, i, get(b, t, i));
    NCCL(ncclAllReduce(a, a, n, t, ncclMax, comm, NULL));
    for (size_t i = 0; i < n; i++) CHECK(get(a, t, i) == mx[i], "type %d max[%zu]", t, i);
    /* broadcast from the last rank, and ncclBcast in place from 0 */
    for (size_t i = 0; i < n; i++) put(a, t, i, val(rank, i));
    NCCL(ncclBroadcast(a, b, n, t, nranks - 1, comm, NULL));
    for (size_t i = 0; i < n; i++) CHECK(get(b, t, i) == val(nranks - 1, i), "type %d broadcast", t);
    NCCL(ncclBcast(a, n, t, 0, comm, NULL));
    for (size_t i = 0; i < n; i++) CHECK(get(a, t, i) == val(0, i), "type %d bcast", t);
    /* reduce to rank 0 (others pass NULL) */
    for (size_t i = 0; i < n; i++) put(a, t, i, val(rank, i));
    NCCL(ncclReduce(a, rank == 0 ? b : NULL, n, t, ncclSum, 0, comm, NULL));
    if (rank == 0)
      for (size_t i = 0; i < n; i++) CHECK(get(b, t, i) == sum[i], "type %d reduce", t);
    /* all_gather, and reduce_scatter back */
    NCCL(ncclAllGather(a, b, n, t, comm, NULL));
    for (int r = 0; r < nranks; r++)
      for (size_t i = 0; i < n; i++) CHECK(get(b, t, r * n + i) == val(r, i), "type %d all_gather", t);
    NCCL(ncclReduceScatter(b, a, n, t, ncclSum, comm, NULL));
    for (size_t i = 0; i < n; i++) CHECK(get(a, t, i) == nranks * val(rank, i), "type %d reduce_scatter", t);
    /* all_to_all: block j to rank j */
    for (int j = 0; j < nranks; j++)
      for (size_t i = 0; i < n; i++) put(a, t, j * n + i, rank * 10 + j);
    NCCL(ncclAlltoAll(a, b, n, t, comm, NULL));
    for (int j = 0; j < nranks; j++)
      for (size_t i = 0; i < n; i++) CHECK(get(b, t, j * n + i) == j * 10 + rank, "type %d all_to_all", t);
    /* all_to_all in place */
    NCCL(ncclAlltoAll(a, a, n, t, comm, NULL));
    for (int j = 0; j < nranks; j++)
      for (size_t i = 0; i < n; i++) CHECK(get(a, t, j * n + i) == j * 10 + rank, "type %d all_to_all in place", t);
    /* all_gather in place: this rank's block already sits at its place in recvbuff */
    for (size_t i = 0; i < n; i++) put(b, t, rank * n + i, val(rank, i));
    NCCL(ncclAllGather(b + rank * n * s, b, n, t, comm, NULL));
    for (int r = 0; r < nranks; r++)
      for (size_t i = 0; i < n; i++) CHECK(get(b, t, r * n + i) == val(r, i), "type %d all_gather in place", t);
    /* reduce_scatter in place: recvbuff is this rank's block of sendbuff */
    NCCL(ncclReduceScatter(b, b + rank * n * s, n, t, ncclSum, comm, NULL));
    for (size_t i = 0; i < n; i++) CHECK(get(b, t, rank * n + i) == nranks * val(rank, i), "type %d reduce_scatter in place", t);
    /* broadcast: non-roots pass no send buffer */
    for (size_t i = 0; i < n; i++) put(a, t, i, val(rank, i));
    NCCL(ncclBroadcast(rank == 0 ? a : NULL, b, n, t, 0, comm, NULL));
    for (size_t i = 0; i < n; i++) CHECK(get(b, t, i) == val(0, i), "type %d broadcast, NULL send", t);
    free(a);
    free(b);
  }
  /* fp8 moves as bytes: broadcast works, a reduction is refused */
  uint8_t f8[4] = {(uint8_t)rank, 1, 2, 3};
  NCCL(ncclBroadcast(f8, f8, 4, ncclFloat8e4m3, 0, comm, NULL));
  CHECK(f8[0] == 0, "fp8 broadcast");
  CHECK(ncclAllReduce(f8, f8, 4, ncclFloat8e5m2, ncclSum, comm, NULL) == ncclInvalidArgument, "fp8 sum refused");
  /* avg of floats */
  float av[3] = {(float)rank, 1, 2};
  NCCL(ncclAllReduce(av, av, 3, ncclFloat32, ncclAvg, comm, NULL));
  CHECK(fabsf(av[0] - (nranks - 1) / 2.0f) < 1e-6, "avg %g", av[0]);
  /* send/recv in a group: a ring exchange both ways (never deadlocks) */
  int nxt = (rank + 1) % nranks, prv = (rank + nranks - 1) % nranks;
  int64_t out1[5], out2[5], in1[5], in2[5];
  for (int i = 0; i < 5; i++) {
    out1[i] = rank * 100 + i;
    out2[i] = -rank;
  }
  NCCL(ncclGroupStart());
  NCCL(ncclRecv(in1, 5, ncclInt64, prv, comm, NULL));
  NCCL(ncclRecv(in2, 5, ncclInt64, nxt, comm, NULL));
  NCCL(ncclSend(out1, 5, ncclInt64, nxt, comm, NULL));
  NCCL(ncclSend(out2, 5, ncclInt64, prv, comm, NULL));
  NCCL(ncclGroupEnd());
  for (int i = 0; i < 5; i++) CHECK(in1[i] == prv * 100 + i && in2[i] == -nxt, "ring exchange");
  /* collectives fused in a (nested) group */
  float g1[4] = {1, 1, 1, 1}, g2[2] = {(float)rank, 0};
  NCCL(ncclGroupStart());
  NCCL(ncclGroupStart());
  NCCL(ncclAllReduce(g1, g1, 4, ncclFloat32, ncclSum, comm, NULL));
  NCCL(ncclGroupEnd());
  NCCL(ncclBroadcast(g2, g2, 2, ncclFloat32, 1 % nranks, comm, NULL));
  CHECK(g1[0] == 1, "a grouped call ran before ncclGroupEnd");
  NCCL(ncclGroupEnd());
  CHECK(g1[3] == nranks && g2[0] == 1 % nranks, "group: %g %g", g1[3], g2[0]);
  /* a send to this rank itself meets the receive from it, in a group */
  int32_t mine[3] = {rank, 7, 8}, back[3] = {0};
  NCCL(ncclGroupStart());
  NCCL(ncclSend(mine, 3, ncclInt32, rank, comm, NULL));
  NCCL(ncclRecv(back, 3, ncclInt32, rank, comm, NULL));
  NCCL(ncclGroupEnd());
  CHECK(back[0] == rank && back[2] == 8, "self send/recv");
  /* a call of a group that fails: the group issues nothing, and its end says why */
  float untouched[2] = {5, 5};
  NCCL(ncclGroupStart());
  CHECK(ncclAllReduce(untouched, untouched, 2, (ncclDataType_t)42, ncclSum, comm, NULL) == ncclInvalidArgument,
        "bad type in a group");
  NCCL(ncclAllReduce(untouched, untouched, 2, ncclFloat32, ncclSum, comm, NULL));
  CHECK(ncclGroupEnd() == ncclInvalidArgument, "the group's end returns the error");
  CHECK(strstr(ncclGetLastError(NULL), "not issued") != NULL, "last error: %s", ncclGetLastError(NULL));
  CHECK(untouched[0] == 5, "an operation of a failed group ran");
  /* blocking send/recv between ranks 0 and 1 */
  if (nranks > 1 && rank < 2) {
    double x[3] = {1.5, 2.5, 3.5};
    if (rank == 0)
      NCCL(ncclSend(x, 3, ncclFloat64, 1, comm, NULL));
    else {
      double y[3] = {0};
      NCCL(ncclRecv(y, 3, ncclFloat64, 0, comm, NULL));
      CHECK(y[2] == 3.5, "recv");
    }
  }
  /* pre-multiply then sum: immediate scalar (float) and a scalar read at the call (int) */
  ncclRedOp_t half_sum, times;
  float one_half = 0.5f;
  NCCL(ncclRedOpCreatePreMulSum(&half_sum, &one_half, ncclFloat32, ncclScalarHostImmediate, comm));
  CHECK(half_sum >= ncclNumOps, "op value %d", half_sum);
  float ps[2] = {2.0f * rank, 4}, pr[2];
  NCCL(ncclAllReduce(ps, pr, 2, ncclFloat32, half_sum, comm, NULL));
  CHECK(pr[0] == nranks * (nranks - 1) / 2.0f && pr[1] == 2.0f * nranks, "premul %g %g", pr[0], pr[1]);
  /* in place, and inside a group next to a plain sum */
  float pin[2] = {2.0f * rank, 4}, plain[1] = {1};
  NCCL(ncclGroupStart());
  NCCL(ncclAllReduce(pin, pin, 2, ncclFloat32, half_sum, comm, NULL));
  NCCL(ncclAllReduce(plain, plain, 1, ncclFloat32, ncclSum, comm, NULL));
  NCCL(ncclGroupEnd());
  CHECK(pin[0] == pr[0] && pin[1] == pr[1] && plain[0] == nranks, "premul in place, grouped: %g %g", pin[0], pin[1]);
  CHECK(ncclAllReduce(NULL, NULL, 2, ncclFloat32, half_sum, comm, NULL) == ncclInvalidArgument, "premul, NULL");
  int32_t k = 3;
  NCCL(ncclRedOpCreatePreMulSum(&times, &k, ncclInt32, ncclScalarDevice, comm));
  int32_t pi[8], po[1];
  for (int j = 0; j < 8; j++) pi[j] = j < 2 ? j + 1 : rank;
  k = 2; /* read at the call */
  NCCL(ncclReduceScatter(pi, po, 1, ncclInt32, times, comm, NULL));
  CHECK(po[0] == (rank >= 2 ? nranks * (nranks - 1) : 2 * nranks * (rank + 1)), "premul reduce_scatter %d", po[0]);
  CHECK(ncclAllReduce(ps, pr, 2, ncclFloat64, half_sum, comm, NULL) == ncclInvalidArgument, "op made for float32");
  NCCL(ncclRedOpDestroy(half_sum, comm));
  NCCL(ncclRedOpDestroy(times, comm));
  CHECK(ncclRedOpDestroy(times, comm) == ncclInvalidArgument, "destroyed twice");
  /* registration is accepted */
  void* h = NULL;
  ncclWindow_t w = NULL;
  NCCL(ncclCommRegister(comm, ps, sizeof ps, &h));
  NCCL(ncclCommWindowRegister(comm, ps, sizeof ps, &w, NCCL_WIN_DEFAULT));
  CHECK(h != NULL && w != NULL, "handles");
  NCCL(ncclCommDeregister(comm, h));
  NCCL(ncclCommWindowDeregister(comm, w));
  /* the errors of this rank's own arguments: nothing moves, the communicator stays usable */
  float e[4] = {0};
  CHECK(ncclAllReduce(e, e, 4, ncclFloat32, ncclSum, NULL, NULL) == ncclInvalidArgument, "null comm");
  CHECK(strstr(ncclGetLastError(NULL), "NULL") != NULL, "last error: %s", ncclGetLastError(NULL));
  CHECK(ncclAllReduce(e, e, 4, (ncclDataType_t)99, ncclSum, comm, NULL) == ncclInvalidArgument, "bad type");
  CHECK(ncclAllReduce(e, e, 4, ncclFloat32, (ncclRedOp_t)77, comm, NULL) == ncclInvalidArgument, "bad op");
  CHECK(ncclBroadcast(e, e, 4, ncclFloat32, nranks, comm, NULL) == ncclInvalidArgument, "bad root");
  CHECK(ncclSend(e, 4, ncclFloat32, -1, comm, NULL) == ncclInvalidArgument, "bad peer");
  CHECK(strstr(ncclGetLastError(comm), "peer -1") != NULL, "last error: %s", ncclGetLastError(comm));
  int dev = 0;
  CHECK(ncclCommCuDevice(comm, &dev) == ncclInvalidUsage, "no device");
  CHECK(ncclGroupEnd() == ncclInvalidUsage, "end without start");
  void* gpu = NULL;
  CHECK(ncclMemAlloc(&gpu, 64) == ncclInvalidUsage && gpu == NULL, "ncclMemAlloc");
  CHECK(strstr(ncclGetLastError(NULL), "GPU memory") != NULL, "last error: %s", ncclGetLastError(NULL));
  ncclSimInfo_t sim = NCCL_SIM_INFO_INITIALIZER;
  CHECK(ncclGroupSimulateEnd(&sim) == ncclInvalidUsage, "ncclGroupSimulateEnd");
  ncclResult_t async = ncclInternalError;
  NCCL(ncclCommGetAsyncError(comm, &async));
  CHECK(async == ncclSuccess, "async error %d on a healthy communicator", async);
  float ok[2] = {1, 1};
  NCCL(ncclAllReduce(ok, ok, 2, ncclFloat32, ncclSum, comm, NULL));
  CHECK(ok[0] == nranks, "usable after the errors");
}

static void split_and_mismatch(ncclComm_t comm) {
  /* ranks 0 and 1 form one communicator, the middle ones another; the last rank of three
     or more takes no part (NCCL_SPLIT_NOCOLOR) */
  ncclComm_t sub = NULL;
  int color = rank < 2 ? 0 : rank == nranks - 1 ? NCCL_SPLIT_NOCOLOR : 1;
  NCCL(ncclCommSplit(comm, color, -rank, &sub, NULL));
  if (color == NCCL_SPLIT_NOCOLOR) {
    CHECK(sub == NULL, "no color, no communicator");
  } else {
    int c = 0, r = 0;
    NCCL(ncclCommCount(sub, &c));
    NCCL(ncclCommUserRank(sub, &r));
    int expect = color == 0 ? (nranks < 2 ? nranks : 2) : nranks - 3;
    CHECK(c == expect, "split size %d, want %d", c, expect);
    /* key -rank: the higher parent rank comes first */
    if (color == 0 && c == 2) CHECK(r == 1 - rank, "split rank %d of parent rank %d", r, rank);
    int32_t x = rank;
    NCCL(ncclAllReduce(&x, &x, 1, ncclInt32, ncclSum, sub, NULL));
    if (color == 0) CHECK(x == (c == 2 ? 1 : 0), "split sum %d", x);
    /* counts that differ between the ranks of the sub-communicator: an error, sticky */
    if (c > 1) {
      float y[8] = {0};
      ncclResult_t r1 = ncclAllReduce(y, y, r == 0 ? 8 : 4, ncclFloat32, ncclSum, sub, NULL);
      CHECK(r1 == ncclInvalidUsage || r1 == ncclRemoteError, "mismatched counts -> %d", r1);
      ncclResult_t async = ncclSuccess;
      NCCL(ncclCommGetAsyncError(sub, &async));
      CHECK(async != ncclSuccess, "the mismatch is the communicator's async error");
    }
    NCCL(ncclCommDestroy(sub));
  }
  /* the parent is untouched */
  int32_t z = 1;
  NCCL(ncclAllReduce(&z, &z, 1, ncclInt32, ncclSum, comm, NULL));
  CHECK(z == nranks, "parent after the split's failure");
}

static ncclComm_t victim_comm;
static void* abort_later(void* arg) {
  (void)arg;
  usleep(500000);
  ncclCommAbort(victim_comm);
  return NULL;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: nccl_test SCENARIO RANK NRANKS IDFILE\n");
    return 2;
  }
  scenario = argv[1];
  rank = atoi(argv[2]);
  nranks = atoi(argv[3]);
  int version = 0;
  NCCL(ncclGetVersion(&version));
  CHECK(version == NCCL_VERSION_CODE, "version %d", version);

  if (strcmp(scenario, "initall") == 0) {
    /* one process, several ranks, driven from one thread through a group */
    ncclComm_t comms[3];
    NCCL(ncclCommInitAll(comms, 3, NULL));
    float v[3][4];
    NCCL(ncclGroupStart());
    for (int r = 0; r < 3; r++) {
      for (int i = 0; i < 4; i++) v[r][i] = r + i;
      NCCL(ncclAllReduce(v[r], v[r], 4, ncclFloat32, ncclSum, comms[r], NULL));
    }
    NCCL(ncclGroupEnd());
    for (int r = 0; r < 3; r++)
      for (int i = 0; i < 4; i++) CHECK(v[r][i] == 3 + 3 * i, "initall sum");
    for (int r = 0; r < 3; r++) NCCL(ncclCommDestroy(comms[r]));
    printf("PASS %s rank %d\n", scenario, rank);
    return 0;
  }

  ncclUniqueId id;
  share_id(&id, argv[4]);
  ncclComm_t comm;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.commName = "c-test";
  config.blocking = 1;
  if (strcmp(scenario, "abort") == 0)
    NCCL(ncclCommInitRankScalable(&comm, nranks, rank, 1, &id, &config));
  else
    NCCL(ncclCommInitRankConfig(&comm, nranks, id, rank, &config));

  if (strcmp(scenario, "all") == 0) {
    every_call(comm);
    split_and_mismatch(comm);
    NCCL(ncclCommFinalize(comm));
    NCCL(ncclCommDestroy(comm));
  } else if (strcmp(scenario, "lost") == 0) {
    /* the last rank dies; the others' calls return ncclRemoteError, sticky */
    float x[256] = {0};
    NCCL(ncclAllReduce(x, x, 256, ncclFloat32, ncclSum, comm, NULL));
    if (rank == nranks - 1) _exit(9);
    ncclResult_t r = ncclSuccess;
    for (int i = 0; i < 1000 && r == ncclSuccess; i++) r = ncclAllReduce(x, x, 256, ncclFloat32, ncclSum, comm, NULL);
    CHECK(r == ncclRemoteError, "lost rank -> %d (%s)", r, ncclGetLastError(NULL));
    printf("rank %d: %s\n", rank, ncclGetLastError(NULL));
    ncclResult_t async = ncclSuccess;
    NCCL(ncclCommGetAsyncError(comm, &async));
    CHECK(async == ncclRemoteError, "async %d", async);
    /* the survivors go on without it */
    int gone[1] = {nranks - 1};
    ncclComm_t small = NULL;
    NCCL(ncclCommShrink(comm, gone, 1, &small, NULL, NCCL_SHRINK_ABORT));
    int c = 0;
    NCCL(ncclCommCount(small, &c));
    int32_t one = 1;
    NCCL(ncclAllReduce(&one, &one, 1, ncclInt32, ncclSum, small, NULL));
    CHECK(c == nranks - 1 && one == nranks - 1, "shrunk: %d ranks, sum %d", c, one);
    NCCL(ncclCommDestroy(small));
    NCCL(ncclCommAbort(comm));
  } else if (strcmp(scenario, "abort") == 0) {
    /* rank 0 waits in a receive nobody sends; another thread aborts the communicator */
    if (rank == 0) {
      victim_comm = comm;
      pthread_t t;
      pthread_create(&t, NULL, abort_later, NULL);
      float y[4];
      double t0 = now();
      ncclResult_t r = ncclRecv(y, 4, ncclFloat32, 1, comm, NULL);
      double took = now() - t0;
      pthread_join(t, NULL);
      /* ended by the local abort at 0.5 s (rank 1 stays alive until 3 s) */
      CHECK(r == ncclInvalidUsage && took < 1.5, "recv -> %d after %.2f s", r, took);
      printf("rank 0: the blocked receive returned %d after %.2f s: %s\n", r, took, ncclGetLastError(NULL));
    } else {
      sleep(3);
      ncclCommAbort(comm);
    }
  } else {
    fprintf(stderr, "unknown scenario %s\n", scenario);
    return 2;
  }
  printf("PASS %s rank %d\n", scenario, rank);
  return 0;
}
