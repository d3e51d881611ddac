// The native steps of the shared-memory all-reduce between the ranks of one tensor-parallel replica
// on one machine (kernels/shm_all_reduce.py creates, maps and unlinks the segment, and describes the
// protocol). Each step: copy this rank's chunk into its slot, publish the step's number, wait for
// every rank's, sum all slots in rank order into the output. float32 and bfloat16 (summed in float32).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <signal.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

// The segment's layout; kernels/shm_all_reduce.py writes and reads the same offsets.
constexpr uint64_t kMagic = 0x3152415f4d485346ull;  // "FSHM_AR1" little-endian
constexpr int64_t kPage = 4096;

struct Header {  // at offset 0
  uint64_t magic, world_size, slot_bytes;
  uint64_t unused[5];
  std::atomic<uint64_t> abort_word;  // 0 while healthy; see encode_abort
};

// One per rank at kPage + rank * 128; two cache lines, so the adjacent-line prefetcher does not
// make neighbours' polling collide with this rank's publishing.
struct RankControl {
  std::atomic<uint64_t> published_step;       // the last step whose chunk sits in this rank's slot
  std::atomic<uint64_t> pid, pid_namespace;   // written once, when the rank maps the segment (0 before)
  uint64_t call_numel[2], call_dtype[2];      // the call a step belongs to, by step parity
  uint64_t unused[9];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free, "the flags must be lock-free to work across processes");
static_assert(offsetof(Header, abort_word) == 64 && sizeof(RankControl) == 128, "layout differs from the Python side");

enum AbortReason : uint64_t { kAbortCalled = 1, kTimedOut = 2, kPeerDied = 3, kMismatch = 4, kClosed = 5 };
enum DtypeCode : uint64_t { kFloat32 = 1, kBFloat16 = 2 };

// reason | who noticed (rank + 1) << 8 | whom it concerns (rank + 1) << 16: enough for every rank
// to say why, not only that, the collective ended.
uint64_t encode_abort(uint64_t reason, int64_t origin, int64_t subject) {
  return reason | uint64_t(origin + 1) << 8 | uint64_t(subject + 1) << 16;
}

// The first word written wins, so every rank reports the original cause. Returns the word in force.
uint64_t raise_abort(Header* header, uint64_t word) {
  uint64_t expected = 0;
  header->abort_word.compare_exchange_strong(expected, word, std::memory_order_acq_rel);
  return expected == 0 ? word : expected;
}

struct Segment {
  Header* header;
  RankControl* control;
  uint8_t* data;
  int64_t world_size, slot_bytes;

  // Two slots per rank, chosen by the step's parity: a rank writes step s + 2's chunk into the slot
  // of step s only after seeing every rank publish step s + 1, that is after every rank finished
  // reading step s.
  uint8_t* slot(uint64_t step, int64_t rank) const {
    return data + (int64_t(step & 1) * world_size + rank) * slot_bytes;
  }
};

Segment view_segment(const torch::Tensor& segment) {
  TORCH_CHECK(segment.scalar_type() == torch::kUInt8 && segment.is_contiguous() && segment.device().is_cpu(),
              "segment must be the mapped shared memory as a contiguous uint8 CPU tensor");
  TORCH_CHECK(segment.numel() >= 2 * kPage, "segment too small");
  auto* base = segment.data_ptr<uint8_t>();
  auto* header = reinterpret_cast<Header*>(base);
  TORCH_CHECK(header->magic == kMagic, "not an all-reduce segment (bad magic)");
  const auto world = int64_t(header->world_size), slot_bytes = int64_t(header->slot_bytes);
  const int64_t control_bytes = (world * int64_t(sizeof(RankControl)) + kPage - 1) / kPage * kPage;
  TORCH_CHECK(world >= 1 && slot_bytes % kPage == 0 && slot_bytes > 0 &&
                  segment.numel() >= kPage + control_bytes + 2 * world * slot_bytes,
              "segment header disagrees with the segment's size");
  return {header, reinterpret_cast<RankControl*>(base + kPage), base + kPage + control_bytes, world, slot_bytes};
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// A process that died, as far as this one can see: gone (ESRCH), or killed and not yet reaped by its
// parent (a zombie still answers kill(pid, 0)). Anything uncertain counts as alive; the deadline
// remains for those.
bool process_gone(pid_t pid) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return true;
  char path[64], line[512];
  std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  FILE* stat = std::fopen(path, "r");
  if (!stat) return false;
  const bool read = std::fgets(line, sizeof line, stat) != nullptr;
  std::fclose(stat);
  const char* name_end = read ? std::strrchr(line, ')') : nullptr;  // the state follows "(comm) "
  return name_end && name_end[1] == ' ' && (name_end[2] == 'Z' || name_end[2] == 'X');
}

// The first rank that has not published `step` and whose process died, or -1. Only ranks in this
// rank's pid namespace are judged: elsewhere the pid names another process.
int64_t first_dead_laggard(const Segment& seg, int64_t rank, uint64_t step) {
  const uint64_t own_namespace = seg.control[rank].pid_namespace.load(std::memory_order_relaxed);
  for (int64_t r = 0; r < seg.world_size; ++r) {
    const RankControl& peer = seg.control[r];
    const uint64_t pid = peer.pid.load(std::memory_order_relaxed);
    if (peer.published_step.load(std::memory_order_acquire) >= step || pid == 0) continue;
    if (own_namespace != 0 && peer.pid_namespace.load(std::memory_order_relaxed) == own_namespace &&
        process_gone(pid_t(pid)))
      return r;
  }
  return -1;
}

int64_t first_laggard(const Segment& seg, uint64_t step) {
  for (int64_t r = 0; r < seg.world_size; ++r)
    if (seg.control[r].published_step.load(std::memory_order_acquire) < step) return r;
  return -1;
}

// Waits until every rank published `step`: spins briefly (peers on other cores arrive within
// microseconds), then yields the core (ranks may outnumber cores, and a spinning waiter would starve
// the very peer it waits for), then sleeps in short naps (a peer that is milliseconds late is busy
// elsewhere; no need to burn a core on it). Returns 0, or the abort word that ended the wait.
uint64_t wait_for_step(const Segment& seg, int64_t rank, uint64_t step, double timeout_s) {
  using Clock = std::chrono::steady_clock;
  constexpr int kSpinPolls = 256;  // a few microseconds
  constexpr auto kYieldFor = std::chrono::milliseconds(1), kLivenessEvery = std::chrono::milliseconds(100);
  constexpr timespec kNap{0, 50000};
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  auto next_liveness_check = start + kLivenessEvery;
  for (int polls = 0;; ++polls) {
    if (first_laggard(seg, step) < 0) return 0;
    if (const uint64_t word = seg.header->abort_word.load(std::memory_order_acquire)) return word;
    if (polls < kSpinPolls) {
      cpu_relax();
      continue;
    }
    const auto now = Clock::now();
    if (now >= deadline) return raise_abort(seg.header, encode_abort(kTimedOut, rank, first_laggard(seg, step)));
    if (now >= next_liveness_check) {
      next_liveness_check = now + kLivenessEvery;
      const int64_t dead = first_dead_laggard(seg, rank, step);
      if (dead >= 0) return raise_abort(seg.header, encode_abort(kPeerDied, rank, dead));
    }
    if (now - start < kYieldFor) {
      sched_yield();
    } else {
      nanosleep(&kNap, nullptr);
    }
  }
}

// The rank whose step belongs to another call than this rank's (other size or dtype), or -1.
int64_t first_disagreeing_rank(const Segment& seg, uint64_t step, uint64_t numel, uint64_t dtype) {
  const int parity = int(step & 1);
  for (int64_t r = 0; r < seg.world_size; ++r)
    if (seg.control[r].call_numel[parity] != numel || seg.control[r].call_dtype[parity] != dtype) return r;
  return -1;
}

inline float widen(float value) { return value; }
inline float widen(uint16_t bfloat16_bits) {
  const uint32_t bits = uint32_t(bfloat16_bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// float32 -> bfloat16 rounding to nearest even, any NaN to 0xFFFF: what torch's vectorised conversion
// (tensor.to(torch.bfloat16) on x86) gives, so results equal all_reduce_reference's bit for bit.
// Branch-free, so the loop vectorises.
inline void narrow(float value, float* out) { *out = value; }
inline void narrow(float value, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const auto rounded = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  *out = value != value ? uint16_t(0xFFFF) : rounded;
}

// out[i] = ((slot_0[i] + slot_1[i]) + slot_2[i]) + ... in float32: the same operations in the same
// order on every rank, hence bit-identical results. A block of sums stays in L1 while slots stream.
template <typename T>
void sum_slots_in_rank_order(const Segment& seg, uint64_t step, int64_t count, T* out) {
  constexpr int64_t kBlock = 1024, kGrain = 32768;
  at::parallel_for(0, (count + kBlock - 1) / kBlock, kGrain / kBlock, [&](int64_t first_block, int64_t end_block) {
    alignas(64) float sums[kBlock];
    for (int64_t block = first_block; block < end_block; ++block) {
      const int64_t begin = block * kBlock, n = std::min(kBlock, count - begin);
      const T* first = reinterpret_cast<const T*>(seg.slot(step, 0)) + begin;
      for (int64_t i = 0; i < n; ++i) sums[i] = widen(first[i]);
      for (int64_t r = 1; r < seg.world_size; ++r) {
        const T* slot = reinterpret_cast<const T*>(seg.slot(step, r)) + begin;
        for (int64_t i = 0; i < n; ++i) sums[i] += widen(slot[i]);
      }
      for (int64_t i = 0; i < n; ++i) narrow(sums[i], out + begin + i);
    }
  });
}

void copy_in_parallel(uint8_t* to, const uint8_t* from, int64_t bytes) {
  constexpr int64_t kGrain = 128 << 10;
  at::parallel_for(0, bytes, kGrain, [&](int64_t begin, int64_t end) { std::memcpy(to + begin, from + begin, end - begin); });
}

template <typename T>
uint64_t all_reduce_steps(const Segment& seg, int64_t rank, T* values, int64_t numel, uint64_t dtype, double timeout_s) {
  RankControl& own = seg.control[rank];
  const int64_t per_step = seg.slot_bytes / int64_t(sizeof(T));
  uint64_t step = own.published_step.load(std::memory_order_relaxed);  // only this rank writes it
  for (int64_t begin = 0; begin < numel; begin += per_step) {
    ++step;
    const int64_t count = std::min(per_step, numel - begin);
    copy_in_parallel(seg.slot(step, rank), reinterpret_cast<const uint8_t*>(values + begin), count * int64_t(sizeof(T)));
    own.call_numel[step & 1] = uint64_t(numel);
    own.call_dtype[step & 1] = dtype;
    own.published_step.store(step, std::memory_order_release);  // the chunk and its call, then the step
    if (const uint64_t word = wait_for_step(seg, rank, step, timeout_s)) return word;
    const int64_t other = first_disagreeing_rank(seg, step, uint64_t(numel), dtype);
    if (other >= 0) return raise_abort(seg.header, encode_abort(kMismatch, rank, other));
    sum_slots_in_rank_order(seg, step, count, values + begin);
  }
  return 0;
}

}  // namespace

// Sums `tensor` over the ranks in place. Returns 0, or the segment's abort word when the collective
// ended without a result (the caller raises); `tensor` is then partly reduced.
int64_t shm_all_reduce_(torch::Tensor segment, torch::Tensor tensor, int64_t rank, double timeout_s) {
  const Segment seg = view_segment(segment);
  TORCH_CHECK(rank >= 0 && rank < seg.world_size, "rank ", rank, " outside the segment's ", seg.world_size, " ranks");
  TORCH_CHECK(tensor.device().is_cpu() && tensor.is_contiguous(), "tensor must be contiguous on the CPU");
  if (const uint64_t word = seg.header->abort_word.load(std::memory_order_acquire)) return int64_t(word);
  switch (tensor.scalar_type()) {
    case torch::kFloat32:
      return int64_t(all_reduce_steps(seg, rank, tensor.data_ptr<float>(), tensor.numel(), kFloat32, timeout_s));
    case torch::kBFloat16:
      return int64_t(all_reduce_steps(seg, rank, reinterpret_cast<uint16_t*>(tensor.data_ptr<at::BFloat16>()),
                                      tensor.numel(), kBFloat16, timeout_s));
    default:
      TORCH_CHECK(false, "shm_all_reduce_ takes float32 or bfloat16, got ", tensor.scalar_type());
  }
}

// Ends the collective for every rank (reason: an AbortReason, rank: who ends it). Returns the abort
// word in force, which is an earlier one if some rank ended it first.
int64_t shm_abort(torch::Tensor segment, int64_t reason, int64_t rank) {
  const Segment seg = view_segment(segment);
  return int64_t(raise_abort(seg.header, encode_abort(uint64_t(reason), rank, rank)));
}
