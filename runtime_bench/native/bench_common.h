// Shared code of pocketformer's native benchmark runners (pf-et-bench, pf-ort-bench).
//
// Deliberately written against the C library only (no C++ standard library, no exceptions):
// the ONNX Runtime runner is also linked for Android against a stub libc, where no C++
// runtime is available. Everything here is header-only and `static`.
//
// Command line (both runners):
//   --model PATH [--input FILE:DTYPE:D1xD2x...]... [--seed N]
//   --warmup N --runs N --threads N --json OUT [--values K]
//   [--generate PROMPT_TOKENS,NEW_TOKENS [--prompt-ids FILE]]   (a -gen program; see pf_generate)
// Exit codes: 0 ok, 2 bad arguments / unreadable model or input file, 4 runtime failure.
//
// Timing protocol: the first inference is timed on its own (first_inference_ms), then
// `warmup` untimed runs, then `runs` timed runs (latencies_ms, one entry per run).
#pragma once

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define PF_EXIT_OK 0
#define PF_EXIT_BAD_INPUT 2
#define PF_EXIT_RUNTIME 4

#define PF_MAX_INPUTS 64
#define PF_MAX_DIMS 16

enum PfDType {
  PF_F32 = 0,
  PF_I64,
  PF_I32,
  PF_BOOL,
  PF_U8,
  PF_F16,
  PF_F64,
  PF_I8,
  PF_I16,
  PF_UNKNOWN
};

static const char* pf_prog = "pf-bench";

static const char* pf_dtype_name(int dt) {
  switch (dt) {
    case PF_F32: return "float32";
    case PF_I64: return "int64";
    case PF_I32: return "int32";
    case PF_BOOL: return "bool";
    case PF_U8: return "uint8";
    case PF_F16: return "float16";
    case PF_F64: return "float64";
    case PF_I8: return "int8";
    case PF_I16: return "int16";
    default: return "unknown";
  }
}

static size_t pf_dtype_size(int dt) {
  switch (dt) {
    case PF_F32: case PF_I32: return 4;
    case PF_I64: case PF_F64: return 8;
    case PF_F16: case PF_I16: return 2;
    case PF_BOOL: case PF_U8: case PF_I8: return 1;
    default: return 0;
  }
}

// Same element size and interpretation for benchmarking purposes.
static int pf_dtype_compatible(int given, int model) {
  if (given == model) return 1;
  int g1 = (given == PF_BOOL || given == PF_U8);
  int m1 = (model == PF_BOOL || model == PF_U8);
  return g1 && m1;
}

static int pf_parse_dtype(const char* s) {
  if (!strcmp(s, "float32") || !strcmp(s, "f32") || !strcmp(s, "float")) return PF_F32;
  if (!strcmp(s, "int64") || !strcmp(s, "i64") || !strcmp(s, "long")) return PF_I64;
  if (!strcmp(s, "int32") || !strcmp(s, "i32") || !strcmp(s, "int")) return PF_I32;
  if (!strcmp(s, "bool")) return PF_BOOL;
  if (!strcmp(s, "uint8") || !strcmp(s, "u8")) return PF_U8;
  return -1;
}

__attribute__((noreturn, format(printf, 2, 3)))
static void pf_die(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "%s: error: ", pf_prog);
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  fflush(stderr);
  exit(code);
}

static double pf_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

// A field of /proc/self/status ("VmHWM", "VmRSS") in MB, or -1 when unavailable.
static double pf_status_mb(const char* key) {
  FILE* f = fopen("/proc/self/status", "r");
  if (!f) return -1.0;
  char line[256];
  size_t klen = strlen(key);
  double out = -1.0;
  while (fgets(line, sizeof line, f)) {
    if (!strncmp(line, key, klen) && line[klen] == ':') {
      out = (double)strtoll(line + klen + 1, NULL, 10) / 1024.0;
      break;
    }
  }
  fclose(f);
  return out;
}

// ---------------------------------------------------------------- arguments

struct PfInput {
  const char* spec;      // the --input argument as given
  char file[4096];
  int dtype;
  int ndims;
  int64_t dims[PF_MAX_DIMS];
  void* data;            // filled by pf_load_input_files or by the runner (random fill)
  size_t nbytes;
  int from_file;
};

struct PfArgs {
  const char* model;
  PfInput inputs[PF_MAX_INPUTS];
  int n_inputs;
  uint64_t seed;
  long warmup;
  long runs;
  long threads;
  const char* json;
  long values;
  int generate;            // --generate given: greedy generation with a KV-cache step program
  long gen_prompt;         // PROMPT_TOKENS
  long gen_new;            // NEW_TOKENS
  const char* prompt_ids;  // --prompt-ids FILE (raw int64), or NULL: ids from --seed
};

static void pf_usage(FILE* to) {
  fprintf(to,
          "usage: %s --model PATH [--input FILE:DTYPE:D1xD2x...]... [--seed N]\n"
          "          --warmup N --runs N --threads N --json OUT [--values K]\n"
          "          [--generate PROMPT_TOKENS,NEW_TOKENS [--prompt-ids FILE]]\n"
          "  DTYPE: float32, int64, int32, bool, uint8 (raw little-endian file)\n"
          "  without --input, inputs are filled from --seed using the model's metadata\n"
          "  exit codes: 0 ok, 2 bad arguments or input file, 4 runtime failure\n",
          pf_prog);
}

static long pf_parse_long(const char* flag, const char* v, long lo) {
  char* end = NULL;
  long x = strtol(v, &end, 10);
  if (!*v || *end || x < lo) pf_die(PF_EXIT_BAD_INPUT, "%s: expected an integer >= %ld, got '%s'", flag, lo, v);
  return x;
}

static void pf_parse_input_spec(const char* spec, PfInput* in) {
  memset(in, 0, sizeof *in);
  in->spec = spec;
  // FILE may contain ':'; DTYPE and DIMS are the last two fields.
  const char* last = strrchr(spec, ':');
  if (!last || last == spec) pf_die(PF_EXIT_BAD_INPUT, "--input '%s': expected FILE:DTYPE:D1xD2x...", spec);
  const char* mid = last - 1;
  while (mid > spec && *mid != ':') mid--;
  if (*mid != ':' || mid == spec) pf_die(PF_EXIT_BAD_INPUT, "--input '%s': expected FILE:DTYPE:D1xD2x...", spec);
  size_t flen = (size_t)(mid - spec);
  if (flen >= sizeof in->file) pf_die(PF_EXIT_BAD_INPUT, "--input '%s': file name too long", spec);
  memcpy(in->file, spec, flen);
  in->file[flen] = 0;
  char dt[32];
  size_t dlen = (size_t)(last - mid - 1);
  if (dlen == 0 || dlen >= sizeof dt) pf_die(PF_EXIT_BAD_INPUT, "--input '%s': bad dtype", spec);
  memcpy(dt, mid + 1, dlen);
  dt[dlen] = 0;
  in->dtype = pf_parse_dtype(dt);
  if (in->dtype < 0)
    pf_die(PF_EXIT_BAD_INPUT, "--input '%s': unknown dtype '%s' (float32, int64, int32, bool, uint8)", spec, dt);
  const char* p = last + 1;
  if (!*p) pf_die(PF_EXIT_BAD_INPUT, "--input '%s': missing shape", spec);
  // A scalar is written as an empty shape "" is not allowed; use "1" or "scalar".
  if (!strcmp(p, "scalar")) { in->ndims = 0; return; }
  while (*p) {
    if (in->ndims >= PF_MAX_DIMS) pf_die(PF_EXIT_BAD_INPUT, "--input '%s': too many dims", spec);
    char* end = NULL;
    long long d = strtoll(p, &end, 10);
    if (end == p || d < 0 || (*end && *end != 'x' && *end != 'X') )
      pf_die(PF_EXIT_BAD_INPUT, "--input '%s': bad shape '%s'", spec, last + 1);
    in->dims[in->ndims++] = d;
    p = *end ? end + 1 : end;
    if (*end && !*p) pf_die(PF_EXIT_BAD_INPUT, "--input '%s': bad shape '%s'", spec, last + 1);
  }
}

static void pf_parse_args(int argc, char** argv, PfArgs* a) {
  memset(a, 0, sizeof *a);
  a->warmup = 1;
  a->runs = 10;
  a->threads = 1;
  a->values = 8;
  for (int i = 1; i < argc; i++) {
    const char* f = argv[i];
    if (!strcmp(f, "-h") || !strcmp(f, "--help")) { pf_usage(stdout); exit(0); }
    if (i + 1 >= argc) { pf_usage(stderr); pf_die(PF_EXIT_BAD_INPUT, "%s: missing value (or unknown flag)", f); }
    const char* v = argv[++i];
    if (!strcmp(f, "--model")) a->model = v;
    else if (!strcmp(f, "--input")) {
      if (a->n_inputs >= PF_MAX_INPUTS) pf_die(PF_EXIT_BAD_INPUT, "--input: at most %d inputs", PF_MAX_INPUTS);
      pf_parse_input_spec(v, &a->inputs[a->n_inputs++]);
    } else if (!strcmp(f, "--seed")) a->seed = (uint64_t)pf_parse_long(f, v, 0);
    else if (!strcmp(f, "--warmup")) a->warmup = pf_parse_long(f, v, 0);
    else if (!strcmp(f, "--runs")) a->runs = pf_parse_long(f, v, 1);
    else if (!strcmp(f, "--threads")) a->threads = pf_parse_long(f, v, 0);
    else if (!strcmp(f, "--json")) a->json = v;
    else if (!strcmp(f, "--values")) a->values = pf_parse_long(f, v, 0);
    else if (!strcmp(f, "--generate")) {
      char* end = NULL;
      long p = strtol(v, &end, 10);
      long n = -1;
      if (end != v && *end == ',' && end[1]) {
        const char* q = end + 1;
        n = strtol(q, &end, 10);
        if (end == q || *end) n = -1;
      }
      if (p < 1 || n < 1)
        pf_die(PF_EXIT_BAD_INPUT, "--generate: expected PROMPT_TOKENS,NEW_TOKENS (both >= 1), got '%s'", v);
      a->generate = 1;
      a->gen_prompt = p;
      a->gen_new = n;
    } else if (!strcmp(f, "--prompt-ids")) a->prompt_ids = v;
    else { pf_usage(stderr); pf_die(PF_EXIT_BAD_INPUT, "unknown flag '%s'", f); }
  }
  if (!a->model) { pf_usage(stderr); pf_die(PF_EXIT_BAD_INPUT, "--model is required"); }
  if (!a->json) { pf_usage(stderr); pf_die(PF_EXIT_BAD_INPUT, "--json is required"); }
  if (a->prompt_ids && !a->generate) pf_die(PF_EXIT_BAD_INPUT, "--prompt-ids needs --generate");
  if (a->generate && a->n_inputs)
    pf_die(PF_EXIT_BAD_INPUT, "--input and --generate exclude each other (--generate feeds tokens itself)");
}

static void* pf_read_file(const char* path, size_t* n_out) {
  FILE* f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 1 << 16, n = 0;
  char* buf = (char*)malloc(cap);
  for (;;) {
    if (n == cap) { cap *= 2; buf = (char*)realloc(buf, cap); }
    size_t got = fread(buf + n, 1, cap - n, f);
    if (got == 0) break;
    n += got;
  }
  int err = ferror(f);
  fclose(f);
  if (err) { free(buf); return NULL; }
  *n_out = n;
  return buf;
}

static void pf_check_model_file(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) pf_die(PF_EXIT_BAD_INPUT, "--model: cannot open model file '%s'", path);
  char c;
  size_t got = fread(&c, 1, 1, f);
  fclose(f);
  if (got != 1) pf_die(PF_EXIT_BAD_INPUT, "--model: model file '%s' is empty or unreadable (a directory?)", path);
}

static size_t pf_numel(const int64_t* dims, int ndims) {
  size_t n = 1;
  for (int i = 0; i < ndims; i++) n *= (size_t)dims[i];
  return n;
}

static void pf_load_input_files(PfArgs* a) {
  for (int i = 0; i < a->n_inputs; i++) {
    PfInput* in = &a->inputs[i];
    size_t n = 0;
    in->data = pf_read_file(in->file, &n);
    if (!in->data) pf_die(PF_EXIT_BAD_INPUT, "--input %d: cannot read input file '%s'", i, in->file);
    size_t want = pf_numel(in->dims, in->ndims) * pf_dtype_size(in->dtype);
    if (n != want)
      pf_die(PF_EXIT_BAD_INPUT, "--input %d: input file '%s' has %zu bytes, shape/dtype '%s' needs %zu",
             i, in->file, n, in->spec, want);
    in->nbytes = n;
    in->from_file = 1;
  }
}

// ---------------------------------------------------------------- deterministic fill

static uint64_t pf_splitmix64(uint64_t* s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// float inputs uniform in [-1, 1); integer inputs in [0, 100); bool 0/1.
static void pf_fill_random(PfInput* in, uint64_t seed, int index) {
  size_t n = pf_numel(in->dims, in->ndims);
  size_t es = pf_dtype_size(in->dtype);
  in->nbytes = n * es;
  in->data = calloc(n ? n : 1, es ? es : 1);
  uint64_t s = seed * 1000003ULL + (uint64_t)index * 7919ULL + 1;
  for (size_t i = 0; i < n; i++) {
    uint64_t r = pf_splitmix64(&s);
    switch (in->dtype) {
      case PF_F32: ((float*)in->data)[i] = (float)((double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0); break;
      case PF_F64: ((double*)in->data)[i] = (double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0; break;
      case PF_I64: ((int64_t*)in->data)[i] = (int64_t)(r % 100); break;
      case PF_I32: ((int32_t*)in->data)[i] = (int32_t)(r % 100); break;
      case PF_I16: ((int16_t*)in->data)[i] = (int16_t)(r % 100); break;
      case PF_I8: ((int8_t*)in->data)[i] = (int8_t)(r % 100); break;
      case PF_U8: ((uint8_t*)in->data)[i] = (uint8_t)(r % 100); break;
      case PF_BOOL: ((uint8_t*)in->data)[i] = (uint8_t)(r & 1); break;
      case PF_F16: ((uint16_t*)in->data)[i] = 0; break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------- JSON

struct PfJson {
  char* buf;
  size_t len, cap;
};

__attribute__((format(printf, 2, 3)))
static void pf_j(PfJson* j, const char* fmt, ...) {
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    size_t room = j->cap - j->len;
    int n = vsnprintf(j->buf ? j->buf + j->len : NULL, j->buf ? room : 0, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (j->buf && (size_t)n < room) { j->len += (size_t)n; return; }
    size_t cap = j->cap ? j->cap : 4096;
    while (cap < j->len + (size_t)n + 1) cap *= 2;
    j->buf = (char*)realloc(j->buf, cap);
    j->cap = cap;
  }
}

static void pf_j_str(PfJson* j, const char* s) {
  pf_j(j, "\"");
  for (const unsigned char* p = (const unsigned char*)(s ? s : ""); *p; p++) {
    if (*p == '"' || *p == '\\') pf_j(j, "\\%c", *p);
    else if (*p < 0x20) pf_j(j, "\\u%04x", *p);
    else pf_j(j, "%c", *p);
  }
  pf_j(j, "\"");
}

static int pf_finite(double x) { return x == x && (x - x) == 0.0; }

static void pf_j_num(PfJson* j, double x) {
  if (pf_finite(x)) pf_j(j, "%.9g", x);
  else pf_j(j, "null");
}

static void pf_j_num17(PfJson* j, double x) {
  if (pf_finite(x)) pf_j(j, "%.17g", x);
  else pf_j(j, "null");
}

static double pf_half_to_double(uint16_t h) {
  int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  double v;
  if (exp == 0) v = man * (1.0 / 16777216.0);             // 2^-24
  else if (exp == 31) v = man ? (0.0 / 0.0) : (1.0 / 0.0);
  else {
    v = 1.0 + man / 1024.0;
    int e = exp - 15;
    while (e > 0) { v *= 2.0; e--; }
    while (e < 0) { v *= 0.5; e++; }
  }
  return sign ? -v : v;
}

static double pf_value(const void* data, int dt, size_t i) {
  switch (dt) {
    case PF_F32: return ((const float*)data)[i];
    case PF_F64: return ((const double*)data)[i];
    case PF_I64: return (double)((const int64_t*)data)[i];
    case PF_I32: return ((const int32_t*)data)[i];
    case PF_I16: return ((const int16_t*)data)[i];
    case PF_I8: return ((const int8_t*)data)[i];
    case PF_U8: case PF_BOOL: return ((const uint8_t*)data)[i];
    case PF_F16: return pf_half_to_double(((const uint16_t*)data)[i]);
    default: return 0.0 / 0.0;
  }
}

struct PfOutput {
  int dtype;
  int ndims;
  int64_t dims[PF_MAX_DIMS];
  const void* data;
  size_t numel;
};

static void pf_j_output(PfJson* j, const PfOutput* o, long k) {
  double sum = 0.0, abs_sum = 0.0;
  for (size_t i = 0; i < o->numel; i++) {
    double v = pf_value(o->data, o->dtype, i);
    sum += v;
    abs_sum += v < 0 ? -v : v;
  }
  pf_j(j, "{\"dtype\": ");
  pf_j_str(j, pf_dtype_name(o->dtype));
  pf_j(j, ", \"shape\": [");
  for (int d = 0; d < o->ndims; d++) pf_j(j, "%s%lld", d ? ", " : "", (long long)o->dims[d]);
  pf_j(j, "], \"numel\": %zu, \"sum\": ", o->numel);
  pf_j_num17(j, sum);
  pf_j(j, ", \"abs_sum\": ");
  pf_j_num17(j, abs_sum);
  pf_j(j, ", \"values\": [");
  for (size_t i = 0; i < o->numel && (long)i < k; i++) {
    if (i) pf_j(j, ", ");
    pf_j_num(j, pf_value(o->data, o->dtype, i));
  }
  pf_j(j, "]}");
}

struct PfResult {
  const char* runner;
  const char* runtime_version;
  int threads_applied;
  long threads_effective;   // -1 when unknown
  double rss_before_load_mb;
  double load_ms;
  double first_inference_ms;
  double* latencies_ms;
  long n_latencies;
  const PfOutput* outputs;
  int n_outputs;
  const PfInput* inputs;     // the inputs actually fed (given or generated)
  int n_inputs;
  const struct PfGen* gen;   // --generate: the "generation" block; NULL otherwise
};


// ---------------------------------------------------------------- generation (--generate)
//
// A `-gen` step program maps (tokens [1, T] int64, input_pos [1] int64) to logits [1, T, V],
// writing the keys/values of positions input_pos .. input_pos+T-1 into its KV cache. The
// runner supplies a step function (and a reset of its cache); pf_generate drives it like
// pocketformer's greedy_loop: each run is reset, prefill of the prompt at position 0 (timed:
// time to first token, including the argmax), then NEW_TOKENS-1 decode steps of one token at
// positions PROMPT_TOKENS, PROMPT_TOKENS+1, ... (each timed, argmax included).

struct PfGen {
  long prompt_tokens, new_tokens;
  int64_t* prompt;              // prompt_tokens ids
  const char* prompt_source;    // the --prompt-ids file, or "seed"
  long vocab;                   // from the probe call's logits
  long max_len;                 // the cache length the runner found (-1 unknown)
  double probe_ms;              // the untimed-by-protocol first call (tokens [[1]] at position 0)
  double* ttft_ms;              // per timed run
  double* decode_ms;            // every decode step of every timed run
  long n_ttft, n_decode;
  int64_t* tokens;              // the greedy tokens of the last run (new_tokens of them)
  const float* last_logits;     // logits row of the last position of the last step
};

// Logits row of the last of the `t` fed positions, valid until the next step; `*vocab` is set.
typedef const float* (*PfStepFn)(void* ctx, const int64_t* ids, long t, int64_t pos, long* vocab);
typedef void (*PfResetFn)(void* ctx);

// The prompt ids file is read before the runtime is touched (bad input -> exit 2 early).
static void pf_load_prompt(const PfArgs* a, PfGen* g) {
  memset(g, 0, sizeof *g);
  g->prompt_tokens = a->gen_prompt;
  g->new_tokens = a->gen_new;
  g->max_len = -1;
  g->prompt = (int64_t*)calloc((size_t)a->gen_prompt, sizeof(int64_t));
  g->prompt_source = "seed";
  if (!a->prompt_ids) return;
  size_t n = 0;
  void* data = pf_read_file(a->prompt_ids, &n);
  if (!data) pf_die(PF_EXIT_BAD_INPUT, "--prompt-ids: cannot read '%s'", a->prompt_ids);
  if (n % 8 || (long)(n / 8) != a->gen_prompt)
    pf_die(PF_EXIT_BAD_INPUT, "--prompt-ids '%s' has %zu bytes; --generate %ld,... needs %ld int64 ids (%ld bytes)",
           a->prompt_ids, n, a->gen_prompt, a->gen_prompt, a->gen_prompt * 8);
  memcpy(g->prompt, data, n);
  free(data);
  for (long i = 0; i < g->prompt_tokens; i++)
    if (g->prompt[i] < 0)
      pf_die(PF_EXIT_BAD_INPUT, "--prompt-ids '%s': id %ld is negative (%lld)", a->prompt_ids, i,
             (long long)g->prompt[i]);
  g->prompt_source = a->prompt_ids;
}

// Cache capacity check: prompt + new tokens must fit (as greedy_loop requires).
static void pf_check_fits(const PfGen* g, long max_len, const char* how) {
  if (max_len > 0 && g->prompt_tokens + g->new_tokens > max_len)
    pf_die(PF_EXIT_BAD_INPUT, "--generate %ld,%ld: prompt + new tokens exceed the program's KV cache of %ld "
           "positions (%s)", g->prompt_tokens, g->new_tokens, max_len, how);
}

static long pf_argmax(const float* row, long n) {
  long best = 0;
  for (long i = 1; i < n; i++)
    if (row[i] > row[best]) best = i;     // first maximum, like numpy.argmax
  return best;
}

static int pf_cmp_double(const void* x, const void* y) {
  double a = *(const double*)x, b = *(const double*)y;
  return (a > b) - (a < b);
}

// numpy.median: mean of the two middle values for an even count.
static double pf_median(const double* x, long n) {
  if (n <= 0) return 0.0 / 0.0;
  double* c = (double*)malloc((size_t)n * sizeof(double));
  memcpy(c, x, (size_t)n * sizeof(double));
  qsort(c, (size_t)n, sizeof(double), pf_cmp_double);
  double m = n % 2 ? c[n / 2] : 0.5 * (c[n / 2 - 1] + c[n / 2]);
  free(c);
  return m;
}

static void pf_generate(const PfArgs* a, PfGen* g, void* ctx, PfResetFn reset, PfStepFn step) {
  // Probe: the first call, timed alone (first_inference_ms), discovers the vocabulary.
  int64_t one = 1;
  long vocab = 0;
  double t = pf_now_ms();
  step(ctx, &one, 1, 0, &vocab);
  g->probe_ms = pf_now_ms() - t;
  if (vocab < 1) pf_die(PF_EXIT_RUNTIME, "the program's logits have no vocabulary dimension");
  g->vocab = vocab;
  if (!a->prompt_ids) {
    if (vocab <= 3) pf_die(PF_EXIT_RUNTIME, "vocabulary of %ld is too small for a seeded prompt (ids 3..V-1)", vocab);
    uint64_t s = a->seed * 1000003ULL + 0x5EEDULL;
    for (long i = 0; i < g->prompt_tokens; i++)
      g->prompt[i] = 3 + (int64_t)(pf_splitmix64(&s) % (uint64_t)(vocab - 3));
  } else {
    for (long i = 0; i < g->prompt_tokens; i++)
      if (g->prompt[i] >= vocab)
        pf_die(PF_EXIT_BAD_INPUT, "--prompt-ids '%s': id %ld is %lld, the vocabulary has %ld", a->prompt_ids, i,
               (long long)g->prompt[i], vocab);
  }
  long steps = g->new_tokens - 1;
  g->ttft_ms = (double*)calloc((size_t)a->runs, sizeof(double));
  g->decode_ms = (double*)calloc((size_t)(a->runs * (steps > 0 ? steps : 1)), sizeof(double));
  g->tokens = (int64_t*)calloc((size_t)g->new_tokens, sizeof(int64_t));
  g->n_ttft = g->n_decode = 0;
  for (long r = 0; r < a->warmup + a->runs; r++) {
    int timed = r >= a->warmup;
    reset(ctx);
    long v = 0;
    t = pf_now_ms();
    const float* row = step(ctx, g->prompt, g->prompt_tokens, 0, &v);
    int64_t nxt = pf_argmax(row, v);
    double ttft = pf_now_ms() - t;
    if (v != vocab) pf_die(PF_EXIT_RUNTIME, "logits width changed from %ld to %ld", vocab, v);
    if (timed) g->ttft_ms[g->n_ttft++] = ttft;
    g->tokens[0] = nxt;
    for (long i = 0; i < steps; i++) {
      int64_t tok = nxt;
      t = pf_now_ms();
      row = step(ctx, &tok, 1, (int64_t)(g->prompt_tokens + i), &v);
      nxt = pf_argmax(row, v);
      double dt = pf_now_ms() - t;
      if (timed) g->decode_ms[g->n_decode++] = dt;
      g->tokens[i + 1] = nxt;
    }
    g->last_logits = row;
  }
}

// The last step's logits row as an output record ([1, 1, V]).
static void pf_gen_output(const PfGen* g, PfOutput* o) {
  memset(o, 0, sizeof *o);
  o->dtype = PF_F32;
  o->ndims = 3;
  o->dims[0] = 1;
  o->dims[1] = 1;
  o->dims[2] = g->vocab;
  o->data = g->last_logits;
  o->numel = (size_t)g->vocab;
}

static void pf_j_gen(PfJson* j, const PfGen* g) {
  double ttft = pf_median(g->ttft_ms, g->n_ttft);
  double step = pf_median(g->decode_ms, g->n_decode);
  pf_j(j, ",\n  \"generation\": {\"prompt_tokens\": %ld, \"new_tokens\": %ld, \"vocab\": %ld",
       g->prompt_tokens, g->new_tokens, g->vocab);
  pf_j(j, ", \"max_len\": ");
  if (g->max_len > 0) pf_j(j, "%ld", g->max_len); else pf_j(j, "null");
  pf_j(j, ", \"prompt_source\": ");
  pf_j_str(j, g->prompt_source);
  pf_j(j, ",\n    \"probe_ms\": ");
  pf_j_num(j, g->probe_ms);
  pf_j(j, ", \"ttft_ms\": [");
  for (long i = 0; i < g->n_ttft; i++) { if (i) pf_j(j, ", "); pf_j_num(j, g->ttft_ms[i]); }
  pf_j(j, "],\n    \"decode_ms\": [");
  for (long i = 0; i < g->n_decode; i++) { if (i) pf_j(j, ", "); pf_j_num(j, g->decode_ms[i]); }
  pf_j(j, "],\n    \"prefill_tokens_per_s\": ");
  pf_j_num(j, ttft > 0 ? (double)g->prompt_tokens / (ttft / 1e3) : 0.0 / 0.0);
  pf_j(j, ", \"decode_tokens_per_s\": ");
  pf_j_num(j, g->n_decode > 0 && step > 0 ? 1e3 / step : 0.0 / 0.0);
  pf_j(j, ",\n    \"tokens\": [");
  for (long i = 0; i < g->new_tokens; i++) pf_j(j, "%s%lld", i ? ", " : "", (long long)g->tokens[i]);
  pf_j(j, "],\n    \"prompt\": [");
  for (long i = 0; i < g->prompt_tokens; i++) pf_j(j, "%s%lld", i ? ", " : "", (long long)g->prompt[i]);
  pf_j(j, "]}");
}

// ---------------------------------------------------------------- JSON writer

static void pf_write_json(const PfArgs* a, const PfResult* r) {
  PfJson j = {NULL, 0, 0};
  struct utsname u;
  const char* arch = "unknown";
  if (uname(&u) == 0) arch = u.machine;
  double peak = pf_status_mb("VmHWM");
  pf_j(&j, "{\n  \"runner\": ");
  pf_j_str(&j, r->runner);
  pf_j(&j, ",\n  \"runtime_version\": ");
  pf_j_str(&j, r->runtime_version);
  pf_j(&j, ",\n  \"arch\": ");
  pf_j_str(&j, arch);
  pf_j(&j, ",\n  \"model\": ");
  pf_j_str(&j, a->model);
  pf_j(&j, ",\n  \"threads\": %ld,\n  \"threads_applied\": %s", a->threads, r->threads_applied ? "true" : "false");
  if (r->threads_effective >= 0) pf_j(&j, ",\n  \"threads_effective\": %ld", r->threads_effective);
  pf_j(&j, ",\n  \"warmup\": %ld,\n  \"runs\": %ld,\n  \"seed\": %llu", a->warmup, a->runs,
       (unsigned long long)a->seed);
  pf_j(&j, ",\n  \"load_ms\": ");
  pf_j_num(&j, r->load_ms);
  pf_j(&j, ",\n  \"first_inference_ms\": ");
  pf_j_num(&j, r->first_inference_ms);
  pf_j(&j, ",\n  \"latencies_ms\": [");
  for (long i = 0; i < r->n_latencies; i++) {
    if (i) pf_j(&j, ", ");
    pf_j_num(&j, r->latencies_ms[i]);
  }
  pf_j(&j, "],\n  \"peak_rss_mb\": ");
  if (peak >= 0) pf_j_num(&j, peak); else pf_j(&j, "null");
  pf_j(&j, ",\n  \"rss_before_load_mb\": ");
  if (r->rss_before_load_mb >= 0) pf_j_num(&j, r->rss_before_load_mb); else pf_j(&j, "null");
  pf_j(&j, ",\n  \"inputs\": [");
  for (int i = 0; i < r->n_inputs; i++) {
    const PfInput* in = &r->inputs[i];
    pf_j(&j, "%s{\"dtype\": ", i ? ", " : "");
    pf_j_str(&j, pf_dtype_name(in->dtype));
    pf_j(&j, ", \"shape\": [");
    for (int d = 0; d < in->ndims; d++) pf_j(&j, "%s%lld", d ? ", " : "", (long long)in->dims[d]);
    pf_j(&j, "], \"source\": ");
    pf_j_str(&j, in->from_file ? in->file : "random");
    pf_j(&j, "}");
  }
  pf_j(&j, "],\n  \"outputs\": [");
  for (int i = 0; i < r->n_outputs; i++) {
    pf_j(&j, "%s\n    ", i ? "," : "");
    pf_j_output(&j, &r->outputs[i], a->values);
  }
  pf_j(&j, "\n  ]");
  if (r->gen) pf_j_gen(&j, r->gen);
  pf_j(&j, "\n}\n");

  // Write beside the target, then rename: a reader never sees half a file.
  size_t plen = strlen(a->json) + 32;
  char* tmp = (char*)malloc(plen);
  snprintf(tmp, plen, "%s.tmp.%ld", a->json, (long)getpid());
  FILE* f = fopen(tmp, "wb");
  if (!f) pf_die(PF_EXIT_BAD_INPUT, "--json: cannot write '%s'", a->json);
  size_t wrote = fwrite(j.buf, 1, j.len, f);
  int bad = (wrote != j.len) | (fflush(f) != 0);
  bad |= (fclose(f) != 0);
  if (bad || rename(tmp, a->json) != 0) {
    remove(tmp);
    pf_die(PF_EXIT_RUNTIME, "--json: failed writing '%s'", a->json);
  }
  free(tmp);
  free(j.buf);
}
