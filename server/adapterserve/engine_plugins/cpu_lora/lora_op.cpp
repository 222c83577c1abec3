// The compiled graph's LoRA op, `adapterserve::apply_lora_linear`, with its steady state in C++.
//
// In a compiled forward pass every LoRA linear layer calls this op (compiled.py). What a
// layer does depends on the step's token-to-slot mapping and on the slots' contents, and
// from one step to the next these mostly stay the same. So the op keeps, per layer, what
// the Python path (the fused wrapper, punica.py) found the last time it ran for the same
// "generation" (compiled.py's IdleLayers: it changes whenever the slots the tokens use or
// a slot's adapter change):
//   - the layer is idle (no slot in use changes it): return at once;
//   - the kernel applied it (lora_kernel.cpp), with these slots and live slices: apply it
//     again, here, over the step's token-to-slot array (published by the wrapper when it
//     made the step's plan, cleared when the mapping changes).
// Anything else, or any doubt (another generation, no kernel plan for the step, another
// token count, dtype or layout), goes to the Python path through the dispatcher
// (`adapterserve::apply_lora_linear_miss`), which computes and, where it can, remembers.
// The kernel is the same function with the same arguments either way, so the output is
// the same bits. The pointers kept here stay valid: a layer's slot tensors are allocated
// once by vLLM and kept with the layer (the wrapper's cache of fused slots holds them), and
// the step's array is held by the wrapper's plan, withdrawn here when vLLM updates the
// mapping and replaced when the wrapper makes another plan (no op call runs in between).
//
// Why: entering Python, the wrapper's checks and ctypes cost ~14 us of a ~23 us live layer
// call in the engine, ~120 calls a decode step (bench/RESULTS.md).
//
// Built by native.py against PyTorch's headers, loaded with torch.ops.load_library (the op)
// and ctypes (the extern "C" functions below, which set the state; one process, one copy).

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

#include "lora_kernel.cpp"

namespace {

struct LayerMemo {
  int64_t generation = -1;  // what follows holds for this generation only
  int64_t live = 0;         // 0: idle; else the kernel's live slices (bit i: slice i)
  int64_t wrapper = -1;     // the punica wrapper (engine) whose step array it uses
  int dtype = -1;           // 0 float32, 1 bfloat16
  const void* a = nullptr;
  int64_t k = 0, rank_sum = 0, rank = 0, threads = 0, width = 0;
  std::vector<int64_t> sizes;
  std::vector<const void*> b;
};

struct Step {
  int64_t tokens = -1;  // -1: no kernel plan published for the wrapper's current step
  const int64_t* slot_of = nullptr;
};

int64_t current_generation = 0;
std::vector<LayerMemo> memos;  // by layer key
std::vector<Step> steps;       // by wrapper index

void apply_miss(at::Tensor& output, const at::Tensor& x, int64_t key) {
  static auto miss = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("adapterserve::apply_lora_linear_miss", "")
                         .typed<void(at::Tensor&, const at::Tensor&, int64_t)>();
  miss.call(output, x, key);
}

bool fits(const LayerMemo& m, const Step& s, const at::Tensor& output, const at::Tensor& x) {
  const auto dtype = m.dtype == 0 ? at::kFloat : at::kBFloat16;
  return s.slot_of != nullptr && x.dim() == 2 && output.dim() == 2 && x.size(0) == s.tokens &&
         output.size(0) == s.tokens && x.size(1) == m.k && output.size(1) >= m.width && x.scalar_type() == dtype &&
         output.scalar_type() == dtype && x.stride(1) == 1 && output.stride(1) == 1;
}

void apply_lora_linear(at::Tensor& output, const at::Tensor& x, int64_t key) {
  if (key >= 0 && key < int64_t(memos.size())) {
    const LayerMemo& m = memos[key];
    if (m.generation == current_generation) {
      if (m.live == 0) return;
      const Step& s = steps[m.wrapper];
      if (fits(m, s, output, x)) {
        const int64_t slices = int64_t(m.sizes.size());
        if (m.dtype == 0)
          apply(output.data_ptr<float>(), output.stride(0), x.data_ptr<float>(), x.stride(0), m.k,
                static_cast<const float*>(m.a), m.rank_sum, s.slot_of, s.tokens, slices, m.sizes.data(),
                reinterpret_cast<const float* const*>(m.b.data()), m.rank, m.live, 1.0f, m.threads);
        else
          apply(reinterpret_cast<uint16_t*>(output.data_ptr()), output.stride(0),
                reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), m.k, static_cast<const uint16_t*>(m.a),
                m.rank_sum, s.slot_of, s.tokens, slices, m.sizes.data(),
                reinterpret_cast<const uint16_t* const*>(m.b.data()), m.rank, m.live, 1.0f, m.threads);
        return;
      }
    }
  }
  apply_miss(output, x, key);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adapterserve, m) {
  m.def("apply_lora_linear(Tensor(a!) output, Tensor x, int layer_key) -> ()");
  m.impl("apply_lora_linear", c10::DispatchKey::CPU, TORCH_FN(apply_lora_linear));
}

extern "C" {

void adapterserve_lora_op_set_generation(int64_t generation) { current_generation = generation; }

// A wrapper's step: `tokens` tokens mapped by `slot_of` (int64, contiguous); tokens -1: none.
void adapterserve_lora_op_set_step(int64_t wrapper, int64_t tokens, const int64_t* slot_of) {
  if (wrapper < 0) return;
  if (wrapper >= int64_t(steps.size())) steps.resize(wrapper + 1);
  steps[wrapper] = Step{slot_of == nullptr ? -1 : tokens, slot_of};
}

// Layer `key` is idle in `generation`.
void adapterserve_lora_op_remember_idle(int64_t key, int64_t generation) {
  if (key < 0) return;
  if (key >= int64_t(memos.size())) memos.resize(key + 1);
  memos[key].generation = generation;
  memos[key].live = 0;
}

// Layer `key` was applied by the kernel in `generation`, with these arguments (see
// lora_kernel.cpp; `dtype` 0 float32, 1 bfloat16), for the step arrays of `wrapper`.
void adapterserve_lora_op_remember_kernel(int64_t key, int64_t generation, int64_t wrapper, int64_t dtype,
                                          const void* a, int64_t k, int64_t rank_sum, int64_t slices,
                                          const int64_t* sizes, const void* const* b, int64_t rank, int64_t live,
                                          int64_t threads) {
  if (key < 0 || wrapper < 0 || live == 0 || (dtype != 0 && dtype != 1)) return;
  if (key >= int64_t(memos.size())) memos.resize(key + 1);
  if (wrapper >= int64_t(steps.size())) steps.resize(wrapper + 1);
  LayerMemo& m = memos[key];
  m.generation = generation;
  m.live = live;
  m.wrapper = wrapper;
  m.dtype = int(dtype);
  m.a = a;
  m.k = k;
  m.rank_sum = rank_sum;
  m.rank = rank;
  m.threads = threads;
  m.sizes.assign(sizes, sizes + slices);
  m.b.assign(b, b + slices);
  m.width = 0;
  for (int64_t i = 0; i < slices; ++i) m.width += sizes[i];
}
}
