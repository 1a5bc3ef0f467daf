/* The copy floor of a shared-memory exchange: T threads, each copying its own buffer of
 * SIZE bytes into another R times, started together; prints the aggregate memcpy rate.
 * A single-copy all_to_all_v moves every byte once (read and written once), so no runtime
 * on this host exchanges faster than this rate, whatever its algorithm.
 *
 *   copy_floor THREADS SIZE REPEATS      -> "copy_floor,THREADS,SIZE,GB/s"
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static size_t size;
static int repeats;
static pthread_barrier_t start;
static double began;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *copy(void *arg) {
  (void)arg;
  char *src = malloc(size), *dst = malloc(size);
  if (!src || !dst) { perror("malloc"); exit(1); }
  memset(src, 1, size); /* touch every page before the clock starts */
  memset(dst, 2, size);
  pthread_barrier_wait(&start);
  began = now();
  for (int i = 0; i < repeats; i++) {
    memcpy(dst, src, size);
    __asm__ volatile("" ::: "memory"); /* the copies are not dead stores */
  }
  volatile char seen = dst[size / 2];
  (void)seen;
  free(src);
  free(dst);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: copy_floor THREADS SIZE REPEATS\n"); return 2; }
  int threads = atoi(argv[1]);
  size = strtoull(argv[2], NULL, 10);
  repeats = atoi(argv[3]);
  if (threads < 1 || threads > 256 || size < 1 || repeats < 1) { fprintf(stderr, "bad arguments\n"); return 2; }
  pthread_t th[256];
  pthread_barrier_init(&start, NULL, threads);
  for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, copy, NULL);
  for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
  double took = now() - began;
  printf("copy_floor,%d,%zu,%.3f\n", threads, size, (double)threads * size * repeats / took / 1e9);
  return 0;
}
