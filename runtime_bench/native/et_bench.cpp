// pf-et-bench: benchmark a .pte program with the ExecuTorch Module API.
// Linked against the libraries the executorch wheel ships: the runtime, the optimized and
// quantized kernels, the XNNPACK delegate and the shared thread pool.
#include "bench_common.h"

#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/runtime.h>

#include <optional>
#include <string>
#include <vector>

#ifndef PF_RUNTIME_VERSION
#define PF_RUNTIME_VERSION "unknown"
#endif

// The wheel ships libexecutorch_threadpool.so but not threadpool.h. These declarations
// match the exported symbols (non-virtual members: only the names and arguments matter).
namespace executorch {
namespace extension {
namespace threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace threadpool
}  // namespace extension
}  // namespace executorch

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

static int from_et(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return PF_F32;
    case ScalarType::Long: return PF_I64;
    case ScalarType::Int: return PF_I32;
    case ScalarType::Bool: return PF_BOOL;
    case ScalarType::Byte: return PF_U8;
    case ScalarType::Half: return PF_F16;
    case ScalarType::Double: return PF_F64;
    case ScalarType::Char: return PF_I8;
    case ScalarType::Short: return PF_I16;
    default: return PF_UNKNOWN;
  }
}

static ScalarType to_et(int dt) {
  switch (dt) {
    case PF_F32: return ScalarType::Float;
    case PF_I64: return ScalarType::Long;
    case PF_I32: return ScalarType::Int;
    case PF_BOOL: return ScalarType::Bool;
    case PF_U8: return ScalarType::Byte;
    case PF_F16: return ScalarType::Half;
    case PF_F64: return ScalarType::Double;
    case PF_I8: return ScalarType::Char;
    default: return ScalarType::Short;
  }
}

static void et_check(Error e, const char* what) {
  if (e != Error::Ok) pf_die(PF_EXIT_RUNTIME, "%s failed (ExecuTorch error 0x%x)", what, (unsigned)e);
}

// ---------------------------------------------------------------- --generate
// The KV cache lives in the program's mutable buffers, which the loaded Method keeps between
// calls: nothing to reset (positions past the current one are masked, and a new prompt
// overwrites the cache from position 0, as EtGenerator does). The input tensors are
// preallocated once (prompt [1, P], one token [1, 1], position [1]) and only their data changes.
struct EtGen {
  Module* module;
  int64_t tok = 0;
  int64_t pos = 0;
  const int64_t* prompt = nullptr;
  executorch::extension::TensorPtr t_prompt, t_tok, t_pos;
  std::vector<EValue> in;
  std::optional<executorch::runtime::Result<std::vector<EValue>>> out;
};

static void et_gen_reset(void*) {}

static const float* et_gen_step(void* c, const int64_t* ids, long t, int64_t pos, long* vocab) {
  EtGen* g = (EtGen*)c;
  g->pos = pos;
  if (t == 1) {
    g->tok = ids[0];
    g->in[0] = EValue(*g->t_tok);
  } else {
    if (ids != g->prompt) pf_die(PF_EXIT_RUNTIME, "internal: multi-token step is not the prompt");
    g->in[0] = EValue(*g->t_prompt);
  }
  g->out.reset();
  g->out.emplace(g->module->execute("forward", g->in));
  if (!g->out->ok())
    pf_die(PF_EXIT_RUNTIME, "execute('forward') at position %lld with %ld tokens failed (ExecuTorch error 0x%x)",
           (long long)pos, t, (unsigned)g->out->error());
  const std::vector<EValue>& outs = **g->out;
  if (outs.empty() || !outs[0].isTensor()) pf_die(PF_EXIT_RUNTIME, "forward returned no logits tensor");
  // [1, t, V] from a program exported with every position's logits, [1, 1, V] (the last
  // position) from one exported with --gen-logits last, the default
  const auto& logits = outs[0].toTensor();
  if (logits.scalar_type() != ScalarType::Float || logits.dim() != 3 ||
      (logits.size(1) != t && logits.size(1) != 1))
    pf_die(PF_EXIT_RUNTIME, "logits are not float32 [1, %ld or 1, V] (dtype %d, %d dims)", t,
           (int)logits.scalar_type(), (int)logits.dim());
  *vocab = (long)logits.size(2);
  return logits.const_data_ptr<float>() + (size_t)(logits.size(1) - 1) * (size_t)*vocab;
}

static void et_generate(PfArgs* a, PfGen* pg, Module& module, PfResult* res) {
  auto meta = module.method_meta("forward");
  if (!meta.ok()) pf_die(PF_EXIT_RUNTIME, "method_meta('forward') failed (0x%x)", (unsigned)meta.error());
  if (meta->num_inputs() != 2)
    pf_die(PF_EXIT_BAD_INPUT, "--generate: '%s' has %zu inputs; a -gen program takes (tokens, input_pos)",
           a->model, meta->num_inputs());
  for (size_t i = 0; i < 2; i++) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok() || info->scalar_type() != ScalarType::Long)
      pf_die(PF_EXIT_BAD_INPUT, "--generate: input %zu of '%s' is not an int64 tensor", i, a->model);
  }
  auto tok_meta = meta->input_tensor_meta(0);
  auto pos_meta = meta->input_tensor_meta(1);
  auto sizes = tok_meta->sizes();
  if (sizes.size() != 2 || sizes[0] != 1 || pos_meta->sizes().size() != 1 || pos_meta->sizes()[0] != 1)
    pf_die(PF_EXIT_BAD_INPUT, "--generate: '%s' is not a -gen program: expected inputs tokens [1, T] and "
           "input_pos [1]", a->model);
  long max_t = (long)sizes[1];    // the upper bound of the dynamic T
  if (pg->prompt_tokens > max_t)
    pf_die(PF_EXIT_BAD_INPUT, "--generate %ld,...: the program takes at most %ld tokens per call",
           pg->prompt_tokens, max_t);
  // pocketformer exports T in 1 .. max_len - 1, so the cache holds max_t + 1 positions.
  pg->max_len = max_t + 1;
  pf_check_fits(pg, pg->max_len, "max_len = the tokens bound + 1, as pocketformer exports it");

  static EtGen g;
  g.module = &module;
  g.prompt = pg->prompt;
  g.t_prompt = executorch::extension::from_blob(pg->prompt, {1, (executorch::aten::SizesType)pg->prompt_tokens},
                                                ScalarType::Long);
  g.t_tok = executorch::extension::from_blob(&g.tok, {1, 1}, ScalarType::Long);
  g.t_pos = executorch::extension::from_blob(&g.pos, {1}, ScalarType::Long);
  g.in.clear();
  g.in.emplace_back(*g.t_tok);
  g.in.emplace_back(*g.t_pos);
  pf_generate(a, pg, &g, et_gen_reset, et_gen_step);
  res->first_inference_ms = pg->probe_ms;
  res->latencies_ms = pg->decode_ms;    // as the Python worker: one entry per decode step
  res->n_latencies = pg->n_decode;
  res->gen = pg;
}

int main(int argc, char** argv) {
  pf_prog = "pf-et-bench";
  static PfArgs a;
  pf_parse_args(argc, argv, &a);
  pf_check_model_file(a.model);
  pf_load_input_files(&a);
  static PfGen gen;
  if (a.generate) pf_load_prompt(&a, &gen);

  double rss_before = pf_status_mb("VmRSS");
  executorch::runtime::runtime_init();

  // The pool must be sized before the XNNPACK delegate initialises: it keeps the pool pointer.
  int threads_applied = 0;
  long threads_effective = -1;
  {
    auto* tp = executorch::extension::threadpool::get_threadpool();
    if (tp) {
      if (a.threads > 0) tp->_unsafe_reset_threadpool((uint32_t)a.threads);
      threads_effective = (long)tp->get_thread_count();
      threads_applied = a.threads == 0 || threads_effective == a.threads;
    }
  }

  double t0 = pf_now_ms();
  Module module(a.model, Module::LoadMode::Mmap);
  // a file that is not a loadable program is bad input (exit 2), like the ORT runner's
  if (module.load() != Error::Ok)
    pf_die(PF_EXIT_BAD_INPUT, "'%s' is not a loadable ExecuTorch program", a.model);
  et_check(module.load_method("forward"), "loading method 'forward'");
  double load_ms = pf_now_ms() - t0;

  if (a.generate) {
    PfResult res;
    memset(&res, 0, sizeof res);
    res.runner = "executorch-native";
    res.runtime_version = PF_RUNTIME_VERSION;
    res.threads_applied = threads_applied;
    res.threads_effective = threads_effective;
    res.rss_before_load_mb = rss_before;
    res.load_ms = load_ms;
    et_generate(&a, &gen, module, &res);
    PfOutput logits;
    pf_gen_output(&gen, &logits);
    res.outputs = &logits;
    res.n_outputs = 1;
    pf_write_json(&a, &res);
    return 0;
  }

  auto meta = module.method_meta("forward");
  if (!meta.ok()) pf_die(PF_EXIT_RUNTIME, "method_meta('forward') failed (0x%x)", (unsigned)meta.error());
  size_t n_in = meta->num_inputs();
  if (n_in > PF_MAX_INPUTS) pf_die(PF_EXIT_RUNTIME, "model has %zu inputs (max %d)", n_in, PF_MAX_INPUTS);
  if (a.n_inputs > 0 && (size_t)a.n_inputs != n_in)
    pf_die(PF_EXIT_BAD_INPUT, "--input given %d times but model '%s' has %zu inputs", a.n_inputs, a.model, n_in);

  std::vector<executorch::extension::TensorPtr> tensors;
  std::vector<EValue> inputs;
  for (size_t i = 0; i < n_in; i++) {
    auto tag = meta->input_tag(i);
    if (!tag.ok() || *tag != executorch::runtime::Tag::Tensor)
      pf_die(PF_EXIT_RUNTIME, "model input %zu is not a tensor (only tensor inputs are supported)", i);
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) pf_die(PF_EXIT_RUNTIME, "input_tensor_meta(%zu) failed", i);
    int mdt = from_et(info->scalar_type());
    auto sizes = info->sizes();
    PfInput* in = &a.inputs[i];
    if (a.n_inputs > 0) {
      if (!pf_dtype_compatible(in->dtype, mdt))
        pf_die(PF_EXIT_BAD_INPUT, "--input %zu ('%s'): dtype %s but model input %zu is %s", i, in->file,
               pf_dtype_name(in->dtype), i, pf_dtype_name(mdt));
      if ((size_t)in->ndims != sizes.size())
        pf_die(PF_EXIT_BAD_INPUT, "--input %zu ('%s'): %d dims but model input %zu has %zu", i, in->file,
               in->ndims, i, sizes.size());
      // Dynamic-shape programs record upper bounds: a smaller size is allowed.
      for (size_t d = 0; d < sizes.size(); d++)
        if (in->dims[d] > sizes[d])
          pf_die(PF_EXIT_BAD_INPUT, "--input %zu ('%s'): dim %zu is %lld, model allows at most %d", i, in->file,
                 d, (long long)in->dims[d], (int)sizes[d]);
    } else {
      if (mdt == PF_UNKNOWN || mdt == PF_F16)
        pf_die(PF_EXIT_BAD_INPUT, "model input %zu has scalar type %d: pass it with --input", i,
               (int)info->scalar_type());
      memset(in, 0, sizeof *in);
      in->dtype = mdt;
      in->ndims = (int)sizes.size();
      for (size_t d = 0; d < sizes.size(); d++) in->dims[d] = sizes[d];
      pf_fill_random(in, a.seed, (int)i);
    }
    std::vector<executorch::aten::SizesType> shape(in->dims, in->dims + in->ndims);
    tensors.push_back(executorch::extension::from_blob(in->data, shape, to_et(mdt)));
    inputs.emplace_back(*tensors.back());
  }

  double t = pf_now_ms();
  auto result = module.execute("forward", inputs);
  double first_ms = pf_now_ms() - t;
  if (!result.ok()) pf_die(PF_EXIT_RUNTIME, "execute('forward') failed (ExecuTorch error 0x%x)",
                           (unsigned)result.error());
  for (long w = 0; w < a.warmup; w++) {
    auto r = module.execute("forward", inputs);
    if (!r.ok()) pf_die(PF_EXIT_RUNTIME, "execute('forward') failed in warm-up (0x%x)", (unsigned)r.error());
  }
  std::vector<double> lat((size_t)a.runs);
  std::optional<executorch::runtime::Result<std::vector<EValue>>> last;
  for (long r = 0; r < a.runs; r++) {
    last.reset();
    t = pf_now_ms();
    last.emplace(module.execute("forward", inputs));
    lat[(size_t)r] = pf_now_ms() - t;
    if (!last->ok()) pf_die(PF_EXIT_RUNTIME, "execute('forward') failed (0x%x)", (unsigned)last->error());
  }

  // Outputs of the last timed run (they live in the method's planned memory).
  const std::vector<EValue>& outs_ev = **last;
  std::vector<PfOutput> outs(outs_ev.size());
  std::vector<int64_t> scalars(outs_ev.size());
  std::vector<double> scalars_d(outs_ev.size());
  for (size_t i = 0; i < outs_ev.size(); i++) {
    PfOutput* o = &outs[i];
    memset(o, 0, sizeof *o);
    const EValue& ev = outs_ev[i];
    if (ev.isTensor()) {
      const auto& ten = ev.toTensor();
      o->dtype = from_et(ten.scalar_type());
      o->ndims = (int)ten.dim();
      for (int d = 0; d < o->ndims && d < PF_MAX_DIMS; d++) o->dims[d] = ten.size(d);
      o->numel = o->dtype == PF_UNKNOWN ? 0 : (size_t)ten.numel();
      o->data = ten.const_data_ptr();
    } else if (ev.isInt()) {
      scalars[i] = ev.toInt();
      o->dtype = PF_I64; o->numel = 1; o->data = &scalars[i];
    } else if (ev.isDouble()) {
      scalars_d[i] = ev.toDouble();
      o->dtype = PF_F64; o->numel = 1; o->data = &scalars_d[i];
    } else {
      o->dtype = PF_UNKNOWN;
    }
  }

  PfResult res;
  memset(&res, 0, sizeof res);
  res.runner = "executorch-native";
  res.runtime_version = PF_RUNTIME_VERSION;
  res.threads_applied = threads_applied;
  res.threads_effective = threads_effective;
  res.rss_before_load_mb = rss_before;
  res.load_ms = load_ms;
  res.first_inference_ms = first_ms;
  res.latencies_ms = lat.data();
  res.n_latencies = a.runs;
  res.outputs = outs.data();
  res.n_outputs = (int)outs.size();
  res.inputs = a.inputs;
  res.n_inputs = (int)n_in;
  pf_write_json(&a, &res);
  return 0;
}
