// Registers the CPU implementation of every op as a call into the kernel variant chosen for this
// CPU (kernel_table.h). The op names and schemas are those of lavae_fast/op_schemas.inc (defined
// from it by lavae_fast/engine/ops.py and norm.py); this file does not read it:
// tests/cpp/test_kernels.cpp checks these registrations against it (every op there has a kernel
// here, no kernel here lacks a schema there, and the dispatcher checks each kernel's signature
// against its schema).
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

#include "kernel_table.h"

namespace lavae_fast {
namespace {

struct Variant {
  const char* name;
  const KernelTable* (*table)();
  bool (*cpu_runs)();
};

bool always() { return true; }

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
// __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV).
bool cpu_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
}
bool cpu_avx512() {
  __builtin_cpu_init();
  return cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#else
bool cpu_avx2() { return false; }
bool cpu_avx512() { return false; }
#endif

// In increasing order of capability.
const Variant kVariants[] = {
    {"default", &baseline::kernel_table, &always},
    {"avx2", &avx2::kernel_table, &cpu_avx2},
    {"avx512", &avx512::kernel_table, &cpu_avx512},
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

int variant_index(const std::string& name) {
  for (int i = 0; i < kNumVariants; ++i)
    if (name == kVariants[i].name) return i;
  return -1;
}

bool usable(int i) { return kVariants[i].table() != nullptr && kVariants[i].cpu_runs(); }

// The cap requested through the environment, or kNumVariants − 1 (none). An unknown value is an
// error rather than silently ignored: a benchmark run under a mistyped cap would mislabel its rows.
int requested_cap() {
  for (const char* var : {"LAVAE_FAST_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"}) {
    const char* v = std::getenv(var);
    if (v == nullptr || *v == '\0') continue;
    std::string s(v);
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    if (s == "avx512_vnni" || s == "avx512_bf16" || s == "amx") s = "avx512";  // newer ATen names
    const int i = variant_index(s);
    TORCH_CHECK(i >= 0, "lavae_fast: ", var, "=", v, " is not a known CPU capability (default, avx2, avx512)");
    return i;
  }
  return kNumVariants - 1;
}

std::atomic<const KernelTable*> g_active{nullptr};
std::mutex g_mutex;

const KernelTable* choose() {
  const int cap = requested_cap();
  for (int i = cap; i >= 0; --i)
    if (usable(i)) return kVariants[i].table();
  TORCH_INTERNAL_ASSERT(false, "lavae_fast: the baseline kernel variant is missing");
}

}  // namespace

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    std::lock_guard<std::mutex> lock(g_mutex);
    t = g_active.load(std::memory_order_relaxed);
    if (t == nullptr) {
      t = choose();
      g_active.store(t, std::memory_order_release);
    }
  }
  return *t;
}

std::string cpu_capability() { return active_kernels().name; }

void set_cpu_capability(const std::string& name) {
  const int i = variant_index(name);
  TORCH_CHECK(i >= 0, "lavae_fast: unknown CPU capability '", name, "' (default, avx2, avx512)");
  TORCH_CHECK(kVariants[i].table() != nullptr, "lavae_fast: the '", name,
              "' kernels are not built into this extension (built with GCC on x86-64 only)");
  TORCH_CHECK(kVariants[i].cpu_runs(), "lavae_fast: this CPU cannot run the '", name, "' kernels");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_active.store(kVariants[i].table(), std::memory_order_release);
}

std::vector<std::string> available_cpu_capabilities() {
  std::vector<std::string> out;
  for (int i = 0; i < kNumVariants; ++i)
    if (usable(i)) out.emplace_back(kVariants[i].name);
  return out;
}

namespace {

// One registered function per op, forwarding to the active variant's entry point.
template <auto Member>
struct Forward;
template <typename R, typename... A, R (*KernelTable::*Member)(A...)>
struct Forward<Member> {
  static R call(A... args) { return (active_kernels().*Member)(std::forward<A>(args)...); }
};

}  // namespace

TORCH_LIBRARY_IMPL(lavae_fast, CPU, m) {
  m.impl("count_objects", &Forward<&KernelTable::count_objects>::call);
  m.impl("place_loglik", &Forward<&KernelTable::place_loglik>::call);
  m.impl("place_loglik_backward", &Forward<&KernelTable::place_loglik_backward>::call);
  m.impl("gather_appearance", &Forward<&KernelTable::gather_appearance>::call);
  m.impl("gather_appearance_backward", &Forward<&KernelTable::gather_appearance_backward>::call);
  m.impl("gumbel_topk_relaxed", &Forward<&KernelTable::gumbel_topk_relaxed>::call);
  m.impl("gumbel_topk_relaxed_backward", &Forward<&KernelTable::gumbel_topk_relaxed_backward>::call);
  m.impl("lrelu_batch_norm", &Forward<&KernelTable::lrelu_batch_norm>::call);
  m.impl("lrelu_batch_norm_backward", &Forward<&KernelTable::lrelu_batch_norm_backward>::call);
}

}  // namespace lavae_fast
