// The compiled graph's LoRA op, `adapterserve::apply_lora_linear`, with its steady state in C++.
//
// In a compiled forward pass every LoRA linear layer calls this op (compiled.py). What a
// layer does depends on the step's token-to-slot mapping and on the slots' contents. The
// contents change only when an adapter is set into a slot or reset ("the slots'
// generation", compiled.py's IdleLayers); the mapping changes with the requests in the
// batch, often every step. So the op keeps, per layer, what the Python path (the fused
// wrapper, punica.py) found the last time it ran in the same slots' generation: the slices
// each slot's adapter changes (`layout.track_live_slots`) and, where the kernel applied
// the layer (lora_kernel.cpp), its arguments. In each step, over the step's mapping
// (published by the wrapper when vLLM updates it):
//   - no slot in use changes the layer: return at once (idle);
//   - the step's plan is the kernel's (the wrapper says so when it makes the plan, at the
//     step's first live layer) and the layer was applied by it: apply it again, here, for
//     the slices the slots in use change.
// Anything else, or any doubt (another slots' generation, no plan or another form for the
// step, another token count, dtype or layout), goes to the Python path through the
// dispatcher (`adapterserve::apply_lora_linear_miss`), which computes and, where it can,
// remembers. The kernel is the same function with the same arguments either way, so the
// output is the same bits. The pointers kept here stay valid: a layer's slot tensors are
// allocated once by vLLM and kept with the layer (the wrapper's cache of fused slots holds
// them), and the step's mapping is vLLM's persistent index buffer (punica_base.py), held by
// the wrapper.
//
// Why: entering Python, the wrapper's checks and ctypes cost ~14 us of a ~23 us live layer
// call in the engine, ~120 calls a decode step (bench/RESULTS.md). Keyed on the slots in
// use (as at first), every step in which a request started or ended with an adapter of its
// own went to Python for every layer: most steps, at 16 adapters over 16 requests.
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
  int64_t generation = -1;  // what follows holds for this slots' generation only
  int64_t wrapper = -1;     // the punica wrapper (engine) whose step it reads
  std::vector<int64_t> live_of_slot;  // per slot, the slices its adapter changes (bit i: slice i)
  bool kernel = false;      // the kernel applied the layer: its arguments follow
  int dtype = -1;           // 0 float32, 1 bfloat16
  const void* a = nullptr;
  int64_t k = 0, rank_sum = 0, rank = 0, threads = 0, width = 0;
  std::vector<int64_t> sizes;
  std::vector<const void*> b;
};

struct Step {
  int64_t tokens = -1;  // -1: no mapping published for the wrapper's current step
  const int64_t* slot_of = nullptr;
  bool kernel = false;  // the step's plan is the kernel's (known once the wrapper made it)
  std::vector<int64_t> used;  // the distinct slots the step's tokens use, found once per step
};

int64_t current_generation = 0;
std::vector<LayerMemo> memos;  // by layer key
std::vector<Step> steps;       // by wrapper index

// The slices the step's slots change in this layer; -1 where a slot is outside the memo.
int64_t step_live(const LayerMemo& m, const Step& s) {
  int64_t live = 0;
  const int64_t slots = int64_t(m.live_of_slot.size());
  for (const int64_t slot : s.used) {
    if (slot >= slots) return -1;
    live |= m.live_of_slot[slot];
  }
  return live;
}

// The distinct slots (>= 0) of `tokens` tokens mapped by `slot_of`, in `used`.
void find_used(const int64_t* slot_of, int64_t tokens, std::vector<int64_t>& used) {
  used.clear();
  std::vector<char> seen;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slot_of[t];
    if (slot < 0) continue;
    if (slot >= 4096) {  // no engine has that many slots: kept, so that step_live sends the layer to Python
      used.push_back(slot);
      continue;
    }
    if (slot >= int64_t(seen.size())) seen.resize(slot + 1, 0);
    if (!seen[slot]) {
      seen[slot] = 1;
      used.push_back(slot);
    }
  }
}

void apply_miss(at::Tensor& output, const at::Tensor& x, int64_t key) {
  static auto miss = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("adapterserve::apply_lora_linear_miss", "")
                         .typed<void(at::Tensor&, const at::Tensor&, int64_t)>();
  miss.call(output, x, key);
}

bool fits(const LayerMemo& m, const Step& s, const at::Tensor& output, const at::Tensor& x) {
  const auto dtype = m.dtype == 0 ? at::kFloat : at::kBFloat16;
  return x.dim() == 2 && output.dim() == 2 && output.size(0) == s.tokens && output.size(1) >= m.width &&
         x.size(1) == m.k && x.scalar_type() == dtype && output.scalar_type() == dtype && x.stride(1) == 1 &&
         output.stride(1) == 1;
}

void apply_lora_linear(at::Tensor& output, const at::Tensor& x, int64_t key) {
  if (key >= 0 && key < int64_t(memos.size())) {
    const LayerMemo& m = memos[key];
    const Step* s = m.generation == current_generation && m.wrapper >= 0 ? &steps[m.wrapper] : nullptr;
    if (s != nullptr && s->slot_of != nullptr && x.dim() >= 1 && x.size(0) == s->tokens) {
      const int64_t live = step_live(m, *s);
      if (live == 0) return;
      if (live > 0 && m.kernel && s->kernel && fits(m, *s, output, x)) {
        const int64_t slices = int64_t(m.sizes.size());
        if (m.dtype == 0)
          apply(output.data_ptr<float>(), output.stride(0), x.data_ptr<float>(), x.stride(0), m.k,
                static_cast<const float*>(m.a), m.rank_sum, s->slot_of, s->tokens, slices, m.sizes.data(),
                reinterpret_cast<const float* const*>(m.b.data()), m.rank, live, 1.0f, m.threads);
        else
          apply(reinterpret_cast<uint16_t*>(output.data_ptr()), output.stride(0),
                reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), m.k, static_cast<const uint16_t*>(m.a),
                m.rank_sum, s->slot_of, s->tokens, slices, m.sizes.data(),
                reinterpret_cast<const uint16_t* const*>(m.b.data()), m.rank, live, 1.0f, m.threads);
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

// The slots' generation: a slot's adapter was set or reset (every memo of another one is void).
void adapterserve_lora_op_set_generation(int64_t generation) { current_generation = generation; }

// A wrapper's step: `tokens` tokens mapped by `slot_of` (int64, contiguous; tokens -1: none),
// `kernel` 1 where the step's plan is the kernel's.
void adapterserve_lora_op_set_step(int64_t wrapper, int64_t tokens, const int64_t* slot_of, int64_t kernel) {
  if (wrapper < 0) return;
  if (wrapper >= int64_t(steps.size())) steps.resize(wrapper + 1);
  Step& s = steps[wrapper];
  s.tokens = slot_of == nullptr ? -1 : tokens;
  s.slot_of = slot_of;
  s.kernel = slot_of != nullptr && kernel != 0;
  find_used(slot_of, s.tokens, s.used);  // once here, not in each of the step's ~120 layer calls
}

namespace {
LayerMemo* memo_for(int64_t key, int64_t generation, int64_t wrapper, const int64_t* live_of_slot, int64_t slots) {
  if (key < 0 || wrapper < 0 || slots < 0 || (slots > 0 && live_of_slot == nullptr)) return nullptr;
  if (key >= int64_t(memos.size())) memos.resize(key + 1);
  if (wrapper >= int64_t(steps.size())) steps.resize(wrapper + 1);
  LayerMemo& m = memos[key];
  m = LayerMemo{};
  m.generation = generation;
  m.wrapper = wrapper;
  m.live_of_slot.assign(live_of_slot, live_of_slot + slots);
  return &m;
}
}  // namespace

// Layer `key`, read with `wrapper`'s steps, changes in slot s the slices live_of_slot[s]
// (for `slots` slots) in `generation`; no slot in use: idle. Not applied by the kernel.
void adapterserve_lora_op_remember_idle(int64_t key, int64_t generation, int64_t wrapper, const int64_t* live_of_slot,
                                        int64_t slots) {
  memo_for(key, generation, wrapper, live_of_slot, slots);
}

// As `remember_idle`, and the kernel applied the layer, with these arguments (see
// lora_kernel.cpp; `dtype` 0 float32, 1 bfloat16).
void adapterserve_lora_op_remember_kernel(int64_t key, int64_t generation, int64_t wrapper, const int64_t* live_of_slot,
                                          int64_t slots, int64_t dtype, const void* a, int64_t k, int64_t rank_sum,
                                          int64_t slices, const int64_t* sizes, const void* const* b, int64_t rank,
                                          int64_t threads) {
  if (dtype != 0 && dtype != 1) return;
  LayerMemo* m = memo_for(key, generation, wrapper, live_of_slot, slots);
  if (m == nullptr) return;
  m->kernel = true;
  m->dtype = int(dtype);
  m->a = a;
  m->k = k;
  m->rank_sum = rank_sum;
  m->rank = rank;
  m->threads = threads;
  m->sizes.assign(sizes, sizes + slices);
  m->b.assign(b, b + slices);
  m->width = 0;
  for (int64_t i = 0; i < slices; ++i) m->width += sizes[i];
}
}
