// A SIMT emulator that runs specee's CUDA kernels (csrc/cuda/*.cuh, unchanged but for the launch syntax) on
// the CPU, so that tests can check the kernels' logic against the torch references without a GPU.
//
// Every CUDA thread of a block is a fiber (its own stack) on one OS thread; blocks run one after another. A fiber
// runs until it reaches a synchronization point (__syncthreads, a warp shuffle or vote), then the scheduler
// resumes the next fiber whose barrier has been released. Barriers are strict: every thread of the block
// (of the warp, for the *_sync intrinsics with a full mask) must reach the same barrier, otherwise the launch
// fails with a message naming the stuck threads (CUDA would hang or be undefined there). The order in which
// fibers run between barriers can be forward, reverse or shuffled (seeded), which moves the interleaving of
// shared-memory accesses and so exposes some races; dynamic shared memory starts filled with a poison
// pattern (NaN as fp32, -1 as int32) so that reading an element no thread wrote shows up in the results.
//
// What it does not check: timing, coalescing, the memory model beyond barrier order, register/shared
// limits, or what nvcc generates (the code is compiled by the host compiler: fp contraction may differ).
// The shim headers cuda_runtime.h, cuda_fp16.h and cuda_bf16.h in this folder include this file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One block runs at a time, so a function-local static is exactly one block's __shared__ variable. The launch
// rewriter (tests/cuda_emu/__init__.py) turns `extern __shared__ T name[];` into a pointer to the dynamic buffer.
#define __shared__ static

using std::isnan;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

// ------------------------------------------------------------------------------------------------ fp16 / bf16
struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};
inline __half __ushort_as_half(unsigned short r) { return __half{r}; }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu;
  if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
  const float mag = std::ldexp(float(man), -24);  // subnormal (or zero): man * 2^-24, exact in fp32
  return sign ? -mag : mag;
}

template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}

// ------------------------------------------------------------------------------------------------ runtime API
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace specee_emu {

constexpr int kWarp = 32;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // an H100's opt-in limit
constexpr size_t kStackBytes = 64 * 1024;

enum class Wait { kNone, kBlock, kWarp };
enum class Order { kForward = 0, kReverse = 1, kShuffle = 2 };

// Context switch. x86-64: saves the callee-saved registers and swaps stacks (ucontext's swapcontext makes a
// sigprocmask syscall per switch: the tests ran 10x slower); elsewhere ucontext. The asm defines a global symbol:
// one translation unit (harness.cpp) includes this header.
#if defined(__x86_64__)
extern "C" void specee_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl specee_emu_switch
  .type specee_emu_switch, @function
specee_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size specee_emu_switch, .-specee_emu_switch
)");
struct Context {
  void* sp = nullptr;
  void Switch(Context& to) { specee_emu_switch(&sp, to.sp); }
  // A fresh stack whose first switch enters entry() as if called (rsp = 8 mod 16 at entry); entry never returns.
  void Make(char* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
    void** p = reinterpret_cast<void**>(top);
    *--p = nullptr;                              // entry's return address (never used)
    *--p = reinterpret_cast<void*>(entry);       // popped by ret
    for (int i = 0; i < 6; ++i) *--p = nullptr;  // rbp rbx r12-r15
    sp = p;
  }
};
#else
#include <ucontext.h>
struct Context {
  ucontext_t uc;
  void Switch(Context& to) { swapcontext(&uc, &to.uc); }
  void Make(char* stack, size_t bytes, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
#endif

struct Fiber {
  Context ctx;
  uint3 tid;
  unsigned linear = 0;
  bool done = false;
  Wait wait = Wait::kNone;
  uint64_t wait_gen = 0;
};

struct Barrier {
  unsigned arrived = 0, expected = 0;
  uint64_t gen = 0;
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // one shuffle slot per thread
  Barrier block;
  Fiber* current = nullptr;
  Context scheduler;
  void (*body)(void*) = nullptr;  // the launch's kernel call, run by every fiber
  void* body_arg = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim, block_dim;
  std::vector<unsigned char> dynamic_shared;
  cudaError_t last_error = cudaSuccess;
  std::string message;  // why the last launch failed
  Order order = Order::kForward;
  uint64_t seed = 0;
  std::vector<std::pair<const void*, size_t>> shared_limits;  // kernel -> max dynamic shared bytes
};

inline State& S() {
  static State s;
  return s;
}

inline Fiber& Current() { return *S().current; }
inline void* DynamicShared() { return S().dynamic_shared.data(); }

inline void Yield() { Current().ctx.Switch(S().scheduler); }

inline void Arrive(Barrier& b, Wait kind) {
  Fiber& f = Current();
  const uint64_t gen = b.gen;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  f.wait = kind;
  f.wait_gen = gen;
  while (b.gen == gen) Yield();
  f.wait = Wait::kNone;
}

inline Barrier& WarpOf(const Fiber& f) { return S().warps[f.linear / kWarp]; }

inline void CheckFullMask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) {
    S().message = std::string(what) + ": the emulator supports only the full mask 0xffffffff";
    throw std::runtime_error(S().message);
  }
}

template <typename T>
inline uint64_t Bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T FromBits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// A warp collective: every lane publishes v; once all have, read(slots, lanes) computes this lane's result from
// the warp's published values (slots[l] = lane l's bits).
template <typename T, typename Read>
inline T WarpCollective(T v, Read read) {
  Fiber& f = Current();
  Barrier& warp = WarpOf(f);
  const uint64_t* slots = S().lanes.data() + (f.linear - f.linear % kWarp);
  S().lanes[f.linear] = Bits(v);
  Arrive(warp, Wait::kWarp);
  const T r = read(slots, warp.expected);
  Arrive(warp, Wait::kWarp);  // nobody overwrites a slot before every lane has read
  return r;
}

// Every lane reads lane src(lane)'s value (its own when src is outside the warp).
template <typename T, typename Src>
inline T Exchange(T v, Src src) {
  const int lane = int(Current().linear % kWarp);
  return WarpCollective(v, [&](const uint64_t* slots, unsigned) {
    const int from = src(lane);
    return (from >= 0 && from < kWarp) ? FromBits<T>(slots[from]) : v;
  });
}

inline bool Released(const Fiber& f) {
  if (f.wait == Wait::kBlock) return S().block.gen != f.wait_gen;
  if (f.wait == Wait::kWarp) return WarpOf(f).gen != f.wait_gen;
  return true;
}

// Every fiber starts here: runs the kernel body, then hands control back for good.
inline void FiberMain() {
  try {
    S().body(S().body_arg);
  } catch (const std::exception& e) {
    if (S().message.empty()) S().message = e.what();
  }
  Current().done = true;
  Current().ctx.Switch(S().scheduler);
  std::abort();  // a finished fiber is never resumed
}

// Runs one block; returns false (with S().message) when the threads deadlock.
template <typename Body>
inline bool RunBlock(Body& body, std::mt19937_64& rng) {
  State& s = S();
  const unsigned n = s.block_dim.x * s.block_dim.y * s.block_dim.z;
  s.fibers.assign(n, Fiber{});
  s.lanes.assign(n, 0);
  s.warps.assign((n + kWarp - 1) / kWarp, Barrier{});
  for (unsigned w = 0; w < s.warps.size(); ++w) s.warps[w].expected = std::min<unsigned>(kWarp, n - w * kWarp);
  s.block = Barrier{};
  s.block.expected = n;
  if (s.stacks.size() < size_t(n) * kStackBytes) s.stacks.resize(size_t(n) * kStackBytes);
  s.body = [](void* b) { (*static_cast<Body*>(b))(); };
  s.body_arg = &body;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.linear = i;
    f.tid = {i % s.block_dim.x, (i / s.block_dim.x) % s.block_dim.y, i / (s.block_dim.x * s.block_dim.y)};
    f.ctx.Make(s.stacks.data() + size_t(i) * kStackBytes, kStackBytes, &FiberMain);
  }
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = s.order == Order::kReverse ? n - 1 - i : i;
  unsigned live = n;
  while (live > 0) {
    if (s.order == Order::kShuffle) std::shuffle(order.begin(), order.end(), rng);
    bool progress = false;
    for (unsigned i : order) {
      Fiber& f = s.fibers[i];
      if (f.done || !Released(f)) continue;
      s.current = &f;
      s.scheduler.Switch(f.ctx);
      progress = true;
      if (f.done) --live;
      if (!s.message.empty()) return false;
    }
    if (!progress) {
      unsigned at_block = 0, at_warp = 0, exited = 0, first_warp = n;
      for (const Fiber& f : s.fibers) {
        if (f.done) ++exited;
        else if (f.wait == Wait::kBlock) ++at_block;
        else if (f.wait == Wait::kWarp) ++at_warp, first_warp = std::min(first_warp, f.linear);
      }
      s.message = "deadlock in block (" + std::to_string(s.block_idx.x) + ", " + std::to_string(s.block_idx.y) +
                  "): " + std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
                  " at a warp shuffle/vote (first: thread " + std::to_string(first_warp) + "), " +
                  std::to_string(exited) + " have exited: not every thread reaches the same barrier";
      return false;
    }
  }
  return true;
}

inline size_t SharedLimit(const void* kernel) {
  for (const auto& [k, bytes] : S().shared_limits)
    if (k == kernel) return bytes;
  return kDefaultDynamicShared;
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to Launch(kernel, grid, block, smem, stream,
// [&] { kernel(args); }). Runs the whole grid before returning.
template <typename Kernel, typename Body>
inline void Launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Body body) {
  State& s = S();
  s.message.clear();
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    s.last_error = cudaErrorInvalidConfiguration;
    s.message = "invalid launch configuration: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                ", " + std::to_string(grid.z) + "), block of " + std::to_string(threads) + " threads";
    return;
  }
  if (smem > SharedLimit(reinterpret_cast<const void*>(kernel))) {
    s.last_error = cudaErrorInvalidValue;
    s.message = "dynamic shared memory of " + std::to_string(smem) + " bytes exceeds the kernel's limit (raise it "
                "with cudaFuncSetAttribute)";
    return;
  }
  s.grid_dim = grid;
  s.block_dim = block;
  std::mt19937_64 rng(s.seed);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        s.block_idx = {x, y, z};
        s.dynamic_shared.assign(smem + 16, 0xff);  // poison: NaN as float, -1 as int
        if (!RunBlock(body, rng)) {
          s.last_error = cudaErrorLaunchFailure;
          return;
        }
      }
}

}  // namespace specee_emu

#define threadIdx (::specee_emu::Current().tid)
#define blockIdx (::specee_emu::S().block_idx)
#define blockDim (::specee_emu::S().block_dim)
#define gridDim (::specee_emu::S().grid_dim)

inline void __syncthreads() { ::specee_emu::Arrive(::specee_emu::S().block, ::specee_emu::Wait::kBlock); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::specee_emu::CheckFullMask(mask, "__shfl_xor_sync");
  return ::specee_emu::Exchange(v, [&](int lane) {
    const int src = lane ^ lane_mask;
    return (src / width == lane / width) ? src : lane;  // outside the lane's width segment: its own value
  });
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::specee_emu::CheckFullMask(mask, "__shfl_up_sync");
  return ::specee_emu::Exchange(v, [&](int lane) { return lane % width >= int(delta) ? lane - int(delta) : lane; });
}

inline int __reduce_max_sync(unsigned mask, int v) {
  ::specee_emu::CheckFullMask(mask, "__reduce_max_sync");
  return ::specee_emu::WarpCollective(v, [](const uint64_t* slots, unsigned lanes) {
    int r = ::specee_emu::FromBits<int>(slots[0]);
    for (unsigned l = 1; l < lanes; ++l) r = std::max(r, ::specee_emu::FromBits<int>(slots[l]));
    return r;
  });
}

// Fibers never run concurrently, so a read-modify-write is atomic.
inline int atomicMin(int* p, int v) {
  const int old = *p;
  *p = std::min(old, v);
  return old;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::specee_emu::S().last_error;
  ::specee_emu::S().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = int(::specee_emu::kMaxDynamicShared);
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > ::specee_emu::kMaxDynamicShared)
    return cudaErrorInvalidValue;
  auto& limits = ::specee_emu::S().shared_limits;  // the latest value per kernel, as CUDA keeps it
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& [k, bytes] : limits)
    if (k == key) return bytes = size_t(value), cudaSuccess;
  limits.emplace_back(key, size_t(value));
  return cudaSuccess;
}
