// pf-ort-bench: benchmark an .onnx model with the ONNX Runtime C API.
// Uses only the C library (see bench_common.h), so it links for Linux and Android alike.
#include "bench_common.h"

#include "onnxruntime_c_api.h"

static const OrtApi* g_ort = NULL;

static void ort_check(OrtStatus* st, const char* what) {
  if (!st) return;
  const char* msg = g_ort->GetErrorMessage(st);
  OrtErrorCode code = g_ort->GetErrorCode(st);
  fprintf(stderr, "%s: error: %s failed (ORT code %d): %s\n", pf_prog, what, (int)code, msg);
  fflush(stderr);
  exit(PF_EXIT_RUNTIME);
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

static void release_values(OrtValue** v, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (v[i]) g_ort->ReleaseValue(v[i]);
    v[i] = NULL;
  }
}

int main(int argc, char** argv) {
  pf_prog = "pf-ort-bench";
  static PfArgs a;
  pf_parse_args(argc, argv, &a);
  pf_check_model_file(a.model);
  pf_load_input_files(&a);

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
  ort_check(g_ort->CreateSession(env, a.model, so, &sess), "CreateSession");
  double load_ms = pf_now_ms() - t0;

  OrtAllocator* alloc = NULL;
  ort_check(g_ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions");

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
    OrtTypeInfo* ti = NULL;
    ort_check(g_ort->SessionGetInputTypeInfo(sess, i, &ti), "SessionGetInputTypeInfo");
    const OrtTensorTypeAndShapeInfo* tinfo = NULL;
    ort_check(g_ort->CastTypeInfoToTensorInfo(ti, &tinfo), "CastTypeInfoToTensorInfo");
    if (!tinfo) pf_die(PF_EXIT_RUNTIME, "model input %zu ('%s') is not a tensor", i, in_names[i]);
    ONNXTensorElementDataType et;
    ort_check(g_ort->GetTensorElementType(tinfo, &et), "GetTensorElementType");
    size_t nd = 0;
    ort_check(g_ort->GetDimensionsCount(tinfo, &nd), "GetDimensionsCount");
    if (nd > PF_MAX_DIMS) pf_die(PF_EXIT_RUNTIME, "model input '%s' has %zu dims", in_names[i], nd);
    int64_t dims[PF_MAX_DIMS];
    ort_check(g_ort->GetDimensions(tinfo, dims, nd), "GetDimensions");
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
    g_ort->ReleaseTypeInfo(ti);
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
