/* JNI layer of the pocketformer demo app: com.pocketformer.demo.OrtSession over ONNX Runtime's
 * C API (onnxruntime_c_api.h). Built three ways from this one file:
 *   - Android arm64 by pocketformer/android.py (clang --target=aarch64-linux-android24, lld,
 *     linked against the official AAR's libonnxruntime.so; no NDK: libc calls are declared in
 *     a generated shim header set and resolved by Bionic on the phone),
 *   - the host (gcc, Linux x64 libonnxruntime.so) for the tests on the host JVM,
 *   - Gradle/CMake with the NDK (CMakeLists.txt beside this file, prefab onnxruntime).
 * Only malloc/calloc/free/memcpy/strlen of the C library are used.
 *
 * Errors become Java exceptions: IllegalArgumentException for a model that cannot be loaded
 * (missing file, invalid protobuf or graph, unsupported operator, wrong inputs), otherwise
 * IllegalStateException.
 */
#include <jni.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

static const OrtApi* g_ort = NULL;
static OrtEnv* g_env = NULL;

typedef struct {
  OrtSession* session;
  size_t n_in, n_out;
  char** in_names;
  char** out_names;
} PfSession;

/* ------------------------------------------------------------------ errors */

static char* pf_concat(const char* a, const char* b) {
  size_t la = strlen(a), lb = b ? strlen(b) : 0;
  char* s = (char*)malloc(la + lb + 3);
  if (!s) return NULL;
  memcpy(s, a, la);
  if (b) {
    memcpy(s + la, ": ", 2);
    memcpy(s + la + 2, b, lb);
    s[la + 2 + lb] = 0;
  } else {
    s[la] = 0;
  }
  return s;
}

static void pf_throw(JNIEnv* env, int bad_input, const char* what, const char* detail) {
  jclass cls = (*env)->FindClass(env, bad_input ? "java/lang/IllegalArgumentException"
                                                : "java/lang/IllegalStateException");
  char* msg = pf_concat(what, detail);
  if (cls) (*env)->ThrowNew(env, cls, msg ? msg : what);
  free(msg);
}

/* Throws for a failed status and releases it; returns 1 if it threw. */
static int pf_check(JNIEnv* env, OrtStatus* st, const char* what) {
  if (!st) return 0;
  OrtErrorCode code = g_ort->GetErrorCode(st);
  int bad = code == ORT_NO_SUCHFILE || code == ORT_INVALID_PROTOBUF || code == ORT_INVALID_GRAPH ||
            code == ORT_NOT_IMPLEMENTED || code == ORT_INVALID_ARGUMENT || code == ORT_MODEL_LOADED ||
            code == ORT_NO_MODEL;
  pf_throw(env, bad, what, g_ort->GetErrorMessage(st));
  g_ort->ReleaseStatus(st);
  return 1;
}

static int pf_init(JNIEnv* env) {
  if (!g_ort) {
    const OrtApiBase* base = OrtGetApiBase();
    g_ort = base ? base->GetApi(ORT_API_VERSION) : NULL;
    if (!g_ort) {
      pf_throw(env, 0, "libonnxruntime does not serve this ORT API version (too old?)",
               base ? base->GetVersionString() : NULL);
      return 0;
    }
  }
  if (!g_env && pf_check(env, g_ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "pfdemo", &g_env),
                         "CreateEnv")) {
    g_env = NULL;
    return 0;
  }
  return 1;
}

/* ------------------------------------------------------------------ sessions */

static void pf_free_names(char** names, size_t n) {
  if (!names) return;
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
}

static void pf_free_session(PfSession* s) {
  if (!s) return;
  if (s->session) g_ort->ReleaseSession(s->session);
  pf_free_names(s->in_names, s->n_in);
  pf_free_names(s->out_names, s->n_out);
  free(s);
}

static char* pf_strdup(const char* s) {
  size_t n = strlen(s);
  char* d = (char*)malloc(n + 1);
  if (d) memcpy(d, s, n + 1);
  return d;
}

static int pf_read_names(JNIEnv* env, PfSession* s, int outputs) {
  OrtAllocator* alloc = NULL;
  if (pf_check(env, g_ort->GetAllocatorWithDefaultOptions(&alloc), "GetAllocator")) return 0;
  size_t n = 0;
  if (pf_check(env, outputs ? g_ort->SessionGetOutputCount(s->session, &n)
                            : g_ort->SessionGetInputCount(s->session, &n), "name count")) return 0;
  char** names = (char**)calloc(n ? n : 1, sizeof(char*));
  if (outputs) { s->out_names = names; s->n_out = n; } else { s->in_names = names; s->n_in = n; }
  for (size_t i = 0; i < n; i++) {
    char* name = NULL;
    OrtStatus* st = outputs ? g_ort->SessionGetOutputName(s->session, i, alloc, &name)
                            : g_ort->SessionGetInputName(s->session, i, alloc, &name);
    if (pf_check(env, st, "session name")) return 0;
    names[i] = pf_strdup(name);
    alloc->Free(alloc, name);
  }
  return 1;
}

static jlong pf_create(JNIEnv* env, const char* path, const void* data, size_t len, jint threads) {
  if (!pf_init(env)) return 0;
  OrtSessionOptions* opts = NULL;
  if (pf_check(env, g_ort->CreateSessionOptions(&opts), "CreateSessionOptions")) return 0;
  OrtStatus* st = g_ort->SetIntraOpNumThreads(opts, threads > 0 ? threads : 1);
  if (!st) st = g_ort->SetInterOpNumThreads(opts, 1);
  if (!st) st = g_ort->SetSessionGraphOptimizationLevel(opts, ORT_ENABLE_ALL);
  if (pf_check(env, st, "session options")) {
    g_ort->ReleaseSessionOptions(opts);
    return 0;
  }
  PfSession* s = (PfSession*)calloc(1, sizeof(PfSession));
  st = path ? g_ort->CreateSession(g_env, path, opts, &s->session)
            : g_ort->CreateSessionFromArray(g_env, data, len, opts, &s->session);
  g_ort->ReleaseSessionOptions(opts);
  if (pf_check(env, st, "cannot load the model")) {
    s->session = NULL;
    pf_free_session(s);
    return 0;
  }
  if (!pf_read_names(env, s, 0) || !pf_read_names(env, s, 1)) {
    pf_free_session(s);
    return 0;
  }
  if (s->n_out < 1) {
    pf_free_session(s);
    pf_throw(env, 1, "the model has no outputs", NULL);
    return 0;
  }
  return (jlong)(intptr_t)s;
}

JNIEXPORT jstring JNICALL Java_com_pocketformer_demo_OrtSession_nativeVersion(JNIEnv* env, jclass cls) {
  (void)cls;
  const OrtApiBase* base = OrtGetApiBase();
  return (*env)->NewStringUTF(env, base ? base->GetVersionString() : "unknown");
}

JNIEXPORT jlong JNICALL Java_com_pocketformer_demo_OrtSession_nativeCreate(JNIEnv* env, jclass cls,
                                                                          jstring jpath, jint threads) {
  (void)cls;
  if (!jpath) { pf_throw(env, 1, "model path is null", NULL); return 0; }
  const char* path = (*env)->GetStringUTFChars(env, jpath, NULL);
  if (!path) return 0;
  jlong h = pf_create(env, path, NULL, 0, threads);
  (*env)->ReleaseStringUTFChars(env, jpath, path);
  return h;
}

JNIEXPORT jlong JNICALL Java_com_pocketformer_demo_OrtSession_nativeCreateFromBuffer(
    JNIEnv* env, jclass cls, jobject buffer, jlong length, jint threads) {
  (void)cls;
  void* data = buffer ? (*env)->GetDirectBufferAddress(env, buffer) : NULL;
  if (!data || length <= 0) { pf_throw(env, 1, "model buffer is not a non-empty direct buffer", NULL); return 0; }
  return pf_create(env, NULL, data, (size_t)length, threads);
}

static jobjectArray pf_names(JNIEnv* env, char** names, size_t n) {
  jclass str = (*env)->FindClass(env, "java/lang/String");
  jobjectArray arr = (*env)->NewObjectArray(env, (jsize)n, str, NULL);
  for (size_t i = 0; arr && i < n; i++) {
    jstring s = (*env)->NewStringUTF(env, names[i]);
    (*env)->SetObjectArrayElement(env, arr, (jsize)i, s);
    (*env)->DeleteLocalRef(env, s);
  }
  return arr;
}

JNIEXPORT jobjectArray JNICALL Java_com_pocketformer_demo_OrtSession_nativeInputNames(JNIEnv* env, jclass cls,
                                                                                      jlong h) {
  (void)cls;
  PfSession* s = (PfSession*)(intptr_t)h;
  return pf_names(env, s->in_names, s->n_in);
}

JNIEXPORT jobjectArray JNICALL Java_com_pocketformer_demo_OrtSession_nativeOutputNames(JNIEnv* env, jclass cls,
                                                                                       jlong h) {
  (void)cls;
  PfSession* s = (PfSession*)(intptr_t)h;
  return pf_names(env, s->out_names, s->n_out);
}

/* Runs the session on int64 [batch, seq] token inputs, matched by name (input_ids,
 * attention_mask; token_type_ids is fed zeros); returns the first output as float32. */
JNIEXPORT jfloatArray JNICALL Java_com_pocketformer_demo_OrtSession_nativeRun(
    JNIEnv* env, jclass cls, jlong h, jlongArray jids, jlongArray jmask, jint batch, jint seq,
    jlongArray jshape) {
  (void)cls;
  PfSession* s = (PfSession*)(intptr_t)h;
  jfloatArray result = NULL;
  size_t numel = (size_t)batch * (size_t)seq;
  int64_t dims[2] = {batch, seq};
  OrtMemoryInfo* mem = NULL;
  OrtValue** inputs = (OrtValue**)calloc(s->n_in ? s->n_in : 1, sizeof(OrtValue*));
  OrtValue* output = NULL;
  int64_t* zeros = NULL;
  jlong* ids = (*env)->GetLongArrayElements(env, jids, NULL);
  jlong* mask = (*env)->GetLongArrayElements(env, jmask, NULL);
  if (!ids || !mask || !inputs) goto done;
  if (pf_check(env, g_ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem), "memory info"))
    goto done;
  for (size_t i = 0; i < s->n_in; i++) {
    void* data;
    const char* name = s->in_names[i];
    if (!strcmp(name, "input_ids")) {
      data = ids;
    } else if (!strcmp(name, "attention_mask")) {
      data = mask;
    } else if (!strcmp(name, "token_type_ids")) {
      if (!zeros) zeros = (int64_t*)calloc(numel ? numel : 1, sizeof(int64_t));
      data = zeros;
    } else {
      pf_throw(env, 1, "unsupported model input (the app feeds input_ids, attention_mask, "
               "token_type_ids)", name);
      goto done;
    }
    if (pf_check(env, g_ort->CreateTensorWithDataAsOrtValue(mem, data, numel * sizeof(int64_t), dims, 2,
                                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
                                                            &inputs[i]), "input tensor"))
      goto done;
  }
  if (pf_check(env, g_ort->Run(s->session, NULL, (const char* const*)s->in_names,
                               (const OrtValue* const*)inputs, s->n_in,
                               (const char* const*)s->out_names, 1, &output), "Run"))
    goto done;
  {
    OrtTensorTypeAndShapeInfo* info = NULL;
    if (pf_check(env, g_ort->GetTensorTypeAndShape(output, &info), "output shape")) goto done;
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    size_t rank = 0, count = 0;
    int64_t odims[8] = {0};
    OrtStatus* st = g_ort->GetTensorElementType(info, &type);
    if (!st) st = g_ort->GetDimensionsCount(info, &rank);
    if (!st && rank <= 8) st = g_ort->GetDimensions(info, odims, rank);
    if (!st) st = g_ort->GetTensorShapeElementCount(info, &count);
    g_ort->ReleaseTensorTypeAndShapeInfo(info);
    if (pf_check(env, st, "output shape")) goto done;
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || rank > 8) {
      pf_throw(env, 1, "the first output must be a float32 tensor of rank <= 8", s->out_names[0]);
      goto done;
    }
    float* y = NULL;
    if (pf_check(env, g_ort->GetTensorMutableData(output, (void**)&y), "output data")) goto done;
    if (jshape && (*env)->GetArrayLength(env, jshape) >= (jsize)(rank + 1)) {
      jlong shp[9];
      shp[0] = (jlong)rank;
      for (size_t d = 0; d < rank; d++) shp[d + 1] = (jlong)odims[d];
      (*env)->SetLongArrayRegion(env, jshape, 0, (jsize)(rank + 1), shp);
    }
    result = (*env)->NewFloatArray(env, (jsize)count);
    if (result) (*env)->SetFloatArrayRegion(env, result, 0, (jsize)count, y);
  }
done:
  if (output) g_ort->ReleaseValue(output);
  for (size_t i = 0; inputs && i < s->n_in; i++)
    if (inputs[i]) g_ort->ReleaseValue(inputs[i]);
  free(inputs);
  free(zeros);
  if (mem) g_ort->ReleaseMemoryInfo(mem);
  if (ids) (*env)->ReleaseLongArrayElements(env, jids, ids, JNI_ABORT);
  if (mask) (*env)->ReleaseLongArrayElements(env, jmask, mask, JNI_ABORT);
  return result;
}

JNIEXPORT void JNICALL Java_com_pocketformer_demo_OrtSession_nativeClose(JNIEnv* env, jclass cls, jlong h) {
  (void)env;
  (void)cls;
  pf_free_session((PfSession*)(intptr_t)h);
}
