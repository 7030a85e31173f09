// pf-ort-bench: benchmark an .onnx model with the ONNX Runtime C API.
// Uses only the C library (see bench_common.h), so it links for Linux and Android alike.
#include "bench_common.h"

#include "onnxruntime_c_api.h"

static const OrtApi* g_ort = NULL;

static void ort_fail(OrtStatus* st, const char* what, int exit_code) {
  if (!st) return;
  const char* msg = g_ort->GetErrorMessage(st);
  OrtErrorCode code = g_ort->GetErrorCode(st);
  fprintf(stderr, "%s: error: %s failed (ORT code %d): %s\n", pf_prog, what, (int)code, msg);
  fflush(stderr);
  exit(exit_code);
}

static void ort_check(OrtStatus* st, const char* what) { ort_fail(st, what, PF_EXIT_RUNTIME); }

// Creating the session: a file that is not a loadable model (bad protobuf, invalid graph, an op
// this runtime lacks) is bad input (exit 2); anything else stays a runtime failure (exit 4).
static void ort_check_load(OrtStatus* st) {
  if (!st) return;
  OrtErrorCode code = g_ort->GetErrorCode(st);
  int bad = code == ORT_INVALID_ARGUMENT || code == ORT_NO_SUCHFILE || code == ORT_NO_MODEL ||
            code == ORT_INVALID_PROTOBUF || code == ORT_INVALID_GRAPH || code == ORT_NOT_IMPLEMENTED;
  ort_fail(st, "CreateSession (loading the model)", bad ? PF_EXIT_BAD_INPUT : PF_EXIT_RUNTIME);
}

static int from_onnx(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return PF_F32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return PF_I64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return PF_I32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return PF_BOOL;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return PF_U8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return PF_F16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return PF_F64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return PF_I8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return PF_I16;
    default: return PF_UNKNOWN;
  }
}

static ONNXTensorElementDataType to_onnx(int dt) {
  switch (dt) {
    case PF_F32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case PF_I64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    case PF_I32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case PF_BOOL: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    case PF_U8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case PF_F16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case PF_F64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
    case PF_I8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case PF_I16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
}

// Element type and shape (-1 on a dynamic axis) of input (`output` 0) or output `i` of the
// session. Returns 0, or 1 when the value is not a tensor, or 2 when it has more than
// PF_MAX_DIMS dimensions (*nd still says how many); each caller words its own error.
static int ort_value_info(OrtSession* sess, int output, size_t i, ONNXTensorElementDataType* et,
                          int64_t* dims, size_t* nd) {
  OrtTypeInfo* ti = NULL;
  if (output) ort_check(g_ort->SessionGetOutputTypeInfo(sess, i, &ti), "SessionGetOutputTypeInfo");
  else ort_check(g_ort->SessionGetInputTypeInfo(sess, i, &ti), "SessionGetInputTypeInfo");
  const OrtTensorTypeAndShapeInfo* tinfo = NULL;
  ort_check(g_ort->CastTypeInfoToTensorInfo(ti, &tinfo), "CastTypeInfoToTensorInfo");
  int status = 0;
  *nd = 0;
  if (!tinfo) {
    status = 1;
  } else {
    ort_check(g_ort->GetTensorElementType(tinfo, et), "GetTensorElementType");
    ort_check(g_ort->GetDimensionsCount(tinfo, nd), "GetDimensionsCount");
    if (*nd > PF_MAX_DIMS) status = 2;
    else ort_check(g_ort->GetDimensions(tinfo, dims, *nd), "GetDimensions");
  }
  g_ort->ReleaseTypeInfo(ti);
  return status;
}

static void release_values(OrtValue** v, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (v[i]) g_ort->ReleaseValue(v[i]);
    v[i] = NULL;
  }
}

// ---------------------------------------------------------------- --generate
// A -gen.onnx graph takes (tokens, input_pos, past_*) and returns (logits, present_*), every
// cache of a static shape. Two sets of cache buffers are preallocated; each Run reads the
// `past` set and writes the `present` set in place (preallocated output OrtValues), then the
// two sets swap roles, so no cache is copied between steps. Reset zeroes the `past` set (as
// OrtGenerator starts from zeros). The logits go to preallocated buffers too ([1, P, V] for
// the prefill, [1, 1, V] for decode) once the probe call has told V; a graph exported with the
// last position's logits only (a static 1 in the logits' second dimension, --gen-logits last)
// gets [1, 1, V] for the prefill as well.
struct OrtGen {
  OrtSession* sess;
  OrtRunOptions* ro;
  OrtMemoryInfo* mem;
  size_t n_in, n_out, n_cache;
  char** in_names;
  char** out_names;
  const OrtValue** feeds;   // [tokens, input_pos, past...]
  OrtValue** fetches;       // [logits, present...]
  OrtValue** past;
  OrtValue** present;
  void** past_data;
  void** present_data;
  size_t* cache_bytes;
  int64_t tok, pos;
  const int64_t* prompt;
  long prompt_tokens;
  OrtValue* v_tok;
  OrtValue* v_pos;
  OrtValue* v_prompt;
  long vocab;
  long prefill_rows;        // logits rows a prefill returns: prompt_tokens, or 1 (last only)
  float* logits_prefill;
  float* logits_decode;
  OrtValue* v_logits_prefill;
  OrtValue* v_logits_decode;
  OrtValue* probe_out;      // ORT-allocated logits of the probe call (released at the next step)
};

static void ort_gen_reset(void* c) {
  OrtGen* g = (OrtGen*)c;
  for (size_t i = 0; i < g->n_cache; i++) memset(g->past_data[i], 0, g->cache_bytes[i]);
}

static const float* ort_gen_step(void* c, const int64_t* ids, long t, int64_t pos, long* vocab) {
  OrtGen* g = (OrtGen*)c;
  if (g->probe_out) { g_ort->ReleaseValue(g->probe_out); g->probe_out = NULL; }
  g->pos = pos;
  if (t == 1) {
    g->tok = ids[0];
    g->feeds[0] = g->v_tok;
  } else {
    if (ids != g->prompt || t != g->prompt_tokens) pf_die(PF_EXIT_RUNTIME, "internal: multi-token step is not the prompt");
    g->feeds[0] = g->v_prompt;
  }
  g->feeds[1] = g->v_pos;
  for (size_t i = 0; i < g->n_cache; i++) {
    g->feeds[2 + i] = g->past[i];
    g->fetches[1 + i] = g->present[i];
  }
  float* logits = NULL;
  if (g->vocab == 0) g->fetches[0] = NULL;    // the probe: ORT allocates, we learn V
  else if (t == 1) { g->fetches[0] = g->v_logits_decode; logits = g->logits_decode; }
  else { g->fetches[0] = g->v_logits_prefill; logits = g->logits_prefill; }
  ort_check(g_ort->Run(g->sess, g->ro, (const char* const*)g->in_names, g->feeds, g->n_in,
                       (const char* const*)g->out_names, g->n_out, g->fetches),
            "Run (generation step)");
  if (g->vocab == 0) {
    g->probe_out = g->fetches[0];
    OrtTensorTypeAndShapeInfo* info = NULL;
    ort_check(g_ort->GetTensorTypeAndShape(g->probe_out, &info), "GetTensorTypeAndShape");
    ONNXTensorElementDataType et;
    ort_check(g_ort->GetTensorElementType(info, &et), "GetTensorElementType");
    size_t nd = 0;
    ort_check(g_ort->GetDimensionsCount(info, &nd), "GetDimensionsCount");
    int64_t dims[PF_MAX_DIMS] = {0};
    if (nd == 3) ort_check(g_ort->GetDimensions(info, dims, nd), "GetDimensions");
    g_ort->ReleaseTensorTypeAndShapeInfo(info);
    if (et != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || nd != 3 || dims[1] != t || dims[2] < 1)
      pf_die(PF_EXIT_RUNTIME, "logits are not float32 [1, %ld, V]", t);   // the probe feeds t = 1
    g->vocab = (long)dims[2];
    void* data = NULL;
    ort_check(g_ort->GetTensorMutableData(g->probe_out, &data), "GetTensorMutableData");
    logits = (float*)data;
    // From now on the logits go to preallocated buffers.
    int64_t shp[3] = {1, g->prefill_rows, g->vocab};
    size_t np = (size_t)g->prefill_rows * (size_t)g->vocab, nd1 = (size_t)g->vocab;
    g->logits_prefill = (float*)calloc(np, sizeof(float));
    g->logits_decode = (float*)calloc(nd1, sizeof(float));
    ort_check(g_ort->CreateTensorWithDataAsOrtValue(g->mem, g->logits_prefill, np * sizeof(float), shp, 3,
                                                    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &g->v_logits_prefill),
              "CreateTensorWithDataAsOrtValue");
    shp[1] = 1;
    ort_check(g_ort->CreateTensorWithDataAsOrtValue(g->mem, g->logits_decode, nd1 * sizeof(float), shp, 3,
                                                    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &g->v_logits_decode),
              "CreateTensorWithDataAsOrtValue");
  }
  // present becomes the next step's past
  for (size_t i = 0; i < g->n_cache; i++) {
    OrtValue* v = g->past[i]; g->past[i] = g->present[i]; g->present[i] = v;
    void* d = g->past_data[i]; g->past_data[i] = g->present_data[i]; g->present_data[i] = d;
  }
  *vocab = g->vocab;
  long rows = t == 1 ? 1 : g->prefill_rows;
  return logits + (size_t)(rows - 1) * (size_t)g->vocab;
}

// 1 when the graph's logits output has a static 1 as its second dimension (the last position
// only), else the prompt length (every position's logits)
static long ort_prefill_rows(OrtSession* sess, long prompt_tokens) {
  ONNXTensorElementDataType et;
  int64_t dims[PF_MAX_DIMS] = {0};
  size_t nd = 0;
  int ok = ort_value_info(sess, 1, 0, &et, dims, &nd) == 0;
  return ok && nd == 3 && dims[1] == 1 ? 1 : prompt_tokens;
}

static void ort_generate(PfArgs* a, PfGen* pg, OrtSession* sess, OrtMemoryInfo* mem, OrtAllocator* alloc,
                         PfResult* res) {
  static OrtGen g;
  memset(&g, 0, sizeof g);
  g.sess = sess;
  g.mem = mem;
  ort_check(g_ort->SessionGetInputCount(sess, &g.n_in), "SessionGetInputCount");
  ort_check(g_ort->SessionGetOutputCount(sess, &g.n_out), "SessionGetOutputCount");
  if (g.n_in < 3 || g.n_out < 2 || g.n_in - 2 != g.n_out - 1)
    pf_die(PF_EXIT_BAD_INPUT, "--generate: '%s' has %zu inputs and %zu outputs; a -gen graph takes "
           "(tokens, input_pos, past...) and returns (logits, present...)", a->model, g.n_in, g.n_out);
  g.n_cache = g.n_in - 2;
  g.in_names = (char**)calloc(g.n_in, sizeof(char*));
  g.out_names = (char**)calloc(g.n_out, sizeof(char*));
  g.feeds = (const OrtValue**)calloc(g.n_in, sizeof(OrtValue*));
  g.fetches = (OrtValue**)calloc(g.n_out, sizeof(OrtValue*));
  g.past = (OrtValue**)calloc(g.n_cache + 1, sizeof(OrtValue*));
  g.present = (OrtValue**)calloc(g.n_cache + 1, sizeof(OrtValue*));
  g.past_data = (void**)calloc(g.n_cache + 1, sizeof(void*));
  g.present_data = (void**)calloc(g.n_cache + 1, sizeof(void*));
  g.cache_bytes = (size_t*)calloc(g.n_cache + 1, sizeof(size_t));
  for (size_t i = 0; i < g.n_in; i++)
    ort_check(g_ort->SessionGetInputName(sess, i, alloc, &g.in_names[i]), "SessionGetInputName");
  for (size_t i = 0; i < g.n_out; i++)
    ort_check(g_ort->SessionGetOutputName(sess, i, alloc, &g.out_names[i]), "SessionGetOutputName");

  long max_len = -1;
  for (size_t i = 0; i < g.n_in; i++) {
    ONNXTensorElementDataType et;
    size_t nd = 0;
    int64_t dims[PF_MAX_DIMS];
    int info = ort_value_info(sess, 0, i, &et, dims, &nd);
    if (info == 1) pf_die(PF_EXIT_BAD_INPUT, "--generate: input '%s' is not a tensor", g.in_names[i]);
    if (info == 2) pf_die(PF_EXIT_BAD_INPUT, "--generate: input '%s' has %zu dims", g.in_names[i], nd);
    if (i < 2) {
      if (et != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
        pf_die(PF_EXIT_BAD_INPUT, "--generate: input '%s' of '%s' is not int64 (tokens, input_pos come first)",
               g.in_names[i], a->model);
      continue;
    }
    int dt = from_onnx(et);
    size_t es = pf_dtype_size(dt);
    int ok = nd == 4 && es > 0;
    for (size_t d = 0; ok && d < nd; d++) ok = dims[d] > 0;
    if (!ok) pf_die(PF_EXIT_BAD_INPUT, "--generate: cache input '%s' needs a static 4-d shape "
                    "[1, kv_heads, max_len, head_dim]", g.in_names[i]);
    if (max_len < 0 || dims[2] < max_len) max_len = (long)dims[2];
    size_t c = i - 2;
    g.cache_bytes[c] = pf_numel(dims, (int)nd) * es;
    g.past_data[c] = calloc(1, g.cache_bytes[c]);
    g.present_data[c] = calloc(1, g.cache_bytes[c]);
    if (!g.past_data[c] || !g.present_data[c]) pf_die(PF_EXIT_RUNTIME, "out of memory for the KV cache");
    ort_check(g_ort->CreateTensorWithDataAsOrtValue(mem, g.past_data[c], g.cache_bytes[c], dims, nd, et, &g.past[c]),
              "CreateTensorWithDataAsOrtValue");
    ort_check(g_ort->CreateTensorWithDataAsOrtValue(mem, g.present_data[c], g.cache_bytes[c], dims, nd, et,
                                                    &g.present[c]),
              "CreateTensorWithDataAsOrtValue");
  }
  pg->max_len = max_len;
  pf_check_fits(pg, max_len, "the cache inputs' sequence dimension");

  g.prompt = pg->prompt;
  g.prompt_tokens = pg->prompt_tokens;
  g.prefill_rows = ort_prefill_rows(sess, pg->prompt_tokens);
  int64_t shp[2] = {1, pg->prompt_tokens};
  ort_check(g_ort->CreateTensorWithDataAsOrtValue(mem, pg->prompt, (size_t)pg->prompt_tokens * sizeof(int64_t),
                                                  shp, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &g.v_prompt),
            "CreateTensorWithDataAsOrtValue");
  shp[1] = 1;
  ort_check(g_ort->CreateTensorWithDataAsOrtValue(mem, &g.tok, sizeof(int64_t), shp, 2,
                                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &g.v_tok),
            "CreateTensorWithDataAsOrtValue");
  ort_check(g_ort->CreateTensorWithDataAsOrtValue(mem, &g.pos, sizeof(int64_t), shp + 1, 1,
                                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &g.v_pos),
            "CreateTensorWithDataAsOrtValue");
  ort_check(g_ort->CreateRunOptions(&g.ro), "CreateRunOptions");

  pf_generate(a, pg, &g, ort_gen_reset, ort_gen_step);
  res->first_inference_ms = pg->probe_ms;
  res->latencies_ms = pg->decode_ms;    // as the Python worker: one entry per decode step
  res->n_latencies = pg->n_decode;
  res->gen = pg;
}

int main(int argc, char** argv) {
  pf_prog = "pf-ort-bench";
  static PfArgs a;
  pf_parse_args(argc, argv, &a);
  pf_check_model_file(a.model);
  pf_load_input_files(&a);
  static PfGen gen;
  if (a.generate) pf_load_prompt(&a, &gen);

  double rss_before = pf_status_mb("VmRSS");
  const OrtApiBase* base = OrtGetApiBase();
  g_ort = base->GetApi(ORT_API_VERSION);
  if (!g_ort) pf_die(PF_EXIT_RUNTIME, "libonnxruntime %s does not provide C API version %d",
                     base->GetVersionString(), ORT_API_VERSION);
  const char* version = base->GetVersionString();

  double t0 = pf_now_ms();
  OrtEnv* env = NULL;
  ort_check(g_ort->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "pf-ort-bench", &env), "CreateEnv");
  OrtSessionOptions* so = NULL;
  ort_check(g_ort->CreateSessionOptions(&so), "CreateSessionOptions");
  if (a.threads > 0) ort_check(g_ort->SetIntraOpNumThreads(so, (int)a.threads), "SetIntraOpNumThreads");
  ort_check(g_ort->SetInterOpNumThreads(so, 1), "SetInterOpNumThreads");
  ort_check(g_ort->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel");
  OrtSession* sess = NULL;
  ort_check_load(g_ort->CreateSession(env, a.model, so, &sess));
  double load_ms = pf_now_ms() - t0;

  OrtAllocator* alloc = NULL;
  ort_check(g_ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");

  if (a.generate) {
    OrtMemoryInfo* gmem = NULL;
    ort_check(g_ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &gmem), "CreateCpuMemoryInfo");
    PfResult res;
    memset(&res, 0, sizeof res);
    res.runner = "onnxruntime-native";
    res.runtime_version = version;
    res.threads_applied = 1;
    res.threads_effective = a.threads;
    res.rss_before_load_mb = rss_before;
    res.load_ms = load_ms;
    ort_generate(&a, &gen, sess, gmem, alloc, &res);
    PfOutput logits;
    pf_gen_output(&gen, &logits);
    res.outputs = &logits;
    res.n_outputs = 1;
    pf_write_json(&a, &res);
    return 0;   // the process exits: the OS reclaims the session and buffers
  }

  size_t n_in = 0, n_out = 0;
  ort_check(g_ort->SessionGetInputCount(sess, &n_in), "SessionGetInputCount");
  ort_check(g_ort->SessionGetOutputCount(sess, &n_out), "SessionGetOutputCount");
  if (n_in > PF_MAX_INPUTS) pf_die(PF_EXIT_RUNTIME, "model has %zu inputs (max %d)", n_in, PF_MAX_INPUTS);
  if (a.n_inputs > 0 && (size_t)a.n_inputs != n_in)
    pf_die(PF_EXIT_BAD_INPUT, "--input given %d times but model '%s' has %zu inputs", a.n_inputs, a.model, n_in);

  char** in_names = (char**)calloc(n_in + 1, sizeof(char*));
  char** out_names = (char**)calloc(n_out + 1, sizeof(char*));
  OrtValue** in_vals = (OrtValue**)calloc(n_in + 1, sizeof(OrtValue*));
  OrtValue** out_vals = (OrtValue**)calloc(n_out + 1, sizeof(OrtValue*));
  OrtMemoryInfo* mem = NULL;
  ort_check(g_ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem), "CreateCpuMemoryInfo");

  for (size_t i = 0; i < n_in; i++) {
    ort_check(g_ort->SessionGetInputName(sess, i, alloc, &in_names[i]), "SessionGetInputName");
    ONNXTensorElementDataType et;
    size_t nd = 0;
    int64_t dims[PF_MAX_DIMS];
    int info = ort_value_info(sess, 0, i, &et, dims, &nd);
    if (info == 1) pf_die(PF_EXIT_RUNTIME, "model input %zu ('%s') is not a tensor", i, in_names[i]);
    if (info == 2) pf_die(PF_EXIT_RUNTIME, "model input '%s' has %zu dims", in_names[i], nd);
    int mdt = from_onnx(et);
    PfInput* in = &a.inputs[i];
    if (a.n_inputs > 0) {
      if (!pf_dtype_compatible(in->dtype, mdt))
        pf_die(PF_EXIT_BAD_INPUT, "--input %zu ('%s'): dtype %s but model input '%s' is %s", i, in->file,
               pf_dtype_name(in->dtype), in_names[i], pf_dtype_name(mdt));
      int ok = (size_t)in->ndims == nd;
      for (size_t d = 0; ok && d < nd; d++) ok = dims[d] < 0 || dims[d] == in->dims[d];
      if (!ok) pf_die(PF_EXIT_BAD_INPUT, "--input %zu ('%s'): shape does not fit model input '%s'", i, in->file,
                      in_names[i]);
    } else {
      if (mdt == PF_UNKNOWN || mdt == PF_F16)
        pf_die(PF_EXIT_BAD_INPUT, "model input '%s' has element type %d: pass it with --input", in_names[i], (int)et);
      memset(in, 0, sizeof *in);
      in->dtype = mdt;
      in->ndims = (int)nd;
      for (size_t d = 0; d < nd; d++) in->dims[d] = dims[d] < 0 ? 1 : dims[d];   // dynamic dims -> 1
      pf_fill_random(in, a.seed, (int)i);
    }
    ort_check(g_ort->CreateTensorWithDataAsOrtValue(mem, in->data, in->nbytes, in->dims, (size_t)in->ndims,
                                                    to_onnx(mdt), &in_vals[i]),
              "CreateTensorWithDataAsOrtValue");
  }
  for (size_t i = 0; i < n_out; i++)
    ort_check(g_ort->SessionGetOutputName(sess, i, alloc, &out_names[i]), "SessionGetOutputName");

  OrtRunOptions* ro = NULL;
  ort_check(g_ort->CreateRunOptions(&ro), "CreateRunOptions");
#define PF_RUN()                                                                                   \
  ort_check(g_ort->Run(sess, ro, (const char* const*)in_names, (const OrtValue* const*)in_vals, n_in, \
                       (const char* const*)out_names, n_out, out_vals),                            \
            "Run")

  double t = pf_now_ms();
  PF_RUN();
  double first_ms = pf_now_ms() - t;
  for (long w = 0; w < a.warmup; w++) {
    release_values(out_vals, n_out);
    PF_RUN();
  }
  double* lat = (double*)calloc((size_t)a.runs, sizeof(double));
  for (long r = 0; r < a.runs; r++) {
    release_values(out_vals, n_out);
    t = pf_now_ms();
    PF_RUN();
    lat[r] = pf_now_ms() - t;
  }

  PfOutput* outs = (PfOutput*)calloc(n_out + 1, sizeof(PfOutput));
  for (size_t i = 0; i < n_out; i++) {
    PfOutput* o = &outs[i];
    int is_tensor = 0;
    ort_check(g_ort->IsTensor(out_vals[i], &is_tensor), "IsTensor");
    if (!is_tensor) { o->dtype = PF_UNKNOWN; continue; }
    OrtTensorTypeAndShapeInfo* info = NULL;
    ort_check(g_ort->GetTensorTypeAndShape(out_vals[i], &info), "GetTensorTypeAndShape");
    ONNXTensorElementDataType et;
    ort_check(g_ort->GetTensorElementType(info, &et), "GetTensorElementType");
    size_t nd = 0;
    ort_check(g_ort->GetDimensionsCount(info, &nd), "GetDimensionsCount");
    if (nd > PF_MAX_DIMS) nd = PF_MAX_DIMS;
    ort_check(g_ort->GetDimensions(info, o->dims, nd), "GetDimensions");
    size_t numel = 0;
    ort_check(g_ort->GetTensorShapeElementCount(info, &numel), "GetTensorShapeElementCount");
    g_ort->ReleaseTensorTypeAndShapeInfo(info);
    void* data = NULL;
    ort_check(g_ort->GetTensorMutableData(out_vals[i], &data), "GetTensorMutableData");
    o->dtype = from_onnx(et);
    o->ndims = (int)nd;
    o->numel = o->dtype == PF_UNKNOWN ? 0 : numel;
    o->data = data;
  }

  PfResult res;
  memset(&res, 0, sizeof res);
  res.runner = "onnxruntime-native";
  res.runtime_version = version;
  res.threads_applied = 1;
  res.threads_effective = a.threads;
  res.rss_before_load_mb = rss_before;
  res.load_ms = load_ms;
  res.first_inference_ms = first_ms;
  res.latencies_ms = lat;
  res.n_latencies = a.runs;
  res.outputs = outs;
  res.n_outputs = (int)n_out;
  res.inputs = a.inputs;
  res.n_inputs = (int)n_in;
  pf_write_json(&a, &res);

  release_values(out_vals, n_out);
  release_values(in_vals, n_in);
  g_ort->ReleaseRunOptions(ro);
  g_ort->ReleaseMemoryInfo(mem);
  g_ort->ReleaseSession(sess);
  g_ort->ReleaseSessionOptions(so);
  g_ort->ReleaseEnv(env);
  return 0;
}
